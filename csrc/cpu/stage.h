// Staged line loops for float16, used by the passes of bn_lines.h where the CPU cannot convert
// in registers (csrc/cpu/in_registers.h) or under CNNKERN_CPU_IN_REGISTERS=0: a
// loop over elements [k0, k1) of some lines runs a chunk of them at a time, its float16 lines
// read from and written to float buffers that are converted a chunk at a time (halves_to_floats
// and floats_to_halves). Element by element, the conversions took most of the float16 kernels'
// time; the buffers of a chunk stay in L1.
//
// A loop runs as stage.for_chunks(k0, k1, body): body(c0, c1) builds its element function
// through the pass's line function, which wraps the tensors' lines: stage.in(line) for those
// it reads, stage.out(line) for those it writes (written with store()). NoStage, for every
// other element type or stride, returns the lines as they are and runs the loop in one chunk.
#pragma once
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <type_traits>
#include <utility>

#include "cpu/element_cast.h"
#include "cpu/line.h"

namespace cnnkern::cpu {

// Elements [k0, k1) of a line, in a buffer: element k at p[k - k0].
template <typename T>
struct ChunkLine {
  T* p;
  int64_t k0;
  T& operator[](int64_t k) const { return p[k - k0]; }
};

// line[k] = v, rounded to the line's element type.
template <typename L, typename A>
void store(const L& line, int64_t k, A v) {
  auto& element = line[k];
  element = from_acc<std::remove_reference_t<decltype(element)>>(v);
}

// The inner loops of the passes (bn_lines.h) over elements [c0, c1) of a chunk, element by
// element: elem(k) is the pass's element function (of a line, or of 4 lines: e[0..3]), which
// yields a pair of acc_t in the sums. The stages that hand the loops elements one at a time
// (NoStage, Stage) share them; InRegisters (csrc/cpu/in_registers.h) has its own.
struct ElementLoops {
  // elem(k) for every k: the elementwise passes.
  template <typename E>
  static void apply(const E& elem, int64_t c0, int64_t c1) {
#pragma omp simd
    for (int64_t k = c0; k < c1; ++k) elem(k);
  }

  // a[k] += elem(k).first and b[k] += elem(k).second.
  template <typename E, typename A>
  static void add_pairs(const E& elem, A* a, A* b, int64_t c0, int64_t c1) {
#pragma omp simd
    for (int64_t k = c0; k < c1; ++k) {
      const std::pair<A, A> ab = elem(k);  // (a structured binding defeats GCC's if-conversion)
      a[k] += ab.first;
      b[k] += ab.second;
    }
  }

  // The same for the sum of 4 lines' elements, (e[0] + e[1]) + (e[2] + e[3]).
  template <typename E, typename A>
  static void add_pairs4(const std::array<E, 4>& e, A* a, A* b, int64_t c0, int64_t c1) {
#pragma omp simd
    for (int64_t k = c0; k < c1; ++k) {
      const std::pair<A, A> p0 = e[0](k), p1 = e[1](k), p2 = e[2](k), p3 = e[3](k);
      a[k] += (p0.first + p1.first) + (p2.first + p3.first);
      b[k] += (p0.second + p1.second) + (p2.second + p3.second);
    }
  }

  // a[v] += elem(k).first and b[v] += elem(k).second, v = (k - c0) % kLanes: independent partial
  // sums, so that the adds pipeline instead of each waiting on the last.
  template <int64_t kLanes, typename E, typename A>
  static void add_pairs_to_lanes(const E& elem, A* a, A* b, int64_t c0, int64_t c1) {
    int64_t k = c0;
    for (; k + kLanes <= c1; k += kLanes) {
#pragma omp simd
      for (int64_t v = 0; v < kLanes; ++v) {
        const std::pair<A, A> ab = elem(k + v);
        a[v] += ab.first;
        b[v] += ab.second;
      }
    }
    for (int64_t v = 0; k + v < c1; ++v) {
      const std::pair<A, A> ab = elem(k + v);
      a[v] += ab.first;
      b[v] += ab.second;
    }
  }
};

// The lines of a loop as they are, in one chunk: the stages that buffer nothing (NoStage,
// InRegisters).
struct Unchunked {
  template <typename F>
  void for_chunks(int64_t k0, int64_t k1, const F& f) {
    f(k0, k1);
  }
  template <typename L>
  L in(const L& line) const {
    return line;
  }
  template <typename L>
  L out(const L& line) const {
    return line;
  }
};

// The lines of one loop as they are, element by element.
struct NoStage : Unchunked, ElementLoops {};

// Elements per line in a chunk: a multiple of the lane counts of the sums (bn_lines.h), so
// that chunks leave their lanes as one pass over the line would.
// - The forwards take 512, which beat 1024 by up to 1.3x (bench.ab, float16, 2-core AMD EPYC,
//   32 KB L1d: 16 slots of 1024 floats overflow L1); with 256 they took 0.91-1.14x the time,
//   slower on most shapes.
// - The backward's passes, which stage 4 or 5 tensors a chunk, take 256: against 512, 0.78-0.87x
//   the time at 32x64x56x56 (both layouts) and 16x256x28x28 channels_last, 0.94-1.11x on
//   shapes that fit the caches (alternating calls in one process; bench/NOTES.md).
constexpr int64_t kForwardChunk = 512;
constexpr int64_t kBackwardChunk = 256;

// float16 lines of unit stride (Line<c10::Half, Unit>), kChunk elements at a time.
template <int64_t kChunkSize>
class Stage : public ElementLoops {
 public:
  static constexpr int64_t kChunk = kChunkSize;
  // Lines per chunk: the most a loop touches is 4 lines (a group) of 4 tensors.
  static constexpr int kSlots = 16;

  Stage() = default;
  Stage(const Stage&) = delete;
  Stage& operator=(const Stage&) = delete;

  // Calls f(c0, c1) for the chunks [c0, c1) of [k0, k1) in order; f wraps its lines with
  // in() and out(), and what it wrote through out() is converted when it returns.
  template <typename F>
  void for_chunks(int64_t k0, int64_t k1, const F& f) {
    for (k0_ = k0; k0_ < k1; k0_ += kChunk) {
      size_ = std::min(kChunk, k1 - k0_);
      used_ = outputs_ = 0;
      f(k0_, k0_ + size_);
      for (int i = 0; i < outputs_; ++i) floats_to_halves(pending_[i].values, pending_[i].dst, size_);
    }
  }

  // A line the loop reads; an absent tensor's (a null line) is never read, and stays null.
  template <typename S>
  ChunkLine<const float> in(const Line<const c10::Half, S>& line) {
    static_assert(S::value == 1, "staged lines have unit stride");
    if (line.p == nullptr) return {nullptr, k0_};
    float* slot = take();
    halves_to_floats(line.p + k0_, slot, size_);
    return {slot, k0_};
  }

  // A line the loop writes (every element of the chunk).
  template <typename S>
  ChunkLine<float> out(const Line<c10::Half, S>& line) {
    static_assert(S::value == 1, "staged lines have unit stride");
    if (line.p == nullptr) return {nullptr, k0_};
    float* slot = take();
    pending_[outputs_++] = {slot, line.p + k0_};
    return {slot, k0_};
  }

 private:
  float* take() {
    TORCH_INTERNAL_ASSERT(used_ < kSlots);
    return buffer_.data() + kChunk * used_++;
  }

  struct Output {
    const float* values;
    c10::Half* dst;
  };
  alignas(64) std::array<float, kChunk * kSlots> buffer_;
  std::array<Output, kSlots> pending_;
  int64_t k0_ = 0, size_ = 0;
  int used_ = 0, outputs_ = 0;
};

// bfloat16 lines of unit stride where the CPU cannot convert them in registers: element by
// element, as NoStage (bfloat16's conversions vectorize as they are). kChunk serves the stage
// that rounds their outputs a chunk at a time where the CPU can (csrc/cpu/bfloat16_outputs.h).
template <int64_t kChunkSize>
struct BFloat16Lines : NoStage {
  static constexpr int64_t kChunk = kChunkSize;
};

// float32 lines of unit stride: element by element, as NoStage (GCC vectorizes them), but in the
// elementwise passes of ops too large for the caches, whose outputs the Streamed stage stores
// around them (csrc/cpu/streamed.h).
struct Float32Lines : NoStage {};

// Whether St serves 16-bit lines of unit stride (float16's Stage, BFloat16Lines): the lines
// that convert in registers instead where the CPU can (converts_in_registers()).
template <typename St>
constexpr bool kSixteenBitLines = false;
template <int64_t kChunk>
constexpr bool kSixteenBitLines<Stage<kChunk>> = true;
template <int64_t kChunk>
constexpr bool kSixteenBitLines<BFloat16Lines<kChunk>> = true;

// Whether St serves bfloat16 lines of unit stride (BFloat16Lines).
template <typename St>
constexpr bool kBFloat16Lines = false;
template <int64_t kChunk>
constexpr bool kBFloat16Lines<BFloat16Lines<kChunk>> = true;

}  // namespace cnnkern::cpu

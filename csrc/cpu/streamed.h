// The passes of float32 ops too large for the caches that write (the elementwise passes, and the
// backward's sums where they store grad_residual): their outputs stored around the caches
// (non-temporal stores), 8 values a step, where an op's tensors exceed the last-level cache
// (streams_outputs, bn_lines.h).
//
// A store through the cache first reads its cache line from memory, only to overwrite it, and
// the cache writes it back later: 2 units of traffic for a written tensor, where a streamed store
// moves 1. Alternating calls in one process (2-core AMD EPYC, 32 MB L3; bench/NOTES.md), streamed
// over cached: at 32x64x56x56 (25.7 MB a tensor) the training forward + backward 0.83-0.85x the
// time in both layouts, channels_last eval 0.64-0.68x; at 16x256x28x28 backward 0.87-0.92x.
// bfloat16 took 1.06-1.22x streamed in an earlier form of these loops, and 0.95-1.13x in this one
// (32x64x56x56 and 32x128x56x56): 16-bit lines do not stream.
#pragma once
#include "cpu/element_cast.h"

#ifdef CNNKERN_IN_REGISTERS
#include <algorithm>
#include <cstdint>
#include <utility>

#include "cpu/in_registers.h"
#include "cpu/line.h"

namespace cnnkern::cpu {

// Lines shorter than this stream nothing: a loop's single elements at either end and its cache
// lines shared with the next line's weigh on a short one. NCHW 14x14 lines (196 floats) ran the
// backward with residual at 16x1024x14x14 1.09-1.11x slower streamed; 28x28 lines (784) at
// 16x256x28x28 0.87-0.91x.
constexpr int64_t kStreamedLine = 256;

// An output line of the Streamed stage: its 8-value steps from k_begin to k_end, the whole cache
// lines among its loop's elements, are stored around the caches; the rest of it through them.
struct StreamedLine {
  float* p;
  int64_t k_begin, k_end;
  float& operator[](int64_t k) const { return p[k]; }
};

CNNKERN_AVX2_F16C inline void store8(const StreamedLine& line, int64_t k, __m256 v) {
  if (k >= line.k_begin && k + 8 <= line.k_end) {
    _mm256_stream_ps(line.p + k, v);
  } else {
    _mm256_storeu_ps(line.p + k, v);
  }
}

// Output line p, written by a loop over its elements [k0, k1) in steps of 8 that fall 32-byte
// aligned: streamed over the whole cache lines among those elements. One written partly around
// the cache and partly through it (by a neighbouring line's loop, or this loop's single elements)
// would be read in and evicted again.
inline StreamedLine streamed_line(float* p, int64_t k0, int64_t k1) {
  constexpr int64_t kCacheLine = 64 / sizeof(float);  // elements
  const int64_t skew = static_cast<int64_t>(reinterpret_cast<uintptr_t>(p) % 64 / sizeof(float));
  return {p, (k0 + skew + kCacheLine - 1) / kCacheLine * kCacheLine - skew, (k1 + skew) / kCacheLine * kCacheLine - skew};
}

// The stage of an elementwise pass over float32 lines of unit stride (Float32Lines,
// csrc/cpu/stage.h) whose outputs stream. Its loop is InRegisters::apply's, but that it takes
// single elements up to where the first output line it handed out falls aligned to 8 values, and
// its last few: no step stores over another. Only the cache lines that a loop's elements fill
// stream (streamed_line). (A first form that streamed them all, and reloaded its element function
// after every store, ran the backward at NCHW 16x1024x14x14, lines of 196 floats, 1.13-1.43x
// slower than cached stores.)
class Streamed : public Unchunked {
 public:
  Streamed() = default;
  Streamed(const Streamed&) = delete;
  Streamed& operator=(const Streamed&) = delete;
  // Streamed stores are weakly ordered: fenced before the thread's part of the pass ends.
  ~Streamed() { _mm_sfence(); }

  // The loop over [k0, k1), in one chunk: out() needs its elements.
  template <typename F>
  void for_chunks(int64_t k0, int64_t k1, const F& f) {
    k0_ = k0;
    k1_ = k1;
    f(k0, k1);
  }

  // The loop's steps fall where the first output line's 8 values are aligned (apply): another
  // output line streams only where its steps do too.
  StreamedLine out(const Line<float, Unit>& line) {
    if (line.p == nullptr) return {nullptr, 0, 0};  // an absent output, never written
    const uintptr_t address = reinterpret_cast<uintptr_t>(line.p);
    if (first_out_ == 0) first_out_ = address;
    if ((address - first_out_) % sizeof(__m256) != 0) return {line.p, 0, 0};
    return streamed_line(line.p, k0_, k1_);
  }

  template <typename E>
  CNNKERN_AVX2_F16C void apply(const E& elem_ref, int64_t c0, int64_t c1) {
    const E elem = elem_ref;  // a local, in registers: the stores could alias the caller's
    int64_t k = c0;
    for (const int64_t head = std::min(c1, c0 + unaligned(c0)); k < head; ++k) elem(k);
#pragma GCC unroll 4
    for (; k + 8 <= c1; k += 8) elem.eight(k);
    for (; k < c1; ++k) elem(k);
  }

 private:
  // Elements from k on before the first output line's next 8-value boundary (0 where the loop
  // has no output); read once per loop.
  int64_t unaligned(int64_t k) {
    const uintptr_t line = std::exchange(first_out_, 0);
    if (line == 0) return 0;
    const uintptr_t address = line + k * sizeof(float);
    return static_cast<int64_t>((sizeof(__m256) - address % sizeof(__m256)) % sizeof(__m256) / sizeof(float));
  }

  int64_t k0_ = 0, k1_ = 0;
  uintptr_t first_out_ = 0;
};

// The stage of a reduction pass over float32 lines of unit stride that also writes one (the
// backward's sums, storing grad_residual as they read), in an op whose outputs stream: InRegisters'
// sum loops, 8 values a step from the loop's first element, so the same lanes add the same values
// in the same order as Float32Lines' loops (the same bits). Its output lines stream where those
// steps fall 32-byte aligned; elsewhere they are stored through the cache.
class StreamedSums : public InRegisters {
 public:
  StreamedSums() = default;
  StreamedSums(const StreamedSums&) = delete;
  StreamedSums& operator=(const StreamedSums&) = delete;
  ~StreamedSums() { _mm_sfence(); }  // as Streamed's

  template <typename F>
  void for_chunks(int64_t k0, int64_t k1, const F& f) {
    k0_ = k0;
    k1_ = k1;
    f(k0, k1);
  }

  StreamedLine out(const Line<float, Unit>& line) const {
    if (line.p == nullptr) return {nullptr, 0, 0};
    if (reinterpret_cast<uintptr_t>(line.p + k0_) % sizeof(__m256) != 0) return {line.p, 0, 0};
    return streamed_line(line.p, k0_, k1_);
  }

 private:
  int64_t k0_ = 0, k1_ = 0;
};

}  // namespace cnnkern::cpu
#endif

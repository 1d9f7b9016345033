// What the CPU kernels of the batch-norm family share: bn_forward.cpp (y =
// act(batch_norm(x) + residual), training and eval) and bn_backward.cpp. The
// contract (shapes, dtypes, math) is in csrc/ops.cpp and csrc/bn_checks.h.
//
// Every pass walks the (N, C, L) index space as lines along the input's
// unit-stride dim: along L for NCHW (the channel is fixed on a line), along C
// for channels_last (the channel is the position on the line). Each tensor is
// addressed with its own strides, so channel slices, mixed layouts and stride-0
// gradients need no copy; the common case, where every tensor has unit stride
// along the lines, gets its own instantiation, whose line loops vectorize. Short
// lines that lie end to end in every tensor are merged into longer, flat ones
// (Walk::has_flat_lines): a sample's short NCHW lines, or runs of a sample's
// channels_last positions.
//
// Training forward reads the input twice (statistics, then normalize), the
// backward reads its inputs twice (reductions, then grad_input; with a ReLU
// and grad_residual wanted, the first pass writes grad_residual and the second
// reads it instead of grad_output and output); per-channel work in between is
// O(C). Along L, a thread takes blocks of channels through both passes, so that
// the second reads what the first left in its cache (by_channel_blocks).
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <initializer_list>
#include <limits>
#include <numeric>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include <unistd.h>

#include "bn_checks.h"
#include "cpu/bfloat16_outputs.h"
#include "cpu/element_cast.h"
#include "cpu/in_registers.h"
#include "cpu/line.h"
#include "cpu/stage.h"
#include "cpu/streamed.h"

namespace cnnkern::cpu {

// ---- walking (N, C, L) as lines ---------------------------------------------

// The stage of the line loops of a pass over scalar_t tensors whose line strides are TS
// (csrc/cpu/stage.h): float16 lines of unit stride are converted kChunk elements at a time,
// bfloat16 ones element by element, or either in registers where the CPU can (for_each_element,
// channel_sums), bfloat16 with its outputs rounded kChunk at a time where the CPU has AVX512-BF16;
// float32 ones element by element, or 8 values a step with their outputs streamed where an op is
// too large for the caches (for_each_element).
template <typename scalar_t, typename TS, int64_t kChunk = kForwardChunk>
using StageFor = std::conditional_t<
    std::is_same_v<TS, Unit>,
    std::conditional_t<
        std::is_same_v<scalar_t, c10::Half>, Stage<kChunk>,
        std::conditional_t<std::is_same_v<scalar_t, c10::BFloat16>, BFloat16Lines<kChunk>,
                           std::conditional_t<std::is_same_v<scalar_t, float>, Float32Lines, NoStage>>>,
    NoStage>;

// Whether scalar_t's lines of unit stride convert in registers (csrc/cpu/in_registers.h).
template <typename scalar_t>
bool unit_lines_in_registers() {
  return kSixteenBitLines<StageFor<scalar_t, Unit>> && converts_in_registers();
}

// A tensor (or a per-channel array) as lines (n, j), j < J.
template <typename T, typename S>
struct Lines {
  T* data;
  int64_t s_n, s_j;
  S stride;
  Line<T, S> line(int64_t n, int64_t j) const {
    if constexpr (std::is_same_v<S, Bcast>) {
      return {data[n * s_n + j * s_j]};
    } else {
      return {data + n * s_n + j * s_j, stride};
    }
  }
};

// Lines are cut into segments of at most kSegment elements, the unit of parallel
// work: a few long lines (C = 1, large L) still spread over all threads.
constexpr int64_t kSegment = 4096;
// The forward's statistics along C take whole lines this many at a time
// (Walk::for_line_groups): the per-channel partials are then loaded and stored once
// per group. One line at a time, each partial's store-to-load chain from line to
// line paced the loop. A group's lines lie a quarter of the thread's lines apart, four
// long streams: adjacent lines (2 KB apart at 64 channels) came from DRAM at about half the
// rate of a plain sum. With them the training forward at 32x64x56x56 channels_last took
// 1.23-1.35x as long in float32, bfloat16 1.12x (1.35x at 32x128x56x56), 1.05-1.18x in the
// caches; float16, whose stage reads a line's chunk at a time, ran level (bench/NOTES.md).
// Passes over several tensors stay one line at a time: grouped, their 4 x (3 to 5) streams
// made them slower (elementwise, bwd_add_relu 16x64x28x28 0.28 -> 0.40 ms; the backward's
// sums with grad_residual, 32x64x56x56, 3.0 -> 4.1 ms; its sums without, in groups of
// adjacent lines 1.17x, of spread ones 1.06x).
constexpr int64_t kLineGroup = 4;

// Lines along L of at most this many elements (8x8 and smaller) are summed by
// sum_short_lines_along_l. Line by line, the fold of each line's lanes took longer than its
// few vector steps: the training forward's statistics at 16x1024x7x7 ran slower than
// torch.compile's. Past 8x8 the two ways ran alike (bench/NOTES.md).
constexpr int64_t kShortLine = 64;
// Short lines are taken channels side by side, in runs of about this many elements: their
// lines lie end to end in each sample, a stream the prefetcher follows (runs of 512 made the
// backward's sums at 7x7 slower than line by line), and a run's expanded per-channel arrays
// (for_flat_runs) stay in L1.
constexpr int64_t kShortRun = 2048;
// Lines along L of at most this many elements (6x6 and smaller) are walked as one line per
// sample (Walk::flat_lines) where the layout allows: the eval forward at 16x2048x3x3 NCHW
// took 0.12 ms line by line, 0.05 ms so; at 6x6 the two ways ran level, at 7x7 and 8x8 the
// flat lines were 6-11% slower (bench/NOTES.md).
constexpr int64_t kFlatLine = 36;
// The same for 16-bit lines that convert in registers (7x7 and smaller): their loop is a call
// per line, and at 7x7 the flat lines ran the float16 passes at 0.59-0.86 of line by line
// (float32 at 0.90-1.14: kFlatLine stays).
constexpr int64_t kFlatLineInRegisters = 49;
// Walk::flat_lines needs at least this many samples to repay its expanded per-channel arrays.
constexpr int64_t kFlatSamples = 4;
// Lines along C are walked as runs of consecutive positions (Walk::position_runs) of at most
// this many elements, where the layout allows and a run holds two positions or more: each
// line's own loop (8 vector steps at C = 64) and, in float16, its own conversions, merged into
// one. One run is one chunk of the forwards' float16 stage (two of the backward's).
constexpr int64_t kPositionRun = 512;
static_assert(kPositionRun <= kForwardChunk, "a run of positions is one chunk of the forwards' float16 stage");

// Lines run along the dim that loads contiguously: L for NCHW, C for
// channels_last and whenever L == 1; for other strides, the smaller one.
inline bool walk_along_c(const Strided3d& x) {
  if (x.L == 1 || x.C == 1) return x.L == 1;
  if (x.sL == 1 || x.sC == 1) return x.sC == 1;
  return x.sC < x.sL;
}

// Lines (n, j) for n < N, each `len` elements long: j = channel and len = L
// when walking along L, j = spatial index and len = C along C (on flat lines, j
// indexes the flat lines of a sample). A walk covers channels [c0, c0 + nc): all
// of them, or along L a block of them (channels()).
struct Walk {
  bool along_c;
  int64_t N, C, J, len, segs;
  int64_t M;       // values per channel: N * L
  int64_t c0, nc;  // the channels covered
  int64_t j0;      // first line index: c0 along L, 0 along C
  // Flat lines (flat_lines, position_runs) are contiguous runs of elements in every tensor, each
  // `positions` positions long; along a flat line, the channel (c0 + k / rep % nc) changes every
  // `rep` elements, and per-channel arrays are read expanded (expand_channels).
  bool flat = false;
  int64_t positions = 1, rep = 1;
  // What the op's tensors hold in all (the op sets it): past the last-level cache, float32
  // passes store their outputs around the caches (streams_outputs) and bfloat16 outputs round
  // in registers (rounds_bfloat16_natively).
  int64_t op_bytes = 0;

  explicit Walk(const Strided3d& x)
      : along_c(walk_along_c(x)),
        N(x.N),
        C(x.C),
        J(along_c ? x.L : x.C),
        len(along_c ? x.C : x.L),
        segs((len + kSegment - 1) / kSegment),
        M(x.N * x.L),
        c0(0),
        nc(x.C),
        j0(0) {}

  // The same walk over channels [begin, end) (along L only: along C every line holds every channel).
  Walk channels(int64_t begin, int64_t end) const {
    TORCH_INTERNAL_ASSERT(!along_c && 0 <= begin && begin < end && end <= C);
    Walk part = *this;
    part.c0 = part.j0 = begin;
    part.nc = part.J = end - begin;
    return part;
  }

  int64_t items() const { return N * J * segs; }
  // Segments per parallel chunk: about GRAIN_SIZE elements, so small tensors stay on one thread.
  int64_t grain() const { return std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::min(len, kSegment)); }

  int64_t line_stride_of(const Strided3d& v) const { return flat ? 1 : along_c ? v.sC : v.sL; }

  // Short lines are merged into flat lines where every one of `tensors` holds them end to end:
  // - along L (flat_lines), each sample's lines of the covered channels (channel stride L and
  //   position stride 1): each line's own loop (a few vector steps at 3x3) merged into one.
  //   Past a few samples the per-channel arrays' expansion costs less than the lines' loops;
  // - along C (position_runs), runs of a sample's positions (channel stride 1 and position
  //   stride C), where a run holds two positions or more.
  bool has_flat_lines(std::initializer_list<const at::Tensor*> tensors, int64_t max_line = kFlatLine) const {
    if (flat) return false;
    if (along_c ? run_positions() < 2 : len > max_line || N < kFlatSamples) return false;
    return std::all_of(tensors.begin(), tensors.end(), [&](const at::Tensor* t) {
      if (!t->defined()) return true;
      const Strided3d v = view3d(*t, "tensor");
      return along_c ? v.sC == 1 && v.sL == len : v.sL == 1 && v.sC == len;
    });
  }

  // Along L, the same elements as one line per sample, nc * L long, where has_flat_lines. The
  // lines carry the channel along them, as along C. For elementwise passes only: the sums
  // along L hold a channel per line.
  Walk flat_lines() const {
    TORCH_INTERNAL_ASSERT(!along_c && !flat);
    Walk lines = *this;
    lines.along_c = lines.flat = true;
    lines.J = 1;
    lines.j0 = 0;
    lines.positions = lines.rep = len;
    lines.len = nc * len;
    lines.segs = (lines.len + kSegment - 1) / kSegment;
    return lines;
  }

  // Along C, the positions of a line of a run: the most that divides L and fits kPositionRun.
  int64_t run_positions() const {
    TORCH_INTERNAL_ASSERT(along_c);
    int64_t m = std::max<int64_t>(1, std::min(J, kPositionRun / len));
    while (J % m != 0) --m;
    return m;
  }

  // Along C, the same elements as lines of run_positions() positions, where has_flat_lines.
  Walk position_runs() const {
    TORCH_INTERNAL_ASSERT(along_c && !flat);
    Walk lines = *this;
    lines.flat = true;
    lines.positions = run_positions();
    lines.J = J / lines.positions;
    lines.len = lines.positions * len;
    lines.segs = 1;
    return lines;
  }

  // The channel of element k of a line, relative to c0.
  int64_t channel_of(int64_t k) const { return k / rep % nc; }

  // Calls f(n, j, k_begin, k_end) for the segments [begin, end) in order.
  template <typename F>
  void for_segments(int64_t begin, int64_t end, const F& f) const {
    int64_t seg = begin % segs, j = begin / segs % J, n = begin / segs / J;
    for (int64_t i = begin; i < end; ++i) {
      const int64_t k0 = seg * kSegment;
      f(n, j0 + j, k0, std::min(k0 + kSegment, len));
      if (++seg == segs) {
        seg = 0;
        if (++j == J) j = 0, ++n;
      }
    }
  }

  // Calls group(i, stride) for groups of kLineGroup whole lines, segments i + g * stride for
  // g < kLineGroup (when every line is one segment, line_of(i) names segment i's line): the
  // segments [begin, end) cut into kLineGroup equal runs, walked side by side. Then
  // f(n, j, k0, k1) for the segments left.
  template <typename G, typename F>
  void for_line_groups(int64_t begin, int64_t end, const G& group, const F& f) const {
    if (segs == 1) {
      const int64_t stride = (end - begin) / kLineGroup;
      for (int64_t i = begin; i < begin + stride; ++i) group(i, stride);
      begin += kLineGroup * stride;
    }
    for_segments(begin, end, f);
  }

  // The (n, j) of segment i when every line is one segment.
  std::pair<int64_t, int64_t> line_of(int64_t i) const { return {i / J, j0 + i % J}; }

  // `t` as lines; an undefined `t` (an absent optional) gives lines never read.
  template <typename T, typename S>
  Lines<T, S> lines(const at::Tensor& t) const {
    if (!t.defined()) return {nullptr, 0, 0, S{}};
    const Strided3d v = view3d(t, "tensor");
    T* data = t.data_ptr<std::remove_const_t<T>>();
    if (flat) return Lines<T, S>{data + c0 * v.sC, v.sN, positions * v.sL, line_stride<S>(1)};
    return along_c ? Lines<T, S>{data, v.sN, v.sL, line_stride<S>(v.sC)}
                   : Lines<T, S>{data, v.sN, v.sC, line_stride<S>(v.sL)};
  }

  // A (C,) array as lines: indexed by position along C, constant along L; on a flat walk,
  // an expanded one (expand_channels), indexed by position along the line.
  template <typename S, typename T>
  Lines<T, S> per_channel(T* data) const {
    return along_c ? Lines<T, S>{data, 0, 0, line_stride<S>(1)} : Lines<T, S>{data, 0, 1, line_stride<S>(0)};
  }
};

// A per-channel array as the flat walk `w` reads it: one value per element of a line.
template <typename T>
std::vector<T> expand_channels(const Walk& w, const T* per_channel) {
  TORCH_INTERNAL_ASSERT(w.flat);
  std::vector<T> expanded(w.len);
  for (int64_t k = 0; k < w.len; k += w.rep) {
    std::fill_n(expanded.begin() + k, w.rep, per_channel[w.c0 + w.channel_of(k)]);
  }
  return expanded;
}

// Along C, where w's lines qualify (Walk::has_flat_lines), calls f(w.position_runs()) and
// returns true; else returns false, having called nothing. The flat lines of the sums: along
// L, a line's sums are one channel's.
template <typename F>
bool for_position_runs(const Walk& w, std::initializer_list<const at::Tensor*> tensors, const F& f) {
  if (!w.along_c || !w.has_flat_lines(tensors)) return false;
  f(w.position_runs());
  return true;
}

// Where w's lines qualify (Walk::has_flat_lines), calls f(flat) with flat walks that cover
// w's elements and returns true; else returns false, having called nothing. Along C, as
// for_position_runs. Along L, f runs in parallel on the flat_lines() of runs of w's channels,
// about kShortRun elements each, so that a run's expanded arrays stay in L1; for elementwise
// passes over scalar_t tensors only.
template <typename scalar_t, typename F>
bool for_flat_lines(const Walk& w, std::initializer_list<const at::Tensor*> tensors, const F& f) {
  if (w.along_c) return for_position_runs(w, tensors, f);
  if (!w.has_flat_lines(tensors, unit_lines_in_registers<scalar_t>() ? kFlatLineInRegisters : kFlatLine)) {
    return false;
  }
  const int64_t run = std::max<int64_t>(1, kShortRun / w.len);
  at::parallel_for(0, w.nc, run, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; i += run) {
      f(w.channels(w.c0 + i, w.c0 + std::min(i + run, end)).flat_lines());
    }
  });
  return true;
}

// Calls f(TensorStride{}, ChannelStride{}): the line-stride types of the tensors
// (Unit when every defined one of `tensors` has unit stride along the lines,
// else a runtime stride) and of per-channel arrays (Unit along C, Bcast along L).
template <typename F>
void dispatch_strides(const Walk& w, std::initializer_list<const at::Tensor*> tensors, const F& f) {
  const bool unit = std::all_of(tensors.begin(), tensors.end(), [&](const at::Tensor* t) {
    return !t->defined() || w.line_stride_of(view3d(*t, "tensor")) == 1;
  });
  const auto with_channel_stride = [&](auto tensor_stride) {
    w.along_c ? f(tensor_stride, Unit{}) : f(tensor_stride, Bcast{});
  };
  unit ? with_channel_stride(Unit{}) : with_channel_stride(int64_t{});
}

// Calls f(std::true_type{}) or f(std::false_type{}): a runtime flag made a
// compile-time one, so that line loops carry no per-element branch.
template <typename F>
void dispatch_bool(bool b, const F& f) {
  b ? f(std::true_type{}) : f(std::false_type{});
}

// ---- the two kinds of passes --------------------------------------------------

// The build targets baseline x86-64 (SSE2). The functions holding the line
// loops also get an AVX2 clone, picked at load time by GCC's function
// multiversioning: channels_last lines load three per-channel arrays per
// element and are compute-bound at SSE width. No AVX-512 clone: there GCC
// turns the ReLU select into zero-masking loads, which made the backward 1.5-2x
// slower than AVX2 on the project's AMD EPYC machines, and these memory-bound
// loops gain nothing from the wider vectors. The arithmetic is the same in
// every clone (no FMA contraction: -ffp-contract=off; fixed summation order), so
// results do not depend on the machine. Clang does not multiversion templates.
// flatten: a clone compiles for its target only what is inlined into it; the
// lambdas that hold the element code are functions of their own, and the float16
// ones (larger: the rounding of csrc/cpu/element_cast.h) stayed out of line, at SSE2.
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__)
#define CNNKERN_VECTOR_CLONES __attribute__((target_clones("avx2", "default"), flatten))
#else
#define CNNKERN_VECTOR_CLONES
#endif

// Whether an op whose tensors hold `bytes` in all streams its float32 outputs, and rounds its
// bfloat16 outputs by AVX512-BF16 (defined below, by the caches' sizes).
inline bool streams_outputs(int64_t bytes);
inline bool rounds_bfloat16_natively(int64_t bytes);

#ifdef CNNKERN_IN_REGISTERS
// Whether w's float32 passes store their outputs around the caches: its op streams, and its lines
// are long enough for it (kStreamedLine, csrc/cpu/streamed.h).
inline bool streams_lines(const Walk& w) { return streams_outputs(w.op_bytes) && w.len >= kStreamedLine; }
#endif

// Line functions: line_fn(n, j, stage) gives the element function of line (n, j), elem(k),
// its tensors' lines wrapped by `stage`, an St (StageFor; csrc/cpu/stage.h). The element
// functions of 16-bit passes also give 8 elements a step, elem.eight(k), for the lines that
// convert in registers (csrc/cpu/in_registers.h).

// Runs line_fn(n, j, stage)(k) for every element of segments [begin, end).
template <typename St, typename LineFn>
CNNKERN_VECTOR_CLONES void apply_segments(const Walk& w, int64_t begin, int64_t end, const LineFn& line_fn) {
  St stage;
  w.for_segments(begin, end, [&](int64_t n, int64_t j, int64_t k0, int64_t k1) {
    stage.for_chunks(k0, k1, [&](int64_t c0, int64_t c1) { stage.apply(line_fn(n, j, stage), c0, c1); });
  });
}

// Runs line_fn(n, j, stage)(k) for every element (n, j, k), in parallel over segments. St, the
// lines' stage: 16-bit lines of unit stride convert in registers instead where the CPU can,
// and the element functions then take 8 elements a step (csrc/cpu/in_registers.h), bfloat16's
// outputs rounded a chunk at a time where it has AVX512-BF16 (csrc/cpu/bfloat16_outputs.h);
// float32 ones take 8 a step where the walk streams its outputs and its lines are long enough
// (csrc/cpu/streamed.h).
template <typename St, typename LineFn>
void for_each_element(const Walk& w, const LineFn& line_fn) {
#ifdef CNNKERN_IN_REGISTERS
  if constexpr (std::is_same_v<St, Float32Lines>) {
    if (streams_lines(w)) return for_each_element<Streamed>(w, line_fn);
  }
#ifdef CNNKERN_AVX512_BF16_LOOPS
  if constexpr (kBFloat16Lines<St>) {
    if (rounds_bfloat16_natively(w.op_bytes)) return for_each_element<BFloat16Outputs<St::kChunk>>(w, line_fn);
  }
#endif
  if constexpr (kSixteenBitLines<St>) {
    if (converts_in_registers()) return for_each_element<InRegisters>(w, line_fn);
  }
#endif
  at::parallel_for(0, w.items(), w.grain(),
                   [&](int64_t begin, int64_t end) { apply_segments<St>(w, begin, end, line_fn); });
}

// Along L, the partial sums of a segment: kLanes per quantity, in independent
// vector registers, so that the adds pipeline instead of each waiting on the last.
constexpr int64_t kLanes = 16;

static_assert(kForwardChunk % kLanes == 0 && kBackwardChunk % kLanes == 0,
              "a chunk leaves the lanes as a whole line would");

// Adds the sums of the pairs of segments [begin, end) of L lines to sums[j - c0]
// and sums[nc + j - c0]. The elements of a line are all channel j's.
template <typename acc_t, typename St, typename LineFn>
CNNKERN_VECTOR_CLONES void sum_segments_along_l(const Walk& w, int64_t begin, int64_t end, const LineFn& line_fn,
                                                double* sums) {
  St stage;
  w.for_segments(begin, end, [&](int64_t n, int64_t j, int64_t k0, int64_t k1) {
    std::array<acc_t, kLanes> a{}, b{};
    stage.for_chunks(k0, k1, [&](int64_t c0, int64_t c1) {
      St::template add_pairs_to_lanes<kLanes>(line_fn(n, j, stage), a.data(), b.data(), c0, c1);
    });
    sums[j - w.c0] += std::accumulate(a.begin(), a.end(), 0.0);
    sums[w.nc + j - w.c0] += std::accumulate(b.begin(), b.end(), 0.0);
  });
}

// Along C, per-channel partial sums hold at most this many lines before being
// folded into double.
constexpr int64_t kFoldLines = 256;
static_assert(kFoldLines % kLineGroup == 0, "a fold falls between groups");

// Adds to sums[i] and sums[nc + i] the sums of the pairs that line_fn(n, j, stage)(k) yields over
// channel j = c0 + i's lines, for i in [begin, end), for short lines (len <= kShortLine).
// Per position of a channel's line, partial sums over its N lines (kLineGroup at a time, in
// acc_t, folded into double every kFoldLines): a line needs no sum of its own.
template <typename acc_t, typename St, typename LineFn>
CNNKERN_VECTOR_CLONES void sum_short_lines_along_l(const Walk& w, int64_t begin, int64_t end,
                                                   const LineFn& line_fn, double* sums) {
  static_assert(kShortLine <= kBackwardChunk && kShortLine <= kForwardChunk, "a short line is one chunk");
  St stage;
  const int64_t len = w.len, group = std::max<int64_t>(1, kShortRun / len);
  std::vector<acc_t> part(2 * group * len);
  acc_t* a = part.data();
  acc_t* b = a + group * len;
  for (int64_t i0 = begin; i0 < end; i0 += group) {
    const int64_t channels = std::min(group, end - i0), j0 = w.j0 + i0;
    for (int64_t n0 = 0; n0 < w.N; n0 += kFoldLines) {
      const int64_t n1 = std::min(n0 + kFoldLines, w.N);
      std::fill(part.begin(), part.end(), acc_t(0));
      int64_t n = n0;
      for (; n + kLineGroup <= n1; n += kLineGroup) {
        for (int64_t g = 0; g < channels; ++g) {
          acc_t* ag = a + g * len;
          acc_t* bg = b + g * len;
          stage.for_chunks(0, len, [&](int64_t c0, int64_t c1) {
            const std::array lines{line_fn(n, j0 + g, stage), line_fn(n + 1, j0 + g, stage),
                                   line_fn(n + 2, j0 + g, stage), line_fn(n + 3, j0 + g, stage)};
            St::add_pairs4(lines, ag, bg, c0, c1);
          });
        }
      }
      for (; n < n1; ++n) {
        for (int64_t g = 0; g < channels; ++g) {
          acc_t* ag = a + g * len;
          acc_t* bg = b + g * len;
          stage.for_chunks(0, len,
                           [&](int64_t c0, int64_t c1) { St::add_pairs(line_fn(n, j0 + g, stage), ag, bg, c0, c1); });
        }
      }
      for (int64_t g = 0; g < channels; ++g) {
        sums[i0 + g] += std::accumulate(a + g * len, a + (g + 1) * len, 0.0);
        sums[w.nc + i0 + g] += std::accumulate(b + g * len, b + (g + 1) * len, 0.0);
      }
    }
  }
}

// Adds the sums of the pairs of segments [begin, end) of C lines to sums[c]
// and sums[C + c]. Element k of a line is channel k's (and the walk covers all C), or on
// a run of positions channel k % C's. kGroupLines: whole lines kLineGroup at a
// time (for_line_groups).
template <typename acc_t, bool kGroupLines, typename St, typename LineFn>
CNNKERN_VECTOR_CLONES void sum_segments_along_c(const Walk& w, int64_t begin, int64_t end, const LineFn& line_fn,
                                                double* sums) {
  St stage;
  std::vector<acc_t> part(2 * w.len, 0);
  acc_t* a = part.data();
  acc_t* b = a + w.len;
  // Along C, a line is whole runs of the C channels (a run of positions, or one position): the
  // partials fold position by position, without a division per element (channel_of).
  TORCH_INTERNAL_ASSERT(w.along_c && w.rep == 1 && w.nc == w.C && w.len % w.C == 0);
  const auto fold = [&] {
    for (int64_t k0 = 0; k0 < w.len; k0 += w.C) {
      for (int64_t c = 0; c < w.C; ++c) {
        sums[c] += std::exchange(a[k0 + c], 0);
        sums[w.C + c] += std::exchange(b[k0 + c], 0);
      }
    }
  };
  int64_t lines = 0;
  const auto add_segment = [&](int64_t n, int64_t j, int64_t k0, int64_t k1) {
    stage.for_chunks(k0, k1, [&](int64_t c0, int64_t c1) { St::add_pairs(line_fn(n, j, stage), a, b, c0, c1); });
    if (++lines % kFoldLines == 0) fold();
  };
  if constexpr (kGroupLines) {
    const auto line = [&](int64_t i) {
      const auto [n, j] = w.line_of(i);
      return line_fn(n, j, stage);
    };
    const auto add_group = [&](int64_t i, int64_t stride) {
      stage.for_chunks(0, w.len, [&](int64_t c0, int64_t c1) {
        const std::array lines{line(i), line(i + stride), line(i + 2 * stride), line(i + 3 * stride)};
        St::add_pairs4(lines, a, b, c0, c1);
      });
      if ((lines += kLineGroup) % kFoldLines == 0) fold();
    };
    w.for_line_groups(begin, end, add_group, add_segment);
  } else {
    w.for_segments(begin, end, add_segment);
  }
  fold();
}

// The threads a parallel_for called here can use: 1 inside another's region (a channel block of
// by_channel_blocks), where it runs inline. The passes choose how to sum by it, so that every call
// sums in the same order. at::get_num_threads() would not do: inside a region it said 1 on a
// worker thread before its first task and the pool's size after, so a process's first training
// forward summed a channel along another path, and its invstd differed in the last bit.
inline int usable_threads() { return at::in_parallel_region() ? 1 : at::get_num_threads(); }

// Per-channel sums of the pair (a, b) that line_fn(n, j, stage)(k) yields per element,
// for the walk's channels c0 + i, i < nc: {sum a for each, then sum b for each}.
// Partial sums are acc_t (vector-wide, fast) over at most a segment or
// kFoldLines lines, folded into per-thread double sums (accurate whatever N * L),
// which are combined at the end. Short lines along L, with a channel for every
// thread, are summed a channel at a time instead (sum_short_lines_along_l).
// ChannelStride tells where the channel is: j on an L line, k on a C line.
// kGroupLines: along C, whole lines kLineGroup at a time, for a line_fn that reads
// one tensor (4 streams); with more, the grouped loop ran slower on large tensors.
// St, the lines' stage, as for for_each_element.
template <typename acc_t, typename ChannelStride, bool kGroupLines, typename St, typename LineFn>
std::vector<double> channel_sums(const Walk& w, const LineFn& line_fn) {
#ifdef CNNKERN_IN_REGISTERS
#ifdef CNNKERN_AVX512_BF16_LOOPS
  if constexpr (kBFloat16Lines<St>) {
    if (rounds_bfloat16_natively(w.op_bytes)) {
      return channel_sums<acc_t, ChannelStride, kGroupLines, BFloat16Outputs<St::kChunk>>(w, line_fn);
    }
  }
#endif
  if constexpr (kSixteenBitLines<St>) {
    if (converts_in_registers()) return channel_sums<acc_t, ChannelStride, kGroupLines, InRegisters>(w, line_fn);
  }
#endif
  const int64_t size = 2 * w.nc;
  const int nthreads = usable_threads();
  if (std::is_same_v<ChannelStride, Bcast> && w.len <= kShortLine && w.nc >= nthreads) {
    std::vector<double> total(size, 0.0);  // a channel's sums on one thread: nothing to combine
    const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / w.M);
    at::parallel_for(0, w.nc, grain, [&](int64_t begin, int64_t end) {
      sum_short_lines_along_l<acc_t, St>(w, begin, end, line_fn, total.data());
    });
    return total;
  }
  std::vector<double> thread_sums(nthreads * size, 0.0);
  at::parallel_for(0, w.items(), w.grain(), [&](int64_t begin, int64_t end) {
    const int tid = at::get_thread_num();
    TORCH_INTERNAL_ASSERT(tid < nthreads);
    double* sums = thread_sums.data() + tid * size;
    if constexpr (std::is_same_v<ChannelStride, Bcast>) {
      sum_segments_along_l<acc_t, St>(w, begin, end, line_fn, sums);
    } else {
      sum_segments_along_c<acc_t, kGroupLines, St>(w, begin, end, line_fn, sums);
    }
  });
  std::vector<double> total(size, 0.0);
  for (int t = 0; t < nthreads; ++t) {
    for (int64_t i = 0; i < size; ++i) total[i] += thread_sums[t * size + i];
  }
  return total;
}

// channel_sums of a line function that also writes a tensor as it reads (the backward's sums,
// storing grad_residual), one line at a time. Where `may_stream`, St is float32's and the op's
// outputs stream (streams_outputs), that tensor streams too (StreamedSums, csrc/cpu/streamed.h):
// the same bits.
template <typename acc_t, typename ChannelStride, typename St, typename LineFn>
std::vector<double> channel_sums_writing(const Walk& w, const LineFn& line_fn, bool may_stream) {
#ifdef CNNKERN_IN_REGISTERS
  if constexpr (std::is_same_v<St, Float32Lines>) {
    if (may_stream && streams_lines(w)) {
      return channel_sums<acc_t, ChannelStride, /*kGroupLines=*/false, StreamedSums>(w, line_fn);
    }
  }
#endif
  return channel_sums<acc_t, ChannelStride, /*kGroupLines=*/false, St>(w, line_fn);
}

// ---- cache sizes ----------------------------------------------------------------

// The size of cpu0's data (or unified) cache of `level`, the highest where level is 0, as
// Linux's sysfs gives it (what lscpu shows), else sysconf(`sysconf_name`)'s; 0 where neither
// says. (In a VM sysconf may report the host's: an L3 of 320 MB on the project's 2-core AMD
// EPYC, where sysfs and lscpu say 32 MB.)
inline int64_t cache_bytes(int64_t level, int sysconf_name) {
  int64_t size = 0, found = 0;
  for (int i = 0;; ++i) {
    const std::string dir = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(i) + "/";
    std::ifstream level_file(dir + "level"), type_file(dir + "type"), size_file(dir + "size");
    if (!level_file) break;
    int64_t l = 0, kib = 0;
    std::string type, unit;
    level_file >> l;
    type_file >> type;
    size_file >> kib >> unit;  // "32768K"
    const bool wanted = level == 0 ? l > found : l == level;
    if (type != "Instruction" && unit == "K" && wanted) found = l, size = kib << 10;
  }
  if (size > 0) return size;
  const long v = sysconf(sysconf_name);
  return v > 0 ? int64_t(v) : int64_t(0);
}

// ---- channel blocks -------------------------------------------------------------

// Along L every line holds one channel, so a thread can take a block of channels
// through both passes of an op while the block's data is still in its L2: the
// second pass then reads cache, not memory (ATen's own schedule for NCHW). Used
// when every thread gets whole channels and one channel's first-pass data fits
// half an L2; otherwise each pass runs over the whole tensor cut into segments,
// which keeps every thread busy however few channels or long lines there are.
inline int64_t l2_bytes() {
  static const int64_t bytes = [] {
    const int64_t v = cache_bytes(2, _SC_LEVEL2_CACHE_SIZE);
    return v > 0 ? v : int64_t(1) << 20;  // 1 MiB where the OS does not say
  }();
  return bytes;
}

// The last-level cache's size, or the largest int64_t where the OS does not say.
inline int64_t last_level_cache_bytes() {
  static const int64_t bytes = [] {
    const int64_t cache = cache_bytes(0, _SC_LEVEL3_CACHE_SIZE);
    return cache > 0 ? cache : std::numeric_limits<int64_t>::max();
  }();
  return bytes;
}

// The bytes past which a float32 op's tensors, in all, stream its elementwise pass's outputs
// around the caches (csrc/cpu/streamed.h): the last-level cache (in it, streamed stores were
// slower: at 3.2 MB a tensor up to 1.45x the time). CNNKERN_CPU_STREAM_STORES=1 streams at any
// size, =0 never (read once per process).
inline int64_t stream_threshold() {
  static const int64_t threshold = [] {
    const char* env = std::getenv("CNNKERN_CPU_STREAM_STORES");
    if (env != nullptr && std::strcmp(env, "0") == 0) return std::numeric_limits<int64_t>::max();
    if (env != nullptr && std::strcmp(env, "1") == 0) return int64_t(0);
    return last_level_cache_bytes();
  }();
  return threshold;
}

inline bool streams_outputs(int64_t bytes) { return converts_in_registers() && bytes > stream_threshold(); }

// bfloat16 outputs round by AVX512-BF16 where the CPU has it and the op's tensors fill at most
// half the last-level cache: from there on the passes wait on memory more than on instructions,
// and a chunk's outputs written in one burst after its loop (where AVX2's rounding writes them
// along it) took up to 1.09x as long at 32 MB (16x256x28x28, the backward with residual; 32 MB
// L3) and 1.26x at 25.7 MB (32x64x56x56 eval), where below 16 MB it gained (bench/NOTES.md).
inline int64_t bfloat16_rounding_bytes() {
  const int64_t cache = last_level_cache_bytes();
  return cache == std::numeric_limits<int64_t>::max() ? cache : cache / 2;  // no limit where unknown
}

inline bool rounds_bfloat16_natively(int64_t bytes) {
#ifdef CNNKERN_AVX512_BF16_LOOPS
  return avx512_bf16_usable() && bytes <= bfloat16_rounding_bytes();
#else
  return false;
#endif
}

// Calls f(part) for blocks of channels in parallel (each block's two passes on one
// thread), or f(w) once; bytes_per_channel: what one channel's two passes touch, every
// tensor read or written by either counted once. A block's fit the thread's L2, so the
// second pass finds what the first read. (The budget was L2 / 2 of the first pass's bytes,
// which left the training backward with ReLU and residual at 32x64x56x56 fp32, 5 tensors of
// 401 KB a channel, unblocked: median 3.2 ms over 9 runs on the 2-core Xeon, 2 MB L2 a core;
// one channel a block: 3.0 ms over 12. The ReLU forward's blocks stay 2 channels there.)
template <typename F>
void by_channel_blocks(const Walk& w, int64_t bytes_per_channel, const F& f) {
  const int64_t budget = l2_bytes(), threads = usable_threads();
  if (w.along_c || w.C < 2 * threads || bytes_per_channel > budget) return f(w);
  const int64_t block = std::clamp<int64_t>(budget / bytes_per_channel, 1, w.C / (2 * threads));
  at::parallel_for(0, w.C, block, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; c += block) f(w.channels(c, std::min(c + block, end)));
  });
}

// ---- per-channel parameters ---------------------------------------------------

// Parameters and running stats are input's dtype, or float32 for reduced-precision
// input (AMP); calls f(param_t{}).
template <typename scalar_t, typename F>
void dispatch_param_type(at::ScalarType param_dtype, const F& f) {
  if constexpr (sizeof(scalar_t) == 2) {
    if (param_dtype == at::kFloat) return f(float{});
  }
  f(scalar_t{});
}

// An optional (C,) parameter in acc_t, or `fill` where it is absent.
template <typename acc_t, typename param_t>
std::vector<acc_t> param_or(const at::Tensor& t, int64_t C, acc_t fill) {
  std::vector<acc_t> out(C, fill);
  if (t.defined()) std::copy_n(t.data_ptr<param_t>(), C, out.begin());
  return out;
}

// y = act((x - mean) * scale + shift + residual), per channel. This form, not
// x * a + b, keeps the precision when |mean| >> std.
template <typename acc_t>
struct Affine {
  std::vector<acc_t> mean, scale, shift;

  // As the flat walk `w` reads it: one value per element of a line (expand_channels).
  Affine expanded(const Walk& w) const {
    return {expand_channels(w, mean.data()), expand_channels(w, scale.data()), expand_channels(w, shift.data())};
  }
};

// The forward's output before the residual and the ReLU. The backward recomputes the ReLU
// mask with it (where the forward had no residual), so both call this one expression, which
// no build contracts into an FMA (setup.py): the same inputs give the same bits.
template <typename acc_t>
acc_t normalized(acc_t x, acc_t mean, acc_t scale, acc_t shift) {
  return (x - mean) * scale + shift;
}

#ifdef CNNKERN_IN_REGISTERS
// normalized() of elements k to k + 7 of lines that convert in registers (or float32 lines
// that stream), in the same order.
template <typename In, typename P>
CNNKERN_AVX2_F16C __m256 normalized8(const In& x, const P& mean, const P& scale, const P& shift, int64_t k) {
  return _mm256_add_ps(_mm256_mul_ps(_mm256_sub_ps(load8(x, k), load8(mean, k)), load8(scale, k)), load8(shift, k));
}
#endif

// The largest acc_t that scalar_t stores as 0: half the smallest subnormal of float16 (2^-24)
// and of bfloat16 (2^-133), the tie rounding to even; 0 where scalar_t is acc_t.
template <typename scalar_t, typename acc_t>
constexpr acc_t kStoredZero = std::is_same_v<scalar_t, c10::Half>       ? acc_t(0x1p-25f)
                              : std::is_same_v<scalar_t, c10::BFloat16> ? acc_t(0x1p-134f)
                                                                        : acc_t(0);

// Whether `v` is still > 0 once stored as scalar_t.
template <typename scalar_t, typename acc_t>
bool stored_positive(acc_t v) {
  return v > kStoredZero<scalar_t, acc_t>;
}

// The tensor of an optional argument, or an undefined one for None.
inline at::Tensor value_or_undefined(const std::optional<at::Tensor>& t) { return t.value_or(at::Tensor()); }

}  // namespace cnnkern::cpu

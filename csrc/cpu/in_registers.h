// 16-bit line loops that convert in registers, 8 values a step: where the CPU has AVX2 and F16C
// (converts_in_registers()), the stage of float16 and bfloat16 lines of unit stride in place of
// their portable ones (csrc/cpu/stage.h): Stage, which converts a float16 chunk into a float
// buffer, runs the loop over it and converts back, and BFloat16Lines, whose loops GCC vectorizes
// with more instructions (callgrind, bfloat16 eval: 104M against 76M). The element functions
// give 8 values a step, elem.eight(k) (a pair of __m256 in the sums), and one at a time, elem(k),
// as for the other stages: a chunk's last few (the elementwise passes redo its last 8 instead).
// Both forms compute what the portable loops do, in the same order, rounded the same way (to
// nearest even): the same bits.
//
// The loops carry AVX2 and F16C's target attribute, so the passes' functions, which GCC clones
// for AVX2 and the baseline (CNNKERN_VECTOR_CLONES, bn_lines.h), call them out of line, once a
// chunk.
#pragma once
#include "cpu/element_cast.h"

#ifdef CNNKERN_IN_REGISTERS
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <array>
#include <cstdint>
#include <utility>

#include "cpu/line.h"
#include "cpu/stage.h"

#define CNNKERN_AVX2_F16C __attribute__((target("avx2,f16c")))

namespace cnnkern::cpu {

// 8 values of a line as floats from element k on: a 16-bit tensor's, or a per-channel array's
// (along the line, or one channel's value 8 times).
CNNKERN_AVX2_F16C inline __m256 load8(const Line<const c10::Half, Unit>& line, int64_t k) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(line.p + k)));
}
CNNKERN_AVX2_F16C inline __m256 load8(const Line<const c10::BFloat16, Unit>& line, int64_t k) {
  const __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(line.p + k));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));  // a float's top half
}
CNNKERN_AVX2_F16C inline __m256 load8(const Line<const float, Unit>& line, int64_t k) {
  return _mm256_loadu_ps(line.p + k);
}
CNNKERN_AVX2_F16C inline __m256 load8(const Line<const float, Bcast>& line, int64_t) {
  return _mm256_set1_ps(line.v);
}

// Elements k to k + 7 of a 16-bit line set to v, rounded to nearest even.
CNNKERN_AVX2_F16C inline void store8(const Line<c10::Half, Unit>& line, int64_t k, __m256 v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(line.p + k), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
}
// As c10's rounding: the float's bits plus 0x7FFF and the kept half's lowest bit, which carries
// into that half where the dropped one is past the tie (or at it, to even); NaN gives 0x7FC0.
// 9 instructions for 8 values: where the CPU has AVX512-BF16, the outputs round a chunk at a
// time in one instruction for 16 instead (csrc/cpu/bfloat16_outputs.h).
CNNKERN_AVX2_F16C inline void store8(const Line<c10::BFloat16, Unit>& line, int64_t k, __m256 v) {
  const __m256i w = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(w, 16), _mm256_set1_epi32(1));
  __m256i top = _mm256_srli_epi32(_mm256_add_epi32(w, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF))), 16);
  const __m256 nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
  top = _mm256_blendv_epi8(top, _mm256_set1_epi32(0x7FC0), _mm256_castps_si256(nan));
  const __m128i halves = _mm_packus_epi32(_mm256_castsi256_si128(top), _mm256_extracti128_si256(top, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(line.p + k), halves);
}

// The sums along L (add_pairs_to_lanes) ask for their 16-bit input lines this many bytes ahead
// of the loop (a software prefetch): the backward's sums, reading 2 or 3 lines and writing one,
// waited on their loads (perf annotate), as the hardware's prefetchers fell behind. With it, NCHW
// 32x64x56x56 float16 and bfloat16 (alternating calls in one process): the backward's sums
// 0.82-0.89 the time, the backward without residual 0.84-0.91, with it 0.94-1.01, the training
// forward 0.86-0.96; bench/NOTES.md. Float32 lines (StreamedSums) took 1.06-1.08 the time with it:
// they ask for nothing.
constexpr int64_t kPrefetchBytes = 1024;

template <typename T>
CNNKERN_AVX2_F16C inline void prefetch(const Line<const T, Unit>& line, int64_t k) {
  if constexpr (sizeof(T) == 2) {
    _mm_prefetch(reinterpret_cast<const char*>(line.p + k) + kPrefetchBytes, _MM_HINT_T0);
  }
}

// The pair of 8 values each that an element function of the sums gives (a struct: std::pair
// would drop __m256's alignment attribute, as GCC warns).
struct Pair8 {
  __m256 first, second;
};

// The stage; its loops do what ElementLoops' do (csrc/cpu/stage.h), 8 elements a step. They take
// their element functions as __restrict: the vector stores may alias anything, and GCC would
// otherwise reload the lines' pointers after every store.
struct InRegisters : Unchunked {
  // Unrolled by 4: a step is a handful of instructions, and the loop's own three would be a large
  // share of them (the F16C conversion loops ran up to 1.3x slower without; bench.ab, 2-core AMD
  // EPYC). A chunk's last few elements, where it holds 8 or more, are its last 8's step again:
  // the outputs it rewrites get the same bits (no pass writes a tensor it reads), where one at a
  // time they cost as much as the 6 steps before them on a 7x7 line (callgrind).
  template <typename E>
  CNNKERN_AVX2_F16C static void apply(const E& __restrict elem, int64_t c0, int64_t c1) {
    int64_t k = c0;
#pragma GCC unroll 4
    for (; k + 8 <= c1; k += 8) elem.eight(k);
    if (k < c1 && c1 - c0 >= 8) return elem.eight(c1 - 8);
    for (; k < c1; ++k) elem(k);
  }

  template <typename E>
  CNNKERN_AVX2_F16C static void add_pairs(const E& __restrict elem, float* a, float* b, int64_t c0, int64_t c1) {
    int64_t k = c0;
#pragma GCC unroll 2
    for (; k + 8 <= c1; k += 8) {
      const Pair8 p = elem.eight(k);
      _mm256_storeu_ps(a + k, _mm256_add_ps(_mm256_loadu_ps(a + k), p.first));
      _mm256_storeu_ps(b + k, _mm256_add_ps(_mm256_loadu_ps(b + k), p.second));
    }
    for (; k < c1; ++k) {
      const std::pair<float, float> p = elem(k);
      a[k] += p.first;
      b[k] += p.second;
    }
  }

  template <typename E>
  CNNKERN_AVX2_F16C static void add_pairs4(const std::array<E, 4>& __restrict e, float* a, float* b, int64_t c0,
                                           int64_t c1) {
    int64_t k = c0;
    for (; k + 8 <= c1; k += 8) {
      const Pair8 p0 = e[0].eight(k), p1 = e[1].eight(k), p2 = e[2].eight(k), p3 = e[3].eight(k);
      const __m256 first =
          _mm256_add_ps(_mm256_add_ps(p0.first, p1.first), _mm256_add_ps(p2.first, p3.first));
      const __m256 second =
          _mm256_add_ps(_mm256_add_ps(p0.second, p1.second), _mm256_add_ps(p2.second, p3.second));
      _mm256_storeu_ps(a + k, _mm256_add_ps(_mm256_loadu_ps(a + k), first));
      _mm256_storeu_ps(b + k, _mm256_add_ps(_mm256_loadu_ps(b + k), second));
    }
    for (; k < c1; ++k) {
      const std::pair<float, float> p0 = e[0](k), p1 = e[1](k), p2 = e[2](k), p3 = e[3](k);
      a[k] += (p0.first + p1.first) + (p2.first + p3.first);
      b[k] += (p0.second + p1.second) + (p2.second + p3.second);
    }
  }

  // 16 lanes, in 2 registers per sum.
  template <int64_t kLanes, typename E>
  CNNKERN_AVX2_F16C static void add_pairs_to_lanes(const E& __restrict elem, float* a, float* b, int64_t c0,
                                                   int64_t c1) {
    static_assert(kLanes == 16, "two registers of lanes per sum");
    __m256 a0 = _mm256_loadu_ps(a), a1 = _mm256_loadu_ps(a + 8);
    __m256 b0 = _mm256_loadu_ps(b), b1 = _mm256_loadu_ps(b + 8);
    int64_t k = c0;
    for (; k + kLanes <= c1; k += kLanes) {
      elem.prefetch(k);
      const Pair8 p = elem.eight(k), q = elem.eight(k + 8);
      a0 = _mm256_add_ps(a0, p.first);
      b0 = _mm256_add_ps(b0, p.second);
      a1 = _mm256_add_ps(a1, q.first);
      b1 = _mm256_add_ps(b1, q.second);
    }
    _mm256_storeu_ps(a, a0);
    _mm256_storeu_ps(a + 8, a1);
    _mm256_storeu_ps(b, b0);
    _mm256_storeu_ps(b + 8, b1);
    for (int64_t v = 0; k + v < c1; ++v) {
      const std::pair<float, float> p = elem(k + v);
      a[v] += p.first;
      b[v] += p.second;
    }
  }
};

}  // namespace cnnkern::cpu
#endif

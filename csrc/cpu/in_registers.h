// float16 line loops that convert in registers (F16C), 8 values a step: where the CPU has F16C,
// the stage of float16 lines of unit stride in place of Stage (csrc/cpu/stage.h), which
// converts a chunk into a float buffer, runs the loop over it and converts back. The element
// functions give 8 values a step, elem.eight(k) (a pair of __m256 in the sums), and one at a
// time, elem(k), as for the other stages: a chunk's last few (the elementwise passes redo its
// last 8 instead). Both forms compute what the staged loop does, in the same order, rounded the
// same way (to nearest even): the same bits, in one pass over the lines instead of three.
//
// The loops carry F16C's target attribute, so the passes' functions, which GCC clones for AVX2
// and the baseline (CNNKERN_VECTOR_CLONES, bn_lines.h), call them out of line, once a chunk.
#pragma once
#include "cpu/element_cast.h"

#ifdef CNNKERN_F16C
#include <c10/util/Half.h>

#include <array>
#include <cstdint>
#include <utility>

#include "cpu/line.h"
#include "cpu/stage.h"

#define CNNKERN_F16C_TARGET __attribute__((target("avx,f16c")))

namespace cnnkern::cpu {

// 8 values of a line as floats from element k on: a float16 tensor's, or a per-channel array's
// (along the line, or one channel's value 8 times).
CNNKERN_F16C_TARGET inline __m256 load8(const Line<const c10::Half, Unit>& line, int64_t k) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(line.p + k)));
}
CNNKERN_F16C_TARGET inline __m256 load8(const Line<const float, Unit>& line, int64_t k) {
  return _mm256_loadu_ps(line.p + k);
}
CNNKERN_F16C_TARGET inline __m256 load8(const Line<const float, Bcast>& line, int64_t) {
  return _mm256_broadcast_ss(line.p);
}

// Elements k to k + 7 of a float16 line set to v, rounded to nearest even.
CNNKERN_F16C_TARGET inline void store8(const Line<c10::Half, Unit>& line, int64_t k, __m256 v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(line.p + k), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
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
  CNNKERN_F16C_TARGET static void apply(const E& __restrict elem, int64_t c0, int64_t c1) {
    int64_t k = c0;
#pragma GCC unroll 4
    for (; k + 8 <= c1; k += 8) elem.eight(k);
    if (k < c1 && c1 - c0 >= 8) return elem.eight(c1 - 8);
    for (; k < c1; ++k) elem(k);
  }

  template <typename E>
  CNNKERN_F16C_TARGET static void add_pairs(const E& __restrict elem, float* a, float* b, int64_t c0, int64_t c1) {
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
  CNNKERN_F16C_TARGET static void add_pairs4(const std::array<E, 4>& __restrict e, float* a, float* b, int64_t c0,
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
  CNNKERN_F16C_TARGET static void add_pairs_to_lanes(const E& __restrict elem, float* a, float* b, int64_t c0,
                                                     int64_t c1) {
    static_assert(kLanes == 16, "two registers of lanes per sum");
    __m256 a0 = _mm256_loadu_ps(a), a1 = _mm256_loadu_ps(a + 8);
    __m256 b0 = _mm256_loadu_ps(b), b1 = _mm256_loadu_ps(b + 8);
    int64_t k = c0;
    for (; k + kLanes <= c1; k += kLanes) {
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

// Conversions of the CPU kernels' line loops (bn_lines.h) between the tensors' element
// types and acc_t (at::opmath_type: float for float16 and bfloat16).
//
// from_acc: a value computed in acc_t, rounded to the element type. c10::Half's constructor
// from float does not vectorize (GCC: "more than one data ref"), and with it none of the
// float16 kernels' loops did: they ran 15x slower than eager's (bench/NOTES.md).
// from_acc<c10::Half> computes the same bits as c10's portable conversion (round to nearest
// even; NaN gives 0x7E00) in a form GCC vectorizes, given -fno-trapping-math (setup.py).
//
// halves_to_floats / floats_to_halves: float16 a run at a time, for the staged line loops
// (csrc/cpu/stage.h). Element by element, the conversions in software took most of a float16
// kernel's time (eval 2.6x eager's); F16C does 8 values in one instruction, and GCC 12
// vectorizes no conversion to or from _Float16, so these call it themselves where the CPU has
// it. Both ways round to nearest even: the same bits, but for NaN payloads.
#pragma once
#include <ATen/OpMathType.h>
#include <c10/util/Half.h>
#include <c10/util/bit_cast.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define CNNKERN_F16C 1
#include <immintrin.h>
#endif

namespace cnnkern::cpu {

template <typename T>
T from_acc(at::opmath_type<T> v) {
  return static_cast<T>(v);
}

// The float adder rounds: |v| is scaled past half's range and back (so that values too large
// for a half end up infinite), then added to a power of two that puts the float's last
// mantissa bit where the half's falls (at least 2^-14, where halves turn subnormal); the
// sum's low bits are the half's exponent and mantissa.
template <>
inline c10::Half from_acc<c10::Half>(float v) {
  const float magnitude = (std::fabs(v) * 0x1.0p+112f) * 0x1.0p-110f;
  const uint32_t w = c10::bit_cast<uint32_t>(v);
  const uint32_t two_w = w + w;  // the sign shifted out
  const uint32_t bias = std::max(two_w & 0xFF000000u, 0x71000000u);
  const float rounded = c10::bit_cast<float>((bias >> 1) + 0x07800000u) + magnitude;
  const uint32_t bits = c10::bit_cast<uint32_t>(rounded);
  const uint32_t nonsign = ((bits >> 13) & 0x7C00u) + (bits & 0x0FFFu);
  const uint32_t sign = (w & 0x80000000u) >> 16;
  return c10::Half(static_cast<uint16_t>(sign | (two_w > 0xFF000000u ? 0x7E00u : nonsign)), c10::Half::from_bits());
}

#ifdef CNNKERN_F16C
// Unrolled by 4: a step converts 8 values in two instructions, and the loop's own three made
// the float16 passes up to 1.3x slower (bench.ab, 2-core AMD EPYC).
__attribute__((target("avx,f16c"))) inline void halves_to_floats_f16c(const c10::Half* src, float* dst, int64_t n) {
  int64_t i = 0;
#pragma GCC unroll 4
  for (; i + 8 <= n; i += 8) {
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
  }
  for (; i < n; ++i) dst[i] = _cvtsh_ss(src[i].x);
}

__attribute__((target("avx,f16c"))) inline void floats_to_halves_f16c(const float* src, c10::Half* dst, int64_t n) {
  int64_t i = 0;
#pragma GCC unroll 4
  for (; i + 8 <= n; i += 8) {
    const __m128i halves = _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), halves);
  }
  for (; i < n; ++i) dst[i] = c10::Half(_cvtss_sh(src[i], _MM_FROUND_TO_NEAREST_INT), c10::Half::from_bits());
}

// 8 float16 values at p as floats, and 8 floats stored at p as float16 (to nearest even): the
// steps of the loops that convert in registers (bn_forward.cpp, bn_backward.cpp).
__attribute__((target("avx,f16c"))) inline __m256 load_halves8(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
__attribute__((target("avx,f16c"))) inline void store_halves8(c10::Half* p, __m256 v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
}
__attribute__((target("f16c"))) inline c10::Half half_of(float v) {
  return c10::Half(_cvtss_sh(v, _MM_FROUND_TO_NEAREST_INT), c10::Half::from_bits());
}

// The per-channel values of 8 elements from k on: an array along the line (kPerElement), or the
// line's one channel's value.
template <bool kPerElement>
__attribute__((target("avx"))) inline __m256 channel_values8(const float* p, int64_t k) {
  return kPerElement ? _mm256_loadu_ps(p + k) : _mm256_broadcast_ss(p);
}
#endif

// Whether the run conversions use F16C: where the CPU has it, unless CNNKERN_CPU_F16C=0
// (read once per process; the tests use it to check the portable loops).
inline bool use_f16c() {
#ifdef CNNKERN_F16C
  static const bool use = [] {
    const char* env = std::getenv("CNNKERN_CPU_F16C");
    const bool allowed = env == nullptr || std::strcmp(env, "0") != 0;
    return allowed && __builtin_cpu_supports("avx") && __builtin_cpu_supports("f16c");
  }();
  return use;
#else
  return false;
#endif
}

inline void halves_to_floats(const c10::Half* src, float* dst, int64_t n) {
#ifdef CNNKERN_F16C
  if (use_f16c()) return halves_to_floats_f16c(src, dst, n);
#endif
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

inline void floats_to_halves(const float* src, c10::Half* dst, int64_t n) {
#ifdef CNNKERN_F16C
  if (use_f16c()) return floats_to_halves_f16c(src, dst, n);
#endif
  for (int64_t i = 0; i < n; ++i) dst[i] = from_acc<c10::Half>(src[i]);
}

}  // namespace cnnkern::cpu

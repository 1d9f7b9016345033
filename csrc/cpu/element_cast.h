// Conversions of the CPU kernels' line loops (bn_lines.h) between the tensors' element
// types and acc_t (at::opmath_type: float for float16 and bfloat16).
//
// from_acc: a value computed in acc_t, rounded to the element type. c10::Half's constructor
// from float does not vectorize (GCC: "more than one data ref"), and with it none of the
// float16 kernels' loops did: they ran 15x slower than eager's (bench/NOTES.md).
// from_acc<c10::Half> computes the same bits as c10's portable conversion (round to nearest
// even; NaN gives 0x7E00) in a form GCC vectorizes, given -fno-trapping-math (setup.py).
// c10::BFloat16's conversions (a shift, and a rounding GCC if-converts) vectorize as they are.
//
// halves_to_floats / floats_to_halves: float16 a run at a time, for the staged line loops
// (csrc/cpu/stage.h), where the CPU cannot convert in registers. Element by element, the
// conversions in software took most of a float16 kernel's time (eval 2.6x eager's). F16C
// converts 8 values in one instruction, and GCC 12 vectorizes no conversion to or from
// _Float16, so the loops call it themselves where the CPU has it, in registers
// (csrc/cpu/in_registers.h). Both ways round to nearest even: the same bits, but for NaN
// payloads, which F16C keeps.
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
#define CNNKERN_IN_REGISTERS 1
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

// Whether the 16-bit line loops convert in registers (csrc/cpu/in_registers.h): where the CPU
// has AVX2 and F16C, unless CNNKERN_CPU_IN_REGISTERS=0 (read once per process; the tests use it
// to check the portable loops).
inline bool converts_in_registers() {
#ifdef CNNKERN_IN_REGISTERS
  static const bool use = [] {
    const char* env = std::getenv("CNNKERN_CPU_IN_REGISTERS");
    const bool allowed = env == nullptr || std::strcmp(env, "0") != 0;
    return allowed && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
  }();
  return use;
#else
  return false;
#endif
}

inline void halves_to_floats(const c10::Half* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

inline void floats_to_halves(const float* src, c10::Half* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = from_acc<c10::Half>(src[i]);
}

}  // namespace cnnkern::cpu

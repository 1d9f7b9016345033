// Stores of the CPU kernels' line loops (bn_lines.h): a value they computed in acc_t
// (at::opmath_type: float for float16 and bfloat16), rounded to the tensor's element type.
//
// c10::Half's constructor from float does not vectorize (GCC: "more than one data ref"), and
// with it none of the float16 kernels' loops did: they ran 15x slower than eager's
// (bench/NOTES.md). from_acc<c10::Half> computes the same bits as c10's portable conversion
// (round to nearest even; NaN gives 0x7E00) in a form GCC vectorizes, given
// -fno-trapping-math (setup.py). Loads need nothing of the kind: c10's conversions to float
// vectorize.
#pragma once
#include <ATen/OpMathType.h>
#include <c10/util/Half.h>
#include <c10/util/bit_cast.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

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

}  // namespace cnnkern::cpu

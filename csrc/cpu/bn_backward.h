// What the two passes of the CPU batch-norm backward share: the ReLU mask, and the
// reduction pass, compiled on its own in bn_backward_sums.cpp (half of the backward's
// instantiations: the builds compile the two halves in parallel).
#pragma once
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <cstdint>
#include <type_traits>
#include <vector>

#include "cpu/bn_lines.h"

namespace cnnkern::cpu {

// Where the backward's ReLU mask comes from: no ReLU; the forward's output (> 0); or the
// forward's output recomputed from x (`normalized`, valid where the forward had no residual).
enum class Mask { kNone, kOutput, kRecomputed };

inline Mask mask_of(bool relu, const at::Tensor& output) {
  return !relu ? Mask::kNone : output.defined() ? Mask::kOutput : Mask::kRecomputed;
}

// Calls f(std::integral_constant<Mask, m>{}) for m = mask.
template <typename F>
void dispatch_mask(Mask mask, const F& f) {
  switch (mask) {
    case Mask::kNone: return f(std::integral_constant<Mask, Mask::kNone>{});
    case Mask::kOutput: return f(std::integral_constant<Mask, Mask::kOutput>{});
    case Mask::kRecomputed: return f(std::integral_constant<Mask, Mask::kRecomputed>{});
  }
}

// The gradient reaching the batch norm: grad_output, zeroed where the ReLU was off. y is
// the output's line (kOutput); x and the affine's lines serve kRecomputed.
template <Mask kMask, typename scalar_t, typename acc_t, typename G, typename Y, typename X, typename P>
acc_t relu_grad(const G& g, const Y& y, const X& x, const P& mean, const P& scale, const P& shift, int64_t k) {
  const acc_t gk = static_cast<acc_t>(g[k]);  // loaded unconditionally: a select, not a branch
  if constexpr (kMask == Mask::kOutput) {
    return static_cast<acc_t>(y[k]) > acc_t(0) ? gk : acc_t(0);
  } else if constexpr (kMask == Mask::kRecomputed) {
    const acc_t v = normalized(static_cast<acc_t>(x[k]), mean[k], scale[k], shift[k]);
    return stored_positive<scalar_t>(v) ? gk : acc_t(0);
  } else {
    return gk;
  }
}

#ifdef CNNKERN_IN_REGISTERS
// relu_grad of elements k to k + 7 of 16-bit lines, converted in registers
// (csrc/cpu/in_registers.h), or of float32 lines (csrc/cpu/streamed.h): the same bits.
template <Mask kMask, typename scalar_t, typename In, typename P>
CNNKERN_AVX2_F16C __m256 relu_grad8(const In& g, const In& y, const In& x, const P& mean, const P& scale,
                                    const P& shift, int64_t k) {
  const __m256 gk = load8(g, k);
  if constexpr (kMask == Mask::kOutput) {
    return _mm256_and_ps(_mm256_cmp_ps(load8(y, k), _mm256_setzero_ps(), _CMP_GT_OQ), gk);
  } else if constexpr (kMask == Mask::kRecomputed) {
    const __m256 v = normalized8(x, mean, scale, shift, k);
    const __m256 zero = _mm256_set1_ps(kStoredZero<scalar_t, float>);
    return _mm256_and_ps(_mm256_cmp_ps(v, zero, _CMP_GT_OQ), gk);  // stored_positive
  } else {
    return gk;
  }
}
#endif

// Per channel of the walk: {sum gz for each, then sum gz * (x - mean) for each}, in double;
// `affine` is the forward's (its scale and shift serve a recomputed mask only).
// A defined grad_residual receives gz on the way (it is gz when relu): the
// elementwise pass then reads it instead of grad_output and output. stream_grad_residual: it
// may be stored around the caches, where a float32 op's outputs are (channel_sums_writing).
template <typename scalar_t>
std::vector<double> grad_sums(const Walk& w, const at::Tensor& grad_output, const at::Tensor& input,
                              const at::Tensor& output, const Affine<at::opmath_type<scalar_t>>& affine, Mask mask,
                              const at::Tensor& grad_residual, bool stream_grad_residual);

}  // namespace cnnkern::cpu

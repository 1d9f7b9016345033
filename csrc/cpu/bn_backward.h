// What the two passes of the CPU batch-norm backward share: the ReLU mask, and the
// reduction pass, compiled on its own in bn_backward_sums.cpp (half of the backward's
// instantiations: the builds compile the two halves in parallel).
#pragma once
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <cstdint>
#include <vector>

#include "cpu/bn_lines.h"

namespace cnnkern::cpu {

// The gradient reaching the batch norm: grad_output, zeroed where the ReLU was off.
template <bool kRelu, typename acc_t, typename G, typename Y>
acc_t relu_grad(const G& g, const Y& y, int64_t k) {
  const acc_t gk = static_cast<acc_t>(g[k]);  // loaded unconditionally: a select, not a branch
  if constexpr (kRelu) {
    return static_cast<acc_t>(y[k]) > acc_t(0) ? gk : acc_t(0);
  } else {
    return gk;
  }
}

// Per channel of the walk: {sum gz for each, then sum gz * (x - mean) for each}, in double.
// A defined grad_residual receives gz on the way (it is gz when relu): the
// elementwise pass then reads it instead of grad_output and output.
template <typename scalar_t>
std::vector<double> grad_sums(const Walk& w, const at::Tensor& grad_output, const at::Tensor& input,
                              const at::Tensor& output, const at::opmath_type<scalar_t>* mean, bool relu,
                              const at::Tensor& grad_residual);

}  // namespace cnnkern::cpu

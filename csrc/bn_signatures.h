// The C++ signature of each batch-norm op's kernels, one per schema in ops.cpp. The
// dispatcher refuses, when the library loads, a kernel whose signature differs from
// another backend's kernel of the same op. That would surface only on a machine that loads
// both the CPU and the CUDA registrations (one with a GPU); each registration, and the
// test suite's CPU emulation of the CUDA wrappers, static_asserts against these instead.
#pragma once
#include <ATen/ATen.h>

#include <array>
#include <optional>
#include <tuple>

namespace cnnkern {

// A `Tensor?` result: std::nullopt for the entries output_mask leaves out.
using OptionalTensor = std::optional<at::Tensor>;

inline OptionalTensor as_optional(const at::Tensor& t) { return t.defined() ? OptionalTensor(t) : std::nullopt; }

using BnForwardTrainSignature = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor& input, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var, double momentum, double eps, bool relu);

using BnForwardEvalSignature = at::Tensor(const at::Tensor& input, const std::optional<at::Tensor>& weight,
                                          const std::optional<at::Tensor>& bias,
                                          const std::optional<at::Tensor>& residual, const at::Tensor& running_mean,
                                          const at::Tensor& running_var, double eps, bool relu);

using BnBackwardSignature = std::tuple<OptionalTensor, OptionalTensor, OptionalTensor, OptionalTensor>(
    const at::Tensor& grad_output, const at::Tensor& input, const std::optional<at::Tensor>& output,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, const at::Tensor& mean,
    const at::Tensor& invstd, bool training, bool relu, std::array<bool, 4> output_mask);

}  // namespace cnnkern

// The torch side of the batch-norm family's CUDA launchers (batch_norm.h): argument checks
// (naming the argument), device guard, output and scratch allocation, the launch on the current
// stream. Generic over a Runtime, so that the same wrappers serve the real CUDA registration
// (bindings.cpp) and the test suite's CPU emulation of the kernels (tests/cuda_emu):
//   Runtime::check_device(input)       the tensor is one this runtime's kernels can address
//   typename Runtime::Guard(device)    makes input's device current for the wrapper's scope
//   Runtime::stream()                  the stream to launch on
//   Runtime::check(cudaError_t)        throws, with the error's text, unless cudaSuccess
//   Runtime::empty(sizes, options), Runtime::empty_like(t)   allocation of outputs and scratch
#pragma once
#include <ATen/ATen.h>

#include <array>
#include <cstdint>
#include <optional>
#include <tuple>
#include <type_traits>

#include "bn_checks.h"
#include "bn_signatures.h"
#include "cuda/batch_norm.h"

namespace cnnkern::cuda_wrappers {

inline cuda::DType to_cuda_dtype(at::ScalarType t) {
  switch (t) {
    case at::kHalf:
      return cuda::DType::kFloat16;
    case at::kBFloat16:
      return cuda::DType::kBFloat16;
    case at::kFloat:
      return cuda::DType::kFloat32;
    case at::kDouble:
      return cuda::DType::kFloat64;
    default:
      break;
  }
  TORCH_CHECK(false, "cnnkern CUDA kernels do not support dtype ", t);
}

// The tensor of an optional argument, or nullptr when it is None (or undefined).
inline const at::Tensor* present(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? &*t : nullptr;
}

inline const void* data_of(const at::Tensor* t) { return t ? t->const_data_ptr() : nullptr; }
inline void* mutable_data_of(const at::Tensor* t) { return t ? t->mutable_data_ptr() : nullptr; }

// Fills what both forward ops share.
inline cuda::BnForwardArgs forward_args(const at::Tensor& input, const at::Tensor* weight, const at::Tensor* bias,
                                        const at::Tensor* residual, const at::Tensor* running_mean,
                                        const at::Tensor* running_var, at::ScalarType param_dtype,
                                        const at::Tensor& output, double eps, bool relu) {
  cuda::BnForwardArgs args{};
  args.input_dtype = to_cuda_dtype(input.scalar_type());
  args.param_dtype = to_cuda_dtype(param_dtype);
  args.input = input.const_data_ptr();
  args.input_view = view3d(input, "input");
  args.residual = data_of(residual);
  if (residual) args.residual_view = view3d(*residual, "residual");
  args.output = output.mutable_data_ptr();
  args.output_view = view3d(output, "output");
  args.weight = data_of(weight);
  args.bias = data_of(bias);
  args.running_mean = mutable_data_of(running_mean);
  args.running_var = mutable_data_of(running_var);
  args.eps = eps;
  args.relu = relu;
  return args;
}

template <class Runtime>
std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_forward_train(
    const at::Tensor& input, const std::optional<at::Tensor>& weight_opt, const std::optional<at::Tensor>& bias_opt,
    const std::optional<at::Tensor>& residual_opt, const std::optional<at::Tensor>& running_mean_opt,
    const std::optional<at::Tensor>& running_var_opt, double momentum, double eps, bool relu) {
  const at::Tensor *weight = present(weight_opt), *bias = present(bias_opt), *residual = present(residual_opt);
  const at::Tensor *running_mean = present(running_mean_opt), *running_var = present(running_var_opt);
  check_input(input);
  Runtime::check_device(input);
  if (residual) check_like_input(*residual, input, "residual");
  const at::ScalarType param_dtype = check_params(
      input, {{weight, "weight"}, {bias, "bias"}, {running_mean, "running_mean"}, {running_var, "running_var"}});

  const typename Runtime::Guard guard(input.device());
  const int64_t C = input.size(1);
  const auto stats_options = input.options().dtype(stat_dtype(input));
  at::Tensor output = Runtime::empty_like(input);
  if (input.numel() == 0) {  // empty batch: zero statistics, running stats untouched
    return {output, at::zeros({C}, stats_options), at::zeros({C}, stats_options)};
  }
  TORCH_CHECK(input.numel() / C > 1, "Expected more than 1 value per channel when training, got input size ",
              input.sizes());
  at::Tensor save_mean = Runtime::empty({C}, stats_options);
  at::Tensor save_invstd = Runtime::empty({C}, stats_options);

  cuda::BnForwardArgs args =
      forward_args(input, weight, bias, residual, running_mean, running_var, param_dtype, output, eps, relu);
  args.save_mean = save_mean.mutable_data_ptr();
  args.save_invstd = save_invstd.mutable_data_ptr();
  args.momentum = momentum;
  size_t bytes = 0;
  Runtime::check(cuda::bn_forward_train_workspace(args, &bytes));
  const at::Tensor scratch = Runtime::empty({static_cast<int64_t>(bytes)}, input.options().dtype(at::kByte));
  Runtime::check(cuda::bn_forward_train(args, scratch.mutable_data_ptr(), Runtime::stream()));
  return {output, save_mean, save_invstd};
}

template <class Runtime>
at::Tensor bn_forward_eval(const at::Tensor& input, const std::optional<at::Tensor>& weight_opt,
                           const std::optional<at::Tensor>& bias_opt, const std::optional<at::Tensor>& residual_opt,
                           const at::Tensor& running_mean, const at::Tensor& running_var, double eps, bool relu) {
  const at::Tensor *weight = present(weight_opt), *bias = present(bias_opt), *residual = present(residual_opt);
  check_input(input);
  Runtime::check_device(input);
  if (residual) check_like_input(*residual, input, "residual");
  TORCH_CHECK(running_mean.defined() && running_var.defined(), "running_mean and running_var are required in eval");
  const at::ScalarType param_dtype = check_params(
      input, {{weight, "weight"}, {bias, "bias"}, {&running_mean, "running_mean"}, {&running_var, "running_var"}});

  const typename Runtime::Guard guard(input.device());
  at::Tensor output = Runtime::empty_like(input);
  if (input.numel() == 0) return output;
  const cuda::BnForwardArgs args =
      forward_args(input, weight, bias, residual, &running_mean, &running_var, param_dtype, output, eps, relu);
  Runtime::check(cuda::bn_forward_eval(args, Runtime::stream()));
  return output;
}

template <class Runtime>
std::tuple<OptionalTensor, OptionalTensor, OptionalTensor, OptionalTensor> bn_backward(
    const at::Tensor& grad_output, const at::Tensor& input, const std::optional<at::Tensor>& output_opt,
    const std::optional<at::Tensor>& weight_opt, const std::optional<at::Tensor>& bias_opt, const at::Tensor& mean,
    const at::Tensor& invstd, bool training, bool relu, std::array<bool, 4> output_mask) {
  const at::Tensor *output = present(output_opt), *weight = present(weight_opt), *bias = present(bias_opt);
  check_input(input);
  Runtime::check_device(input);
  check_like_input(grad_output, input, "grad_output");
  TORCH_CHECK(!relu || output || cuda::bn_backward_recomputes_relu_mask(to_cuda_dtype(input.scalar_type())),
              "the cuda backend's bn_backward reads the ReLU mask from output and cannot recompute it in ",
              input.scalar_type(), " (its recomputing kernels spill registers in 16 bits): pass output "
              "(required when relu=True)");
  if (relu && output) check_like_input(*output, input, "output");
  check_stats(mean, input, "mean");
  check_stats(invstd, input, "invstd");
  // grad_weight / grad_bias take the parameters' dtype, or the statistics dtype without any.
  const at::ScalarType param_dtype = check_params(input, {{weight, "weight"}, {bias, "bias"}});

  const typename Runtime::Guard guard(input.device());
  const auto [want_input, want_weight, want_bias, want_residual] = output_mask;
  const int64_t C = input.size(1);
  const auto param_options = input.options().dtype(param_dtype);
  at::Tensor grad_input = want_input ? Runtime::empty_like(input) : at::Tensor();
  at::Tensor grad_residual = want_residual ? Runtime::empty_like(input) : at::Tensor();
  if (input.numel() == 0) {  // empty batch: nothing flows, parameter grads are zero
    return {as_optional(grad_input), want_weight ? as_optional(at::zeros({C}, param_options)) : std::nullopt,
            want_bias ? as_optional(at::zeros({C}, param_options)) : std::nullopt, as_optional(grad_residual)};
  }
  at::Tensor grad_weight = want_weight ? Runtime::empty({C}, param_options) : at::Tensor();
  at::Tensor grad_bias = want_bias ? Runtime::empty({C}, param_options) : at::Tensor();

  cuda::BnBackwardArgs args{};
  args.input_dtype = to_cuda_dtype(input.scalar_type());
  args.param_dtype = to_cuda_dtype(param_dtype);
  args.grad_output = grad_output.const_data_ptr();
  args.grad_output_view = view3d(grad_output, "grad_output");
  args.input = input.const_data_ptr();
  args.input_view = view3d(input, "input");
  if (relu && output) {
    args.output = output->const_data_ptr();
    args.output_view = view3d(*output, "output");
  }
  args.weight = data_of(weight);
  args.bias = data_of(bias);
  args.mean = mean.const_data_ptr();
  args.invstd = invstd.const_data_ptr();
  if (want_input) {
    args.grad_input = grad_input.mutable_data_ptr();
    args.grad_input_view = view3d(grad_input, "grad_input");
  }
  args.grad_weight = want_weight ? grad_weight.mutable_data_ptr() : nullptr;
  args.grad_bias = want_bias ? grad_bias.mutable_data_ptr() : nullptr;
  if (want_residual) {
    args.grad_residual = grad_residual.mutable_data_ptr();
    args.grad_residual_view = view3d(grad_residual, "grad_residual");
  }
  args.training = training;
  args.relu = relu;
  size_t bytes = 0;
  Runtime::check(cuda::bn_backward_workspace(args, &bytes));
  const at::Tensor scratch = Runtime::empty({static_cast<int64_t>(bytes)}, input.options().dtype(at::kByte));
  Runtime::check(cuda::bn_backward(args, scratch.mutable_data_ptr(), Runtime::stream()));
  return {as_optional(grad_input), as_optional(grad_weight), as_optional(grad_bias), as_optional(grad_residual)};
}

// The signatures the dispatcher expects of every backend's kernels, checked for each Runtime.
template <class Runtime>
constexpr bool matches_op_signatures = std::is_same_v<decltype(bn_forward_train<Runtime>), BnForwardTrainSignature> &&
                                       std::is_same_v<decltype(bn_forward_eval<Runtime>), BnForwardEvalSignature> &&
                                       std::is_same_v<decltype(bn_backward<Runtime>), BnBackwardSignature>;

}  // namespace cnnkern::cuda_wrappers

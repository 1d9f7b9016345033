// TORCH_LIBRARY_IMPL(cnnkern, CUDA, m): the CUDA kernels of csrc/cuda/*.cu behind the op schemas
// of csrc/ops.cpp. Each wrapper checks its arguments (naming them), guards the device, allocates
// the outputs and the kernels' scratch memory with the caching allocator, and launches on the
// current stream. The launchers take raw pointers, so the .cu files stay free of torch headers.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <array>
#include <cstdint>
#include <optional>
#include <tuple>

#include "bn_checks.h"
#include "cuda/batch_norm.h"

namespace cnnkern {
namespace {

cuda::DType to_cuda_dtype(at::ScalarType t) {
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
const at::Tensor* present(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined() ? &*t : nullptr; }

const void* data_of(const at::Tensor* t) { return t ? t->const_data_ptr() : nullptr; }
void* mutable_data_of(const at::Tensor* t) { return t ? t->mutable_data_ptr() : nullptr; }

void check_cuda(const at::Tensor& input) {
  TORCH_CHECK(input.is_cuda(), "input must be a CUDA tensor for the cnnkern CUDA kernels, got ", input.device());
}

// Scratch memory of `bytes` on input's device; freed, stream-ordered, when the caller returns.
at::Tensor workspace(size_t bytes, const at::Tensor& input) {
  return at::empty({static_cast<int64_t>(bytes)}, input.options().dtype(at::kByte));
}

// Fills what both forward ops share.
cuda::BnForwardArgs forward_args(const at::Tensor& input, const at::Tensor* weight, const at::Tensor* bias,
                                 const at::Tensor* residual, const at::Tensor* running_mean,
                                 const at::Tensor* running_var, at::ScalarType param_dtype, const at::Tensor& output,
                                 double eps, bool relu) {
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

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_forward_train_cuda(
    const at::Tensor& input, const std::optional<at::Tensor>& weight_opt, const std::optional<at::Tensor>& bias_opt,
    const std::optional<at::Tensor>& residual_opt, const std::optional<at::Tensor>& running_mean_opt,
    const std::optional<at::Tensor>& running_var_opt, double momentum, double eps, bool relu) {
  const at::Tensor *weight = present(weight_opt), *bias = present(bias_opt), *residual = present(residual_opt);
  const at::Tensor *running_mean = present(running_mean_opt), *running_var = present(running_var_opt);
  check_input(input);
  check_cuda(input);
  if (residual) check_like_input(*residual, input, "residual");
  const at::ScalarType param_dtype = check_params(
      input, {{weight, "weight"}, {bias, "bias"}, {running_mean, "running_mean"}, {running_var, "running_var"}});

  const c10::cuda::CUDAGuard guard(input.device());
  const int64_t C = input.size(1);
  const auto stats_options = input.options().dtype(stat_dtype(input));
  at::Tensor output = at::empty_like(input);
  if (input.numel() == 0) {  // empty batch: zero statistics, running stats untouched
    return {output, at::zeros({C}, stats_options), at::zeros({C}, stats_options)};
  }
  TORCH_CHECK(input.numel() / C > 1, "Expected more than 1 value per channel when training, got input size ",
              input.sizes());
  at::Tensor save_mean = at::empty({C}, stats_options);
  at::Tensor save_invstd = at::empty({C}, stats_options);

  cuda::BnForwardArgs args =
      forward_args(input, weight, bias, residual, running_mean, running_var, param_dtype, output, eps, relu);
  args.save_mean = save_mean.mutable_data_ptr();
  args.save_invstd = save_invstd.mutable_data_ptr();
  args.momentum = momentum;
  size_t bytes = 0;
  C10_CUDA_CHECK(cuda::bn_forward_train_workspace(args, &bytes));
  const at::Tensor scratch = workspace(bytes, input);
  C10_CUDA_CHECK(cuda::bn_forward_train(args, scratch.mutable_data_ptr(), c10::cuda::getCurrentCUDAStream()));
  return {output, save_mean, save_invstd};
}

at::Tensor bn_forward_eval_cuda(const at::Tensor& input, const std::optional<at::Tensor>& weight_opt,
                                const std::optional<at::Tensor>& bias_opt,
                                const std::optional<at::Tensor>& residual_opt, const at::Tensor& running_mean,
                                const at::Tensor& running_var, double eps, bool relu) {
  const at::Tensor *weight = present(weight_opt), *bias = present(bias_opt), *residual = present(residual_opt);
  check_input(input);
  check_cuda(input);
  if (residual) check_like_input(*residual, input, "residual");
  TORCH_CHECK(running_mean.defined() && running_var.defined(), "running_mean and running_var are required in eval");
  const at::ScalarType param_dtype = check_params(
      input, {{weight, "weight"}, {bias, "bias"}, {&running_mean, "running_mean"}, {&running_var, "running_var"}});

  const c10::cuda::CUDAGuard guard(input.device());
  at::Tensor output = at::empty_like(input);
  if (input.numel() == 0) return output;
  const cuda::BnForwardArgs args =
      forward_args(input, weight, bias, residual, &running_mean, &running_var, param_dtype, output, eps, relu);
  C10_CUDA_CHECK(cuda::bn_forward_eval(args, c10::cuda::getCurrentCUDAStream()));
  return output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& input, const std::optional<at::Tensor>& output_opt,
    const std::optional<at::Tensor>& weight_opt, const at::Tensor& mean, const at::Tensor& invstd, bool training,
    bool relu, std::array<bool, 4> output_mask) {
  const at::Tensor *output = present(output_opt), *weight = present(weight_opt);
  check_input(input);
  check_cuda(input);
  check_like_input(grad_output, input, "grad_output");
  TORCH_CHECK(!relu || output, "output is required when relu=True (the ReLU mask is output > 0)");
  if (relu) check_like_input(*output, input, "output");
  check_stats(mean, input, "mean");
  check_stats(invstd, input, "invstd");
  // grad_weight / grad_bias take weight's dtype, or the statistics dtype without a weight.
  const at::ScalarType param_dtype = check_params(input, {{weight, "weight"}});

  const c10::cuda::CUDAGuard guard(input.device());
  const auto [want_input, want_weight, want_bias, want_residual] = output_mask;
  const int64_t C = input.size(1);
  const auto param_options = input.options().dtype(param_dtype);
  at::Tensor grad_input = want_input ? at::empty_like(input) : at::Tensor();
  at::Tensor grad_residual = want_residual ? at::empty_like(input) : at::Tensor();
  if (input.numel() == 0) {  // empty batch: nothing flows, parameter grads are zero
    return {grad_input, want_weight ? at::zeros({C}, param_options) : at::Tensor(),
            want_bias ? at::zeros({C}, param_options) : at::Tensor(), grad_residual};
  }
  at::Tensor grad_weight = want_weight ? at::empty({C}, param_options) : at::Tensor();
  at::Tensor grad_bias = want_bias ? at::empty({C}, param_options) : at::Tensor();

  cuda::BnBackwardArgs args{};
  args.input_dtype = to_cuda_dtype(input.scalar_type());
  args.param_dtype = to_cuda_dtype(param_dtype);
  args.grad_output = grad_output.const_data_ptr();
  args.grad_output_view = view3d(grad_output, "grad_output");
  args.input = input.const_data_ptr();
  args.input_view = view3d(input, "input");
  if (relu) {
    args.output = output->const_data_ptr();
    args.output_view = view3d(*output, "output");
  }
  args.weight = data_of(weight);
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
  C10_CUDA_CHECK(cuda::bn_backward_workspace(args, &bytes));
  const at::Tensor scratch = workspace(bytes, input);
  C10_CUDA_CHECK(cuda::bn_backward(args, scratch.mutable_data_ptr(), c10::cuda::getCurrentCUDAStream()));
  return {grad_input, grad_weight, grad_bias, grad_residual};
}

}  // namespace
}  // namespace cnnkern

TORCH_LIBRARY_IMPL(cnnkern, CUDA, m) {
  m.impl("bn_forward_train", &cnnkern::bn_forward_train_cuda);
  m.impl("bn_forward_eval", &cnnkern::bn_forward_eval_cuda);
  m.impl("bn_backward", &cnnkern::bn_backward_cuda);
}

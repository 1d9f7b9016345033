// Autograd of the batch-norm family: cnnkern::batch_norm (the C++ kernels) and
// cnnkern::triton_batch_norm (the Triton ones) run their backend's forward op, keep what its
// bn_backward needs, and call it for the gradients. In C++, as torchvision's csrc/ops/autograd/,
// rather than a Python torch.autograd.Function, whose bookkeeping took about 20 us of host
// time per forward + backward on the CI machine: more than the kernels of a small layer take.
// (torch.library.register_autograd cannot serve: the forward updates the running stats in place.)
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <string>
#include <tuple>

#include "bn_checks.h"
#include "bn_signatures.h"

namespace cnnkern {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The backend's ops: cnnkern::<name> for the C++ kernels, cnnkern::triton_<name> for Triton's.
template <bool kTriton>
struct BackendOps {
  template <typename Signature>
  static c10::TypedOperatorHandle<Signature> find(const char* name) {
    const std::string qualified = std::string("cnnkern::") + (kTriton ? "triton_" : "") + name;
    return c10::Dispatcher::singleton().findSchemaOrThrow(qualified.c_str(), "").typed<Signature>();
  }
  static const c10::TypedOperatorHandle<BnForwardTrainSignature>& forward_train() {
    static const auto op = find<BnForwardTrainSignature>("bn_forward_train");
    return op;
  }
  static const c10::TypedOperatorHandle<BnForwardEvalSignature>& forward_eval() {
    static const auto op = find<BnForwardEvalSignature>("bn_forward_eval");
    return op;
  }
  static const c10::TypedOperatorHandle<BnBackwardSignature>& backward() {
    static const auto op = find<BnBackwardSignature>("bn_backward");
    return op;
  }
};

// (output, mean, invstd) of the backend's forward op; the statistics are undefined in eval.
template <bool kTriton>
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_ops(const at::Tensor& input, const OptionalTensor& weight,
                                                           const OptionalTensor& bias, const OptionalTensor& residual,
                                                           const OptionalTensor& running_mean,
                                                           const OptionalTensor& running_var, bool training,
                                                           double momentum, double eps, bool relu) {
  using Ops = BackendOps<kTriton>;
  if (training) {
    return Ops::forward_train().call(input, weight, bias, residual, running_mean, running_var, momentum, eps, relu);
  }
  // Unset running stats reach the eval op as undefined tensors, which it refuses by name.
  return {Ops::forward_eval().call(input, weight, bias, residual, running_mean.value_or(at::Tensor()),
                                   running_var.value_or(at::Tensor()), eps, relu),
          at::Tensor(), at::Tensor()};
}

template <bool kTriton>
struct BatchNormFunction : torch::autograd::Function<BatchNormFunction<kTriton>> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input, const OptionalTensor& weight,
                            const OptionalTensor& bias, const OptionalTensor& residual,
                            const OptionalTensor& running_mean, const OptionalTensor& running_var, bool training,
                            double momentum, double eps, bool relu, bool backward_recomputes_relu_mask) {
    auto [output, mean, invstd] = forward_ops<kTriton>(input, weight, bias, residual, running_mean, running_var,
                                                       training, momentum, eps, relu);
    if (!training) {
      // The eval backward normalizes with the running stats as they are now.
      const at::ScalarType acc = stat_dtype(input);
      mean = running_mean->to(acc, /*non_blocking=*/false, /*copy=*/true);
      invstd = at::rsqrt(running_var->to(acc) + eps);
    }
    // The output serves only the ReLU mask. Where the backward recomputes the mask from the
    // input instead (no residual; the batch statistics, which it gets as the forward saved
    // them) it is not kept: the backward reads a tensor fewer, and the output is free for
    // in-place ops (torchvision's `out += identity`) and the allocator.
    const bool keeps_output = relu && !(training && !residual && backward_recomputes_relu_mask);
    ctx->save_for_backward({input, keeps_output ? output : at::Tensor(), weight.value_or(at::Tensor()),
                            bias.value_or(at::Tensor()), mean, invstd});
    ctx->saved_data["training"] = training;
    ctx->saved_data["relu"] = relu;
    ctx->saved_data["residual"] = residual && residual->defined();
    return output;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &input = saved[0], &output = saved[1], &weight = saved[2], &bias = saved[3];
    const at::Tensor &mean = saved[4], &invstd = saved[5];
    const bool training = ctx->saved_data["training"].toBool(), relu = ctx->saved_data["relu"].toBool();
    at::Tensor grad_output = grad_outputs[0];
    if (!try_view3d(grad_output)) grad_output = grad_output.contiguous();  // a layout no kernel addresses
    // needs_input_grad counts the tensor arguments: an absent optional one takes no index.
    size_t index = 0;
    const auto needs_grad = [&](bool present) { return present && ctx->needs_input_grad(index++); };
    const bool need_input = needs_grad(true), need_weight = needs_grad(weight.defined());
    const bool need_bias = needs_grad(bias.defined());
    const bool need_residual = needs_grad(ctx->saved_data["residual"].toBool());
    const std::array<bool, 4> mask{need_input, need_weight, need_bias, need_residual && relu};
    OptionalTensor grad_input, grad_weight, grad_bias, grad_residual;
    if (mask[0] || mask[1] || mask[2] || mask[3]) {
      std::tie(grad_input, grad_weight, grad_bias, grad_residual) = BackendOps<kTriton>::backward().call(
          grad_output, input, as_optional(output), as_optional(weight), as_optional(bias), mean, invstd, training,
          relu, mask);
    }
    if (need_residual && !relu) grad_residual = grad_output;  // d(x + r)/dr = 1: no kernel, no copy
    const auto or_undefined = [](const OptionalTensor& t) { return t.value_or(at::Tensor()); };
    // One gradient per forward argument; none for the running stats and the options.
    return {or_undefined(grad_input),
            or_undefined(grad_weight),
            or_undefined(grad_bias),
            or_undefined(grad_residual),
            at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// Below autograd (inference mode; tracing that has taken care of autograd): the forward alone.
template <bool kTriton>
at::Tensor batch_norm_forward(const at::Tensor& input, const OptionalTensor& weight, const OptionalTensor& bias,
                              const OptionalTensor& residual, const OptionalTensor& running_mean,
                              const OptionalTensor& running_var, bool training, double momentum, double eps,
                              bool relu, bool /*backward_recomputes_relu_mask*/) {
  return std::get<0>(
      forward_ops<kTriton>(input, weight, bias, residual, running_mean, running_var, training, momentum, eps, relu));
}

bool requires_grad(const OptionalTensor& t) { return t && t->requires_grad(); }

// The Autograd kernel. Calls no gradient can flow through take the forward alone: the graph
// node would go unused.
template <bool kTriton>
at::Tensor batch_norm_autograd(const at::Tensor& input, const OptionalTensor& weight, const OptionalTensor& bias,
                               const OptionalTensor& residual, const OptionalTensor& running_mean,
                               const OptionalTensor& running_var, bool training, double momentum, double eps,
                               bool relu, bool backward_recomputes_relu_mask) {
  if (at::GradMode::is_enabled() &&
      (input.requires_grad() || requires_grad(weight) || requires_grad(bias) || requires_grad(residual))) {
    return BatchNormFunction<kTriton>::apply(input, weight, bias, residual, running_mean, running_var, training,
                                             momentum, eps, relu, backward_recomputes_relu_mask);
  }
  return batch_norm_forward<kTriton>(input, weight, bias, residual, running_mean, running_var, training, momentum,
                                     eps, relu, backward_recomputes_relu_mask);
}

}  // namespace
}  // namespace cnnkern

TORCH_LIBRARY_IMPL(cnnkern, Autograd, m) {
  m.impl("batch_norm", &cnnkern::batch_norm_autograd<false>);
  m.impl("triton_batch_norm", &cnnkern::batch_norm_autograd<true>);
  // The kernel ops have no derivative of their own. Differentiating through one (a direct call,
  // or batch_norm's backward under create_graph=True, differentiated again) raises, where the
  // default fallback only warns and counts the op as a constant: silently wrong gradients.
  for (const char* op : {"bn_forward_train", "bn_forward_eval", "bn_backward", "triton_bn_forward_train",
                         "triton_bn_forward_eval", "triton_bn_backward"}) {
    m.impl(op, torch::autograd::autogradNotImplementedFallback());
  }
}

TORCH_LIBRARY_IMPL(cnnkern, CompositeExplicitAutograd, m) {
  m.impl("batch_norm", &cnnkern::batch_norm_forward<false>);
  m.impl("triton_batch_norm", &cnnkern::batch_norm_forward<true>);
}

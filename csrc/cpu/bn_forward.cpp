// CPU kernels of the batch-norm forward, training and eval: y = act(batch_norm(x)
// + residual). The contract is in csrc/ops.cpp; the line walks in bn_lines.h.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <optional>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "bn_checks.h"
#include "bn_signatures.h"
#include "cpu/bn_lines.h"

namespace cnnkern {
namespace {

using namespace cpu;  // NOLINT: the line walks and passes of bn_lines.h

// ---- forward ------------------------------------------------------------------

// Element k of a line of shifted_sums: (x - ref, (x - ref)^2). eight(k): elements k to k + 7,
// for 16-bit lines that convert in registers (csrc/cpu/in_registers.h); prefetch(k): its line
// ahead of k, for the sums along L.
template <typename acc_t, typename In, typename P>
struct ShiftedElement {
  In x;   // the input's line
  P ref;  // the shifts of the line's channels
  std::pair<acc_t, acc_t> operator()(int64_t k) const {
    const acc_t d = static_cast<acc_t>(x[k]) - ref[k];
    return {d, d * d};
  }
#ifdef CNNKERN_IN_REGISTERS
  CNNKERN_AVX2_F16C void prefetch(int64_t k) const { cpu::prefetch(x, k); }
  CNNKERN_AVX2_F16C Pair8 eight(int64_t k) const {
    const __m256 d = _mm256_sub_ps(load8(x, k), load8(ref, k));
    return {d, _mm256_mul_ps(d, d)};
  }
#endif
};

template <typename acc_t, typename In, typename P>
ShiftedElement<acc_t, In, P> shifted_element(const In& x, const P& ref) {
  return {x, ref};
}

// Per-channel sums of x - ref_c and (x - ref_c)^2 over the walk's channels, in
// double, in one read of the input ({first sums, then second sums}, as
// channel_sums). ref_c is a value of the channel (shift_values): shifted by it,
// they are sums of deviations, so the variance does not cancel away when
// |mean| >> std (accurate while |ref_c - mean| is a few std).
template <typename scalar_t>
std::vector<double> shifted_sums(const Walk& w, const at::Tensor& input, const at::opmath_type<scalar_t>* ref) {
  using acc_t = at::opmath_type<scalar_t>;
  std::vector<double> sums;
  const auto on_runs = [&](const Walk& lines) {
    sums = shifted_sums<scalar_t>(lines, input, expand_channels(lines, ref).data());
  };
  if (for_position_runs(w, {&input}, on_runs)) return sums;
  dispatch_strides(w, {&input}, [&](auto ts, auto cs) {
    using TS = decltype(ts);
    using CS = decltype(cs);
    const auto X = w.lines<const scalar_t, TS>(input);
    const auto Ref = w.per_channel<CS>(ref);
    sums = channel_sums<acc_t, CS, /*kGroupLines=*/true, StageFor<scalar_t, TS>>(w, [&](int64_t n, int64_t j,
                                                                                         auto& stage) {
      return shifted_element<acc_t>(stage.in(X.line(n, j)), Ref.line(n, j));
    });
  });
  return sums;
}

// Per channel, the median of 5 of its values spread over (N, L): a value within a few std
// of the channel's mean unless most of those 5 are outliers, where x[0, c, 0] alone, once
// the shift, could be one (3000 std out, it cost float32 sums of 256 squares along C all
// their precision: tests/test_batch_norm.py::test_large_mean[...first_outlying]).
template <typename scalar_t>
std::vector<at::opmath_type<scalar_t>> shift_values(const Strided3d& v, const scalar_t* x) {
  std::vector<at::opmath_type<scalar_t>> shifts(v.C);
  const int64_t M = v.N * v.L;
  for (int64_t c = 0; c < v.C; ++c) {
    std::array<at::opmath_type<scalar_t>, 5> samples;
    for (int64_t s = 0; s < 5; ++s) {
      const int64_t m = s * (M - 1) / 4;
      samples[s] = x[v.offset(m / v.L, c, m % v.L)];
    }
    std::nth_element(samples.begin(), samples.begin() + 2, samples.end());
    shifts[c] = samples[2];
  }
  return shifts;
}

// Element k of a line of the normalize pass: y = act((x - mean) * scale + shift + r).
// eight(k): elements k to k + 7, for 16-bit lines that convert in registers
// (csrc/cpu/in_registers.h) and float32 lines whose outputs stream (csrc/cpu/streamed.h).
template <bool kResidual, bool kRelu, typename acc_t, typename In, typename Out, typename P>
struct NormalizeElement {
  In x, r;               // the input's and the residual's lines (r: read only with kResidual)
  Out y;                 // the output's line
  P mean, scale, shift;  // the line's channels' affine (Affine)
  void operator()(int64_t k) const {
    acc_t v = normalized(static_cast<acc_t>(x[k]), mean[k], scale[k], shift[k]);
    if constexpr (kResidual) v += static_cast<acc_t>(r[k]);
    if constexpr (kRelu) v = std::max(v, acc_t(0));
    store(y, k, v);
  }
#ifdef CNNKERN_IN_REGISTERS
  CNNKERN_AVX2_F16C void eight(int64_t k) const {
    __m256 v = normalized8(x, mean, scale, shift, k);
    if constexpr (kResidual) v = _mm256_add_ps(v, load8(r, k));
    if constexpr (kRelu) v = _mm256_max_ps(_mm256_setzero_ps(), v);  // NaN stays NaN, as std::max(v, 0)
    store8(y, k, v);
  }
#endif
};

template <bool kResidual, bool kRelu, typename acc_t, typename In, typename Out, typename P>
NormalizeElement<kResidual, kRelu, acc_t, In, Out, P> normalize_element(const In& x, const In& r, const Out& y,
                                                                        const P& mean, const P& scale,
                                                                        const P& shift) {
  return {x, r, y, mean, scale, shift};
}

// The normalize pass of both forwards: output = act((x - mean) * scale + shift + r).
template <typename scalar_t>
void normalize(const Walk& w, const at::Tensor& input, const at::Tensor& residual, bool relu,
               const Affine<at::opmath_type<scalar_t>>& affine, const at::Tensor& output) {
  using acc_t = at::opmath_type<scalar_t>;
  const bool flat = for_flat_lines<scalar_t>(w, {&input, &residual, &output}, [&](const Walk& lines) {
    normalize<scalar_t>(lines, input, residual, relu, affine.expanded(lines), output);
  });
  if (flat) return;
  dispatch_bool(residual.defined(), [&](auto has_residual) {
    dispatch_bool(relu, [&](auto do_relu) {
      dispatch_strides(w, {&input, &residual, &output}, [&](auto ts, auto cs) {
        using TS = decltype(ts);
        using CS = decltype(cs);
        constexpr bool kResidual = decltype(has_residual)::value, kRelu = decltype(do_relu)::value;
        const auto X = w.lines<const scalar_t, TS>(input);
        const auto R = w.lines<const scalar_t, TS>(residual);
        const auto Y = w.lines<scalar_t, TS>(output);
        const auto Mean = w.per_channel<CS>(affine.mean.data());
        const auto Scale = w.per_channel<CS>(affine.scale.data());
        const auto Shift = w.per_channel<CS>(affine.shift.data());
        for_each_element<StageFor<scalar_t, TS>>(w, [&](int64_t n, int64_t j, auto& stage) {
          return normalize_element<kResidual, kRelu, acc_t>(stage.in(X.line(n, j)), stage.in(R.line(n, j)),
                                                            stage.out(Y.line(n, j)), Mean.line(n, j),
                                                            Scale.line(n, j), Shift.line(n, j));
        });
      });
    });
  });
}

template <typename scalar_t, typename param_t>
void bn_forward_train_kernel_impl(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias,
                                  const at::Tensor& residual, const at::Tensor& running_mean,
                                  const at::Tensor& running_var, double momentum, double eps, bool relu,
                                  const at::Tensor& output, const at::Tensor& save_mean,
                                  const at::Tensor& save_invstd) {
  using acc_t = at::opmath_type<scalar_t>;
  const Strided3d xv = view3d(input, "input");
  // The two passes touch x, the residual and the output.
  const int64_t tensors = 2 + residual.defined();
  Walk w(xv);
  w.op_bytes = tensors * input.nbytes();
  const int64_t C = w.C;
  const std::vector<acc_t> ref = shift_values(xv, input.data_ptr<scalar_t>());

  Affine<acc_t> affine{std::vector<acc_t>(C), param_or<acc_t, param_t>(weight, C, 1),
                       param_or<acc_t, param_t>(bias, C, 0)};
  acc_t* save_mean_p = save_mean.data_ptr<acc_t>();
  acc_t* save_invstd_p = save_invstd.data_ptr<acc_t>();
  param_t* rm = running_mean.defined() ? running_mean.data_ptr<param_t>() : nullptr;
  param_t* rv = running_var.defined() ? running_var.data_ptr<param_t>() : nullptr;
  // In acc_t, stored in param_t, as F.batch_norm; running_var takes the unbiased variance.
  const acc_t keep = static_cast<acc_t>(1 - momentum), take = static_cast<acc_t>(momentum);
  const double unbias = static_cast<double>(w.M) / (w.M - 1);

  by_channel_blocks(w, tensors * w.M * input.element_size(), [&](const Walk& part) {
    const std::vector<double> sums = shifted_sums<scalar_t>(part, input, ref.data());
    for (int64_t i = 0; i < part.nc; ++i) {
      const int64_t c = part.c0 + i;
      const double d = sums[i] / w.M;  // mean - ref_c
      const double var = std::max(sums[part.nc + i] / w.M - d * d, 0.0);
      save_mean_p[c] = static_cast<acc_t>(ref[c] + d);
      save_invstd_p[c] = static_cast<acc_t>(1.0 / std::sqrt(var + eps));
      affine.mean[c] = save_mean_p[c];
      affine.scale[c] *= save_invstd_p[c];
      if (rm) rm[c] = keep * static_cast<acc_t>(rm[c]) + take * save_mean_p[c];
      if (rv) rv[c] = keep * static_cast<acc_t>(rv[c]) + take * static_cast<acc_t>(var * unbias);
    }
    normalize<scalar_t>(part, input, residual, relu, affine, output);
  });
}

template <typename scalar_t, typename param_t>
void bn_forward_eval_kernel_impl(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias,
                                 const at::Tensor& residual, const at::Tensor& running_mean,
                                 const at::Tensor& running_var, double eps, bool relu, const at::Tensor& output) {
  using acc_t = at::opmath_type<scalar_t>;
  // The pass touches x, the residual and the output.
  const int64_t tensors = 2 + residual.defined();
  Walk w(view3d(input, "input"));
  w.op_bytes = tensors * input.nbytes();
  const int64_t C = w.C;
  Affine<acc_t> affine{param_or<acc_t, param_t>(running_mean, C, 0), param_or<acc_t, param_t>(weight, C, 1),
                       param_or<acc_t, param_t>(bias, C, 0)};
  const param_t* rv = running_var.data_ptr<param_t>();
  for (int64_t c = 0; c < C; ++c)
    affine.scale[c] *= static_cast<acc_t>(1.0 / std::sqrt(static_cast<double>(rv[c]) + eps));
  normalize<scalar_t>(w, input, residual, relu, affine, output);
}

// ---- registered ops: checks, allocation, dispatch ------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_forward_train_kernel(
    const at::Tensor& input, const std::optional<at::Tensor>& weight_opt, const std::optional<at::Tensor>& bias_opt,
    const std::optional<at::Tensor>& residual_opt, const std::optional<at::Tensor>& running_mean_opt,
    const std::optional<at::Tensor>& running_var_opt, double momentum, double eps, bool relu) {
  const at::Tensor weight = value_or_undefined(weight_opt), bias = value_or_undefined(bias_opt);
  const at::Tensor residual = value_or_undefined(residual_opt);
  const at::Tensor running_mean = value_or_undefined(running_mean_opt);
  const at::Tensor running_var = value_or_undefined(running_var_opt);
  check_input(input);
  const at::ScalarType param_dtype = check_params(
      input, {{&weight, "weight"}, {&bias, "bias"}, {&running_mean, "running_mean"}, {&running_var, "running_var"}});
  if (residual.defined()) check_like_input(residual, input, "residual");
  const Strided3d v = view3d(input, "input");
  TORCH_CHECK(v.N * v.L != 1, "Expected more than 1 value per channel when training, got input size ", input.sizes());

  at::Tensor output = at::empty_like(input);
  at::Tensor save_mean = at::zeros({input.size(1)}, input.options().dtype(stat_dtype(input)));
  at::Tensor save_invstd = at::zeros_like(save_mean);
  if (input.numel() == 0) return {output, save_mean, save_invstd};

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "bn_forward_train_kernel", [&] {
    dispatch_param_type<scalar_t>(param_dtype, [&](auto p) {
      bn_forward_train_kernel_impl<scalar_t, decltype(p)>(input, weight, bias, residual, running_mean, running_var,
                                                          momentum, eps, relu, output, save_mean, save_invstd);
    });
  });
  return {output, save_mean, save_invstd};
}

at::Tensor bn_forward_eval_kernel(const at::Tensor& input, const std::optional<at::Tensor>& weight_opt,
                                  const std::optional<at::Tensor>& bias_opt,
                                  const std::optional<at::Tensor>& residual_opt, const at::Tensor& running_mean,
                                  const at::Tensor& running_var, double eps, bool relu) {
  const at::Tensor weight = value_or_undefined(weight_opt), bias = value_or_undefined(bias_opt);
  const at::Tensor residual = value_or_undefined(residual_opt);
  check_input(input);
  TORCH_CHECK(running_mean.defined() && running_var.defined(),
              "running_mean and running_var are required in eval mode");
  const at::ScalarType param_dtype = check_params(
      input, {{&weight, "weight"}, {&bias, "bias"}, {&running_mean, "running_mean"}, {&running_var, "running_var"}});
  if (residual.defined()) check_like_input(residual, input, "residual");

  at::Tensor output = at::empty_like(input);
  if (input.numel() == 0) return output;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "bn_forward_eval_kernel", [&] {
    dispatch_param_type<scalar_t>(param_dtype, [&](auto p) {
      bn_forward_eval_kernel_impl<scalar_t, decltype(p)>(input, weight, bias, residual, running_mean, running_var, eps,
                                                         relu, output);
    });
  });
  return output;
}

}  // namespace

static_assert(std::is_same_v<decltype(bn_forward_train_kernel), BnForwardTrainSignature>);
static_assert(std::is_same_v<decltype(bn_forward_eval_kernel), BnForwardEvalSignature>);

TORCH_LIBRARY_IMPL(cnnkern, CPU, m) {
  m.impl(TORCH_SELECTIVE_NAME("cnnkern::bn_forward_train"), TORCH_FN(bn_forward_train_kernel));
  m.impl(TORCH_SELECTIVE_NAME("cnnkern::bn_forward_eval"), TORCH_FN(bn_forward_eval_kernel));
}

}  // namespace cnnkern

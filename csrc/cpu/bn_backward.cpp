// CPU kernel of the batch-norm backward: grad_input, grad_weight, grad_bias and
// grad_residual of y = act(batch_norm(x) + residual). The contract is in
// csrc/ops.cpp; the line walks in bn_lines.h; the reduction pass in bn_backward_sums.cpp.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "bn_checks.h"
#include "bn_signatures.h"
#include "cpu/bn_backward.h"
#include "cpu/bn_lines.h"

namespace cnnkern {
namespace {

using namespace cpu;  // NOLINT: the line walks and passes of bn_lines.h

// ---- backward -----------------------------------------------------------------

// Per-channel coefficients of grad_input = (gz - mean_gz - (x - mean) * proj) * scale, with
// the forward's affine (scale = w * invstd; its shift serves a recomputed mask only);
// mean_gz and proj are 0 in eval mode, where the statistics are constants.
template <typename acc_t>
struct GradCoeffs {
  Affine<acc_t> affine;
  std::vector<acc_t> mean_gz, proj;
};

// Element k of a line of the elementwise pass: grad_input where kInput, grad_residual (= gz)
// where kResidual. eight(k): elements k to k + 7, for 16-bit lines that convert in registers
// (csrc/cpu/in_registers.h) and float32 lines whose outputs stream (csrc/cpu/streamed.h).
template <Mask kMask, bool kTraining, bool kInput, bool kResidual, typename scalar_t, typename In, typename Out,
          typename P>
struct GradElement {
  using acc_t = at::opmath_type<scalar_t>;
  In g, x, y;                           // grad_output's, input's and output's lines
  Out dx, dr;                           // grad_input's and grad_residual's
  P mean, scale, shift, mean_gz, proj;  // the line's channels' GradCoeffs
  void operator()(int64_t k) const {
    const acc_t gz = relu_grad<kMask, scalar_t, acc_t>(g, y, x, mean, scale, shift, k);
    if constexpr (kInput) {
      if constexpr (kTraining) {
        store(dx, k, (gz - mean_gz[k] - (static_cast<acc_t>(x[k]) - mean[k]) * proj[k]) * scale[k]);
      } else {
        store(dx, k, gz * scale[k]);
      }
    }
    if constexpr (kResidual) store(dr, k, gz);
  }
#ifdef CNNKERN_IN_REGISTERS
  CNNKERN_AVX2_F16C void eight(int64_t k) const {
    const __m256 gz = relu_grad8<kMask, scalar_t>(g, y, x, mean, scale, shift, k);
    if constexpr (kInput) {
      __m256 d = gz;
      if constexpr (kTraining) {
        d = _mm256_sub_ps(_mm256_sub_ps(gz, load8(mean_gz, k)),
                          _mm256_mul_ps(_mm256_sub_ps(load8(x, k), load8(mean, k)), load8(proj, k)));
      }
      store8(dx, k, _mm256_mul_ps(d, load8(scale, k)));
    }
    if constexpr (kResidual) store8(dr, k, gz);
  }
#endif
};

template <Mask kMask, bool kTraining, bool kInput, bool kResidual, typename scalar_t, typename In, typename Out,
          typename P>
GradElement<kMask, kTraining, kInput, kResidual, scalar_t, In, Out, P> grad_element(
    const In& g, const In& x, const In& y, const Out& dx, const Out& dr, const P& mean, const P& scale,
    const P& shift, const P& mean_gz, const P& proj) {
  return {g, x, y, dx, dr, mean, scale, shift, mean_gz, proj};
}

// The elementwise pass of the backward: grad_input and/or grad_residual (= gz).
template <typename scalar_t>
void grad_elementwise(const Walk& w, const at::Tensor& grad_output, const at::Tensor& input,
                      const at::Tensor& output, bool training, Mask mask,
                      const GradCoeffs<at::opmath_type<scalar_t>>& coeffs, const at::Tensor& grad_input,
                      const at::Tensor& grad_residual) {
  using acc_t = at::opmath_type<scalar_t>;
  // In eval mode grad_input = gz * scale: input is read only for a recomputed mask.
  const bool read_x = (training && grad_input.defined()) || mask == Mask::kRecomputed;
  const at::Tensor x_used = read_x ? input : at::Tensor();
  const bool flat = for_flat_lines<scalar_t>(w, {&grad_output, &x_used, &output, &grad_input, &grad_residual},
                                   [&](const Walk& lines) {
    const GradCoeffs<acc_t> expanded{coeffs.affine.expanded(lines), expand_channels(lines, coeffs.mean_gz.data()),
                                     expand_channels(lines, coeffs.proj.data())};
    grad_elementwise<scalar_t>(lines, grad_output, input, output, training, mask, expanded, grad_input,
                               grad_residual);
  });
  if (flat) return;
  dispatch_mask(mask, [&](auto mask_from) {
    dispatch_bool(training, [&](auto is_training) {
      dispatch_bool(grad_input.defined(), [&](auto want_input) {
        dispatch_bool(grad_residual.defined(), [&](auto want_residual) {
          dispatch_strides(w, {&grad_output, &x_used, &output, &grad_input, &grad_residual}, [&](auto ts, auto cs) {
            using TS = decltype(ts);
            using CS = decltype(cs);
            // (maybe_unused: GCC 12 misses a use as a template argument inside a generic lambda)
            [[maybe_unused]] constexpr Mask kMask = decltype(mask_from)::value;
            constexpr bool kTraining = decltype(is_training)::value;
            constexpr bool kInput = decltype(want_input)::value, kResidual = decltype(want_residual)::value;
            const auto G = w.lines<const scalar_t, TS>(grad_output);
            const auto X = w.lines<const scalar_t, TS>(x_used);
            const auto Y = w.lines<const scalar_t, TS>(output);
            const auto DX = w.lines<scalar_t, TS>(grad_input);
            const auto DR = w.lines<scalar_t, TS>(grad_residual);
            const auto Mean = w.per_channel<CS>(coeffs.affine.mean.data());
            const auto Scale = w.per_channel<CS>(coeffs.affine.scale.data());
            const auto Shift = w.per_channel<CS>(coeffs.affine.shift.data());
            const auto MeanGz = w.per_channel<CS>(coeffs.mean_gz.data());
            const auto Proj = w.per_channel<CS>(coeffs.proj.data());
            for_each_element<StageFor<scalar_t, TS, kBackwardChunk>>(w, [&](int64_t n, int64_t j, auto& stage) {
              return grad_element<kMask, kTraining, kInput, kResidual, scalar_t>(
                  stage.in(G.line(n, j)), stage.in(X.line(n, j)), stage.in(Y.line(n, j)), stage.out(DX.line(n, j)),
                  stage.out(DR.line(n, j)), Mean.line(n, j), Scale.line(n, j), Shift.line(n, j), MeanGz.line(n, j),
                  Proj.line(n, j));
            });
          });
        });
      });
    });
  });
}

template <typename scalar_t, typename param_t>
void bn_backward_kernel_impl(const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& output,
                             const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& mean,
                             const at::Tensor& invstd, bool training, Mask mask, const at::Tensor& grad_input,
                             const at::Tensor& grad_weight, const at::Tensor& grad_bias,
                             const at::Tensor& grad_residual) {
  using acc_t = at::opmath_type<scalar_t>;
  Walk w(view3d(input, "input"));
  // The two passes touch grad_output, input, the output (a mask read from it), grad_residual and
  // grad_input.
  const int64_t tensors = 2 + (mask == Mask::kOutput) + grad_residual.defined() + grad_input.defined();
  w.op_bytes = tensors * input.nbytes();
  const int64_t C = w.C;
  const acc_t* mean_p = mean.data_ptr<acc_t>();
  const acc_t* invstd_p = invstd.data_ptr<acc_t>();

  // The forward's affine, computed as it did (bn_forward.cpp): a recomputed mask needs the same bits.
  GradCoeffs<acc_t> coeffs{{std::vector<acc_t>(mean_p, mean_p + C), param_or<acc_t, param_t>(weight, C, 1),
                            param_or<acc_t, param_t>(bias, C, 0)},
                           std::vector<acc_t>(C, 0), std::vector<acc_t>(C, 0)};
  for (int64_t c = 0; c < C; ++c) coeffs.affine.scale[c] *= invstd_p[c];
  param_t* gw = grad_weight.defined() ? grad_weight.data_ptr<param_t>() : nullptr;
  param_t* gb = grad_bias.defined() ? grad_bias.data_ptr<param_t>() : nullptr;

  // Eval mode needs the sums only for grad_weight / grad_bias.
  const bool need_sums = gw || gb || (training && grad_input.defined());
  // With relu, the sums pass writes grad_residual (= gz), and grad_input is
  // computed from it: one tensor fewer to read than grad_output and output, and no
  // mask to recompute.
  const bool residual_first = need_sums && mask != Mask::kNone && grad_residual.defined();
  const auto elementwise = [&](const Walk& part) {
    if (residual_first) {
      if (grad_input.defined()) {
        grad_elementwise<scalar_t>(part, grad_residual, input, at::Tensor(), training, Mask::kNone, coeffs,
                                   grad_input, at::Tensor());
      }
    } else if (grad_input.defined() || grad_residual.defined()) {
      grad_elementwise<scalar_t>(part, grad_output, input, output, training, mask, coeffs, grad_input, grad_residual);
    }
  };
  if (!need_sums) return elementwise(w);

  by_channel_blocks(w, tensors * w.M * input.element_size(), [&](const Walk& part) {
    // grad_residual streams (where the op's outputs do) along L, and only outside channel blocks:
    // in a block the elementwise pass reads it back from the thread's L2 (streamed, the backward
    // at 16x256x28x28 NCHW took 1.08-1.21x as long), and along C the sums pass itself ran slower
    // streamed (1.08-1.19x), where along L unblocked the backward took 0.88-0.93x (32x64x56x56;
    // bench/NOTES.md).
    const bool stream_grad_residual = !part.along_c && part.nc == w.nc;
    const std::vector<double> sums = grad_sums<scalar_t>(part, grad_output, input, output, coeffs.affine, mask,
                                                         residual_first ? grad_residual : at::Tensor(),
                                                         stream_grad_residual);
    for (int64_t i = 0; i < part.nc; ++i) {
      const int64_t c = part.c0 + i;
      const double sum_gz = sums[i], sum_gzxmu = sums[part.nc + i];
      if (gw) gw[c] = static_cast<acc_t>(sum_gzxmu) * invstd_p[c];
      if (gb) gb[c] = static_cast<acc_t>(sum_gz);
      if (training) {
        coeffs.mean_gz[c] = static_cast<acc_t>(sum_gz / w.M);
        coeffs.proj[c] = static_cast<acc_t>(sum_gzxmu / w.M) * invstd_p[c] * invstd_p[c];
      }
    }
    elementwise(part);
  });
}

// ---- registered ops: checks, allocation, dispatch ------------------------------

std::tuple<OptionalTensor, OptionalTensor, OptionalTensor, OptionalTensor> bn_backward_kernel(
    const at::Tensor& grad_output, const at::Tensor& input, const std::optional<at::Tensor>& output_opt,
    const std::optional<at::Tensor>& weight_opt, const std::optional<at::Tensor>& bias_opt, const at::Tensor& mean,
    const at::Tensor& invstd, bool training, bool relu, std::array<bool, 4> output_mask) {
  const at::Tensor weight = value_or_undefined(weight_opt), bias = value_or_undefined(bias_opt);
  // Without relu the output is not read (it may since have been overwritten in place).
  const at::Tensor output = relu ? value_or_undefined(output_opt) : at::Tensor();
  check_input(input);
  check_like_input(grad_output, input, "grad_output");
  if (output.defined()) check_like_input(output, input, "output");
  // grad_weight / grad_bias take the parameters' dtype, or the statistics dtype without any.
  const at::ScalarType param_dtype = check_params(input, {{&weight, "weight"}, {&bias, "bias"}});
  check_stats(mean, input, "mean");
  check_stats(invstd, input, "invstd");

  const auto [want_input, want_weight, want_bias, want_residual] = output_mask;
  const auto param_options = input.options().dtype(param_dtype);
  at::Tensor grad_input = want_input ? at::empty_like(input) : at::Tensor();
  at::Tensor grad_weight = want_weight ? at::zeros({input.size(1)}, param_options) : at::Tensor();
  at::Tensor grad_bias = want_bias ? at::zeros({input.size(1)}, param_options) : at::Tensor();
  at::Tensor grad_residual = want_residual ? at::empty_like(input) : at::Tensor();
  const auto results = [&]() -> std::tuple<OptionalTensor, OptionalTensor, OptionalTensor, OptionalTensor> {
    return {as_optional(grad_input), as_optional(grad_weight), as_optional(grad_bias), as_optional(grad_residual)};
  };
  if (input.numel() == 0) return results();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "bn_backward_kernel", [&] {
    dispatch_param_type<scalar_t>(param_dtype, [&](auto p) {
      bn_backward_kernel_impl<scalar_t, decltype(p)>(grad_output, input, output, weight, bias, mean, invstd, training,
                                                     mask_of(relu, output), grad_input, grad_weight, grad_bias,
                                                     grad_residual);
    });
  });
  return results();
}

}  // namespace

static_assert(std::is_same_v<decltype(bn_backward_kernel), BnBackwardSignature>);

TORCH_LIBRARY_IMPL(cnnkern, CPU, m) {
  m.impl(TORCH_SELECTIVE_NAME("cnnkern::bn_backward"), TORCH_FN(bn_backward_kernel));
}

}  // namespace cnnkern

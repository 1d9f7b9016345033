// The reduction pass of the CPU batch-norm backward (declared in bn_backward.h), for
// every input dtype the op dispatches to.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <utility>
#include <vector>

#include "cpu/bn_backward.h"
#include "cpu/bn_lines.h"

namespace cnnkern::cpu {

template <typename scalar_t>
std::vector<double> grad_sums(const Walk& w, const at::Tensor& grad_output, const at::Tensor& input,
                              const at::Tensor& output, const Affine<at::opmath_type<scalar_t>>& affine, Mask mask,
                              const at::Tensor& grad_residual) {
  using acc_t = at::opmath_type<scalar_t>;
  std::vector<double> sums;
  const auto on_runs = [&](const Walk& lines) {
    sums = grad_sums<scalar_t>(lines, grad_output, input, output, affine.expanded(lines), mask, grad_residual);
  };
  if (for_position_runs(w, {&grad_output, &input, &output, &grad_residual}, on_runs)) return sums;
  dispatch_mask(mask, [&](auto mask_from) {
    dispatch_bool(grad_residual.defined(), [&](auto want_residual) {
      dispatch_strides(w, {&grad_output, &input, &output, &grad_residual}, [&](auto ts, auto cs) {
        using TS = decltype(ts);
        using CS = decltype(cs);
        // (maybe_unused: GCC 12 misses a use as a template argument inside a generic lambda)
        [[maybe_unused]] constexpr Mask kMask = decltype(mask_from)::value;
        constexpr bool kResidual = decltype(want_residual)::value;
        const auto G = w.lines<const scalar_t, TS>(grad_output);
        const auto X = w.lines<const scalar_t, TS>(input);
        const auto Y = w.lines<const scalar_t, TS>(output);
        const auto DR = w.lines<scalar_t, TS>(grad_residual);
        const auto Mean = w.per_channel<CS>(affine.mean.data());
        const auto Scale = w.per_channel<CS>(affine.scale.data());
        const auto Shift = w.per_channel<CS>(affine.shift.data());
        const auto line_fn = [&](int64_t n, int64_t j, auto& stage) {
          return [g = stage.in(G.line(n, j)), x = stage.in(X.line(n, j)), y = stage.in(Y.line(n, j)),
                  dr = stage.out(DR.line(n, j)), mean = Mean.line(n, j), scale = Scale.line(n, j),
                  shift = Shift.line(n, j)](int64_t k) {
            const acc_t gz = relu_grad<kMask, scalar_t, acc_t>(g, y, x, mean, scale, shift, k);
            if constexpr (kResidual) store(dr, k, gz);
            return std::pair<acc_t, acc_t>(gz, gz * (static_cast<acc_t>(x[k]) - mean[k]));
          };
        };
        sums = channel_sums<acc_t, CS, /*kGroupLines=*/false, StageFor<scalar_t, TS, kBackwardChunk>>(w, line_fn);
      });
    });
  });
  return sums;
}

#define CNNKERN_INSTANTIATE_GRAD_SUMS(scalar_t)                                                            \
  template std::vector<double> grad_sums<scalar_t>(const Walk&, const at::Tensor&, const at::Tensor&, \
                                                   const at::Tensor&, const Affine<at::opmath_type<scalar_t>>&, \
                                                   Mask, const at::Tensor&);
CNNKERN_INSTANTIATE_GRAD_SUMS(double)
CNNKERN_INSTANTIATE_GRAD_SUMS(float)
CNNKERN_INSTANTIATE_GRAD_SUMS(at::Half)
CNNKERN_INSTANTIATE_GRAD_SUMS(at::BFloat16)
#undef CNNKERN_INSTANTIATE_GRAD_SUMS

}  // namespace cnnkern::cpu

// The reduction pass of the CPU batch-norm backward (declared in bn_backward.h), for
// every input dtype the op dispatches to.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <utility>
#include <vector>

#include "cpu/bn_backward.h"
#include "cpu/bn_lines.h"

namespace cnnkern::cpu {

namespace {

// Element k of a line of grad_sums: (gz, gz * (x - mean)), gz stored to grad_residual where
// kResidual. eight(k): elements k to k + 7, for 16-bit lines that convert in registers
// (csrc/cpu/in_registers.h); prefetch(k): its lines ahead of k, for the sums along L.
template <Mask kMask, bool kResidual, typename scalar_t, typename In, typename Out, typename P>
struct GradSumsElement {
  using acc_t = at::opmath_type<scalar_t>;
  In g, x, y;            // grad_output's, input's and output's lines
  Out dr;                // grad_residual's
  P mean, scale, shift;  // the forward's affine
  std::pair<acc_t, acc_t> operator()(int64_t k) const {
    const acc_t gz = relu_grad<kMask, scalar_t, acc_t>(g, y, x, mean, scale, shift, k);
    if constexpr (kResidual) store(dr, k, gz);
    return {gz, gz * (static_cast<acc_t>(x[k]) - mean[k])};
  }
#ifdef CNNKERN_IN_REGISTERS
  CNNKERN_AVX2_F16C void prefetch(int64_t k) const {  // of the lines eight() reads
    cpu::prefetch(g, k);
    cpu::prefetch(x, k);
    if constexpr (kMask == Mask::kOutput) cpu::prefetch(y, k);
  }
  CNNKERN_AVX2_F16C Pair8 eight(int64_t k) const {
    const __m256 gz = relu_grad8<kMask, scalar_t>(g, y, x, mean, scale, shift, k);
    if constexpr (kResidual) store8(dr, k, gz);
    return {gz, _mm256_mul_ps(gz, _mm256_sub_ps(load8(x, k), load8(mean, k)))};
  }
#endif
};

template <Mask kMask, bool kResidual, typename scalar_t, typename In, typename Out, typename P>
GradSumsElement<kMask, kResidual, scalar_t, In, Out, P> grad_sums_element(const In& g, const In& x, const In& y,
                                                                          const Out& dr, const P& mean,
                                                                          const P& scale, const P& shift) {
  return {g, x, y, dr, mean, scale, shift};
}

}  // namespace

template <typename scalar_t>
std::vector<double> grad_sums(const Walk& w, const at::Tensor& grad_output, const at::Tensor& input,
                              const at::Tensor& output, const Affine<at::opmath_type<scalar_t>>& affine, Mask mask,
                              const at::Tensor& grad_residual, bool stream_grad_residual) {
  using acc_t = at::opmath_type<scalar_t>;
  std::vector<double> sums;
  const auto on_runs = [&](const Walk& lines) {
    sums = grad_sums<scalar_t>(lines, grad_output, input, output, affine.expanded(lines), mask, grad_residual,
                               stream_grad_residual);
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
          return grad_sums_element<kMask, kResidual, scalar_t>(
              stage.in(G.line(n, j)), stage.in(X.line(n, j)), stage.in(Y.line(n, j)), stage.out(DR.line(n, j)),
              Mean.line(n, j), Scale.line(n, j), Shift.line(n, j));
        };
        using St = StageFor<scalar_t, TS, kBackwardChunk>;
        if constexpr (kResidual) {
          sums = channel_sums_writing<acc_t, CS, St>(w, line_fn, stream_grad_residual);
        } else {
          sums = channel_sums<acc_t, CS, /*kGroupLines=*/false, St>(w, line_fn);
        }
      });
    });
  });
  return sums;
}

#define CNNKERN_INSTANTIATE_GRAD_SUMS(scalar_t)                                                            \
  template std::vector<double> grad_sums<scalar_t>(const Walk&, const at::Tensor&, const at::Tensor&, \
                                                   const at::Tensor&, const Affine<at::opmath_type<scalar_t>>&, \
                                                   Mask, const at::Tensor&, bool);
CNNKERN_INSTANTIATE_GRAD_SUMS(double)
CNNKERN_INSTANTIATE_GRAD_SUMS(float)
CNNKERN_INSTANTIATE_GRAD_SUMS(at::Half)
CNNKERN_INSTANTIATE_GRAD_SUMS(at::BFloat16)
#undef CNNKERN_INSTANTIATE_GRAD_SUMS

}  // namespace cnnkern::cpu

// The two-pass kernels of the batch-norm family (see batch_norm.cu): a reduction launch that
// writes per-split partials, then an elementwise launch that merges them itself.
#pragma once
#include "cuda/bn_device.cuh"

namespace cnnkern::cuda::bn {

// Training forward, launch 1: Welford statistics of each (split, channel).
template <typename T, bool kAlongC, int VEC>
__global__ void __launch_bounds__(kThreads, kBlocksPerSM)
    bn_stats_kernel(const T* input,                    // x, (N, C, L)
                    const Strided3d in_view,           // x's view
                    const Tiling tiling,               // the grid's cover of (N, C, L)
                    const StatPartials<acc_t<T>> out)  // written: (S, C) partials, S = gridDim.y * gridDim.z
{
  using A = acc_t<T>;
  constexpr int K = kAlongC ? VEC : 1;
  constexpr int U = items_per_step(sizeof(T) * VEC);
  const ThreadTile<kAlongC, VEC> tile(tiling);

  Welford<A, K> acc = empty<Welford<A, K>>();
  for_each_step<U>(tile, [&](int64_t n, int64_t i, auto count) {
    Vec<T, VEC> x[U];
    load_step(input, in_view, tile, n, i, count, x);
    acc.merge(step_stats<K>(x, count));
  });
  acc = block_merge(acc, channel_groups<kAlongC>());
  if (thread_rank() < channel_groups<kAlongC>() && tile.channel_ok) out.store(split_index(), tile.c, tiling.C, acc);
}

// Forward, elementwise (training: launch 2; eval: the only launch). Each block first gets the
// statistics of its channels (training: merges all S partials; eval: the running stats), then
// y = act((x - mean) * (w * invstd) + b + r) over its split.
template <typename T, typename P, bool kAlongC, int VEC, bool kTraining>
__global__ void __launch_bounds__(kThreads, kBlocksPerSM)
    bn_forward_kernel(const ForwardParams<T, P> p,  // tensors and scalars, see ForwardParams
                      const Tiling tiling)          // the grid's cover of (N, C, L)
{
  using A = acc_t<T>;
  constexpr int K = kAlongC ? VEC : 1;
  constexpr int U = items_per_step(sizeof(T) * VEC);
  const ThreadTile<kAlongC, VEC, /*kBackwards=*/true> tile(tiling);
  const int groups = channel_groups<kAlongC>();

  Welford<A, K> batch = empty<Welford<A, K>>();
  if constexpr (kTraining) {
    batch = merge_partials<kAlongC, Welford<A, K>>(p.partials, p.num_splits, tile.c, tiling.C, groups);
  }
  const Coefficients<A, K> co = channel_coefficients<kTraining>(p, tile, groups, batch, tile.first_split);
  if (!tile.channel_ok) return;
  for_each_step<U>(tile, [&](int64_t n, int64_t i, auto count) {
    Vec<T, VEC> x[U], r[U] = {};
    load_step(p.input, p.in_view, tile, n, i, count, x);
    if (p.residual) load_step(p.residual, p.res_view, tile, n, i, count, r);
    normalize_step(x, r, co, p.relu);
    store_step(p.output, p.out_view, tile, n, i, count, x);
  });
}

// Backward, launch 1 (when some output needs the sums): per (split, channel), sum(gz) and
// sum(gz * (x - mean)). With relu and grad_residual wanted, it also writes grad_residual = gz,
// which launch 2 then reads in place of grad_output and the ReLU mask. kRecompute: the mask is
// recomputed from x (mask_recomputed) rather than read from the output (relu_output is unused).
template <typename T, bool kAlongC, int VEC, bool kRecompute>
__global__ void __launch_bounds__(kThreads, kBlocksPerSM)
    bn_grad_sums_kernel(const T* grad_output,              // g, (N, C, L)
                        const Strided3d g_view,            // g's view
                        const T* input,                    // x, same shape
                        const Strided3d in_view,           // x's view
                        const T* relu_output,              // forward output (relu: gz = g * (y > 0)), or nullptr
                        const Strided3d out_view,          // its view
                        T* grad_residual,                  // written: gz, same shape, or nullptr
                        const Strided3d gr_view,           // its view
                        const acc_t<T>* mean,              // (C,) the mean the forward normalized with
                        const acc_t<T>* invstd,            // (C,) kRecompute: the invstd it normalized with
                        const acc_t<T>* weight,            // (C,) kRecompute: the forward's, or nullptr (w = 1)
                        const acc_t<T>* bias,              // (C,) kRecompute: the forward's, or nullptr (b = 0)
                        const Tiling tiling,               // the grid's cover of (N, C, L)
                        const GradPartials<acc_t<T>> out)  // written: (S, C) partial sums
{
  using A = acc_t<T>;
  constexpr int K = kAlongC ? VEC : 1;
  constexpr int U = items_per_step(sizeof(T) * VEC);
  const ThreadTile<kAlongC, VEC> tile(tiling);

  A mu[K];
#pragma unroll
  for (int k = 0; k < K; ++k) mu[k] = tile.channel_ok ? mean[tile.c + k] : A(0);
  Coefficients<A, K> forward{};
  if constexpr (kRecompute) forward = forward_coefficients<K>(mean, invstd, weight, bias, tile);

  GradSums<A, K> acc = empty<GradSums<A, K>>();
  // Along C, compiled once: a second copy for whole steps spills registers (8 channels a thread, sm_80).
  for_each_step<U, /*kWholeSteps=*/!kAlongC>(tile, [&](int64_t n, int64_t i, auto count) {
    Vec<T, VEC> gz[U], x[U];
    load_gz_and_x<kRecompute>(grad_output, g_view, input, in_view, relu_output, out_view, grad_residual, gr_view,
                              forward, tile, n, i, count, gz, x);
    add_grad_step(acc, gz, x, mu, count);
  });
  acc = block_merge(acc, channel_groups<kAlongC>());
  if (thread_rank() < channel_groups<kAlongC>() && tile.channel_ok) out.store(split_index(), tile.c, tiling.C, acc);
}

// Backward, elementwise. Each block merges its channels' partial sums, its split-0 block writes
// grad_weight / grad_bias, then over its split writes grad_input (see GradCoefficients) and
// grad_residual = gz. kRecompute: the ReLU mask is recomputed from x, as in bn_grad_sums_kernel.
template <typename T, typename P, bool kAlongC, int VEC, bool kRecompute>
__global__ void __launch_bounds__(kThreads, kBlocksPerSM)
    bn_backward_kernel(const BackwardParams<T, P> p,  // tensors and scalars, see BackwardParams
                       const Tiling tiling)           // the grid's cover of (N, C, L)
{
  using A = acc_t<T>;
  constexpr int K = kAlongC ? VEC : 1;
  constexpr int U = items_per_step(sizeof(T) * VEC);
  const ThreadTile<kAlongC, VEC, /*kBackwards=*/true> tile(tiling);
  const int groups = channel_groups<kAlongC>();

  GradSums<A, K> sums = empty<GradSums<A, K>>();
  if (p.num_splits > 0) {  // uniform over the block, as block_merge requires
    sums = merge_partials<kAlongC, GradSums<A, K>>(p.partials, p.num_splits, tile.c, tiling.C, groups);
  }
  const GradCoefficients<A, K> co = grad_coefficients(p, tile, groups, sums);
  if (!tile.channel_ok || (!p.grad_input && !p.grad_residual)) return;
  const bool read_x = p.grad_input && p.training;
  Coefficients<A, K> forward{};
  if constexpr (kRecompute) forward = forward_coefficients<K>(p.mean, p.invstd, p.weight, p.bias, tile);

  for_each_step<U>(tile, [&](int64_t n, int64_t i, auto count) {
    Vec<T, VEC> gz[U], x[U] = {};
    if constexpr (kRecompute) {
      load_step(p.input, p.in_view, tile, n, i, count, x);  // the mask's, read whatever read_x says
      load_step(p.grad_output, p.g_view, tile, n, i, count, gz);
      mask_recomputed(gz, x, forward);
    } else {
      load_gz(p.grad_output, p.g_view, p.relu_output, p.out_view, tile, n, i, count, gz);
    }
    if (p.grad_residual) store_step(p.grad_residual, p.gr_view, tile, n, i, count, gz);
    if (!p.grad_input) return;  // to the next step
    if (read_x && !kRecompute) load_step(p.input, p.in_view, tile, n, i, count, x);
    grad_input_step(gz, x, co, p.training);
    store_step(p.grad_input, p.gi_view, tile, n, i, count, x);
  });
}

}  // namespace cnnkern::cuda::bn

// The one-pass (resident) kernels of the batch-norm family (see batch_norm.cu): for inputs larger
// than L2, one cooperative launch keeps each block's split on chip between its statistics and
// its elementwise outputs.
#pragma once
#include "cuda/bn_device.cuh"

namespace cnnkern::cuda::bn {

// The rounds of a resident kernel: a grid of gridDim.x channel tiles by S = gridDim.y * gridDim.z
// splits, all resident at once (a cooperative launch), takes the tensor's channel tiles gridDim.x
// at a time. Per round, each block calls gather(tile) (reads its split, keeps it in shared memory,
// stores its partial), waits for the other S - 1 blocks of its tile to have stored theirs, then
// calls apply(tile) (merges the tile's partials, writes from shared memory). The blocks of a tile
// meet at a counter, arrivals[blockIdx.x] (zero at launch), rather than at a grid sync: each tile
// goes on as soon as its own partials are in, so one tile's writes overlap another's reads.
template <bool kAlongC, int VEC, class Gather, class Apply>
__device__ __forceinline__ void resident_rounds(const Tiling& tiling, int64_t channel_tiles, unsigned* arrivals,
                                                Gather&& gather, Apply&& apply) {
  const unsigned splits = gridDim.y * gridDim.z;
  for (int64_t round = 0, tile_x = blockIdx.x; tile_x < channel_tiles; ++round, tile_x += gridDim.x) {
    const ThreadTile<kAlongC, VEC> tile(tiling, tile_x);
    gather(tile);
    __threadfence();  // this block's partial is visible to the whole GPU before it counts itself in
    __syncthreads();
    if (thread_rank() == 0) {
      atomicAdd(&arrivals[blockIdx.x], 1u);
      const unsigned all_in = splits * unsigned(round + 1);
      while (*reinterpret_cast<volatile unsigned*>(&arrivals[blockIdx.x]) < all_in) __nanosleep(64);
      __threadfence();
    }
    __syncthreads();
    apply(tile);
  }
}

// Training forward in one pass over x from DRAM, for tensors larger than L2 (resident_rounds):
// each block loads its split of x into shared memory while accumulating its Welford partial, then
// merges its tile's partials, normalizes from shared memory and writes y. Each thread keeps its
// own items in shared memory, at slots no other thread touches: no barrier guards them.
template <typename T, typename P, bool kAlongC, int VEC>
__global__ void __launch_bounds__(kThreads, kBlocksPerSM)
    bn_forward_resident_kernel(const ForwardParams<T, P> p,  // tensors and scalars, see ForwardParams
                               const Tiling tiling,          // one channel tile's cover; gridDim.x tiles a round
                               const int64_t channel_tiles,  // of the whole tensor
                               unsigned* const arrivals)     // (gridDim.x,) zeros: resident_rounds' counters
{
  using A = acc_t<T>;
  constexpr int K = kAlongC ? VEC : 1;
  constexpr int U = items_per_step(sizeof(T) * VEC);
  extern __shared__ __align__(16) unsigned char resident[];  // per thread rank: its items, U per step
  Vec<T, VEC>* const kept = reinterpret_cast<Vec<T, VEC>*>(resident);
  const int groups = channel_groups<kAlongC>();
  const int rank = thread_rank();

  const auto gather = [&](const ThreadTile<kAlongC, VEC>& tile) {
    Welford<A, K> acc = empty<Welford<A, K>>();
    int64_t slot = rank;
    for_each_step<U>(tile, [&](int64_t n, int64_t i, auto count) {
      Vec<T, VEC> x[U];
      load_step(p.input, p.in_view, tile, n, i, count, x);
#pragma unroll
      for (int u = 0; u < U; ++u, slot += kThreads) kept[slot] = x[u];
      acc.merge(step_stats<K>(x, count));
    });
    acc = block_merge(acc, groups);
    if (rank < groups && tile.channel_ok) p.partials.store(split_index(), tile.c, tiling.C, acc);
  };
  const auto apply = [&](const ThreadTile<kAlongC, VEC>& tile) {
    const Welford<A, K> batch =
        merge_partials<kAlongC, Welford<A, K>>(p.partials, p.num_splits, tile.c, tiling.C, groups);
    const Coefficients<A, K> co = channel_coefficients<true>(p, tile, groups, batch, tile.first_split);
    int64_t slot = rank;
    for_each_step<U>(tile, [&](int64_t n, int64_t i, auto count) {
      Vec<T, VEC> x[U], r[U] = {};
#pragma unroll
      for (int u = 0; u < U; ++u, slot += kThreads) x[u] = kept[slot];
      if (p.residual) load_step(p.residual, p.res_view, tile, n, i, count, r);
      normalize_step(x, r, co, p.relu);
      store_step(p.output, p.out_view, tile, n, i, count, x);
    });
  };
  resident_rounds<kAlongC, VEC>(tiling, channel_tiles, arrivals, gather, apply);
}

// Training backward with grad_input in one pass over its inputs from DRAM, for tensors larger
// than L2 (resident_rounds): each block loads gz (from g and the ReLU mask) and x of its split,
// writes grad_residual = gz right away, keeps both in shared memory while summing its partials,
// then merges its tile's partials and writes grad_input from shared memory. kRecompute: the ReLU
// mask is recomputed from x (mask_recomputed) rather than read from the output.
template <typename T, typename P, bool kAlongC, int VEC, bool kRecompute>
__global__ void __launch_bounds__(kThreads, kBlocksPerSM)
    bn_backward_resident_kernel(const BackwardParams<T, P> p,  // tensors and scalars; training, grad_input wanted
                                const Tiling tiling,           // one channel tile's cover; gridDim.x tiles a round
                                const int64_t channel_tiles,   // of the whole tensor
                                const int64_t kept_items,      // per tensor kept: gz's items, then x's
                                unsigned* const arrivals)      // (gridDim.x,) zeros: resident_rounds' counters
{
  using A = acc_t<T>;
  constexpr int K = kAlongC ? VEC : 1;
  constexpr int U = items_per_step(sizeof(T) * VEC);
  extern __shared__ __align__(16) unsigned char resident[];  // per thread rank: its items, U per step
  Vec<T, VEC>* const kept_gz = reinterpret_cast<Vec<T, VEC>*>(resident);
  Vec<T, VEC>* const kept_x = kept_gz + kept_items;
  const int groups = channel_groups<kAlongC>();
  const int rank = thread_rank();

  const auto gather = [&](const ThreadTile<kAlongC, VEC>& tile) {
    A mu[K];
#pragma unroll
    for (int k = 0; k < K; ++k) mu[k] = tile.channel_ok ? p.mean[tile.c + k] : A(0);
    Coefficients<A, K> forward{};
    if constexpr (kRecompute) forward = forward_coefficients<K>(p.mean, p.invstd, p.weight, p.bias, tile);
    GradSums<A, K> acc = empty<GradSums<A, K>>();
    int64_t slot = rank;
    // Along C, compiled once: a second copy for whole steps spills registers (8 channels a thread).
    for_each_step<U, /*kWholeSteps=*/!kAlongC>(tile, [&](int64_t n, int64_t i, auto count) {
      Vec<T, VEC> gz[U], x[U];
      load_gz_and_x<kRecompute>(p.grad_output, p.g_view, p.input, p.in_view, p.relu_output, p.out_view,
                                p.grad_residual, p.gr_view, forward, tile, n, i, count, gz, x);
#pragma unroll
      for (int u = 0; u < U; ++u, slot += kThreads) kept_gz[slot] = gz[u], kept_x[slot] = x[u];
      add_grad_step(acc, gz, x, mu, count);
    });
    acc = block_merge(acc, groups);
    if (rank < groups && tile.channel_ok) p.partials.store(split_index(), tile.c, tiling.C, acc);
  };
  const auto apply = [&](const ThreadTile<kAlongC, VEC>& tile) {
    const GradSums<A, K> sums =
        merge_partials<kAlongC, GradSums<A, K>>(p.partials, p.num_splits, tile.c, tiling.C, groups);
    const GradCoefficients<A, K> co = grad_coefficients(p, tile, groups, sums);
    int64_t slot = rank;
    for_each_step<U>(tile, [&](int64_t n, int64_t i, auto count) {
      Vec<T, VEC> gz[U], x[U];
#pragma unroll
      for (int u = 0; u < U; ++u, slot += kThreads) gz[u] = kept_gz[slot], x[u] = kept_x[slot];
      grad_input_step(gz, x, co, /*training=*/true);
      store_step(p.grad_input, p.gi_view, tile, n, i, count, x);
    });
  };
  resident_rounds<kAlongC, VEC>(tiling, channel_tiles, arrivals, gather, apply);
}

// The static __shared__ bytes of a resident kernel that merges `Acc` (block_merge's warp totals)
// and keeps kCoefficients values of type A per channel (group_coefficients' table): they share
// each SM's shared memory with the dynamic part.
template <class Acc, typename A, int kCoefficients>
constexpr size_t resident_static_shared() {
  constexpr size_t groups = max_channel_groups<Acc::kChannels>();
  return (sizeof(Acc) * kWarps + sizeof(A) * kCoefficients * Acc::kChannels) * groups;
}

}  // namespace cnnkern::cuda::bn

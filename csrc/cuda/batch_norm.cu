// CUDA kernels of the batch-norm family: y = act(batch_norm(x) + residual) and its backward.
// Semantics: the schemas in csrc/ops.cpp; launcher API: batch_norm.h. No torch header here, so
// plain nvcc compiles this file.
//
// Geometry. Every tensor is an (N, C, L) strided view. A launch picks one orientation from the
// input's strides and uses it for all of its tensors (each keeps its own strides):
//   along L (NCHW, sL == 1): a block owns one channel; threadIdx.x runs along l, threadIdx.y along n.
//   along C (channels_last, sC == 1): a block owns blockDim.x * VEC channels; threadIdx.x runs
//     along c, threadIdx.y along l, and n is a loop (usually of one: (N, L) merge into L when the
//     strides allow, as they do for channels_last).
// Any other strides run the same kernels with VEC = 1: the strides are runtime values anyway.
// A thread reads "items": VEC elements adjacent along its lane dimension, one 16-byte access when
// every tensor of the launch allows it (stride 1 there, aligned pointers and strides), else VEC = 1.
// The grid is (channel tiles, batch splits, l splits); a "split" (blockIdx.y, blockIdx.z) is one
// block's share of the N * L values of its channels. Grids are sized from the SM count.
//
// Launches. Training forward: bn_stats_kernel writes a Welford partial (count, mean, M2) per
// (split, channel); bn_forward_kernel merges the partials of its block's channels itself (no
// finalize launch), normalizes, adds the residual, applies ReLU, and the split-0 block of each
// channel tile writes save_mean / save_invstd and the running stats. Eval forward:
// bn_forward_kernel alone. Backward: bn_grad_sums_kernel writes partial sums of gz and
// gz * (x - mean) per (split, channel) when any output needs them (with relu, it also writes
// grad_residual = gz, if wanted); bn_backward_kernel merges them (its split-0 blocks write
// grad_weight / grad_bias) and writes grad_input (from grad_residual when the first launch wrote
// it) and grad_residual (when it did not).
// Second launches walk their grid and steps backwards (ThreadTile), to start on data still in L2.
// No block reads what another block of the same launch writes: partials are read only by the
// next launch on the stream. The exception: a training forward whose input is larger than L2 runs
// in one pass when it can (plan_resident), as one cooperative launch of bn_forward_resident_kernel
// that keeps x in shared memory between the statistics and the normalization, with a grid sync
// between the two, per round of channel tiles.
#include "cuda/batch_norm.h"
#include "cuda/cooperative_launch.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <array>
#include <climits>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <optional>
#include <type_traits>
#include <utility>

namespace cnnkern::cuda {
namespace {

constexpr int kThreads = 256;  // threads per block, in every kernel (block_merge relies on it)
constexpr int kWarps = kThreads / 32;
constexpr int kBlocksPerSM = 2;        // resident blocks per SM that every kernel guarantees
                                       // (<= 128 registers) and grids are sized for
constexpr int kMinStepsPerThread = 2;  // splitting finer only adds partials to merge
constexpr int kSectorBytes = 32;       // memory access granularity: along C, a row of a block's
                                       // channels is at least this wide
constexpr int64_t kMaxGridYZ = 65535;
// A resident kernel's wait for the other blocks of its tile, once per round, in the bytes a block
// moves meanwhile: about 2 us at 3 TB/s shared by 264 blocks. An estimate until a GPU measures it.
constexpr int64_t kRoundOverheadBytes = 32 << 10;

// Items a thread loads per step of one tensor, all issued before the first is used: 4 (64 bytes
// of 16-byte vectors), or 8 of 2-byte scalars for 16 bytes in flight. More would not fit 128
// registers: the compiler keeps each item's 64-bit offset live per tensor.
__host__ __device__ constexpr int items_per_step(int item_bytes) { return item_bytes == 2 ? 8 : 4; }

// ---- element types ---------------------------------------------------------------------------

// Accumulation ("statistics") type: all arithmetic happens in it.
template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};
template <typename T>
using acc_t = typename AccOf<T>::type;

__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }

template <typename T>
__device__ __forceinline__ T from_acc(acc_t<T> x) {
  return x;  // float, double
}
template <>
__device__ __forceinline__ __half from_acc<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// 1 / sqrt(x) in the accumulation precision (no fast-math approximation).
__device__ __forceinline__ float inv_sqrt(float x) { return rsqrtf(x); }
__device__ __forceinline__ double inv_sqrt(double x) { return 1.0 / sqrt(x); }

// VEC elements adjacent in memory: one access (16 bytes when VEC > 1).
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Vec {
  T v[VEC];
};

// ---- geometry --------------------------------------------------------------------------------

// How a launch's grid covers the (N, C, L) space; computed by make_plan, passed by value.
struct Tiling {
  int64_t N;                // batch size (1 once (N, L) merged into L)
  int64_t C;                // channels
  int64_t items;            // items per (n, channel): L / VEC along L, L along C
  int64_t n_per_split;      // batch indices per blockIdx.y
  int64_t items_per_split;  // items per blockIdx.z
};

__device__ __forceinline__ int thread_rank() { return threadIdx.x + threadIdx.y * blockDim.x; }
__device__ __forceinline__ int64_t split_index() { return int64_t(blockIdx.y) * gridDim.z + blockIdx.z; }

// Threads [0, group) of a block each hold one of its channel groups after block_merge; a thread's
// group is threadIdx.x along C (blockDim.x divides 32 there) and the block's one channel along L.
template <bool kAlongC>
__device__ __forceinline__ int channel_groups() {
  return kAlongC ? blockDim.x : 1;
}

// The part of the (n, item) space one thread visits, and the channels it belongs to. A second pass
// (kBackwards) numbers the blocks backwards and visits each thread's steps last to first: it starts
// on the data the first pass read last, still in L2, so a tensor that fits in L2 is read from DRAM
// once, and a larger one saves the part that does.
template <bool kAlongC, int VEC, bool kBackwards = false>
struct ThreadTile {
  static constexpr bool backwards = kBackwards;
  int64_t c;                         // first channel (along C the thread's VEC channels start here)
  bool channel_ok;                   // c < C: false only for the padding groups of the last tile along C
  bool first_split;                  // the block holds split 0 of its channels: one block per channel tile
  int64_t n_begin, n_end, n_step;    // batch indices n_begin, n_begin + n_step, ... < n_end
  int64_t i_begin, i_end, i_stride;  // items i_begin, i_begin + i_stride, ... < i_end

  __device__ explicit ThreadTile(const Tiling& t)
      : ThreadTile(t, kBackwards ? gridDim.x - 1 - blockIdx.x : blockIdx.x) {}

  // The tile of channel tile `bx` (a persistent block visits several).
  __device__ ThreadTile(const Tiling& t, int64_t bx) {
    const int64_t by = kBackwards ? gridDim.y - 1 - blockIdx.y : blockIdx.y;
    const int64_t bz = kBackwards ? gridDim.z - 1 - blockIdx.z : blockIdx.z;
    first_split = by == 0 && bz == 0;
    const int64_t n0 = by * t.n_per_split;
    const int64_t i0 = bz * t.items_per_split;
    n_end = n0 + t.n_per_split < t.N ? n0 + t.n_per_split : t.N;
    i_end = i0 + t.items_per_split < t.items ? i0 + t.items_per_split : t.items;
    if (kAlongC) {
      c = (bx * blockDim.x + threadIdx.x) * VEC;
      n_begin = n0, n_step = 1;
      i_begin = i0 + threadIdx.y, i_stride = blockDim.y;
    } else {
      c = bx;
      n_begin = n0 + threadIdx.y, n_step = blockDim.y;
      i_begin = i0 + threadIdx.x, i_stride = blockDim.x;
    }
    channel_ok = c < t.C;
  }

  // Element offset, in view v, of the first element of item i at batch index n.
  __device__ __forceinline__ int64_t offset(const Strided3d& v, int64_t n, int64_t i) const {
    return n * v.sN + c * v.sC + (kAlongC ? i : i * VEC) * v.sL;
  }
};

// Calls visit(n, i, count) for each step of the thread's tile: the items i + u * i_stride for
// u < count <= U (count < U only for the last step of an n); last to first when Tile::backwards.
template <int U, class Tile, class Visit>
__device__ __forceinline__ void for_each_step(const Tile& t, Visit&& visit) {
  if (!t.channel_ok || t.n_begin >= t.n_end || t.i_begin >= t.i_end) return;
  const int64_t i_step = U * t.i_stride;
  const int64_t n_last = t.n_begin + (t.n_end - 1 - t.n_begin) / t.n_step * t.n_step;
  const int64_t i_last = t.i_begin + (t.i_end - 1 - t.i_begin) / i_step * i_step;
  const int64_t n_inc = Tile::backwards ? -t.n_step : t.n_step, i_inc = Tile::backwards ? -i_step : i_step;
  for (int64_t n = Tile::backwards ? n_last : t.n_begin; n >= t.n_begin && n <= n_last; n += n_inc) {
    for (int64_t i = Tile::backwards ? i_last : t.i_begin; i >= t.i_begin && i <= i_last; i += i_inc) {
      int count = 0;
#pragma unroll
      for (int u = 0; u < U; ++u) count += i + u * t.i_stride < t.i_end;
      visit(n, i, count);
    }
  }
}

// Loads a step's items (n, i + u * i_stride), u < count, of tensor `base` (view v); the items past
// `count` are zero. Items stay in T until used: half the registers of converting them up front.
template <int U, int VEC, typename T, class Tile>
__device__ __forceinline__ void load_step(const T* base, const Strided3d& v, const Tile& t, int64_t n, int64_t i,
                                          int count, Vec<T, VEC> (&items)[U]) {
#pragma unroll
  for (int u = 0; u < U; ++u) {
    items[u] = u < count ? *reinterpret_cast<const Vec<T, VEC>*>(base + t.offset(v, n, i + u * t.i_stride))
                         : Vec<T, VEC>{};
  }
}

// Stores a step's items u < count to tensor `base` (view v).
template <int U, int VEC, typename T, class Tile>
__device__ __forceinline__ void store_step(T* base, const Strided3d& v, const Tile& t, int64_t n, int64_t i, int count,
                                           const Vec<T, VEC> (&items)[U]) {
#pragma unroll
  for (int u = 0; u < U; ++u) {
    if (u < count) *reinterpret_cast<Vec<T, VEC>*>(base + t.offset(v, n, i + u * t.i_stride)) = items[u];
  }
}

// ---- accumulators ----------------------------------------------------------------------------
// A thread accumulates K channels: its VEC channels along C, its block's one channel along L.
// Both types merge pairwise at every level (step -> thread -> warp -> block -> splits), in a fixed
// order, so every block that merges the same partials gets bit-identical results.

// Count, mean and M2 (sum of squared deviations from the mean) of K channels' values. Chan's
// pairwise merge is exact up to rounding for any split of the data and, unlike sums of x and x^2,
// does not cancel when |mean| >> std.
template <typename A, int K>
struct Welford {
  static constexpr int kChannels = K;
  A n;        // values per channel (the same for all K channels)
  A mean[K];
  A m2[K];

  __device__ static Welford empty() {
    Welford w;
    w.n = 0;
#pragma unroll
    for (int k = 0; k < K; ++k) w.mean[k] = w.m2[k] = 0;
    return w;
  }

  __device__ void merge(const Welford& o) {
    const A n_ab = n + o.n;
    const A w = n_ab > A(0) ? o.n / n_ab : A(0);  // o's weight in the merged mean
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const A delta = o.mean[k] - mean[k];
      mean[k] += delta * w;
      m2[k] += o.m2[k] + delta * delta * n * w;  // n * o.n / n_ab * delta^2
    }
    n = n_ab;
  }

  __device__ Welford shfl_xor(int lane_mask) const {
    Welford o;
    o.n = __shfl_xor_sync(0xffffffffu, n, lane_mask);
#pragma unroll
    for (int k = 0; k < K; ++k) {
      o.mean[k] = __shfl_xor_sync(0xffffffffu, mean[k], lane_mask);
      o.m2[k] = __shfl_xor_sync(0xffffffffu, m2[k], lane_mask);
    }
    return o;
  }
};

// Backward reductions of K channels. Plain sums suffice: x - mean is taken per value, so the sums
// never hold a |mean|-sized term to cancel.
template <typename A, int K>
struct GradSums {
  static constexpr int kChannels = K;
  A gz[K];     // sum of gz
  A gzxmu[K];  // sum of gz * (x - mean)

  __device__ static GradSums empty() {
    GradSums s;
#pragma unroll
    for (int k = 0; k < K; ++k) s.gz[k] = s.gzxmu[k] = 0;
    return s;
  }

  __device__ void merge(const GradSums& o) {
#pragma unroll
    for (int k = 0; k < K; ++k) gz[k] += o.gz[k], gzxmu[k] += o.gzxmu[k];
  }

  __device__ GradSums shfl_xor(int lane_mask) const {
    GradSums o;
#pragma unroll
    for (int k = 0; k < K; ++k) {
      o.gz[k] = __shfl_xor_sync(0xffffffffu, gz[k], lane_mask);
      o.gzxmu[k] = __shfl_xor_sync(0xffffffffu, gzxmu[k], lane_mask);
    }
    return o;
  }
};

// Per-split Welford statistics, the training forward's workspace: three (S, C) arrays, row-major.
// Loads read L2 (__ldcg), past the SM's L1: in a resident kernel, L1 may still hold a line of them
// from an earlier round, read before other blocks wrote this round's partials into it.
template <typename A>
struct StatPartials {
  A* n;
  A* mean;
  A* m2;

  template <int K>
  __device__ Welford<A, K> load(int64_t split, int64_t c, int64_t C) const {
    const int64_t at = split * C + c;
    Welford<A, K> w;
    w.n = __ldcg(n + at);
#pragma unroll
    for (int k = 0; k < K; ++k) w.mean[k] = __ldcg(mean + at + k), w.m2[k] = __ldcg(m2 + at + k);
    return w;
  }

  template <int K>
  __device__ void store(int64_t split, int64_t c, int64_t C, const Welford<A, K>& w) const {
    const int64_t at = split * C + c;
#pragma unroll
    for (int k = 0; k < K; ++k) n[at + k] = w.n, mean[at + k] = w.mean[k], m2[at + k] = w.m2[k];
  }
};

// Per-split backward sums, the backward's workspace: two (S, C) arrays, row-major, loaded as
// StatPartials are.
template <typename A>
struct GradPartials {
  A* gz;
  A* gzxmu;

  template <int K>
  __device__ GradSums<A, K> load(int64_t split, int64_t c, int64_t C) const {
    const int64_t at = split * C + c;
    GradSums<A, K> s;
#pragma unroll
    for (int k = 0; k < K; ++k) s.gz[k] = __ldcg(gz + at + k), s.gzxmu[k] = __ldcg(gzxmu + at + k);
    return s;
  }

  template <int K>
  __device__ void store(int64_t split, int64_t c, int64_t C, const GradSums<A, K>& s) const {
    const int64_t at = split * C + c;
#pragma unroll
    for (int k = 0; k < K; ++k) gz[at + k] = s.gz[k], gzxmu[at + k] = s.gzxmu[k];
  }
};

// Merges `acc` over the threads of the block that hold the same channels: those whose lane is the
// same modulo `groups` (channel_groups()), first by warp shuffles, then across warps. Returns the
// block total in threads [0, groups), one per channel group. Every thread of the block must call
// it.
template <class Acc>
__device__ Acc block_merge(Acc acc, int groups) {
  __shared__ Acc warp_totals[kWarps][32];
  const int rank = thread_rank(), lane = rank % 32, warp = rank / 32;
  __syncthreads();  // a previous call's readers are done with warp_totals
  // Lanes l and l ^ mask (mask >= groups, both powers of two) hold the same channels.
  for (int mask = 16; mask >= groups; mask /= 2) acc.merge(acc.shfl_xor(mask));
  if (lane < groups) warp_totals[warp][lane] = acc;
  __syncthreads();
  if (rank < groups) {
    for (int w = 1; w < kWarps; ++w) acc.merge(warp_totals[w][rank]);
  }
  return acc;
}

// The block total of the num_splits partials of its channels (c, ...), in threads [0, groups) as
// block_merge leaves it. Each thread first merges its share: along C the threads of one channel
// group (threadIdx.y) take turns, along L all threads of the block do. Every thread of the block
// must call it.
template <bool kAlongC, class Acc, class Partials>
__device__ Acc merge_partials(const Partials& partials, int num_splits, int64_t c, int64_t C, int groups) {
  Acc acc = Acc::empty();
  const int first = kAlongC ? int(threadIdx.y) : thread_rank();
  const int step = kAlongC ? int(blockDim.y) : kThreads;
  if (c < C) {
    for (int s = first; s < num_splits; s += step) acc.merge(partials.template load<Acc::kChannels>(s, c, C));
  }
  return block_merge(acc, groups);
}

// Statistics of one step's items u < count (per channel, VEC / K values of each item), two-pass
// over registers. The mean sums x - shift, shift being one of the values, so that the sum stays
// small (no rounding at the scale of |mean|) when |mean| >> std.
template <int K, int U, int VEC, typename T>
__device__ __forceinline__ Welford<acc_t<T>, K> step_stats(const Vec<T, VEC> (&x)[U], int count) {
  using A = acc_t<T>;
  constexpr int kPerItem = VEC / K;  // values of one channel in one item
  Welford<A, K> s;
  s.n = A(count * kPerItem);
  const A inv_n = A(1) / s.n;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const A shift = to_acc(x[0].v[k * kPerItem]);  // item 0 is always valid
    A sum = 0;
#pragma unroll
    for (int u = 0; u < U; ++u) {
#pragma unroll
      for (int e = 0; e < kPerItem; ++e) sum += u < count ? to_acc(x[u].v[k * kPerItem + e]) - shift : A(0);
    }
    s.mean[k] = shift + sum * inv_n;
    A m2 = 0;
#pragma unroll
    for (int u = 0; u < U; ++u) {
#pragma unroll
      for (int e = 0; e < kPerItem; ++e) {
        const A d = to_acc(x[u].v[k * kPerItem + e]) - s.mean[k];
        m2 += u < count ? d * d : A(0);
      }
    }
    s.m2[k] = m2;
  }
  return s;
}

// ---- kernels ---------------------------------------------------------------------------------

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

  Welford<A, K> acc = Welford<A, K>::empty();
  for_each_step<U>(tile, [&](int64_t n, int64_t i, int count) {
    Vec<T, VEC> x[U];
    load_step(input, in_view, tile, n, i, count, x);
    acc.merge(step_stats<K>(x, count));
  });
  acc = block_merge(acc, channel_groups<kAlongC>());
  if (thread_rank() < channel_groups<kAlongC>() && tile.channel_ok) out.store(split_index(), tile.c, tiling.C, acc);
}

template <typename T, typename P>
struct ForwardParams {
  const T* input;  // x, (N, C, L)
  Strided3d in_view;
  const T* residual;  // r, same shape, or nullptr
  Strided3d res_view;
  T* output;  // y, same shape
  Strided3d out_view;
  const P* weight;                  // (C,) or nullptr: w = 1
  const P* bias;                    // (C,) or nullptr: b = 0
  P* running_mean;                  // (C,) training: updated in place, or nullptr; eval: read
  P* running_var;                   // (C,) as running_mean; the unbiased variance
  StatPartials<acc_t<T>> partials;  // training: (S, C) from bn_stats_kernel
  int num_splits;                   // training: S
  acc_t<T>* save_mean;              // training: (C,) written
  acc_t<T>* save_invstd;            // training: (C,) written
  int64_t count;                    // M = N * L values per channel
  acc_t<T> momentum;                // training: weight of the batch statistic in the running one
  acc_t<T> eps;
  bool relu;
};

// Per channel: y = (x - mean) * scale + shift (+ r, then ReLU).
template <typename A, int K>
struct Coefficients {
  A mean[K], scale[K], shift[K];
};

// The coefficients of the thread's channels, from the batch statistics `batch` (training: the
// block total in threads [0, groups) from block_merge) or the running stats (eval). In training,
// the block that holds split 0 of its channels (`publish`) writes save_mean / save_invstd and
// updates the running stats. Every thread of the block must call it.
template <bool kTraining, typename T, typename P, int K, class Tile>
__device__ Coefficients<acc_t<T>, K> channel_coefficients(const ForwardParams<T, P>& p, const Tile& tile, int groups,
                                                          const Welford<acc_t<T>, K>& batch, bool publish) {
  using A = acc_t<T>;
  __shared__ A coef[32][3][K];  // per channel group: mean, scale = w * invstd, shift = b
  const int rank = thread_rank();
  __syncthreads();  // a previous call's readers are done with coef
  if (rank < groups && tile.channel_ok) {
    const A m = A(p.count);
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int64_t c = tile.c + k;
      const A mean = kTraining ? batch.mean[k] : to_acc(p.running_mean[c]);
      const A var = kTraining ? batch.m2[k] / m : to_acc(p.running_var[c]);
      const A invstd = inv_sqrt(var + p.eps);
      coef[rank][0][k] = mean;
      coef[rank][1][k] = (p.weight ? to_acc(p.weight[c]) : A(1)) * invstd;
      coef[rank][2][k] = p.bias ? to_acc(p.bias[c]) : A(0);
      if (kTraining && publish) {
        p.save_mean[c] = mean;
        p.save_invstd[c] = invstd;
        const A keep = A(1) - p.momentum;
        if (p.running_mean) p.running_mean[c] = from_acc<P>(keep * to_acc(p.running_mean[c]) + p.momentum * mean);
        if (p.running_var) {
          const A unbiased = batch.m2[k] / (m - A(1));
          p.running_var[c] = from_acc<P>(keep * to_acc(p.running_var[c]) + p.momentum * unbiased);
        }
      }
    }
  }
  __syncthreads();
  const int group = groups > 1 ? rank % groups : 0;  // along C: threadIdx.x
  Coefficients<A, K> out;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    out.mean[k] = coef[group][0][k], out.scale[k] = coef[group][1][k], out.shift[k] = coef[group][2][k];
  }
  return out;
}

// y = act((x - mean) * scale + shift + r) of a step's items, in place in x. The (x - mean) * scale
// form keeps |mean| >> std from cancelling, where x * scale + shift would not.
template <int U, int VEC, int K, typename T>
__device__ __forceinline__ void normalize_step(Vec<T, VEC> (&x)[U], const Vec<T, VEC> (&r)[U],
                                               const Coefficients<acc_t<T>, K>& co, bool relu) {
  using A = acc_t<T>;
  constexpr int kPerItem = VEC / K;
#pragma unroll
  for (int u = 0; u < U; ++u) {
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      const int k = e / kPerItem;
      A y = (to_acc(x[u].v[e]) - co.mean[k]) * co.scale[k] + co.shift[k] + to_acc(r[u].v[e]);
      if (relu) y = y < A(0) ? A(0) : y;  // NaN stays NaN, as torch.relu
      x[u].v[e] = from_acc<T>(y);
    }
  }
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

  Welford<A, K> batch = Welford<A, K>::empty();
  if constexpr (kTraining) {
    batch = merge_partials<kAlongC, Welford<A, K>>(p.partials, p.num_splits, tile.c, tiling.C, groups);
  }
  const Coefficients<A, K> co = channel_coefficients<kTraining>(p, tile, groups, batch, tile.first_split);
  if (!tile.channel_ok) return;
  for_each_step<U>(tile, [&](int64_t n, int64_t i, int count) {
    Vec<T, VEC> x[U], r[U] = {};
    load_step(p.input, p.in_view, tile, n, i, count, x);
    if (p.residual) load_step(p.residual, p.res_view, tile, n, i, count, r);
    normalize_step(x, r, co, p.relu);
    store_step(p.output, p.out_view, tile, n, i, count, x);
  });
}

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
    Welford<A, K> acc = Welford<A, K>::empty();
    int64_t slot = rank;
    for_each_step<U>(tile, [&](int64_t n, int64_t i, int count) {
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
    for_each_step<U>(tile, [&](int64_t n, int64_t i, int count) {
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

// Loads a step of gz = g, or with relu (`relu_output` non-null) g where the forward output is > 0
// and 0 elsewhere.
template <int U, int VEC, typename T, class Tile>
__device__ __forceinline__ void load_gz(const T* grad_output, const Strided3d& g_view, const T* relu_output,
                                        const Strided3d& out_view, const Tile& t, int64_t n, int64_t i, int count,
                                        Vec<T, VEC> (&gz)[U]) {
  load_step(grad_output, g_view, t, n, i, count, gz);
  if (!relu_output) return;
  Vec<T, VEC> out[U];
  load_step(relu_output, out_view, t, n, i, count, out);
#pragma unroll
  for (int u = 0; u < U; ++u) {
#pragma unroll
    for (int e = 0; e < VEC; ++e) gz[u].v[e] = to_acc(out[u].v[e]) > acc_t<T>(0) ? gz[u].v[e] : T{};
  }
}

// Backward, launch 1 (when some output needs the sums): per (split, channel), sum(gz) and
// sum(gz * (x - mean)). With relu and grad_residual wanted, it also writes grad_residual = gz,
// which launch 2 then reads in place of grad_output and the output.
template <typename T, bool kAlongC, int VEC>
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
                        const Tiling tiling,               // the grid's cover of (N, C, L)
                        const GradPartials<acc_t<T>> out)  // written: (S, C) partial sums
{
  using A = acc_t<T>;
  constexpr int K = kAlongC ? VEC : 1;
  constexpr int kPerItem = VEC / K;
  constexpr int U = items_per_step(sizeof(T) * VEC);
  const ThreadTile<kAlongC, VEC> tile(tiling);

  A mu[K];
#pragma unroll
  for (int k = 0; k < K; ++k) mu[k] = tile.channel_ok ? mean[tile.c + k] : A(0);

  GradSums<A, K> acc = GradSums<A, K>::empty();
  for_each_step<U>(tile, [&](int64_t n, int64_t i, int count) {
    Vec<T, VEC> gz[U], x[U];
    load_gz(grad_output, g_view, relu_output, out_view, tile, n, i, count, gz);
    if (grad_residual) store_step(grad_residual, gr_view, tile, n, i, count, gz);
    load_step(input, in_view, tile, n, i, count, x);
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (u >= count) break;
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const int k = e / kPerItem;
        const A g = to_acc(gz[u].v[e]);
        acc.gz[k] += g;
        acc.gzxmu[k] += g * (to_acc(x[u].v[e]) - mu[k]);
      }
    }
  });
  acc = block_merge(acc, channel_groups<kAlongC>());
  if (thread_rank() < channel_groups<kAlongC>() && tile.channel_ok) out.store(split_index(), tile.c, tiling.C, acc);
}

template <typename T, typename P>
struct BackwardParams {
  const T* grad_output;  // g, (N, C, L)
  Strided3d g_view;
  const T* input;  // x, same shape; read for grad_input when training
  Strided3d in_view;
  const T* relu_output;  // forward output (relu: gz = g * (y > 0)), or nullptr
  Strided3d out_view;
  const P* weight;                  // (C,) or nullptr: w = 1
  const acc_t<T>* mean;             // (C,) the statistics the forward normalized with
  const acc_t<T>* invstd;           // (C,)
  GradPartials<acc_t<T>> partials;  // (S, C) from bn_grad_sums_kernel
  int num_splits;                   // S, 0 when no sums were computed
  T* grad_input;                    // same shape as x, or nullptr
  Strided3d gi_view;
  T* grad_residual;  // same shape as x (gz), or nullptr
  Strided3d gr_view;
  P* grad_weight;  // (C,) or nullptr
  P* grad_bias;    // (C,) or nullptr
  int64_t count;   // M = N * L values per channel
  bool training;   // grad_input flows through the batch mean and invstd
};

// Per channel: grad_input = (gz - mean_gz - (x - mean) * proj) * scale in training, gz * scale
// in eval, with scale = w * invstd, mean_gz = sum_gz / M and proj = invstd^2 * sum_gzxmu / M.
template <typename A, int K>
struct GradCoefficients {
  A mean[K], scale[K], mean_gz[K], proj[K];
};

// The backward coefficients of the thread's channels, from the block totals `sums` (threads
// [0, groups), from block_merge); the block that holds split 0 of its channels writes
// grad_weight / grad_bias. Every thread of the block must call it.
template <typename T, typename P, int K, class Tile>
__device__ GradCoefficients<acc_t<T>, K> grad_coefficients(const BackwardParams<T, P>& p, const Tile& tile, int groups,
                                                           const GradSums<acc_t<T>, K>& sums) {
  using A = acc_t<T>;
  __shared__ A coef[32][4][K];  // per channel group: mean, scale, mean_gz, proj
  const int rank = thread_rank();
  __syncthreads();  // a previous call's readers are done with coef
  if (rank < groups && tile.channel_ok) {
    const A m = A(p.count);
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int64_t c = tile.c + k;
      const A invstd = p.invstd[c];
      coef[rank][0][k] = p.mean[c];
      coef[rank][1][k] = (p.weight ? to_acc(p.weight[c]) : A(1)) * invstd;
      coef[rank][2][k] = p.training ? sums.gz[k] / m : A(0);
      coef[rank][3][k] = p.training ? invstd * invstd * (sums.gzxmu[k] / m) : A(0);
      if (tile.first_split && p.grad_weight) p.grad_weight[c] = from_acc<P>(sums.gzxmu[k] * invstd);
      if (tile.first_split && p.grad_bias) p.grad_bias[c] = from_acc<P>(sums.gz[k]);
    }
  }
  __syncthreads();
  const int group = groups > 1 ? rank % groups : 0;  // along C: threadIdx.x
  GradCoefficients<A, K> out;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    out.mean[k] = coef[group][0][k], out.scale[k] = coef[group][1][k];
    out.mean_gz[k] = coef[group][2][k], out.proj[k] = coef[group][3][k];
  }
  return out;
}

// grad_input of a step's items, into x (read only in training).
template <int U, int VEC, int K, typename T>
__device__ __forceinline__ void grad_input_step(const Vec<T, VEC> (&gz)[U], Vec<T, VEC> (&x)[U],
                                                const GradCoefficients<acc_t<T>, K>& co, bool training) {
  using A = acc_t<T>;
  constexpr int kPerItem = VEC / K;
#pragma unroll
  for (int u = 0; u < U; ++u) {
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      const int k = e / kPerItem;
      const A g = to_acc(gz[u].v[e]);
      const A dx = training ? g - co.mean_gz[k] - (to_acc(x[u].v[e]) - co.mean[k]) * co.proj[k] : g;
      x[u].v[e] = from_acc<T>(dx * co.scale[k]);
    }
  }
}

// Backward, elementwise. Each block merges its channels' partial sums, its split-0 block writes
// grad_weight / grad_bias, then over its split writes grad_input (see GradCoefficients) and
// grad_residual = gz.
template <typename T, typename P, bool kAlongC, int VEC>
__global__ void __launch_bounds__(kThreads, kBlocksPerSM)
    bn_backward_kernel(const BackwardParams<T, P> p,  // tensors and scalars, see BackwardParams
                       const Tiling tiling)           // the grid's cover of (N, C, L)
{
  using A = acc_t<T>;
  constexpr int K = kAlongC ? VEC : 1;
  constexpr int U = items_per_step(sizeof(T) * VEC);
  const ThreadTile<kAlongC, VEC, /*kBackwards=*/true> tile(tiling);
  const int groups = channel_groups<kAlongC>();

  GradSums<A, K> sums = GradSums<A, K>::empty();
  if (p.num_splits > 0) {  // uniform over the block, as block_merge requires
    sums = merge_partials<kAlongC, GradSums<A, K>>(p.partials, p.num_splits, tile.c, tiling.C, groups);
  }
  const GradCoefficients<A, K> co = grad_coefficients(p, tile, groups, sums);
  if (!tile.channel_ok || (!p.grad_input && !p.grad_residual)) return;
  const bool read_x = p.grad_input && p.training;

  for_each_step<U>(tile, [&](int64_t n, int64_t i, int count) {
    Vec<T, VEC> gz[U], x[U] = {};
    load_gz(p.grad_output, p.g_view, p.relu_output, p.out_view, tile, n, i, count, gz);
    if (p.grad_residual) store_step(p.grad_residual, p.gr_view, tile, n, i, count, gz);
    if (!p.grad_input) return;  // to the next step
    if (read_x) load_step(p.input, p.in_view, tile, n, i, count, x);
    grad_input_step(gz, x, co, p.training);
    store_step(p.grad_input, p.gi_view, tile, n, i, count, x);
  });
}

// Training backward with grad_input in one pass over its inputs from DRAM, for tensors larger
// than L2 (resident_rounds): each block loads gz (from g and the ReLU mask) and x of its split,
// writes grad_residual = gz right away, keeps both in shared memory while summing its partials,
// then merges its tile's partials and writes grad_input from shared memory.
template <typename T, typename P, bool kAlongC, int VEC>
__global__ void __launch_bounds__(kThreads, kBlocksPerSM)
    bn_backward_resident_kernel(const BackwardParams<T, P> p,  // tensors and scalars; training, grad_input wanted
                                const Tiling tiling,           // one channel tile's cover; gridDim.x tiles a round
                                const int64_t channel_tiles,   // of the whole tensor
                                const int64_t kept_items,      // per tensor kept: gz's items, then x's
                                unsigned* const arrivals)      // (gridDim.x,) zeros: resident_rounds' counters
{
  using A = acc_t<T>;
  constexpr int K = kAlongC ? VEC : 1;
  constexpr int kPerItem = VEC / K;
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
    GradSums<A, K> acc = GradSums<A, K>::empty();
    int64_t slot = rank;
    for_each_step<U>(tile, [&](int64_t n, int64_t i, int count) {
      Vec<T, VEC> gz[U], x[U];
      load_gz(p.grad_output, p.g_view, p.relu_output, p.out_view, tile, n, i, count, gz);
      if (p.grad_residual) store_step(p.grad_residual, p.gr_view, tile, n, i, count, gz);
      load_step(p.input, p.in_view, tile, n, i, count, x);
#pragma unroll
      for (int u = 0; u < U; ++u, slot += kThreads) {
        kept_gz[slot] = gz[u];
        kept_x[slot] = x[u];
        if (u >= count) continue;
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          const int k = e / kPerItem;
          const A g = to_acc(gz[u].v[e]);
          acc.gz[k] += g;
          acc.gzxmu[k] += g * (to_acc(x[u].v[e]) - mu[k]);
        }
      }
    });
    acc = block_merge(acc, groups);
    if (rank < groups && tile.channel_ok) p.partials.store(split_index(), tile.c, tiling.C, acc);
  };
  const auto apply = [&](const ThreadTile<kAlongC, VEC>& tile) {
    const GradSums<A, K> sums =
        merge_partials<kAlongC, GradSums<A, K>>(p.partials, p.num_splits, tile.c, tiling.C, groups);
    const GradCoefficients<A, K> co = grad_coefficients(p, tile, groups, sums);
    int64_t slot = rank;
    for_each_step<U>(tile, [&](int64_t n, int64_t i, int count) {
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
// and keeps kCoefficients values of type A per channel (the coefficient table of 32 channel
// groups): they share each SM's shared memory with the dynamic part.
template <class Acc, typename A, int kCoefficients>
constexpr size_t resident_static_shared() {
  return sizeof(Acc) * kWarps * 32 + sizeof(A) * 32 * kCoefficients * Acc::kChannels;
}

// ---- host: launch planning -------------------------------------------------------------------

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

int64_t pow2_ceil(int64_t x) {
  int64_t p = 1;
  while (p < x) p *= 2;
  return p;
}

size_t dtype_size(DType t) {
  switch (t) {
    case DType::kFloat16:
    case DType::kBFloat16:
      return 2;
    case DType::kFloat32:
      return 4;
    case DType::kFloat64:
      return 8;
  }
  return 0;
}

size_t acc_size(DType input) { return input == DType::kFloat64 ? 8 : 4; }

// What the launch plans need to know of a device.
struct DeviceLimits {
  int sms;
  int l2_bytes;
  int shared_per_sm;     // bytes of shared memory per SM
  int shared_per_block;  // bytes one block may use, opted in
  bool cooperative;      // cooperative launches (grid syncs) are supported
};

// The current device's limits, queried once per device.
cudaError_t device_limits(DeviceLimits* limits) {
  constexpr int kMaxDevices = 64;
  static std::mutex mutex;
  static std::array<std::optional<DeviceLimits>, kMaxDevices> cache;
  int device = 0;
  if (const cudaError_t err = cudaGetDevice(&device); err != cudaSuccess) return err;
  std::lock_guard<std::mutex> lock(mutex);
  if (device < kMaxDevices && cache[device]) {
    *limits = *cache[device];
    return cudaSuccess;
  }
  int values[5] = {};
  const cudaDeviceAttr attrs[5] = {cudaDevAttrMultiProcessorCount, cudaDevAttrL2CacheSize,
                                   cudaDevAttrMaxSharedMemoryPerMultiprocessor,
                                   cudaDevAttrMaxSharedMemoryPerBlockOptin, cudaDevAttrCooperativeLaunch};
  for (int a = 0; a < 5; ++a) {
    if (const cudaError_t err = cudaDeviceGetAttribute(&values[a], attrs[a], device); err != cudaSuccess) return err;
  }
  *limits = DeviceLimits{values[0], values[1], values[2], values[3], values[4] != 0};
  if (device < kMaxDevices) cache[device] = *limits;
  return cudaSuccess;
}

// One tensor of a launch; data == nullptr: absent (its view is ignored).
struct Operand {
  const void* data;
  Strided3d view;
};

// The launch geometry an op's kernels share.
struct Plan {
  bool along_c;     // lanes along C, else along L
  bool vectorized;  // VEC = 16 / sizeof(T), else 1
  dim3 grid, block;
  Tiling tiling;

  int64_t num_splits() const { return int64_t(grid.y) * grid.z; }
};

// Whether `op` can be read as 16-byte items along the plan's lane dimension: stride 1 there,
// and every item start 16-byte aligned (the pointer, and the strides of the other dims).
bool vector_ok(const Operand& op, bool along_c, int vec) {
  const Strided3d& v = op.view;
  const int64_t lane_stride = along_c ? v.sC : v.sL;
  const int64_t other_size = along_c ? v.L : v.C, other_stride = along_c ? v.sL : v.sC;
  return reinterpret_cast<uintptr_t>(op.data) % 16 == 0 && lane_stride == 1 && (v.N == 1 || v.sN % vec == 0) &&
         (other_size == 1 || other_stride % vec == 0);
}

// Splits `want` ways over dim a first, then dim b, never below one index per thread along a dim.
// Returns the indices per split of each.
void split_two(int64_t want, int64_t size_a, int64_t threads_a, int64_t size_b, int64_t threads_b, int64_t* per_a,
               int64_t* per_b) {
  const int64_t splits_a = std::clamp<int64_t>(std::min(want, size_a / threads_a), 1, kMaxGridYZ);
  *per_a = ceil_div(size_a, splits_a);
  const int64_t left = ceil_div(want, ceil_div(size_a, *per_a));
  const int64_t splits_b = std::clamp<int64_t>(std::min(left, size_b / threads_b), 1, kMaxGridYZ);
  *per_b = ceil_div(size_b, splits_b);
}

// Plans a launch over ops[0..num_ops) (ops[0]: the input, which picks the orientation). Rewrites
// their views in place: with L == 1, sL = sN (l is always 0, and this lets n merge into l); and
// (N, L) merge into L when every present view allows it (sN == L * sL, e.g. channels_last).
cudaError_t make_plan(DType dtype, Operand* ops, int num_ops, Plan* plan) {
  Strided3d& in = ops[0].view;
  if (in.N < 1 || in.C < 1 || in.L < 1) return cudaErrorInvalidValue;
  DeviceLimits device;
  if (const cudaError_t err = device_limits(&device); err != cudaSuccess) return err;
  const int sms = device.sms;

  const int64_t N = in.N, L = in.L;
  bool merge_nl = N > 1;
  for (int j = 0; j < num_ops; ++j) {
    if (!ops[j].data) continue;
    Strided3d& v = ops[j].view;
    if (L == 1) v.sL = v.sN;
    merge_nl = merge_nl && v.sN == L * v.sL;
  }
  for (int j = 0; merge_nl && j < num_ops; ++j) {
    if (!ops[j].data) continue;
    ops[j].view.L = N * L;
    ops[j].view.N = 1;
    ops[j].view.sN = 0;
  }

  // Lanes along the unit stride; otherwise along the smaller one (fewer sectors per warp access).
  plan->along_c = in.L == 1 || (in.sL != 1 && (in.sC == 1 || std::llabs(in.sC) < std::llabs(in.sL)));
  const int elt = int(dtype_size(dtype)), max_vec = 16 / elt;
  plan->vectorized = (plan->along_c ? in.C : in.L) % max_vec == 0;
  for (int j = 0; j < num_ops; ++j) {
    if (ops[j].data) plan->vectorized = plan->vectorized && vector_ok(ops[j], plan->along_c, max_vec);
  }
  const int vec = plan->vectorized ? max_vec : 1, steps = items_per_step(vec * elt);
  const int64_t items = plan->along_c ? in.L : in.L / vec;

  int64_t tx;
  if (plan->along_c) {
    // The narrowest rows that still read whole sectors: more channel tiles, so fewer splits (and
    // fewer partials for each block of the second launch to merge).
    tx = std::min<int64_t>(std::max(kSectorBytes / (vec * elt), 1), pow2_ceil(ceil_div(in.C, vec)));
  } else {
    // Enough lanes along l to cover a row in one step (at most a warp), then no more threads
    // along n than there are batch indices.
    tx = std::min<int64_t>(32, pow2_ceil(ceil_div(items, steps)));
    while (tx < kThreads && kThreads / tx > in.N) tx *= 2;
  }
  const int64_t ty = kThreads / tx;

  const int64_t channel_tiles = plan->along_c ? ceil_div(in.C, tx * vec) : in.C;
  if (channel_tiles > INT_MAX) return cudaErrorInvalidValue;  // gridDim.x limit
  // Splits per channel tile: as many as fit one wave of resident blocks (rounding up would leave a
  // second, mostly idle wave), but no more than give every thread kMinStepsPerThread steps.
  const int64_t item_threads = plan->along_c ? ty : kThreads;  // threads sharing one channel's items
  const int64_t splits =
      std::max<int64_t>(1, std::min(int64_t(sms) * kBlocksPerSM / channel_tiles,
                                    in.N * items / (item_threads * steps * kMinStepsPerThread)));
  int64_t n_per, i_per;
  if (plan->along_c) {
    split_two(splits, items, ty, in.N, 1, &i_per, &n_per);  // l first: n is a per-thread loop
  } else {
    split_two(splits, in.N, ty, items, tx, &n_per, &i_per);  // n first: keeps rows whole
  }

  plan->block = dim3(unsigned(tx), unsigned(ty));
  plan->grid = dim3(unsigned(channel_tiles), unsigned(ceil_div(in.N, n_per)), unsigned(ceil_div(items, i_per)));
  plan->tiling = Tiling{in.N, in.C, items, n_per, i_per};
  return cudaSuccess;
}

// Steps (of U items each) of the busiest thread in one split of `plan`.
int64_t max_steps(const Plan& plan, int U) {
  const Tiling& t = plan.tiling;
  const int64_t tx = plan.block.x, ty = plan.block.y;
  if (plan.along_c) return t.n_per_split * ceil_div(t.items_per_split, U * ty);  // n: a loop of each thread
  return ceil_div(t.n_per_split, ty) * ceil_div(t.items_per_split, U * tx);
}

// CNNKERN_CUDA_ONE_PASS=0 keeps every call on the two-pass kernels (the benchmark's
// cnnkern-cuda-two-pass provider measures what one pass gains). Read at each launch; workspace
// sizes cover both paths, so the switch may change between a workspace query and its launch.
bool one_pass_enabled() {
  const char* value = std::getenv("CNNKERN_CUDA_ONE_PASS");
  return value == nullptr || std::strcmp(value, "0") != 0;
}

// A one-pass launch (bn_forward_resident_kernel, bn_backward_resident_kernel): `plan` with the
// grid of one round (channel tiles per round, splits), `channel_tiles` of the tensor, the items
// each block keeps per tensor, and its dynamic shared memory.
struct ResidentPlan {
  Plan plan;
  int64_t channel_tiles;
  int64_t kept_items;
  size_t shared_bytes;
};

// Whether a launch over the tensors `base` plans runs in one pass, keeping `kept_tensors` of them
// in shared memory, and how: when the input is larger than L2 (below that, the two-pass kernels
// re-read it from L2 anyway) and the grid can hold every channel tile of a round in shared memory,
// kBlocksPerSM blocks per SM, next to the kernel's `static_shared` bytes. Among the split counts
// that fit, the one with the least time for the busiest block: rounds x (its bytes per round +
// kRoundOverheadBytes); ties go to fewer splits (fewer partials to merge).
template <typename T, bool kAlongC, int VEC>
bool plan_resident(const Plan& base, const DeviceLimits& device, int kept_tensors, size_t static_shared,
                   ResidentPlan* out) {
  constexpr int U = items_per_step(sizeof(T) * VEC);
  const Tiling& t = base.tiling;
  const int64_t bytes = t.N * t.C * t.items * (kAlongC ? 1 : VEC) * int64_t(sizeof(T));
  if (!device.cooperative || bytes <= device.l2_bytes) return false;
  constexpr int64_t kReservedPerBlock = 1024;  // the driver's share of each block's shared memory
  const int64_t budget =
      std::min<int64_t>(device.shared_per_block, device.shared_per_sm / kBlocksPerSM - kReservedPerBlock) -
      int64_t(static_shared);
  const int64_t blocks = int64_t(device.sms) * kBlocksPerSM, channel_tiles = base.grid.x;
  const int64_t tx = base.block.x, ty = base.block.y;
  int64_t best = INT64_MAX;
  for (int64_t want = 1; want <= blocks; ++want) {
    Plan p = base;
    int64_t n_per, i_per;
    if (kAlongC) {
      split_two(want, t.items, ty, t.N, 1, &i_per, &n_per);
    } else {
      split_two(want, t.N, ty, t.items, tx, &n_per, &i_per);
    }
    p.tiling.n_per_split = n_per;
    p.tiling.items_per_split = i_per;
    p.grid.y = unsigned(ceil_div(t.N, n_per));
    p.grid.z = unsigned(ceil_div(t.items, i_per));
    const int64_t splits = p.num_splits(), steps = max_steps(p, U), kept = steps * U * kThreads;
    const int64_t shared = kept_tensors * kept * int64_t(sizeof(Vec<T, VEC>));
    if (splits > blocks || shared > budget) continue;
    const int64_t tiles_per_round = std::min(channel_tiles, blocks / splits);
    const int64_t cost = ceil_div(channel_tiles, tiles_per_round) * (shared + kRoundOverheadBytes);
    if (cost >= best) continue;
    best = cost;
    p.grid.x = unsigned(tiles_per_round);
    *out = ResidentPlan{p, channel_tiles, kept, size_t(shared)};
  }
  return best != INT64_MAX;
}

// ---- host: dispatch and launchers ------------------------------------------------------------

template <typename T>
struct Type {
  using type = T;
};

// Calls f(Type<T>{}, Type<P>{}) for the (input, param) dtype pair; pairs outside the contract
// return cudaErrorInvalidValue.
template <class F>
cudaError_t dispatch_dtypes(DType input, DType param, F&& f) {
  switch (input) {
    case DType::kFloat16:
      if (param == DType::kFloat16) return f(Type<__half>{}, Type<__half>{});
      if (param == DType::kFloat32) return f(Type<__half>{}, Type<float>{});
      break;
    case DType::kBFloat16:
      if (param == DType::kBFloat16) return f(Type<__nv_bfloat16>{}, Type<__nv_bfloat16>{});
      if (param == DType::kFloat32) return f(Type<__nv_bfloat16>{}, Type<float>{});
      break;
    case DType::kFloat32:
      if (param == DType::kFloat32) return f(Type<float>{}, Type<float>{});
      break;
    case DType::kFloat64:
      if (param == DType::kFloat64) return f(Type<double>{}, Type<double>{});
      break;
  }
  return cudaErrorInvalidValue;
}

// Calls f(std::bool_constant<along C>{}, std::integral_constant<int, VEC>{}) for the plan.
template <typename T, class F>
cudaError_t dispatch_layout(const Plan& plan, F&& f) {
  using Vector = std::integral_constant<int, int(16 / sizeof(T))>;
  using Scalar = std::integral_constant<int, 1>;
  if (plan.along_c) return plan.vectorized ? f(std::true_type{}, Vector{}) : f(std::true_type{}, Scalar{});
  return plan.vectorized ? f(std::false_type{}, Vector{}) : f(std::false_type{}, Scalar{});
}

std::array<Operand, 3> forward_operands(const BnForwardArgs& a) {
  return {{{a.input, a.input_view}, {a.residual, a.residual_view}, {a.output, a.output_view}}};
}

// The input first (it picks the orientation), then every tensor a backward kernel may access.
std::array<Operand, 5> backward_operands(const BnBackwardArgs& a) {
  return {{{a.input, a.input_view},
           {a.grad_output, a.grad_output_view},
           {a.relu ? a.output : nullptr, a.output_view},
           {a.grad_input, a.grad_input_view},
           {a.grad_residual, a.grad_residual_view}}};
}

bool backward_needs_sums(const BnBackwardArgs& a) {
  return (a.grad_input && a.training) || a.grad_weight || a.grad_bias;
}

// The forward's launch plan (rewrites the views in `ops`, as make_plan does); in training, also
// the one-pass plan when plan_resident takes the call.
template <typename T>
cudaError_t plan_forward(bool training, DType dtype, std::array<Operand, 3>& ops, Plan* plan,
                         std::optional<ResidentPlan>* resident) {
  if (const cudaError_t err = make_plan(dtype, ops.data(), int(ops.size()), plan); err != cudaSuccess) return err;
  resident->reset();
  if (!training) return cudaSuccess;
  DeviceLimits device;
  if (const cudaError_t err = device_limits(&device); err != cudaSuccess) return err;
  return dispatch_layout<T>(*plan, [&](auto along_c, auto vec) {
    constexpr bool kAlongC = decltype(along_c)::value;
    constexpr int VEC = decltype(vec)::value, K = kAlongC ? VEC : 1;
    using A = acc_t<T>;
    ResidentPlan r;
    if (plan_resident<T, kAlongC, VEC>(*plan, device, 1, resident_static_shared<Welford<A, K>, A, 3>(), &r)) {
      *resident = r;
    }
    return cudaSuccess;
  });
}

// Resident kernels' counters (resident_rounds), after `partial_values` statistics of type A in the
// workspace.
template <typename A>
unsigned* arrivals_in(void* workspace, int64_t partial_values) {
  return reinterpret_cast<unsigned*>(static_cast<A*>(workspace) + partial_values);
}

// Workspace bytes for `arrays` (S, C) arrays of partials of `acc_bytes` each: the larger of the
// two-pass plan's needs and the one-pass plan's (its partials, then its counters).
size_t workspace_bytes(int arrays, size_t acc_bytes, const Plan& plan, const std::optional<ResidentPlan>& resident) {
  const size_t per_split = arrays * size_t(plan.tiling.C) * acc_bytes;
  const size_t two_pass = size_t(plan.num_splits()) * per_split;
  if (!resident) return two_pass;
  return std::max(two_pass, size_t(resident->plan.num_splits()) * per_split + resident->plan.grid.x * sizeof(unsigned));
}

// A cooperative launch of a resident kernel on `r`, its counters `arrivals` zeroed first; the
// kernel takes them after `args`.
template <class... Params, class... Args>
cudaError_t launch_resident(void (*kernel)(Params...), const ResidentPlan& r, unsigned* arrivals, cudaStream_t stream,
                            Args&&... args) {
  if (const cudaError_t err = cudaMemsetAsync(arrivals, 0, r.plan.grid.x * sizeof(unsigned), stream);
      err != cudaSuccess) {
    return err;
  }
  // The plan counts on kBlocksPerSM blocks per SM with their shared memory: the largest carveout.
  for (const auto [attr, value] : {std::pair{cudaFuncAttributeMaxDynamicSharedMemorySize, int(r.shared_bytes)},
                                   std::pair{cudaFuncAttributePreferredSharedMemoryCarveout, 100}}) {
    if (const cudaError_t err = cudaFuncSetAttribute(kernel, attr, value); err != cudaSuccess) return err;
  }
  return launch_cooperative(kernel, r.plan.grid, r.plan.block, r.shared_bytes, stream, std::forward<Args>(args)...,
                            arrivals);
}

template <typename T, typename P>
cudaError_t forward(const BnForwardArgs& a, bool training, void* workspace, cudaStream_t stream) {
  using A = acc_t<T>;
  auto ops = forward_operands(a);
  Plan plan;
  std::optional<ResidentPlan> resident;
  if (const cudaError_t err = plan_forward<T>(training, a.input_dtype, ops, &plan, &resident); err != cudaSuccess) {
    return err;
  }
  if (!one_pass_enabled()) resident.reset();
  const int64_t C = plan.tiling.C, S = resident ? resident->plan.num_splits() : plan.num_splits();
  ForwardParams<T, P> p{};
  p.input = static_cast<const T*>(a.input);
  p.in_view = ops[0].view;
  p.residual = static_cast<const T*>(a.residual);
  p.res_view = ops[1].view;
  p.output = static_cast<T*>(a.output);
  p.out_view = ops[2].view;
  p.weight = static_cast<const P*>(a.weight);
  p.bias = static_cast<const P*>(a.bias);
  p.running_mean = static_cast<P*>(a.running_mean);
  p.running_var = static_cast<P*>(a.running_var);
  if (training) {
    A* ws = static_cast<A*>(workspace);
    p.partials = StatPartials<A>{ws, ws + S * C, ws + 2 * S * C};
    p.num_splits = int(S);
    p.save_mean = static_cast<A*>(a.save_mean);
    p.save_invstd = static_cast<A*>(a.save_invstd);
  }
  p.count = a.input_view.N * a.input_view.L;
  p.momentum = A(a.momentum);
  p.eps = A(a.eps);
  p.relu = a.relu;
  return dispatch_layout<T>(plan, [&](auto along_c, auto vec) {
    constexpr bool kAlongC = decltype(along_c)::value;
    constexpr int VEC = decltype(vec)::value;
    if (!training) {
      bn_forward_kernel<T, P, kAlongC, VEC, false><<<plan.grid, plan.block, 0, stream>>>(p, plan.tiling);
      return cudaGetLastError();
    }
    if (resident) {
      return launch_resident(bn_forward_resident_kernel<T, P, kAlongC, VEC>, *resident,
                             arrivals_in<A>(workspace, 3 * S * C), stream, p, resident->plan.tiling,
                             resident->channel_tiles);
    }
    bn_stats_kernel<T, kAlongC, VEC><<<plan.grid, plan.block, 0, stream>>>(p.input, p.in_view, plan.tiling, p.partials);
    if (const cudaError_t err = cudaGetLastError(); err != cudaSuccess) return err;
    bn_forward_kernel<T, P, kAlongC, VEC, true><<<plan.grid, plan.block, 0, stream>>>(p, plan.tiling);
    return cudaGetLastError();
  });
}

// The backward's launch plan (rewrites the views in `ops`, as make_plan does); in training with
// grad_input wanted, also the one-pass plan when plan_resident takes the call.
template <typename T>
cudaError_t plan_backward(const BnBackwardArgs& a, std::array<Operand, 5>& ops, Plan* plan,
                          std::optional<ResidentPlan>* resident) {
  if (const cudaError_t err = make_plan(a.input_dtype, ops.data(), int(ops.size()), plan); err != cudaSuccess) {
    return err;
  }
  resident->reset();
  if (!a.training || !a.grad_input) return cudaSuccess;
  DeviceLimits device;
  if (const cudaError_t err = device_limits(&device); err != cudaSuccess) return err;
  return dispatch_layout<T>(*plan, [&](auto along_c, auto vec) {
    constexpr bool kAlongC = decltype(along_c)::value;
    constexpr int VEC = decltype(vec)::value, K = kAlongC ? VEC : 1;
    using A = acc_t<T>;
    ResidentPlan r;
    if (plan_resident<T, kAlongC, VEC>(*plan, device, 2, resident_static_shared<GradSums<A, K>, A, 4>(), &r)) {
      *resident = r;
    }
    return cudaSuccess;
  });
}

template <typename T, typename P>
cudaError_t backward(const BnBackwardArgs& a, void* workspace, cudaStream_t stream) {
  using A = acc_t<T>;
  const bool sums = backward_needs_sums(a), elementwise = a.grad_input || a.grad_residual;
  if (!sums && !elementwise) return cudaSuccess;
  auto ops = backward_operands(a);
  Plan plan;
  std::optional<ResidentPlan> resident;
  if (const cudaError_t err = plan_backward<T>(a, ops, &plan, &resident); err != cudaSuccess) return err;
  if (!one_pass_enabled()) resident.reset();
  const int64_t C = plan.tiling.C, S = resident ? resident->plan.num_splits() : plan.num_splits();
  BackwardParams<T, P> p{};
  p.grad_output = static_cast<const T*>(a.grad_output);
  p.g_view = ops[1].view;
  p.input = static_cast<const T*>(a.input);
  p.in_view = ops[0].view;
  p.relu_output = static_cast<const T*>(ops[2].data);
  p.out_view = ops[2].view;
  p.weight = static_cast<const P*>(a.weight);
  p.mean = static_cast<const A*>(a.mean);
  p.invstd = static_cast<const A*>(a.invstd);
  if (sums) {
    A* ws = static_cast<A*>(workspace);
    p.partials = GradPartials<A>{ws, ws + S * C};
    p.num_splits = int(S);
  }
  p.grad_input = static_cast<T*>(a.grad_input);
  p.gi_view = ops[3].view;
  p.grad_residual = static_cast<T*>(a.grad_residual);
  p.gr_view = ops[4].view;
  p.grad_weight = static_cast<P*>(a.grad_weight);
  p.grad_bias = static_cast<P*>(a.grad_bias);
  p.count = a.input_view.N * a.input_view.L;
  p.training = a.training;
  if (resident) {
    return dispatch_layout<T>(plan, [&](auto along_c, auto vec) {
      return launch_resident(bn_backward_resident_kernel<T, P, decltype(along_c)::value, decltype(vec)::value>,
                             *resident, arrivals_in<A>(workspace, 2 * S * C), stream, p, resident->plan.tiling,
                             resident->channel_tiles, resident->kept_items);
    });
  }
  // With relu, launch 1 writes grad_residual (gz) and launch 2 reads it instead of grad_output
  // and the output: one tensor fewer to read.
  const bool residual_first = sums && p.relu_output && p.grad_residual;
  BackwardParams<T, P> q = p;
  if (residual_first) {
    q.grad_output = p.grad_residual;
    q.g_view = p.gr_view;
    q.relu_output = nullptr;
    q.grad_residual = nullptr;
  }
  // Without elementwise outputs left, only the blocks writing grad_weight / grad_bias are needed.
  const dim3 grid = q.grad_input || q.grad_residual ? plan.grid : dim3(plan.grid.x);
  return dispatch_layout<T>(plan, [&](auto along_c, auto vec) {
    constexpr bool kAlongC = decltype(along_c)::value;
    constexpr int VEC = decltype(vec)::value;
    if (sums) {
      bn_grad_sums_kernel<T, kAlongC, VEC><<<plan.grid, plan.block, 0, stream>>>(
          p.grad_output, p.g_view, p.input, p.in_view, p.relu_output, p.out_view,
          residual_first ? p.grad_residual : nullptr, p.gr_view, p.mean, plan.tiling, p.partials);
      if (const cudaError_t err = cudaGetLastError(); err != cudaSuccess) return err;
    }
    bn_backward_kernel<T, P, kAlongC, VEC><<<grid, plan.block, 0, stream>>>(q, plan.tiling);
    return cudaGetLastError();
  });
}

}  // namespace

cudaError_t bn_forward_train_workspace(const BnForwardArgs& args, size_t* bytes) {
  return dispatch_dtypes(args.input_dtype, args.param_dtype, [&](auto t, auto) {
    auto ops = forward_operands(args);
    Plan plan;
    std::optional<ResidentPlan> resident;
    if (const cudaError_t err = plan_forward<typename decltype(t)::type>(true, args.input_dtype, ops, &plan, &resident);
        err != cudaSuccess) {
      return err;
    }
    *bytes = workspace_bytes(3, acc_size(args.input_dtype), plan, resident);
    return cudaSuccess;
  });
}

cudaError_t bn_forward_train(const BnForwardArgs& args, void* workspace, cudaStream_t stream) {
  if (args.input_view.N * args.input_view.L < 2 || !args.save_mean || !args.save_invstd || !workspace) {
    return cudaErrorInvalidValue;
  }
  return dispatch_dtypes(args.input_dtype, args.param_dtype, [&](auto t, auto p) {
    return forward<typename decltype(t)::type, typename decltype(p)::type>(args, true, workspace, stream);
  });
}

cudaError_t bn_forward_eval(const BnForwardArgs& args, cudaStream_t stream) {
  if (!args.running_mean || !args.running_var) return cudaErrorInvalidValue;
  return dispatch_dtypes(args.input_dtype, args.param_dtype, [&](auto t, auto p) {
    return forward<typename decltype(t)::type, typename decltype(p)::type>(args, false, nullptr, stream);
  });
}

cudaError_t bn_backward_workspace(const BnBackwardArgs& args, size_t* bytes) {
  *bytes = 0;
  if (!backward_needs_sums(args)) return cudaSuccess;
  return dispatch_dtypes(args.input_dtype, args.param_dtype, [&](auto t, auto) {
    auto ops = backward_operands(args);
    Plan plan;
    std::optional<ResidentPlan> resident;
    if (const cudaError_t err = plan_backward<typename decltype(t)::type>(args, ops, &plan, &resident);
        err != cudaSuccess) {
      return err;
    }
    *bytes = workspace_bytes(2, acc_size(args.input_dtype), plan, resident);
    return cudaSuccess;
  });
}

cudaError_t bn_backward(const BnBackwardArgs& args, void* workspace, cudaStream_t stream) {
  if ((args.relu && !args.output) || (backward_needs_sums(args) && !workspace)) return cudaErrorInvalidValue;
  return dispatch_dtypes(args.input_dtype, args.param_dtype, [&](auto t, auto p) {
    return backward<typename decltype(t)::type, typename decltype(p)::type>(args, workspace, stream);
  });
}

}  // namespace cnnkern::cuda

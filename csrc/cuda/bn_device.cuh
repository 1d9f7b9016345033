// Device building blocks of the batch-norm kernels (bn_two_pass.cuh, bn_one_pass.cuh): element
// types, the (N, C, L) geometry and its per-thread tiles, the statistics accumulators and their
// merges, the per-channel coefficients and the per-step arithmetic. The geometry and the launch
// plans: batch_norm.cu.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "cuda/word_access.cuh"
#include "strided3d.h"

namespace cnnkern::cuda::bn {

constexpr int kThreads = 256;  // threads per block, in every kernel (block_merge relies on it)
constexpr int kWarps = kThreads / 32;
constexpr int kBlocksPerSM = 2;  // resident blocks per SM that every kernel guarantees
                                 // (<= 128 registers) and grids are sized for
constexpr int kMaxRowBytes = 128;  // along C, the widest row of a block's channels (make_plan)

// The most channel groups (lanes along C of one row, channel_groups()) a block has for K channels
// a thread: with K > 1 each lane reads 16-byte items of K channels, at most kMaxRowBytes a row;
// with K == 1 (scalar items along C, or lanes along L) at most a warp. The per-group staging
// arrays in shared memory are sized by it: a resident kernel keeps its data in what they leave.
template <int K>
__host__ __device__ constexpr int max_channel_groups() {
  return K > 1 ? kMaxRowBytes / 16 : 32;
}

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

// The forward's output before the residual and the ReLU, (x - mean) * scale + shift, as one fused
// multiply-add written out: the forward and a backward that recomputes the ReLU mask from x call
// this one expression, which nvcc cannot then contract differently at the two call sites, so the
// same inputs give the same bits.
__device__ __forceinline__ float normalized(float x, float mean, float scale, float shift) {
  return __fmaf_rn(x - mean, scale, shift);
}
__device__ __forceinline__ double normalized(double x, double mean, double scale, double shift) {
  return __fma_rn(x - mean, scale, shift);
}

// Whether the backward kernels recompute the ReLU mask for input type T (bn_backward with no
// output): float32 and float64. In 16 bits the recomputing kernels spilled registers along C (the
// mean, scale and shift of 8 channels a thread), so they read the mask from the output.
template <typename T>
constexpr bool kRecomputesReluMask = std::is_same_v<T, float> || std::is_same_v<T, double>;

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

// The count of a step that has all U items, as a compile-time constant (see for_each_step).
template <int U>
struct FullStep {
  __host__ __device__ constexpr operator int() const { return U; }
};

// Calls visit(n, i, count) for each step of the thread's tile: the items i + u * i_stride for
// u < count <= U (count < U only for the last step of an n); last to first when Tile::backwards.
// kWholeSteps: a whole step's count is FullStep<U>, an int otherwise, so visit is compiled twice and
// the whole steps, nearly all of them on large tensors, run without the tests and selects of items
// past count: on sm_90, 35-50% fewer instructions a whole step in every two-pass kernel (e.g.
// 434 -> 251 in the bf16 NCHW stats kernel, 860 -> 542 in the bf16 NCHW backward).
// Each loop tests only the bound it moves towards, on purpose: nvcc 13.0 -O3 ran a loop written
// `for (n = first; n >= first && n <= last; n += step)`, with a step of 1 known at compile time
// (along C), only once, skipping every n after the first (seen on an H200; no back edge in the PTX).
template <int U, bool kWholeSteps = true, class Tile, class Visit>
__device__ __forceinline__ void for_each_step(const Tile& t, Visit&& visit) {
  if (!t.channel_ok || t.n_begin >= t.n_end || t.i_begin >= t.i_end) return;
  const int64_t i_step = U * t.i_stride;
  const int64_t n_last = t.n_begin + (t.n_end - 1 - t.n_begin) / t.n_step * t.n_step;
  const int64_t i_last = t.i_begin + (t.i_end - 1 - t.i_begin) / i_step * i_step;
  constexpr bool kBack = Tile::backwards;
  const int64_t n_inc = kBack ? -t.n_step : t.n_step, i_inc = kBack ? -i_step : i_step;
  for (int64_t n = kBack ? n_last : t.n_begin; kBack ? n >= t.n_begin : n <= n_last; n += n_inc) {
    for (int64_t i = kBack ? i_last : t.i_begin; kBack ? i >= t.i_begin : i <= i_last; i += i_inc) {
      int count = 0;
#pragma unroll
      for (int u = 0; u < U; ++u) count += i + u * t.i_stride < t.i_end;
      if (kWholeSteps && count == U) {
        visit(n, i, FullStep<U>{});
      } else {
        visit(n, i, count);
      }
    }
  }
}

// The unsigned word (CUDA vector type) of a Vec's size.
template <int Bytes>
struct WordOf;
template <>
struct WordOf<2> {
  using type = unsigned short;
};
template <>
struct WordOf<4> {
  using type = unsigned;
};
template <>
struct WordOf<8> {
  using type = uint2;
};
template <>
struct WordOf<16> {
  using type = uint4;
};

// Loads the Vec at `p` (aligned to its size) in one instruction, as one word (ld.global.v4.u32
// for 16 bytes). Plain reads of the Vec were whole too; the word keeps them so whatever the
// compiler does to stores (see store_whole).
template <int VEC, typename T>
__device__ __forceinline__ Vec<T, VEC> load_whole(const T* p) {
  using Word = typename WordOf<sizeof(Vec<T, VEC>)>::type;
  const Word word = load_word(reinterpret_cast<const Word*>(p));
  Vec<T, VEC> item;
  memcpy(&item, &word, sizeof(item));
  return item;
}

// Loads a step's items (n, i + u * i_stride), u < count, of tensor `base` (view v); the items past
// `count` are zero. Items stay in T until used: half the registers of converting them up front.
template <int U, int VEC, typename T, class Tile, typename Count>
__device__ __forceinline__ void load_step(const T* base, const Strided3d& v, const Tile& t, int64_t n, int64_t i,
                                          Count count, Vec<T, VEC> (&items)[U]) {
#pragma unroll
  for (int u = 0; u < U; ++u) {
    items[u] = u < count ? load_whole<VEC>(base + t.offset(v, n, i + u * t.i_stride)) : Vec<T, VEC>{};
  }
}

// Stores `item` at `p` (aligned to its size) in one instruction. Assigned as a struct, it was
// stored in pieces by every kernel (nvcc 13.0, sm_90 PTX: 8 st.global.u16 for 8 bf16, 4
// st.global.f32 for 4 float), each moving 2 or 4 of a thread's 16 bytes; a store of the word
// type (st.global.v4.u32 for 16 bytes) is one, as load_whole is one load.
template <typename T, int VEC>
__device__ __forceinline__ void store_whole(T* p, const Vec<T, VEC>& item) {
  using Word = typename WordOf<sizeof(item)>::type;
  Word word;
  memcpy(&word, &item, sizeof(item));
  store_word(reinterpret_cast<Word*>(p), word);
}

// Stores a step's items u < count to tensor `base` (view v).
template <int U, int VEC, typename T, class Tile, typename Count>
__device__ __forceinline__ void store_step(T* base, const Strided3d& v, const Tile& t, int64_t n, int64_t i, Count count,
                                           const Vec<T, VEC> (&items)[U]) {
#pragma unroll
  for (int u = 0; u < U; ++u) {
    if (u < count) store_whole(base + t.offset(v, n, i + u * t.i_stride), items[u]);
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
  static constexpr int kValues = 3;  // per channel in Partials: n, mean, m2
  A n;                               // values per channel (the same for all K channels)
  A mean[K];
  A m2[K];

  __device__ A& value(int j, int k) { return j == 0 ? n : j == 1 ? mean[k] : m2[k]; }
  __device__ A value(int j, int k) const { return j == 0 ? n : j == 1 ? mean[k] : m2[k]; }


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

};

// Backward reductions of K channels. Plain sums suffice: x - mean is taken per value, so the sums
// never hold a |mean|-sized term to cancel.
template <typename A, int K>
struct GradSums {
  static constexpr int kChannels = K;
  static constexpr int kValues = 2;  // per channel in Partials: gz, gzxmu
  A gz[K];                           // sum of gz
  A gzxmu[K];                        // sum of gz * (x - mean)

  __device__ A& value(int j, int k) { return j == 0 ? gz[k] : gzxmu[k]; }
  __device__ A value(int j, int k) const { return j == 0 ? gz[k] : gzxmu[k]; }


  __device__ void merge(const GradSums& o) {
#pragma unroll
    for (int k = 0; k < K; ++k) gz[k] += o.gz[k], gzxmu[k] += o.gzxmu[k];
  }

};

// What both accumulators share, over their values (value(j, k): value j of channel k).

// The accumulator of no values: all zeros.
template <class Acc>
__device__ __forceinline__ Acc empty() {
  Acc acc;
#pragma unroll
  for (int j = 0; j < Acc::kValues; ++j) {
#pragma unroll
    for (int k = 0; k < Acc::kChannels; ++k) acc.value(j, k) = 0;
  }
  return acc;
}

// The accumulator of lane (this lane ^ lane_mask).
template <class Acc>
__device__ __forceinline__ Acc shfl_xor(const Acc& acc, int lane_mask) {
  Acc o;
#pragma unroll
  for (int j = 0; j < Acc::kValues; ++j) {
#pragma unroll
    for (int k = 0; k < Acc::kChannels; ++k) o.value(j, k) = __shfl_xor_sync(0xffffffffu, acc.value(j, k), lane_mask);
  }
  return o;
}

// Per-split partials of an accumulator, a reduction's workspace: one (S, C) array, row-major,
// per value the accumulator keeps per channel (Welford: 3, GradSums: 2). Loads read L2 (__ldcg),
// past the SM's L1: in a resident kernel, L1 may still hold a line of them from an earlier round,
// read before other blocks wrote this round's partials into it.
template <typename A, int kValues>
struct Partials {
  A* values[kValues];

  template <class Acc>
  __device__ Acc load(int64_t split, int64_t c, int64_t C) const {
    static_assert(Acc::kValues == kValues, "the accumulator of these partials");
    const int64_t at = split * C + c;
    Acc acc;
#pragma unroll
    for (int j = 0; j < kValues; ++j) {
#pragma unroll
      for (int k = 0; k < Acc::kChannels; ++k) acc.value(j, k) = __ldcg(values[j] + at + k);
    }
    return acc;
  }

  template <class Acc>
  __device__ void store(int64_t split, int64_t c, int64_t C, const Acc& acc) const {
    static_assert(Acc::kValues == kValues, "the accumulator of these partials");
    const int64_t at = split * C + c;
#pragma unroll
    for (int j = 0; j < kValues; ++j) {
#pragma unroll
      for (int k = 0; k < Acc::kChannels; ++k) values[j][at + k] = acc.value(j, k);
    }
  }
};

template <typename A>
using StatPartials = Partials<A, 3>;  // the training forward's: Welford
template <typename A>
using GradPartials = Partials<A, 2>;  // the backward's: GradSums

// Merges `acc` over the threads of the block that hold the same channels: those whose lane is the
// same modulo `groups` (channel_groups()), first by warp shuffles, then across warps. Returns the
// block total in threads [0, groups), one per channel group. Every thread of the block must call
// it.
template <class Acc>
__device__ Acc block_merge(Acc acc, int groups) {
  __shared__ Acc warp_totals[kWarps][max_channel_groups<Acc::kChannels>()];
  const int rank = thread_rank(), lane = rank % 32, warp = rank / 32;
  __syncthreads();  // a previous call's readers are done with warp_totals
  // Lanes l and l ^ mask (mask >= groups, both powers of two) hold the same channels.
  for (int mask = 16; mask >= groups; mask /= 2) acc.merge(shfl_xor(acc, mask));
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
  Acc acc = empty<Acc>();
  const int first = kAlongC ? int(threadIdx.y) : thread_rank();
  const int step = kAlongC ? int(blockDim.y) : kThreads;
  if (c < C) {
    for (int s = first; s < num_splits; s += step) acc.merge(partials.template load<Acc>(s, c, C));
  }
  return block_merge(acc, groups);
}

// Statistics of one step's items u < count (per channel, VEC / K values of each item), two-pass
// over registers, converted to A once for both. The mean sums x - shift, shift being one of the
// values, so that the sum stays small (no rounding at the scale of |mean|) when |mean| >> std.
template <int K, int U, int VEC, typename T, typename Count>
__device__ __forceinline__ Welford<acc_t<T>, K> step_stats(const Vec<T, VEC> (&x)[U], Count count) {
  using A = acc_t<T>;
  constexpr int kPerItem = VEC / K;  // values of one channel in one item
  A v[U][VEC];
#pragma unroll
  for (int u = 0; u < U; ++u) {
#pragma unroll
    for (int e = 0; e < VEC; ++e) v[u][e] = to_acc(x[u].v[e]);
  }
  Welford<A, K> s;
  s.n = A(count * kPerItem);
  const A inv_n = A(1) / s.n;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const A shift = v[0][k * kPerItem];  // item 0 is always valid
    A sum = 0;
#pragma unroll
    for (int u = 0; u < U; ++u) {
#pragma unroll
      for (int e = 0; e < kPerItem; ++e) sum += u < count ? v[u][k * kPerItem + e] - shift : A(0);
    }
    s.mean[k] = shift + sum * inv_n;
    A m2 = 0;
#pragma unroll
    for (int u = 0; u < U; ++u) {
#pragma unroll
      for (int e = 0; e < kPerItem; ++e) {
        const A d = v[u][k * kPerItem + e] - s.mean[k];
        m2 += u < count ? d * d : A(0);
      }
    }
    s.m2[k] = m2;
  }
  return s;
}

// Calls f(u, e, k) for value e of item u of a step, k being its channel among the thread's K
// (VEC / K values of each channel per item). Unrolled: every index is a compile-time constant.
template <int U, int VEC, int K, class F>
__device__ __forceinline__ void for_each_value(F&& f) {
  constexpr int kPerItem = VEC / K;
#pragma unroll
  for (int u = 0; u < U; ++u) {
#pragma unroll
    for (int e = 0; e < VEC; ++e) f(u, e, e / kPerItem);
  }
}

// Adds a step's items u < count to `acc`: gz, and gz * (x - mu), per channel.
template <int K, int U, int VEC, typename T, typename Count>
__device__ __forceinline__ void add_grad_step(GradSums<acc_t<T>, K>& acc, const Vec<T, VEC> (&gz)[U],
                                              const Vec<T, VEC> (&x)[U], const acc_t<T> (&mu)[K], Count count) {
  using A = acc_t<T>;
  constexpr int kPerItem = VEC / K;
  // Its own loop, not for_each_value: the early break over u gives the reduction kernels other
  // code (registers up or down by up to 20), which only a GPU can weigh.
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
}

// ---- parameters, coefficients and per-step arithmetic ---------------------------------------

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

// The forward's scale and shift of channel c: every kernel that needs them (the forward's, and a
// backward's that recomputes its output) computes them with these, from the same values.
template <typename A, typename P>
__device__ __forceinline__ A affine_scale(const P* weight, int64_t c, A invstd) {
  return (weight ? to_acc(weight[c]) : A(1)) * invstd;
}
template <typename A, typename P>
__device__ __forceinline__ A affine_shift(const P* bias, int64_t c) {
  return bias ? to_acc(bias[c]) : A(0);
}

// Per-channel coefficients of type Coefs (K channels a thread) for every thread of the block:
// the first `groups` threads, which hold their channel group's block totals (block_merge), each
// fill their group's with `fill(coefs, k, c)` for channel c = tile.c + k, and all threads read
// their group's back from shared memory. Every thread of the block must call it.
template <class Coefs, int K, class Tile, class Fill>
__device__ Coefs group_coefficients(const Tile& tile, int groups, Fill fill) {
  __shared__ Coefs shared[max_channel_groups<K>()];
  const int rank = thread_rank();
  __syncthreads();  // a previous call's readers are done with shared
  if (rank < groups && tile.channel_ok) {
    Coefs own;
#pragma unroll
    for (int k = 0; k < K; ++k) fill(own, k, tile.c + k);
    shared[rank] = own;
  }
  __syncthreads();
  return shared[groups > 1 ? rank % groups : 0];  // along C, a thread's group is its threadIdx.x
}

// The coefficients of the thread's channels, from the batch statistics `batch` (training: the
// block total in threads [0, groups) from block_merge) or the running stats (eval). In training,
// the block that holds split 0 of its channels (`publish`) writes save_mean / save_invstd and
// updates the running stats. Every thread of the block must call it.
template <bool kTraining, typename T, typename P, int K, class Tile>
__device__ Coefficients<acc_t<T>, K> channel_coefficients(const ForwardParams<T, P>& p, const Tile& tile, int groups,
                                                          const Welford<acc_t<T>, K>& batch, bool publish) {
  using A = acc_t<T>;
  const A m = A(p.count);
  return group_coefficients<Coefficients<A, K>, K>(tile, groups, [&](Coefficients<A, K>& co, int k, int64_t c) {
    const A mean = kTraining ? batch.mean[k] : to_acc(p.running_mean[c]);
    const A var = kTraining ? batch.m2[k] / m : to_acc(p.running_var[c]);
    const A invstd = inv_sqrt(var + p.eps);
    co.mean[k] = mean;
    co.scale[k] = affine_scale(p.weight, c, invstd);
    co.shift[k] = affine_shift<A>(p.bias, c);
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
  });
}

// y = act((x - mean) * scale + shift + r) of a step's items, in place in x. The (x - mean) * scale
// form keeps |mean| >> std from cancelling, where x * scale + shift would not.
template <int U, int VEC, int K, typename T>
__device__ __forceinline__ void normalize_step(Vec<T, VEC> (&x)[U], const Vec<T, VEC> (&r)[U],
                                               const Coefficients<acc_t<T>, K>& co, bool relu) {
  using A = acc_t<T>;
  for_each_value<U, VEC, K>([&](int u, int e, int k) {
    A y = normalized(to_acc(x[u].v[e]), co.mean[k], co.scale[k], co.shift[k]) + to_acc(r[u].v[e]);
    if (relu) y = y < A(0) ? A(0) : y;  // NaN stays NaN, as torch.relu
    x[u].v[e] = from_acc<T>(y);
  });
}

// Loads a step of gz = g, or with relu (`relu_output` non-null) g where the forward output is > 0
// and 0 elsewhere.
template <int U, int VEC, typename T, class Tile, typename Count>
__device__ __forceinline__ void load_gz(const T* grad_output, const Strided3d& g_view, const T* relu_output,
                                        const Strided3d& out_view, const Tile& t, int64_t n, int64_t i, Count count,
                                        Vec<T, VEC> (&gz)[U]) {
  load_step(grad_output, g_view, t, n, i, count, gz);
  if (!relu_output) return;
  Vec<T, VEC> out[U];
  load_step(relu_output, out_view, t, n, i, count, out);
  for_each_value<U, VEC, 1>([&](int u, int e, int) {
    gz[u].v[e] = to_acc(out[u].v[e]) > acc_t<T>(0) ? gz[u].v[e] : T{};
  });
}

// The forward's coefficients of the thread's K channels, from the statistics it saved (mean,
// invstd) and its parameters, for recomputing its output from x: all zeros past the last channel.
template <int K, typename A, typename P, class Tile>
__device__ __forceinline__ Coefficients<A, K> forward_coefficients(const A* mean, const A* invstd, const P* weight,
                                                                   const P* bias, const Tile& tile) {
  Coefficients<A, K> co;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const int64_t c = tile.c + k;
    co.mean[k] = tile.channel_ok ? mean[c] : A(0);
    co.scale[k] = tile.channel_ok ? affine_scale(weight, c, invstd[c]) : A(0);
    co.shift[k] = tile.channel_ok ? affine_shift<A>(bias, c) : A(0);
  }
  return co;
}

// gz = g where the forward's output, recomputed from x with its coefficients `co`, is > 0, and 0
// elsewhere (in place in g): the mask load_gz reads from the output, for a forward without a
// residual. Float32 and float64 only (kRecomputesReluMask): there the stored output is the
// computed value, so the test needs no rounding to the element type.
template <int U, int VEC, int K, typename T>
__device__ __forceinline__ void mask_recomputed(Vec<T, VEC> (&g)[U], const Vec<T, VEC> (&x)[U],
                                                const Coefficients<acc_t<T>, K>& co) {
  static_assert(kRecomputesReluMask<T>, "16-bit outputs round tiny positive values to 0");
  for_each_value<U, VEC, K>([&](int u, int e, int k) {
    g[u].v[e] = normalized(x[u].v[e], co.mean[k], co.scale[k], co.shift[k]) > T(0) ? g[u].v[e] : T(0);
  });
}

// A backward reduction's step: loads gz (g and the ReLU mask) and x, and writes grad_residual = gz
// where wanted (`grad_residual` non-null). The mask comes from `relu_output` (g first, then x: the
// order the 16-bit kernels fit their registers in) or, with kRecompute, from x and the forward's
// coefficients `forward`.
template <bool kRecompute, int U, int VEC, int K, typename T, class Tile, typename Count>
__device__ __forceinline__ void load_gz_and_x(const T* grad_output, const Strided3d& g_view, const T* input,
                                              const Strided3d& in_view, const T* relu_output,
                                              const Strided3d& out_view, T* grad_residual, const Strided3d& gr_view,
                                              const Coefficients<acc_t<T>, K>& forward, const Tile& t, int64_t n,
                                              int64_t i, Count count, Vec<T, VEC> (&gz)[U], Vec<T, VEC> (&x)[U]) {
  if constexpr (kRecompute) {
    load_step(input, in_view, t, n, i, count, x);
    load_step(grad_output, g_view, t, n, i, count, gz);
    mask_recomputed(gz, x, forward);
    if (grad_residual) store_step(grad_residual, gr_view, t, n, i, count, gz);
  } else {
    load_gz(grad_output, g_view, relu_output, out_view, t, n, i, count, gz);
    if (grad_residual) store_step(grad_residual, gr_view, t, n, i, count, gz);
    load_step(input, in_view, t, n, i, count, x);
  }
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
  const P* bias;                    // (C,) or nullptr: b = 0; read only to recompute the ReLU mask
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
  const A m = A(p.count);
  return group_coefficients<GradCoefficients<A, K>, K>(tile, groups, [&](GradCoefficients<A, K>& co, int k,
                                                                         int64_t c) {
    const A invstd = p.invstd[c];
    co.mean[k] = p.mean[c];
    co.scale[k] = affine_scale(p.weight, c, invstd);
    co.mean_gz[k] = p.training ? sums.gz[k] / m : A(0);
    co.proj[k] = p.training ? invstd * invstd * (sums.gzxmu[k] / m) : A(0);
    if (tile.first_split && p.grad_weight) p.grad_weight[c] = from_acc<P>(sums.gzxmu[k] * invstd);
    if (tile.first_split && p.grad_bias) p.grad_bias[c] = from_acc<P>(sums.gz[k]);
  });
}

// grad_input of a step's items, into x (read only in training).
template <int U, int VEC, int K, typename T>
__device__ __forceinline__ void grad_input_step(const Vec<T, VEC> (&gz)[U], Vec<T, VEC> (&x)[U],
                                                const GradCoefficients<acc_t<T>, K>& co, bool training) {
  using A = acc_t<T>;
  for_each_value<U, VEC, K>([&](int u, int e, int k) {
    const A g = to_acc(gz[u].v[e]);
    const A dx = training ? g - co.mean_gz[k] - (to_acc(x[u].v[e]) - co.mean[k]) * co.proj[k] : g;
    x[u].v[e] = from_acc<T>(dx * co.scale[k]);
  });
}

}  // namespace cnnkern::cuda::bn

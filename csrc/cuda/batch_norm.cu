// CUDA launchers of the batch-norm family: y = act(batch_norm(x) + residual) and its backward.
// Semantics: the schemas in csrc/ops.cpp; launcher API: batch_norm.h; kernels: bn_two_pass.cuh and
// bn_one_pass.cuh over bn_device.cuh. No torch header here, so plain nvcc compiles this file.
//
// Geometry. Every tensor is an (N, C, L) strided view. A launch picks one orientation from the
// input's strides and uses it for all of its tensors (each keeps its own strides):
//   along L (NCHW, sL == 1): a block owns one channel; threadIdx.x runs along l, threadIdx.y along n.
//   along C (channels_last, sC == 1): a block owns blockDim.x * VEC channels, a cache line of
//     them where C allows (narrower in a one-pass launch whose tiles would not fit otherwise);
//     threadIdx.x runs along c, threadIdx.y along l, and n is a loop (usually of one: (N, L)
//     merge into L when the strides allow, as they do for channels_last).
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
// next launch on the stream. The exception: a training forward, or a training backward with
// grad_input, whose input is larger than L2 runs in one pass when it can (plan_resident): one
// cooperative launch of bn_forward_resident_kernel / bn_backward_resident_kernel keeps its inputs
// in shared memory between the statistics and the elementwise outputs, the blocks of each
// channel tile meeting at a counter in between.
#include "cuda/batch_norm.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <array>
#include <climits>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <optional>
#include <string>
#include <type_traits>
#include <unordered_map>
#include <utility>

#include "cuda/bn_one_pass.cuh"
#include "cuda/bn_two_pass.cuh"
#include "cuda/cooperative_launch.h"

namespace cnnkern::cuda {
namespace {

using namespace bn;  // NOLINT: the kernels and their building blocks

constexpr int kMinStepsPerThread = 2;  // splitting finer only adds partials to merge
constexpr int kSectorBytes = 32;       // memory access granularity: along C, no row of a block's
                                       // channels is narrower
constexpr int kLineBytes = 128;        // a cache line: the rows the two-pass kernels take along C
static_assert(kLineBytes <= kMaxRowBytes, "block_merge and group_coefficients stage rows up to kMaxRowBytes");
constexpr int64_t kMaxGridYZ = 65535;
// A resident kernel's wait for the other blocks of its tile, once per round, in the bytes a block
// moves meanwhile: about 2 us at 3 TB/s shared by 264 blocks. An estimate until a GPU measures it.
constexpr int64_t kRoundOverheadBytes = 32 << 10;

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
  bool cooperative;      // cooperative launches (all blocks resident at once) are supported
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

// Splits each channel tile of `plan` (its block and tiling's sizes set) about `want` ways: sets the
// tiling's shares and the grid's y and z.
void split_plan(int64_t want, Plan* plan) {
  Tiling& t = plan->tiling;
  const int64_t tx = plan->block.x, ty = plan->block.y;
  if (plan->along_c) {
    split_two(want, t.items, ty, t.N, 1, &t.items_per_split, &t.n_per_split);  // l first: n is a per-thread loop
  } else {
    split_two(want, t.N, ty, t.items, tx, &t.n_per_split, &t.items_per_split);  // n first: keeps rows whole
  }
  plan->grid.y = unsigned(ceil_div(t.N, t.n_per_split));
  plan->grid.z = unsigned(ceil_div(t.items, t.items_per_split));
}

// Plans a launch over ops[0..num_ops) (ops[0]: the input, which picks the orientation), along C
// with rows of a block's channels `row_bytes` wide where C allows, along L with at most
// `max_lanes_l` lanes a row (more where the batch is too small to fill the block's rows).
// Rewrites the views in place (so planning them again gives the same views): with L == 1,
// sL = sN (l is always 0, and this lets n merge into l); and (N, L) merge into L when every
// present view allows it (sN == L * sL, e.g. channels_last).
cudaError_t make_plan(DType dtype, Operand* ops, int num_ops, int row_bytes, Plan* plan, int max_lanes_l = 32) {
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
    // At most a warp along C: block_merge's channel groups are lanes.
    tx = std::min<int64_t>({std::max(row_bytes / (vec * elt), 1), 32, pow2_ceil(ceil_div(in.C, vec))});
  } else {
    // Enough lanes along l to cover a row in one step (at most a warp), then no more threads
    // along n than there are batch indices.
    tx = std::min<int64_t>(max_lanes_l, pow2_ceil(ceil_div(items, steps)));
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
  plan->block = dim3(unsigned(tx), unsigned(ty));
  plan->grid.x = unsigned(channel_tiles);
  plan->tiling = Tiling{in.N, in.C, items, 0, 0};
  split_plan(splits, plan);
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

// The rows of a block's channels along C in the two-pass kernels: a cache line (kLineBytes), or
// CNNKERN_CUDA_ROW_BYTES (32 or 64; an experiment's knob: on the H200, channels_last kernels with
// 32-byte rows ran at a third of their NCHW twins' speed, bench/NOTES.md, and bench.dram times
// the widths side by side). Read once per process: a workspace query and its launch must plan alike.
int two_pass_row_bytes() {
  static const int bytes = [] {
    const char* value = std::getenv("CNNKERN_CUDA_ROW_BYTES");
    if (value == nullptr) return kLineBytes;
    for (const int allowed : {kSectorBytes, 2 * kSectorBytes, kLineBytes}) {
      if (std::strcmp(value, std::to_string(allowed).c_str()) == 0) return allowed;
    }
    std::fprintf(stderr, "cnnkern: CNNKERN_CUDA_ROW_BYTES=%s ignored (32, 64 or 128): rows of %d bytes\n", value,
                 kLineBytes);
    return kLineBytes;
  }();
  return bytes;
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
// kRoundOverheadBytes); ties go to fewer splits (fewer partials to merge). Returns that time, in
// bytes, or INT64_MAX where no split count fits (and `out` is left as it was).
template <typename T, bool kAlongC, int VEC>
int64_t plan_resident(const Plan& base, const DeviceLimits& device, int kept_tensors, size_t static_shared,
                      ResidentPlan* out) {
  constexpr int U = items_per_step(sizeof(T) * VEC);
  const Tiling& t = base.tiling;
  const int64_t bytes = t.N * t.C * t.items * (kAlongC ? 1 : VEC) * int64_t(sizeof(T));
  if (!device.cooperative || bytes <= device.l2_bytes) return INT64_MAX;
  constexpr int64_t kReservedPerBlock = 1024;  // the driver's share of each block's shared memory
  const int64_t budget =
      std::min<int64_t>(device.shared_per_block, device.shared_per_sm / kBlocksPerSM - kReservedPerBlock) -
      int64_t(static_shared);
  const int64_t blocks = int64_t(device.sms) * kBlocksPerSM, channel_tiles = base.grid.x;
  int64_t best = INT64_MAX;
  for (int64_t want = 1; want <= blocks; ++want) {
    Plan p = base;
    split_plan(want, &p);
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
  return best;
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

// Calls f(std::bool_constant<recompute>{}): whether the backward kernels recompute the ReLU mask
// from x. The recomputing kernels exist for the types that recompute it only; for the others
// `recompute` is cudaErrorInvalidValue (the wrapper refuses the call before).
template <typename T, class F>
cudaError_t dispatch_recompute(bool recompute, F&& f) {
  if (!recompute) return f(std::false_type{});
  if constexpr (kRecomputesReluMask<T>) return f(std::true_type{});
  return cudaErrorInvalidValue;
}

// The launch plan over `ops` (rewrites their views, as make_plan does) and, when the call has a
// one-pass kernel (`one_pass_kernel`), the one-pass plan if plan_resident takes the call. That
// kernel keeps kKept tensors in shared memory and merges Acc partials, with a table of
// kCoefficients values per channel (resident_static_shared).
// Along C, the one-pass plan takes the widest rows, from the two-pass kernels' down to a sector,
// whose channel tiles a round can keep in shared memory. Along L it takes the lane count, from a
// warp down to a 128-byte row, of the least time (plan_resident): fewer lanes a row mean more
// samples a step, which can fit a block's share of the samples into its shared memory with less
// padding (a row's items and a split's samples both come in whole steps).
template <typename T, template <typename, int> class Acc, int kKept, int kCoefficients, size_t kOps>
cudaError_t plan_call_uncached(DType dtype, std::array<Operand, kOps>& ops, bool one_pass_kernel, Plan* plan,
                               std::optional<ResidentPlan>* resident) {
  const int row_bytes = two_pass_row_bytes();
  if (const cudaError_t err = make_plan(dtype, ops.data(), int(ops.size()), row_bytes, plan); err != cudaSuccess) {
    return err;
  }
  resident->reset();
  if (!one_pass_kernel) return cudaSuccess;
  DeviceLimits device;
  if (const cudaError_t err = device_limits(&device); err != cudaSuccess) return err;
  return dispatch_layout<T>(*plan, [&](auto along_c, auto vec) {
    constexpr bool kAlongC = decltype(along_c)::value;
    constexpr int VEC = decltype(vec)::value, K = kAlongC ? VEC : 1;
    using A = acc_t<T>;
    const size_t static_shared = resident_static_shared<Acc<A, K>, A, kCoefficients>();
    Plan base = *plan;
    ResidentPlan r;
    if constexpr (kAlongC) {
      for (int row = row_bytes; row >= kSectorBytes; row /= 2) {
        if (row != row_bytes) {
          if (const cudaError_t err = make_plan(dtype, ops.data(), int(ops.size()), row, &base); err != cudaSuccess) {
            return err;
          }
        }
        if (plan_resident<T, kAlongC, VEC>(base, device, kKept, static_shared, &r) != INT64_MAX) {
          *resident = r;
          break;
        }
      }
    } else {
      int64_t best = INT64_MAX;
      const int line_lanes = kLineBytes / int(sizeof(T) * VEC);  // lanes that read a line a row
      for (int lanes = 32;; lanes /= 2) {
        if (lanes != 32) {
          if (const cudaError_t err = make_plan(dtype, ops.data(), int(ops.size()), row_bytes, &base, lanes);
              err != cudaSuccess) {
            return err;
          }
        }
        if (const int64_t cost = plan_resident<T, kAlongC, VEC>(base, device, kKept, static_shared, &r); cost < best) {
          best = cost;
          *resident = r;
        }
        if (lanes <= line_lanes) break;
      }
    }
    return cudaSuccess;
  });
}

// What plan_call's plans depend on: the current device, the two-pass row width, whether the call
// has a one-pass kernel, and per operand whether it is present, whether it is 16-byte aligned and
// its view.
template <size_t kOps>
struct PlanKey {
  std::array<int64_t, 3 + 8 * kOps> values;

  bool operator==(const PlanKey& o) const { return values == o.values; }
};

template <size_t kOps>
struct PlanKeyHash {
  size_t operator()(const PlanKey<kOps>& key) const {
    uint64_t h = 14695981039346656037ull;  // FNV-1a over the values
    for (const int64_t v : key.values) h = (h ^ uint64_t(v)) * 1099511628211ull;
    return size_t(h);
  }
};

template <size_t kOps>
struct PlannedCall {
  Plan plan;
  std::optional<ResidentPlan> resident;
  std::array<Strided3d, kOps> views;  // the operands' views as make_plan rewrote them
};

// plan_call_uncached, remembered per key: planning a one-pass call searches every split count of
// up to three row shapes (tens of microseconds of host time), and a training step asks for the
// same few plans at every call, twice (the workspace query, then the launch).
template <typename T, template <typename, int> class Acc, int kKept, int kCoefficients, size_t kOps>
cudaError_t plan_call(DType dtype, std::array<Operand, kOps>& ops, bool one_pass_kernel, Plan* plan,
                      std::optional<ResidentPlan>* resident) {
  constexpr size_t kMaxPlans = 1024;  // then start afresh: a process sees a few dozen geometries
  static std::mutex mutex;
  static std::unordered_map<PlanKey<kOps>, PlannedCall<kOps>, PlanKeyHash<kOps>> planned;
  PlanKey<kOps> key{};
  int device = 0;
  if (const cudaError_t err = cudaGetDevice(&device); err != cudaSuccess) return err;
  key.values[0] = device;
  key.values[1] = two_pass_row_bytes();
  key.values[2] = one_pass_kernel;
  for (size_t j = 0; j < kOps; ++j) {
    if (!ops[j].data) continue;  // absent: zeros, whatever its view holds
    const Strided3d& v = ops[j].view;
    const int64_t aligned = reinterpret_cast<uintptr_t>(ops[j].data) % 16 == 0;
    const std::array<int64_t, 8> values = {1, aligned, v.N, v.C, v.L, v.sN, v.sC, v.sL};
    std::copy(values.begin(), values.end(), key.values.begin() + 3 + 8 * j);
  }
  {
    std::lock_guard<std::mutex> lock(mutex);
    if (const auto it = planned.find(key); it != planned.end()) {
      *plan = it->second.plan;
      *resident = it->second.resident;
      for (size_t j = 0; j < kOps; ++j) ops[j].view = it->second.views[j];
      return cudaSuccess;
    }
  }
  if (const cudaError_t err = plan_call_uncached<T, Acc, kKept, kCoefficients>(dtype, ops, one_pass_kernel, plan,
                                                                               resident);
      err != cudaSuccess) {
    return err;
  }
  PlannedCall<kOps> call{*plan, *resident, {}};
  for (size_t j = 0; j < kOps; ++j) call.views[j] = ops[j].view;
  std::lock_guard<std::mutex> lock(mutex);
  if (planned.size() >= kMaxPlans) planned.clear();
  planned.emplace(key, call);
  return cudaSuccess;
}

// The forward's plans: the one-pass kernel keeps x (training only).
template <typename T>
cudaError_t plan_forward(bool training, DType dtype, std::array<Operand, 3>& ops, Plan* plan,
                         std::optional<ResidentPlan>* resident) {
  return plan_call<T, Welford, 1, 3>(dtype, ops, training, plan, resident);
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
    p.partials = StatPartials<A>{{ws, ws + S * C, ws + 2 * S * C}};
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

// The backward's plans: the one-pass kernel keeps gz and x (training with grad_input only).
template <typename T>
cudaError_t plan_backward(const BnBackwardArgs& a, std::array<Operand, 5>& ops, Plan* plan,
                          std::optional<ResidentPlan>* resident) {
  return plan_call<T, GradSums, 2, 4>(a.input_dtype, ops, a.training && a.grad_input, plan, resident);
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
  p.bias = static_cast<const P*>(a.bias);
  p.mean = static_cast<const A*>(a.mean);
  p.invstd = static_cast<const A*>(a.invstd);
  if (sums) {
    A* ws = static_cast<A*>(workspace);
    p.partials = GradPartials<A>{{ws, ws + S * C}};
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
  const bool recompute = a.relu && !a.output;  // the ReLU mask from x (kRecomputesReluMask)
  if (resident) {
    return dispatch_recompute<T>(recompute, [&](auto recomputed) {
      return dispatch_layout<T>(plan, [&](auto along_c, auto vec) {
        return launch_resident(bn_backward_resident_kernel<T, P, decltype(along_c)::value, decltype(vec)::value,
                                                           decltype(recomputed)::value>,
                               *resident, arrivals_in<A>(workspace, 2 * S * C), stream, p, resident->plan.tiling,
                               resident->channel_tiles, resident->kept_items);
      });
    });
  }
  // With relu, launch 1 writes grad_residual (gz) and launch 2 reads it instead of grad_output
  // and the mask's source (the output, or x when it needs no x itself): at most as many tensors.
  const bool residual_first = sums && a.relu && p.grad_residual;
  BackwardParams<T, P> q = p;
  if (residual_first) {
    q.grad_output = p.grad_residual;
    q.g_view = p.gr_view;
    q.relu_output = nullptr;
    q.grad_residual = nullptr;
  }
  // Without elementwise outputs left, only the blocks writing grad_weight / grad_bias are needed.
  const dim3 grid = q.grad_input || q.grad_residual ? plan.grid : dim3(plan.grid.x);
  return dispatch_recompute<T>(recompute, [&](auto recomputed) {
    constexpr bool kRecompute = decltype(recomputed)::value;
    return dispatch_layout<T>(plan, [&](auto along_c, auto vec) {
      constexpr bool kAlongC = decltype(along_c)::value;
      constexpr int VEC = decltype(vec)::value;
      if (sums) {
        static_assert(!kRecompute || std::is_same_v<P, A>, "recomputing types have parameters of their own type");
        const A* weight = kRecompute ? reinterpret_cast<const A*>(p.weight) : nullptr;
        const A* bias = kRecompute ? reinterpret_cast<const A*>(p.bias) : nullptr;
        bn_grad_sums_kernel<T, kAlongC, VEC, kRecompute><<<plan.grid, plan.block, 0, stream>>>(
            p.grad_output, p.g_view, p.input, p.in_view, p.relu_output, p.out_view,
            residual_first ? p.grad_residual : nullptr, p.gr_view, p.mean, p.invstd, weight, bias, plan.tiling,
            p.partials);
        if (const cudaError_t err = cudaGetLastError(); err != cudaSuccess) return err;
      }
      if (residual_first) {
        bn_backward_kernel<T, P, kAlongC, VEC, false><<<grid, plan.block, 0, stream>>>(q, plan.tiling);
      } else {
        bn_backward_kernel<T, P, kAlongC, VEC, kRecompute><<<grid, plan.block, 0, stream>>>(q, plan.tiling);
      }
      return cudaGetLastError();
    });
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

bool bn_backward_recomputes_relu_mask(DType input) {
  switch (input) {
    case DType::kFloat16:
      return kRecomputesReluMask<__half>;
    case DType::kBFloat16:
      return kRecomputesReluMask<__nv_bfloat16>;
    case DType::kFloat32:
      return kRecomputesReluMask<float>;
    case DType::kFloat64:
      return kRecomputesReluMask<double>;
  }
  return false;
}

cudaError_t bn_backward(const BnBackwardArgs& args, void* workspace, cudaStream_t stream) {
  if ((args.relu && !args.output && !bn_backward_recomputes_relu_mask(args.input_dtype)) ||
      (backward_needs_sums(args) && !workspace)) {
    return cudaErrorInvalidValue;
  }
  return dispatch_dtypes(args.input_dtype, args.param_dtype, [&](auto t, auto p) {
    return backward<typename decltype(t)::type, typename decltype(p)::type>(args, workspace, stream);
  });
}

}  // namespace cnnkern::cuda

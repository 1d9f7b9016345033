// The CPU emulator of CUDA behind emulator.h (what it does and does not model: see there), and a
// Python module exposing the CUDA backend's op wrappers (csrc/cuda/bn_wrappers.h) over it, for CPU
// tensors. Test code only: tests/cuda_emulator.py builds and loads it.
#include <sys/mman.h>
#include <torch/extension.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstdio>
#include <map>
#include <numeric>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "cuda/bn_wrappers.h"
#include "emulator.h"
#include "selftest.h"

// Saves the callee-saved registers and the floating-point control words on the current stack,
// stores the stack pointer to *save_sp, and resumes the fiber whose stack pointer is load_sp
// (System V x86-64). A few instructions, where swapcontext() would make a system call.
extern "C" void cuda_emu_switch(void** save_sp, void* load_sp);
asm(R"(
  .text
  .globl cuda_emu_switch
  .type cuda_emu_switch, @function
cuda_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size cuda_emu_switch, .-cuda_emu_switch
)");

namespace cuda_emu {
namespace {

constexpr int kWarpSize = 32;
constexpr std::size_t kMaxShuffleBytes = 16;
constexpr std::size_t kStackBytes = 256 << 10;  // per fiber: kernels keep a few KB of locals
constexpr std::size_t kGuardBytes = 4096;       // an unmapped page under each stack: overflow faults
constexpr int kMaxFibers = 16384;               // alive at once: a block, or a cooperative grid
constexpr int kDefaultDynamicShared = 48 << 10;  // without cudaFuncSetAttribute
constexpr int kThreadsPerSM = 2048;
constexpr int kMaxBlocksPerSM = 32;
constexpr int kReservedSharedPerBlock = 1024;  // the driver's share of each block's shared memory

enum class State { kReady, kAtBarrier, kAtShuffle, kSpinning, kDone };

struct Fiber {
  uint3 idx;
  int rank;  // linear thread index: lane = rank % 32, warp = rank / 32
  void* sp;  // saved stack pointer while switched out
  State state;
  int shuffle_parity;        // which of the warp's two slot sets this lane's next shuffle uses
  const char* barrier_file;  // the __syncthreads() call the thread waits at, while it does
  int barrier_line;
};

using Slot = std::array<unsigned char, kMaxShuffleBytes>;
using WarpSlots = std::array<std::array<Slot, kWarpSize>, 2>;
// A block's dynamic shared memory, its end against an unmapped page: a kernel that writes past
// what it was launched with faults there instead of corrupting the emulator.
class DynamicShared {
 public:
  DynamicShared() = default;
  DynamicShared(const DynamicShared&) = delete;
  DynamicShared& operator=(const DynamicShared&) = delete;
  DynamicShared(DynamicShared&& o) noexcept { *this = std::move(o); }
  DynamicShared& operator=(DynamicShared&& o) noexcept {
    std::swap(map_, o.map_);
    std::swap(map_bytes_, o.map_bytes_);
    std::swap(data_, o.data_);
    std::swap(bytes_, o.bytes_);
    return *this;
  }
  ~DynamicShared() {
    if (map_) munmap(map_, map_bytes_);
  }

  void allocate(std::size_t bytes) {
    const std::size_t page = 4096, rounded = (bytes + 127) / 128 * 128;  // data stays 128-byte aligned
    map_bytes_ = (rounded + page - 1) / page * page + page;
    map_ = mmap(nullptr, map_bytes_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    TORCH_CHECK(map_ != MAP_FAILED, "cuda_emu: cannot map ", map_bytes_, " bytes of shared memory");
    char* guard = static_cast<char*>(map_) + map_bytes_ - page;
    TORCH_CHECK(mprotect(guard, page, PROT_NONE) == 0, "cuda_emu: cannot protect a shared memory guard page");
    data_ = guard - rounded;
    bytes_ = rounded;
  }
  void poison() { std::memset(data_, 0xff, bytes_); }
  void* data() const { return data_; }

 private:
  void* map_ = nullptr;
  std::size_t map_bytes_ = 0;
  char* data_ = nullptr;
  std::size_t bytes_ = 0;
};

// Stacks for up to `count` fibers, reused by every block and launch.
class Stacks {
 public:
  char* top(int i) { return base_ + (static_cast<std::size_t>(i) + 1) * (kStackBytes + kGuardBytes); }
  void reserve(int count) {
    if (count <= count_) return;
    release();
    const std::size_t bytes = static_cast<std::size_t>(count) * (kStackBytes + kGuardBytes);
    void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    TORCH_CHECK(p != MAP_FAILED, "cuda_emu: cannot map ", bytes, " bytes of fiber stacks");
    base_ = static_cast<char*>(p);
    count_ = count;
    for (int i = 0; i < count; ++i) {
      TORCH_CHECK(mprotect(base_ + i * (kStackBytes + kGuardBytes), kGuardBytes, PROT_NONE) == 0,
                  "cuda_emu: cannot protect the guard page of fiber stack ", i);
    }
  }
  ~Stacks() { release(); }

 private:
  void release() {
    if (base_) munmap(base_, static_cast<std::size_t>(count_) * (kStackBytes + kGuardBytes));
    base_ = nullptr;
    count_ = 0;
  }
  char* base_ = nullptr;
  int count_ = 0;
};

// A block of the running launch, with its threads and shared memory.
struct Block {
  const Launch* launch;
  const std::function<void()>* body;
  uint3 idx;
  int first_stack;  // its threads' stacks: first_stack + rank
  std::vector<Fiber> fibers;
  std::vector<WarpSlots> slots;
  DynamicShared dynamic_shared;
  Fiber* current = nullptr;
  void* scheduler_sp = nullptr;
  std::string error;  // first failure seen in this block
};

thread_local Block* t_block = nullptr;
thread_local Stacks t_stacks;
thread_local cudaError_t t_last_error = cudaSuccess;
thread_local std::string t_last_message;

struct Device {
  int sms, l2_bytes, shared_per_sm, shared_per_block_optin;
  bool operator==(const Device& o) const {  // spelled out: torch 2.11's extension builds are C++17
    return sms == o.sms && l2_bytes == o.l2_bytes && shared_per_sm == o.shared_per_sm &&
           shared_per_block_optin == o.shared_per_block_optin;
  }
};
// Emulated devices; an index always names the same limits (the launchers cache them per device).
std::vector<Device> g_devices = {{132, 50 << 20, 228 << 10, 227 << 10}};  // an H100's
thread_local int t_device = 0;
std::uint64_t g_block_order_seed = 0;
std::int64_t g_launches = 0;
std::vector<Launch> g_launched;  // since launched_grids() last took them
bool g_dry_run = false;          // launches are checked and recorded, not run
std::map<const void*, int> g_max_dynamic_shared;  // per kernel, set by cudaFuncSetAttribute
std::uint64_t g_progress = 0;  // fiber steps that end elsewhere than in a spin wait

const Device& device() { return g_devices[t_device]; }

void fail(Block& b, const std::string& why) {
  if (b.error.empty()) {
    b.error = "block (" + std::to_string(b.idx.x) + ", " + std::to_string(b.idx.y) + ", " + std::to_string(b.idx.z) +
              "): " + why;
  }
}

void yield(State state) {
  Block& b = *t_block;
  Fiber& f = *b.current;
  f.state = state;
  if (state != State::kSpinning) ++g_progress;
  cuda_emu_switch(&f.sp, b.scheduler_sp);
}

[[noreturn]] void fiber_main() {
  (*t_block->body)();
  yield(State::kDone);
  __builtin_unreachable();
}

// A stack on which the first switch "returns" into fiber_main with an ABI-aligned stack pointer.
void* initial_sp(char* top) {
  auto* sp = reinterpret_cast<std::uint64_t*>(top);
  *--sp = 0;  // fiber_main's return address: it never returns
  *--sp = reinterpret_cast<std::uint64_t>(&fiber_main);
  for (int r = 0; r < 6; ++r) *--sp = 0;  // rbp, rbx, r12..r15
  std::uint32_t mxcsr = __builtin_ia32_stmxcsr();
  std::uint16_t fpu_cw = 0;
  asm volatile("fnstcw %0" : "=m"(fpu_cw));
  *--sp = mxcsr | (std::uint64_t(fpu_cw) << 32);
  return sp;
}

void init_block(Block& b, const Launch& launch, const std::function<void()>& body, int first_stack) {
  const dim3 d = launch.block;
  b.launch = &launch;
  b.body = &body;
  b.first_stack = first_stack;
  b.slots.resize((d.x * d.y * d.z + kWarpSize - 1) / kWarpSize);
  b.dynamic_shared.allocate(launch.shared_bytes);
  for (unsigned z = 0; z < d.z; ++z) {
    for (unsigned y = 0; y < d.y; ++y) {
      for (unsigned x = 0; x < d.x; ++x) {
        b.fibers.push_back(Fiber{uint3{x, y, z}, int(x + d.x * (y + d.y * z)), nullptr, State::kReady, 0, nullptr, 0});
      }
    }
  }
}

// Starts block `id` (linear) on b's threads: fresh stacks, shared memory all-ones bytes.
void start_block(Block& b, std::uint64_t id) {
  const dim3 g = b.launch->grid;
  b.idx = uint3{unsigned(id % g.x), unsigned(id / g.x % g.y), unsigned(id / g.x / g.y)};
  for (Fiber& f : b.fibers) {
    f.state = State::kReady;
    f.shuffle_parity = 0;
    f.sp = initial_sp(t_stacks.top(b.first_stack + f.rank));
  }
  b.dynamic_shared.poison();
}

std::string site(const Fiber& f) { return std::string(f.barrier_file) + ":" + std::to_string(f.barrier_line); }

template <class Pred>
std::ptrdiff_t count(const Block& b, Pred pred) {
  return std::count_if(b.fibers.begin(), b.fibers.end(), pred);
}

// Releases the warps whose 32 lanes all wait at a shuffle. False when a warp shuffles with lanes
// missing (b.error says so).
bool release_shuffles(Block& b, bool* released) {
  for (std::size_t w0 = 0; w0 < b.fibers.size(); w0 += kWarpSize) {
    const std::size_t w1 = std::min(b.fibers.size(), w0 + kWarpSize);
    const auto shuffling = std::count_if(b.fibers.begin() + w0, b.fibers.begin() + w1,
                                         [](const Fiber& f) { return f.state == State::kAtShuffle; });
    if (shuffling == 0) continue;
    if (shuffling != kWarpSize) {
      fail(b, "warp " + std::to_string(w0 / kWarpSize) + ": " + std::to_string(shuffling) +
                  " lanes wait at a full-warp shuffle, the others exited, wait elsewhere or do not exist");
      return false;
    }
    for (std::size_t i = w0; i < w1; ++i) b.fibers[i].state = State::kReady;
    *released = true;
  }
  return true;
}

// Releases the fibers that may go on, after every ready fiber ran to its next wait. False when
// none may: the block waits for the rest of the grid (a spin wait), or broke a rule (b.error
// says which).
bool release(Block& b) {
  bool released = false;
  if (!release_shuffles(b, &released)) return false;
  if (released) return true;
  const auto live = count(b, [](const Fiber& f) { return f.state != State::kDone; });
  if (count(b, [](const Fiber& f) { return f.state == State::kSpinning; }) > 0) return false;
  // Every live fiber waits at a barrier.
  const Fiber& first =
      *std::find_if(b.fibers.begin(), b.fibers.end(), [](const Fiber& f) { return f.state == State::kAtBarrier; });
  if (live != static_cast<std::ptrdiff_t>(b.fibers.size())) {
    fail(b, std::to_string(b.fibers.size() - live) + " threads exited while the other " + std::to_string(live) +
                " wait at __syncthreads() (" + site(first) + ")");
    return false;
  }
  for (const Fiber& f : b.fibers) {
    if (f.barrier_line != first.barrier_line || std::strcmp(f.barrier_file, first.barrier_file) != 0) {
      fail(b, "threads wait at different __syncthreads() calls: " + site(first) + " and " + site(f));
      return false;
    }
  }
  for (Fiber& f : b.fibers) f.state = State::kReady;
  return true;
}

// Runs the block's threads until every one exited or the block waits for the rest of the grid
// (release), or a rule is broken; threads in spin waits first try again. Each thread runs until
// it waits or exits, in rank order or (`reversed`) the reverse: a load that no barrier orders
// after another thread's store then reads a stale value in one of the two orders, whichever way
// round the two threads are.
void run_block(Block& b, bool reversed) {
  for (Fiber& f : b.fibers) f.state = f.state == State::kSpinning ? State::kReady : f.state;
  Block* outer = t_block;
  t_block = &b;
  const std::size_t n = b.fibers.size();
  for (;;) {
    for (std::size_t k = 0; k < n; ++k) {
      Fiber& f = b.fibers[reversed ? n - 1 - k : k];
      if (f.state != State::kReady) continue;
      b.current = &f;
      threadIdx = f.idx;
      blockIdx = b.idx;
      blockDim = b.launch->block;
      gridDim = b.launch->grid;
      cuda_emu_switch(&b.scheduler_sp, f.sp);
    }
    b.current = nullptr;
    if (count(b, [](const Fiber& f) { return f.state != State::kDone; }) == 0) break;
    if (!b.error.empty() || !release(b)) break;  // a broken rule abandons the threads mid-kernel
  }
  t_block = outer;
}

bool done(const Block& b) {
  return std::all_of(b.fibers.begin(), b.fibers.end(), [](const Fiber& f) { return f.state == State::kDone; });
}

bool spinning(const Block& b) {
  return std::any_of(b.fibers.begin(), b.fibers.end(), [](const Fiber& f) { return f.state == State::kSpinning; });
}

cudaError_t launch_failure(const std::string& error) {
  t_last_message = "unspecified launch failure (cuda_emu: " + error + ")";
  return cudaErrorLaunchFailure;
}

// Blocks one after another, each on the same threads; a block may spin-wait only for itself.
cudaError_t run_blocks(const Launch& launch, const std::function<void()>& body,
                       const std::vector<std::uint64_t>& order) {
  Block b;
  init_block(b, launch, body, 0);
  for (std::size_t k = 0; k < order.size(); ++k) {
    start_block(b, order[k]);
    std::uint64_t before;
    do {
      before = g_progress;
      run_block(b, k % 2 == 1);
    } while (b.error.empty() && spinning(b) && g_progress != before);
    if (b.error.empty() && !done(b)) {
      fail(b, "a spin wait that only other blocks can end, in a launch that is not cooperative");
    }
    if (!b.error.empty()) return launch_failure(b.error);
  }
  return cudaSuccess;
}

// A cooperative launch: every block alive at once. In turns, each block runs until it waits for
// the others (a spin wait) or exits; a spin wait tries again each turn, and a turn in which no
// thread gets past a spin wait is a deadlock.
cudaError_t run_cooperative(const Launch& launch, const std::function<void()>& body, std::vector<std::uint64_t> order,
                            std::mt19937_64& rng) {
  const int threads = int(launch.block.x * launch.block.y * launch.block.z);
  std::vector<Block> blocks(order.size());
  for (std::size_t k = 0; k < blocks.size(); ++k) {
    init_block(blocks[k], launch, body, int(k) * threads);
    start_block(blocks[k], order[k]);
  }
  std::vector<std::size_t> turns(blocks.size());  // the order of the blocks in a turn
  std::iota(turns.begin(), turns.end(), 0);
  for (;;) {
    const std::uint64_t before = g_progress;
    for (std::size_t k = 0; k < turns.size(); ++k) {
      Block& b = blocks[turns[k]];
      run_block(b, k % 2 == 1);
      if (!b.error.empty()) return launch_failure(b.error);
    }
    if (std::all_of(blocks.begin(), blocks.end(), done)) return cudaSuccess;
    if (g_progress == before) {  // every block not done spins, and none got further
      Block& spinner = *std::find_if(blocks.begin(), blocks.end(), spinning);
      fail(spinner, "deadlock: threads spin-wait for what no thread of the grid will do");
      return launch_failure(spinner.error);
    }
    std::shuffle(turns.begin(), turns.end(), rng);  // the next turn in another order
  }
}

cudaError_t invalid_configuration(const std::string& why) {
  t_last_message = "invalid launch configuration (cuda_emu: " + why + ")";
  return cudaErrorInvalidConfiguration;
}

}  // namespace

int occupancy(int block_threads, std::size_t shared_bytes) {
  if (block_threads <= 0) return 0;
  const std::size_t per_block = shared_bytes + kReservedSharedPerBlock;
  return int(std::min<std::size_t>({kMaxBlocksPerSM, std::size_t(kThreadsPerSM / block_threads),
                                    std::size_t(device().shared_per_sm) / per_block}));
}

cudaError_t set_max_dynamic_shared(const void* kernel, int bytes) {
  if (bytes < 0 || bytes > device().shared_per_block_optin) return cudaErrorInvalidValue;
  g_max_dynamic_shared[kernel] = bytes;
  return cudaSuccess;
}

int lane() { return t_block->current->rank % kWarpSize; }
void* dynamic_shared() { return t_block->dynamic_shared.data(); }

void syncthreads(const char* file, int line) {
  Fiber& f = *t_block->current;
  f.barrier_file = file;
  f.barrier_line = line;
  yield(State::kAtBarrier);
}

void spin_wait() { yield(State::kSpinning); }

void misaligned(const char* access, const void* address, std::size_t bytes) {
  char where[32];
  std::snprintf(where, sizeof(where), "%p", address);
  fail(*t_block, "misaligned address: a " + std::to_string(bytes) + "-byte " + access + " at " + where);
}


void shuffle(const void* value, void* out, std::size_t bytes, unsigned mask, int src_lane) {
  Block& b = *t_block;
  Fiber& f = *b.current;
  if (mask != 0xffffffffu || bytes > kMaxShuffleBytes || src_lane < 0 || src_lane >= kWarpSize) {
    fail(b, "unsupported shuffle (the emulator models full-warp shuffles of up to 16 bytes within the warp)");
  }
  WarpSlots& slots = b.slots[f.rank / kWarpSize];
  const int parity = f.shuffle_parity;
  std::memcpy(slots[parity][f.rank % kWarpSize].data(), value, std::min(bytes, kMaxShuffleBytes));
  yield(State::kAtShuffle);
  // Slots of this parity stay put until every lane has read them: no lane can publish to them
  // again before the whole warp has passed the next shuffle, which uses the other set.
  std::memcpy(out, slots[parity][src_lane % kWarpSize].data(), std::min(bytes, kMaxShuffleBytes));
  f.shuffle_parity ^= 1;
}

cudaError_t run_grid(const Launch& launch, const std::function<void()>& body) {
  ++g_launches;
  const dim3 grid = launch.grid, block = launch.block;
  const std::uint64_t threads = std::uint64_t(block.x) * block.y * block.z;
  const std::uint64_t blocks = std::uint64_t(grid.x) * grid.y * grid.z;
  if (threads == 0 || threads > 1024 || block.z > 64 || grid.x == 0 || grid.x > 2147483647u || grid.y == 0 ||
      grid.y > 65535 || grid.z == 0 || grid.z > 65535) {
    return invalid_configuration("block " + std::to_string(threads) + " threads, grid (" + std::to_string(grid.x) +
                                 ", " + std::to_string(grid.y) + ", " + std::to_string(grid.z) + ")");
  }
  const auto raised = g_max_dynamic_shared.find(launch.kernel);
  const int shared_limit = raised == g_max_dynamic_shared.end() ? kDefaultDynamicShared : raised->second;
  if (launch.shared_bytes > std::size_t(shared_limit)) {
    return invalid_configuration(std::to_string(launch.shared_bytes) + " bytes of dynamic shared memory, " +
                                 std::to_string(shared_limit) + " allowed (cudaFuncSetAttribute raises it)");
  }
  if (launch.cooperative) {
    const std::uint64_t resident = std::uint64_t(occupancy(int(threads), launch.shared_bytes)) * device().sms;
    if (blocks > resident) {
      t_last_message = "too many blocks in cooperative launch (cuda_emu: " + std::to_string(blocks) + " blocks, " +
                       std::to_string(resident) + " resident at once)";
      return cudaErrorCooperativeLaunchTooLarge;
    }
  }
  g_launched.push_back(launch);
  if (g_dry_run) return cudaSuccess;
  const std::uint64_t fibers = launch.cooperative ? blocks * threads : threads;
  TORCH_CHECK(fibers <= kMaxFibers, "cuda_emu: a launch of ", fibers, " threads alive at once is more than the ",
              kMaxFibers, " the emulator runs; emulate a device with fewer SMs");
  t_stacks.reserve(int(fibers));

  // Blocks in a shuffled order: CUDA promises none, so no kernel may rely on one.
  std::vector<std::uint64_t> order(blocks);
  std::iota(order.begin(), order.end(), 0);
  std::mt19937_64 rng(g_block_order_seed + g_launches);
  std::shuffle(order.begin(), order.end(), rng);
  return launch.cooperative ? run_cooperative(launch, body, std::move(order), rng) : run_blocks(launch, body, order);
}

void set_last_error(cudaError_t err) {
  if (err != cudaSuccess) t_last_error = err;
}

}  // namespace cuda_emu

thread_local uint3 threadIdx;
thread_local uint3 blockIdx;
thread_local dim3 blockDim;
thread_local dim3 gridDim;

cudaError_t cudaGetDevice(int* device) {
  *device = cuda_emu::t_device;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  if (device < 0 || device >= int(cuda_emu::g_devices.size())) return cudaErrorInvalidValue;
  const cuda_emu::Device& d = cuda_emu::g_devices[device];
  switch (attr) {
    case cudaDevAttrMultiProcessorCount:
      *value = d.sms;
      return cudaSuccess;
    case cudaDevAttrL2CacheSize:
      *value = d.l2_bytes;
      return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerMultiprocessor:
      *value = d.shared_per_sm;
      return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin:
      *value = d.shared_per_block_optin;
      return cudaSuccess;
    case cudaDevAttrCooperativeLaunch:
      *value = 1;
      return cudaSuccess;
  }
  return cudaErrorInvalidValue;
}

cudaError_t cudaGetLastError() {
  const cudaError_t err = cuda_emu::t_last_error;
  cuda_emu::t_last_error = cudaSuccess;
  return err;
}

const char* cudaGetErrorString(cudaError_t err) {
  switch (err) {
    case cudaSuccess:
      return "no error";
    case cudaErrorInvalidValue:
      return "invalid argument";
    default:
      return cuda_emu::t_last_message.c_str();
  }
}

namespace {

// The runtime of the CUDA op wrappers, emulated: CPU tensors, no streams, and outputs and
// scratch filled with NaN (all-ones bytes) so that an element no kernel writes cannot pass.
struct EmulatedRuntime {
  struct Guard {
    explicit Guard(c10::Device) {}
  };
  static void check_device(const at::Tensor& input) {
    TORCH_CHECK(input.is_cpu(), "the CUDA emulator runs CPU tensors, got ", input.device());
  }
  static cudaStream_t stream() { return nullptr; }
  static void check(cudaError_t err) { TORCH_CHECK(err == cudaSuccess, "CUDA error: ", cudaGetErrorString(err)); }
  static at::Tensor empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
    return poison(at::empty(sizes, options));
  }
  static at::Tensor empty_like(const at::Tensor& t) { return poison(at::empty_like(t)); }

 private:
  static at::Tensor poison(at::Tensor t) {
    return t.is_floating_point() ? t.fill_(std::numeric_limits<double>::quiet_NaN()) : t.fill_(0xff);
  }
};

static_assert(cnnkern::cuda_wrappers::matches_op_signatures<EmulatedRuntime>,
              "the CUDA wrappers' signatures must match csrc/bn_signatures.h, as the dispatcher requires");

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace w = cnnkern::cuda_wrappers;
  m.doc() = "csrc/cuda's batch-norm kernels, run on the CPU by an emulator of CUDA (tests only)";
  m.def("bn_forward_train", &w::bn_forward_train<EmulatedRuntime>);
  m.def("bn_forward_eval", &w::bn_forward_eval<EmulatedRuntime>);
  m.def("bn_backward", &w::bn_backward<EmulatedRuntime>);
  m.def(
      "use_device",
      [](int sms, int l2_bytes, int shared_per_sm, int shared_per_block) {
        TORCH_CHECK(sms > 0 && l2_bytes > 0 && shared_per_block > 0 && shared_per_sm >= shared_per_block,
                    "use_device: expected positive sizes and shared_per_sm >= shared_per_block");
        const cuda_emu::Device device{sms, l2_bytes, shared_per_sm, shared_per_block};
        auto& d = cuda_emu::g_devices;
        const auto it = std::find(d.begin(), d.end(), device);
        cuda_emu::t_device = int(it - d.begin());
        if (it == d.end()) d.push_back(device);
      },
      pybind11::arg("sms"), pybind11::arg("l2_bytes") = 50 << 20, pybind11::arg("shared_per_sm") = 228 << 10,
      pybind11::arg("shared_per_block") = 227 << 10,
      "Makes current an emulated device (an H100's limits but for the SM count unless given).");
  m.def(
      "set_block_order_seed", [](std::uint64_t seed) { cuda_emu::g_block_order_seed = seed; },
      "Seeds the order in which each launch runs its blocks.");
  m.def(
      "launched_grids",
      [] {
        std::vector<std::tuple<unsigned, unsigned, unsigned, bool, std::size_t, unsigned, unsigned>> grids;
        for (const cuda_emu::Launch& l : cuda_emu::g_launched) {
          grids.emplace_back(l.grid.x, l.grid.y, l.grid.z, l.cooperative, l.shared_bytes, l.block.x, l.block.y);
        }
        cuda_emu::g_launched.clear();
        return grids;
      },
      "The launches run since the last call: grid (x, y, z), cooperative, dynamic shared bytes, block (x, y).");
  m.def(
      "set_dry_run", [](bool dry) { cuda_emu::g_dry_run = dry; },
      "Whether launches are only checked (configuration, shared memory, cooperative occupancy) and "
      "recorded, not run: to see the plans of full-size tensors, whose outputs are then left unwritten.");
  m.def(
      "selftest",
      [](const std::string& kernel, const at::Tensor& in, at::Tensor& out, unsigned blocks, unsigned threads) {
        TORCH_CHECK(in.dtype() == at::kFloat && out.dtype() == at::kFloat && in.is_contiguous() &&
                        out.is_contiguous() && in.numel() >= blocks * 128 && out.numel() > blocks * 128,
                    "selftest: in and out must be contiguous float32 tensors of blocks * 128 elements, out one more");
        return std::string(cudaGetErrorString(
            cuda_emu_selftest(kernel.c_str(), in.const_data_ptr<float>(), out.mutable_data_ptr<float>(), blocks,
                              threads)));
      },
      "Runs a kernel of selftest.cu on `blocks` x `threads`; the launch's error text (\"no error\").");
}

// The CPU emulator of CUDA behind emulator.h (what it does and does not model: see there), and a
// Python module exposing the CUDA backend's op wrappers (csrc/cuda/bn_wrappers.h) over it, for CPU
// tensors. Test code only: tests/cuda_emulator.py builds and loads it.
#include <sys/mman.h>
#include <torch/extension.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <numeric>
#include <random>
#include <string>
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
constexpr std::size_t kMaxSharedBytes = 48 << 10;

enum class State { kReady, kAtBarrier, kAtShuffle, kDone };

struct Fiber {
  uint3 idx;
  int rank;  // linear thread index: lane = rank % 32, warp = rank / 32
  void* sp;  // saved stack pointer while switched out
  State state;
  int shuffle_parity;  // which of the warp's two slot sets this lane's next shuffle uses
  const char* barrier_file;  // the __syncthreads() call the thread waits at, while it does
  int barrier_line;
};

using Slot = std::array<unsigned char, kMaxShuffleBytes>;
using WarpSlots = std::array<std::array<Slot, kWarpSize>, 2>;

// Stacks for up to `count` fibers, reused by every block and launch.
class Stacks {
 public:
  char* top(int i) {
    return base_ + (static_cast<std::size_t>(i) + 1) * (kStackBytes + kGuardBytes);
  }
  void reserve(int count) {
    if (count <= count_) return;
    release();
    const std::size_t bytes = static_cast<std::size_t>(count) * (kStackBytes + kGuardBytes);
    void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    TORCH_CHECK(p != MAP_FAILED, "cuda_emu: cannot map ", bytes, " bytes of fiber stacks");
    base_ = static_cast<char*>(p);
    for (int i = 0; i < count; ++i) mprotect(base_ + i * (kStackBytes + kGuardBytes), kGuardBytes, PROT_NONE);
    count_ = count;
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

// The block being run, on this OS thread.
struct Block {
  dim3 grid, dim;
  uint3 idx;
  const std::function<void()>* body;
  std::vector<Fiber> fibers;
  std::vector<WarpSlots> slots;
  Fiber* current = nullptr;
  void* scheduler_sp = nullptr;
  std::string error;  // first failure seen in this block
};

thread_local Block* t_block = nullptr;
thread_local Stacks t_stacks;
thread_local cudaError_t t_last_error = cudaSuccess;
thread_local std::string t_last_message;

// Emulated devices differ only in SM count; a device's index never changes its count (the
// launchers cache it per device).
std::vector<int> g_device_sms = {132};
thread_local int t_device = 0;
std::uint64_t g_block_order_seed = 0;
std::int64_t g_launches = 0;
std::vector<dim3> g_grids;  // of the launches since launched_grids() last took them

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

std::string site(const Fiber& f) { return std::string(f.barrier_file) + ":" + std::to_string(f.barrier_line); }

// Releases the fibers that may go on, after every ready fiber ran to its next wait. False when
// none may (a rule broken: b.error says which).
bool release(Block& b) {
  const auto live = std::count_if(b.fibers.begin(), b.fibers.end(), [](const Fiber& f) { return f.state != State::kDone; });
  const auto waiting = std::count_if(b.fibers.begin(), b.fibers.end(), [](const Fiber& f) { return f.state == State::kAtBarrier; });
  if (live > 0 && waiting == live) {
    const Fiber& first = *std::find_if(b.fibers.begin(), b.fibers.end(), [](const Fiber& f) { return f.state != State::kDone; });
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
  // Every live fiber waits at a barrier or a shuffle, not all at barriers: some warp shuffles.
  for (std::size_t w0 = 0; w0 < b.fibers.size(); w0 += kWarpSize) {
    const std::size_t w1 = std::min(b.fibers.size(), w0 + kWarpSize);
    const auto shuffling = std::count_if(b.fibers.begin() + w0, b.fibers.begin() + w1,
                                         [](const Fiber& f) { return f.state == State::kAtShuffle; });
    if (shuffling == 0) continue;
    if (shuffling != kWarpSize) {
      fail(b, "warp " + std::to_string(w0 / kWarpSize) + ": " + std::to_string(shuffling) +
                  " lanes wait at a full-warp shuffle, the others exited, wait at __syncthreads() or do not exist");
      return false;
    }
    for (std::size_t i = w0; i < w1; ++i) b.fibers[i].state = State::kReady;
  }
  return true;
}

// Runs the block's threads, each until it waits or exits, in rank order or (`reversed`) the
// reverse: a load that no barrier orders after another thread's store then reads a stale value
// in one of the two orders, whichever way round the two threads are.
void run_block(Block& b, bool reversed) {
  for (Fiber& f : b.fibers) {
    f.state = State::kReady;
    f.shuffle_parity = 0;
    f.sp = initial_sp(t_stacks.top(f.rank));
  }
  const std::size_t n = b.fibers.size();
  for (;;) {
    for (std::size_t k = 0; k < n; ++k) {
      Fiber& f = b.fibers[reversed ? n - 1 - k : k];
      if (f.state != State::kReady) continue;
      b.current = &f;
      cuda_emu_switch(&b.scheduler_sp, f.sp);
    }
    b.current = nullptr;
    if (std::all_of(b.fibers.begin(), b.fibers.end(), [](const Fiber& f) { return f.state == State::kDone; })) return;
    if (!b.error.empty() || !release(b)) return;  // the other fibers are abandoned mid-kernel
  }
}

}  // namespace

const uint3& thread_idx() { return t_block->current->idx; }
const uint3& block_idx() { return t_block->idx; }
const dim3& block_dim() { return t_block->dim; }
const dim3& grid_dim() { return t_block->grid; }
int lane() { return t_block->current->rank % kWarpSize; }

void syncthreads(const char* file, int line) {
  Fiber& f = *t_block->current;
  f.barrier_file = file;
  f.barrier_line = line;
  yield(State::kAtBarrier);
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

cudaError_t run_grid(dim3 grid, dim3 block, std::size_t shared_bytes, const std::function<void()>& body) {
  ++g_launches;
  const std::uint64_t threads = std::uint64_t(block.x) * block.y * block.z;
  if (threads == 0 || threads > 1024 || block.z > 64 || grid.x == 0 || grid.x > 2147483647u || grid.y == 0 ||
      grid.y > 65535 || grid.z == 0 || grid.z > 65535 || shared_bytes > kMaxSharedBytes) {
    t_last_message = "invalid launch configuration";
    return cudaErrorInvalidConfiguration;
  }
  t_stacks.reserve(static_cast<int>(threads));

  Block b;
  b.grid = grid;
  b.dim = block;
  b.body = &body;
  b.slots.resize((threads + kWarpSize - 1) / kWarpSize);
  for (unsigned z = 0; z < block.z; ++z) {
    for (unsigned y = 0; y < block.y; ++y) {
      for (unsigned x = 0; x < block.x; ++x) {
        b.fibers.push_back(Fiber{uint3{x, y, z}, int(x + block.x * (y + block.y * z)), nullptr, State::kReady, 0, nullptr, 0});
      }
    }
  }
  // Blocks in a shuffled order: CUDA promises none, so no kernel may rely on one.
  const std::uint64_t blocks = std::uint64_t(grid.x) * grid.y * grid.z;
  std::vector<std::uint64_t> order(blocks);
  std::iota(order.begin(), order.end(), 0);
  std::shuffle(order.begin(), order.end(), std::mt19937_64(g_block_order_seed + g_launches));

  g_grids.push_back(grid);

  Block* outer = t_block;
  t_block = &b;
  for (std::uint64_t k = 0; k < blocks; ++k) {
    const std::uint64_t id = order[k];
    b.idx = uint3{unsigned(id % grid.x), unsigned(id / grid.x % grid.y), unsigned(id / grid.x / grid.y)};
    run_block(b, k % 2 == 1);
    if (!b.error.empty()) break;
  }
  t_block = outer;
  if (!b.error.empty()) {
    t_last_message = "unspecified launch failure (cuda_emu: " + b.error + ")";
    return cudaErrorLaunchFailure;
  }
  return cudaSuccess;
}

void set_last_error(cudaError_t err) {
  if (err != cudaSuccess) t_last_error = err;
}

}  // namespace cuda_emu

cudaError_t cudaGetDevice(int* device) {
  *device = cuda_emu::t_device;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  if (attr != cudaDevAttrMultiProcessorCount || device < 0 || device >= int(cuda_emu::g_device_sms.size())) {
    return cudaErrorInvalidValue;
  }
  *value = cuda_emu::g_device_sms[device];
  return cudaSuccess;
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

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace w = cnnkern::cuda_wrappers;
  m.doc() = "csrc/cuda's batch-norm kernels, run on the CPU by an emulator of CUDA (tests only)";
  m.def("bn_forward_train", &w::bn_forward_train<EmulatedRuntime>);
  m.def("bn_forward_eval", &w::bn_forward_eval<EmulatedRuntime>);
  m.def("bn_backward", &w::bn_backward<EmulatedRuntime>);
  m.def(
      "use_device",
      [](int sms) {
        TORCH_CHECK(sms > 0, "sms must be positive, got ", sms);
        auto& d = cuda_emu::g_device_sms;
        const auto it = std::find(d.begin(), d.end(), sms);
        cuda_emu::t_device = int(it - d.begin());
        if (it == d.end()) d.push_back(sms);
      },
      "Makes current an emulated device of `sms` multiprocessors (the launchers size grids by it).");
  m.def(
      "set_block_order_seed", [](std::uint64_t seed) { cuda_emu::g_block_order_seed = seed; },
      "Seeds the order in which each launch runs its blocks.");
  m.def(
      "launched_grids",
      [] {
        std::vector<std::tuple<unsigned, unsigned, unsigned>> grids;
        for (const dim3& g : cuda_emu::g_grids) grids.emplace_back(g.x, g.y, g.z);
        cuda_emu::g_grids.clear();
        return grids;
      },
      "The grids (x, y, z) of the launches run since the last call.");
  m.def(
      "selftest",
      [](const std::string& kernel, const at::Tensor& in, at::Tensor& out, unsigned blocks, unsigned threads) {
        TORCH_CHECK(in.dtype() == at::kFloat && out.dtype() == at::kFloat && in.is_contiguous() &&
                        out.is_contiguous() && in.numel() >= blocks * 128 && out.numel() >= blocks * 128,
                    "selftest: in and out must be contiguous float32 tensors of blocks * 128 elements");
        return std::string(cudaGetErrorString(
            cuda_emu_selftest(kernel.c_str(), in.const_data_ptr<float>(), out.mutable_data_ptr<float>(), blocks,
                              threads)));
      },
      "Runs a kernel of selftest.cu on `blocks` x `threads`; the launch's error text (\"no error\").");
}

// A CPU emulator of the CUDA C++ that csrc/cuda/*.cu uses, so the test suite can run those
// kernels on a machine without a GPU (as TRITON_INTERPRET=1 does for the Triton kernels).
//
// Each CUDA thread of a block is a fiber on its own stack; blocks run one after another, in a
// shuffled order (a kernel whose blocks depend on each other's writes shows it), and their
// threads in rank order or its reverse, alternately. Fibers switch only at __syncthreads(), warp
// shuffles and the __nanosleep() of spin waits, with CUDA's rules checked: a barrier releases
// once every thread of the block waits at the same __syncthreads() call, a shuffle once all 32
// lanes of the warp wait at one, a spin wait when the other blocks have had their turn (only a
// cooperative launch guarantees that they run meanwhile; a turn without progress is a deadlock);
// anything else (a thread that exited or waits at another call while the rest wait at a barrier,
// a lane that exited or waits at a barrier while its warp shuffles) fails the launch with
// cudaErrorLaunchFailure and a message. CUDA leaves those cases undefined; hardware often lets
// them pass, the emulator never does.
//
// Memory: static __shared__ variables become function statics, one instance per kernel, which
// serves every block since blocks never overlap between barriers: a cooperative launch runs each
// block until it waits for the grid before the next block runs, so a static __shared__ value does
// not survive a spin wait there (dynamic shared memory, one buffer per block, does; it ends at an
// unmapped page, so an access past the launch's size faults). Atomics, fences and cache hints are
// plain memory operations. Dynamic shared memory and kernel outputs start as all-ones bytes
// (NaN), so a value read before any thread writes it shows. Launches check the block size, grid
// size and dynamic shared memory (48 KB unless cudaFuncSetAttribute raised it, up to the device's
// opt-in limit), and a cooperative grid against the occupancy; the kernels' tensor accesses
// (load_word and store_word: include/cuda/word_access.cuh), the alignment a GPU requires of
// them. What the emulator cannot show: timing, memory-model races between barriers, misaligned
// plain accesses, registers.
//
// The emulated device (use_device in the Python module) has a number of SMs, an L2 size and
// shared memory limits; occupancy is limited by threads (2048 per SM) and shared memory only.
//
// The .cu sources are compiled as C++ after a textual rewrite (cuda_emulator.py): each
// `kernel<<<grid, block, shared_bytes, stream>>>(args...)` becomes
// `::cuda_emu::launch(grid, block, shared_bytes, stream, kernel, args...)`, and each
// `extern __shared__ __align__(16) T name[];` a pointer to the block's dynamic shared memory.
#pragma once
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <tuple>
#include <type_traits>
#include <utility>

#include "include/cuda_runtime_api.h"

namespace cuda_emu {

// A __syncthreads() call, known by its place in the source.
void syncthreads(const char* file, int line);
// Publishes `bytes` of this lane's value, waits for the whole warp, copies lane `src`'s value out.
void shuffle(const void* value, void* out, std::size_t bytes, unsigned mask, int src_lane);
int lane();

// A spin wait's pause (__nanosleep): lets the other threads of the grid run first.
void spin_wait();
// Fails the launch: a load or store (`access`) of `bytes` at `address`, not aligned to them,
// which faults on a GPU.
void misaligned(const char* access, const void* address, std::size_t bytes);
template <typename T>
bool aligned(const T* address) {
  return reinterpret_cast<std::uintptr_t>(address) % alignof(T) == 0;
}
// The running block's dynamic shared memory.
void* dynamic_shared();

struct Launch {
  dim3 grid, block;
  std::size_t shared_bytes;  // dynamic shared memory per block
  bool cooperative;
  const void* kernel;  // identifies the kernel's attributes (cudaFuncSetAttribute)
};
// Runs body() once per thread of every block of the grid; the launch's status.
cudaError_t run_grid(const Launch& launch, const std::function<void()>& body);
void set_last_error(cudaError_t err);
// The emulated device's limits, for the runtime templates below.
cudaError_t set_max_dynamic_shared(const void* kernel, int bytes);
int occupancy(int block_threads, std::size_t shared_bytes);

template <class... Params, class... Args>
cudaError_t launch_kernel(const Launch& launch, void (*kernel)(Params...), Args&&... args) {
  // Kernel arguments are copied once at launch, as CUDA copies them to the device; each thread
  // then gets its own copy of the parameters, as each CUDA thread does.
  const std::tuple<std::decay_t<Params>...> params(std::forward<Args>(args)...);
  return run_grid(launch, [&] { std::apply(kernel, params); });
}

template <class... Params, class... Args>
void launch(dim3 grid, dim3 block, std::size_t shared_bytes, cudaStream_t, void (*kernel)(Params...),
            Args&&... args) {
  const Launch l{grid, block, shared_bytes, false, reinterpret_cast<const void*>(kernel)};
  set_last_error(launch_kernel(l, kernel, std::forward<Args>(args)...));
}

}  // namespace cuda_emu

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) alignas(n)
// The built-in variables, of the running fiber: the scheduler sets them before it switches to one.
extern thread_local uint3 threadIdx;
extern thread_local uint3 blockIdx;
extern thread_local dim3 blockDim;
extern thread_local dim3 gridDim;

// A macro, so that the emulator knows each call by its place in the source.
#define __syncthreads() ::cuda_emu::syncthreads(__FILE__, __LINE__)

template <typename T>
T __shfl_xor_sync(unsigned mask, T value, int lane_mask) {
  static_assert(std::is_trivially_copyable_v<T>, "shuffles move plain values");
  T out;
  ::cuda_emu::shuffle(&value, &out, sizeof(T), mask, ::cuda_emu::lane() ^ lane_mask);
  return out;
}

// The runtime API's templates (<cuda_runtime.h>) over the emulator.
template <class... Params>
cudaError_t cudaFuncSetAttribute(void (*kernel)(Params...), cudaFuncAttribute attr, int value) {
  if (attr == cudaFuncAttributePreferredSharedMemoryCarveout) {  // the emulated SM is all shared memory
    return value >= -1 && value <= 100 ? cudaSuccess : cudaErrorInvalidValue;
  }
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaErrorInvalidValue;
  return ::cuda_emu::set_max_dynamic_shared(reinterpret_cast<const void*>(kernel), value);
}

template <class... Params>
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, void (*)(Params...), int block_threads,
                                                          std::size_t shared_bytes) {
  *blocks = ::cuda_emu::occupancy(block_threads, shared_bytes);
  return cudaSuccess;
}

template <class... Params, class... Args>
cudaError_t cudaLaunchKernelEx(const cudaLaunchConfig_t* config, void (*kernel)(Params...), Args&&... args) {
  bool cooperative = false;
  for (unsigned i = 0; i < config->numAttrs; ++i) {
    if (config->attrs[i].id != cudaLaunchAttributeCooperative) return cudaErrorInvalidValue;
    cooperative = config->attrs[i].val.cooperative != 0;
  }
  const ::cuda_emu::Launch l{config->gridDim, config->blockDim, config->dynamicSmemBytes, cooperative,
                             reinterpret_cast<const void*>(kernel)};
  const cudaError_t err = ::cuda_emu::launch_kernel(l, kernel, std::forward<Args>(args)...);
  ::cuda_emu::set_last_error(err);
  return err;
}

// Memory operations: one OS thread runs every CUDA thread, so atomics are plain read-modify-writes,
// fences order nothing that is not ordered already, and no cache holds stale data.
inline unsigned atomicAdd(unsigned* address, unsigned value) {
  const unsigned old = *address;
  *address = old + value;
  return old;
}
inline void __threadfence() {}
template <typename T>
T __ldcg(const T* address) {
  return *address;
}
inline void __nanosleep(unsigned) { ::cuda_emu::spin_wait(); }

inline cudaError_t cudaMemsetAsync(void* dst, int value, std::size_t bytes, cudaStream_t = nullptr) {
  std::memset(dst, value, bytes);
  return cudaSuccess;
}

// CUDA's rsqrtf is approximate (2 ulp); the emulation computes it exactly, which the tolerances
// of the tests cover either way.
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
// Fused multiply-adds, rounded once to nearest even, as on the GPU: the same bits.
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline double __fma_rn(double a, double b, double c) { return std::fma(a, b, c); }

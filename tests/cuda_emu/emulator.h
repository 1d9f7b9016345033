// A CPU emulator of the CUDA C++ that csrc/cuda/*.cu uses, so the test suite can run those
// kernels on a machine without a GPU (as TRITON_INTERPRET=1 does for the Triton kernels).
//
// Each CUDA thread of a block is a fiber on its own stack; blocks run one after another, in a
// shuffled order (a kernel whose blocks depend on each other's writes shows it), and their
// threads in rank order or its reverse, alternately. Fibers switch only at __syncthreads() and
// warp shuffles, with CUDA's rules checked: a barrier releases once every thread of the block
// waits at the same __syncthreads() call, a shuffle once all 32 lanes of the warp wait at one;
// anything else (a thread that exited or waits at another call while the rest wait at a barrier,
// a lane that exited or waits at a barrier while its warp shuffles) fails the launch with
// cudaErrorLaunchFailure and a message. CUDA leaves those cases undefined; hardware often lets
// them pass, the emulator never does.
// __shared__ variables become function statics: one instance per kernel, which serves every
// block since blocks never overlap. What it cannot show: timing, memory-model races between
// barriers, misaligned vector accesses, resource limits (registers, shared memory).
//
// The .cu sources are compiled as C++ after one textual rewrite (cuda_emulator.py): each
// `kernel<<<grid, block, shared_bytes, stream>>>(args...)` becomes
// `::cuda_emu::launch(grid, block, shared_bytes, stream, kernel, args...)`.
#pragma once
#include <cmath>
#include <cstddef>
#include <cstring>
#include <functional>
#include <tuple>
#include <type_traits>
#include <utility>

#include "include/cuda_runtime_api.h"

namespace cuda_emu {

// The running fiber's built-in variables.
const uint3& thread_idx();
const uint3& block_idx();
const dim3& block_dim();
const dim3& grid_dim();

// A __syncthreads() call, known by its place in the source.
void syncthreads(const char* file, int line);
// Publishes `bytes` of this lane's value, waits for the whole warp, copies lane `src`'s value out.
void shuffle(const void* value, void* out, std::size_t bytes, unsigned mask, int src_lane);
int lane();

// Runs body() once per thread of every block of the grid; the launch's status.
cudaError_t run_grid(dim3 grid, dim3 block, std::size_t shared_bytes, const std::function<void()>& body);
void set_last_error(cudaError_t err);

template <class... Params, class... Args>
void launch(dim3 grid, dim3 block, std::size_t shared_bytes, cudaStream_t, void (*kernel)(Params...),
            Args&&... args) {
  // Kernel arguments are copied once at launch, as CUDA copies them to the device; each thread
  // then gets its own copy of the parameters, as each CUDA thread does.
  const std::tuple<std::decay_t<Params>...> params(std::forward<Args>(args)...);
  set_last_error(run_grid(grid, block, shared_bytes, [&] { std::apply(kernel, params); }));
}

}  // namespace cuda_emu

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define threadIdx (::cuda_emu::thread_idx())
#define blockIdx (::cuda_emu::block_idx())
#define blockDim (::cuda_emu::block_dim())
#define gridDim (::cuda_emu::grid_dim())

// A macro, so that the emulator knows each call by its place in the source.
#define __syncthreads() ::cuda_emu::syncthreads(__FILE__, __LINE__)

template <typename T>
T __shfl_xor_sync(unsigned mask, T value, int lane_mask) {
  static_assert(std::is_trivially_copyable_v<T>, "shuffles move plain values");
  T out;
  ::cuda_emu::shuffle(&value, &out, sizeof(T), mask, ::cuda_emu::lane() ^ lane_mask);
  return out;
}

// CUDA's rsqrtf is approximate (2 ulp); the emulation computes it exactly, which the tolerances
// of the tests cover either way.
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }

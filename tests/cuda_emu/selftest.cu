// Kernels that test the emulator itself (tests/test_cuda_emulator.py): one that follows CUDA's
// rules and must compute the right thing, and one for each broken rule the emulator must report.
// Compiled, like csrc/cuda/*.cu, after the launch rewrite of tests/cuda_emulator.py.
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>

#include "cuda/cooperative_launch.h"
#include "cuda/word_access.cuh"
#include "selftest.h"

namespace {

constexpr int kThreads = 128;

// out[b] = sum of in[b * 128 .. b * 128 + 127]: warp shuffles, then shared memory across warps.
__global__ void block_sums(const float* in, float* out) {
  __shared__ float warp_sums[kThreads / 32];
  const int t = threadIdx.x;
  float v = in[blockIdx.x * kThreads + t];
  for (int mask = 16; mask > 0; mask /= 2) v += __shfl_xor_sync(0xffffffffu, v, mask);
  if (t % 32 == 0) warp_sums[t / 32] = v;
  __syncthreads();
  if (t == 0) out[blockIdx.x] = warp_sums[0] + warp_sums[1] + warp_sums[2] + warp_sums[3];
}

// Half of the block waits at one barrier, the other half at another.
__global__ void divergent_barrier(const float*, float*) {
  if (threadIdx.x < kThreads / 2) {
    __syncthreads();
  } else {
    __syncthreads();
  }
}

// Half of the block waits at a barrier the other half exits without reaching.
__global__ void exit_before_barrier(const float*, float*) {
  if (threadIdx.x < kThreads / 2) return;
  __syncthreads();
}

// One lane exits before its warp's full-warp shuffle.
__global__ void shuffle_after_exit(const float*, float* out) {
  if (threadIdx.x == 5) return;
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.0f, 1);
}

// A 16-byte load, then a store, 4 bytes past an aligned address.
__global__ void misaligned_load(const float* in, float* out) {
  if (threadIdx.x == 0) out[0] = float(cnnkern::cuda::load_word(reinterpret_cast<const uint4*>(in + 1)).x);
}
__global__ void misaligned_store(const float*, float* out) {
  if (threadIdx.x == 0) cnnkern::cuda::store_word(reinterpret_cast<uint4*>(out + 1), uint4{});
}

// out[b * 128 + t] should be what thread t + 1 stored, but no barrier orders the store before the
// load: on a GPU a race, in the emulator a wrong value in every block.
__global__ void missing_barrier(const float*, float* out) {
  __shared__ float stored[kThreads];
  const int t = threadIdx.x;
  stored[t] = float(blockIdx.x * kThreads + t);
  out[blockIdx.x * kThreads + t] = stored[(t + 1) % kThreads];
}

// Blocks meet at a counter (out[B * 128]): thread 0 counts its block in, then spin-waits until
// `expected` per meeting have (the grid's size: a meeting; one more: a deadlock).
__device__ void meet(unsigned* arrived, unsigned target) {
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) {
    atomicAdd(arrived, 1u);
    while (*reinterpret_cast<volatile unsigned*>(arrived) < target) __nanosleep(32);
  }
  __syncthreads();
}

// out[b * 128 + t] = the sum over blocks b' of in[b' * 128 + t], gathered from the rows of out
// the other blocks write before the first meeting, and written after the second.
__global__ void spin_meeting(const float* in, float* out, unsigned expected) {
  unsigned* const arrived = reinterpret_cast<unsigned*>(out + gridDim.x * kThreads);
  const int64_t at = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  out[at] = in[at];
  meet(arrived, expected);
  float sum = 0;
  for (unsigned b = 0; b < gridDim.x; ++b) sum += __ldcg(out + b * kThreads + threadIdx.x);
  meet(arrived, 2 * expected);
  out[at] = sum;
}

// out[b * 128 + t] = in[b * 128 + t] + in[(b + 1) % B * 128 + t]: keeps its own value in
// dynamic shared memory across two meetings, and reads the next block's through global memory
// in between. Instances (kTag) keep their launch attributes apart.
template <int kTag>
__global__ void grid_rotate(const float* in, float* out) {
  extern __shared__ __align__(16) float own[];
  unsigned* const arrived = reinterpret_cast<unsigned*>(out + gridDim.x * kThreads);
  const int64_t at = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  own[threadIdx.x] = in[at];
  out[at] = in[at];
  meet(arrived, gridDim.x);
  const float next = __ldcg(out + (blockIdx.x + 1) % gridDim.x * kThreads + threadIdx.x);
  meet(arrived, 2 * gridDim.x);
  out[at] = own[threadIdx.x] + next;
}

constexpr int kRotateShared = 64 << 10;  // more than the 48 KB a kernel gets by default

// A cooperative launch of grid_rotate<kTag>, raising its shared memory limit first if `raise`.
template <int kTag>
cudaError_t launch_grid_rotate(const float* in, float* out, unsigned blocks, unsigned threads, bool raise) {
  if (raise) {
    if (const cudaError_t err = cudaFuncSetAttribute(grid_rotate<kTag>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                     kRotateShared);
        err != cudaSuccess) {
      return err;
    }
  }
  cudaMemsetAsync(out + blocks * kThreads, 0, sizeof(unsigned));
  return cnnkern::cuda::launch_cooperative(grid_rotate<kTag>, dim3(blocks), dim3(threads), kRotateShared, nullptr,
                                           in, out);
}

}  // namespace

cudaError_t cuda_emu_selftest(const char* kernel, const float* in, float* out, unsigned blocks, unsigned threads) {
  void (*k)(const float*, float*) = nullptr;
  if (std::strcmp(kernel, "block_sums") == 0) k = block_sums;
  if (std::strcmp(kernel, "divergent_barrier") == 0) k = divergent_barrier;
  if (std::strcmp(kernel, "exit_before_barrier") == 0) k = exit_before_barrier;
  if (std::strcmp(kernel, "shuffle_after_exit") == 0) k = shuffle_after_exit;
  if (std::strcmp(kernel, "missing_barrier") == 0) k = missing_barrier;
  if (std::strcmp(kernel, "misaligned_load") == 0) k = misaligned_load;
  if (std::strcmp(kernel, "misaligned_store") == 0) k = misaligned_store;
  if (std::strcmp(kernel, "grid_rotate") == 0) return launch_grid_rotate<0>(in, out, blocks, threads, true);
  if (std::strcmp(kernel, "grid_rotate_unraised") == 0) return launch_grid_rotate<1>(in, out, blocks, threads, false);
  if (std::strcmp(kernel, "spin_meeting") == 0 || std::strcmp(kernel, "spin_deadlock") == 0) {
    const unsigned expected = blocks + (kernel[5] == 'd' ? 1 : 0);
    cudaMemsetAsync(out + blocks * kThreads, 0, sizeof(unsigned));
    return cnnkern::cuda::launch_cooperative(spin_meeting, dim3(blocks), dim3(threads), 0, nullptr, in, out,
                                             expected);
  }
  if (std::strcmp(kernel, "spin_uncooperative") == 0) {
    cudaMemsetAsync(out + blocks * kThreads, 0, sizeof(unsigned));
    spin_meeting<<<blocks, threads, 0, nullptr>>>(in, out, blocks);
    return cudaGetLastError();
  }
  if (!k) return cudaErrorInvalidValue;
  k<<<blocks, threads, 0, nullptr>>>(in, out);
  return cudaGetLastError();
}

// A cooperative launch: every block of the grid resident at once, so that blocks may wait for
// each other (a grid sync, or a spin wait on a counter) without deadlock. The runtime refuses a
// grid larger than the occupancy allows (cudaErrorCooperativeLaunchTooLarge). Dynamic shared memory above 48 KB needs
// the kernel's limit raised first (cudaFuncAttributeMaxDynamicSharedMemorySize).
#pragma once
#include <cuda_runtime.h>

#include <cstddef>
#include <utility>

namespace cnnkern::cuda {

template <class... Params, class... Args>
cudaError_t launch_cooperative(void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared_bytes,
                               cudaStream_t stream, Args&&... args) {
  cudaLaunchAttribute cooperative{};
  cooperative.id = cudaLaunchAttributeCooperative;
  cooperative.val.cooperative = 1;
  cudaLaunchConfig_t config{};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = shared_bytes;
  config.stream = stream;
  config.attrs = &cooperative;
  config.numAttrs = 1;
  const cudaError_t err = cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...);
  // Reported once, by the return value: cleared from the runtime's last error, where the next
  // launch's check (cudaGetLastError) would report it again, against a launch that did not fail.
  if (err != cudaSuccess) static_cast<void>(cudaGetLastError());
  return err;
}

}  // namespace cnnkern::cuda

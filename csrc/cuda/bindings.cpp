// TORCH_LIBRARY_IMPL(cnnkern, CUDA, m): the CUDA kernels of csrc/cuda/*.cu behind the op schemas
// of csrc/ops.cpp. The wrappers (bn_wrappers.h) check their arguments, guard the device, allocate
// outputs and scratch memory, and launch; this file gives them the CUDA runtime: the caching
// allocator (scratch is freed stream-ordered when a wrapper returns) and the current stream.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda/bn_wrappers.h"

namespace cnnkern {
namespace {

struct CudaRuntime {
  using Guard = c10::cuda::CUDAGuard;

  static void check_device(const at::Tensor& input) {
    TORCH_CHECK(input.is_cuda(), "input must be a CUDA tensor for the cnnkern CUDA kernels, got ", input.device());
  }
  static cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream(); }
  static void check(cudaError_t err) { C10_CUDA_CHECK(err); }
  static at::Tensor empty(at::IntArrayRef sizes, const at::TensorOptions& options) { return at::empty(sizes, options); }
  static at::Tensor empty_like(const at::Tensor& t) { return at::empty_like(t); }
};

static_assert(cuda_wrappers::matches_op_signatures<CudaRuntime>,
              "the CUDA kernels' signatures must match bn_signatures.h (the CPU kernels' too)");

}  // namespace
}  // namespace cnnkern

TORCH_LIBRARY_IMPL(cnnkern, CUDA, m) {
  using cnnkern::CudaRuntime;
  namespace w = cnnkern::cuda_wrappers;
  m.impl("bn_forward_train", &w::bn_forward_train<CudaRuntime>);
  m.impl("bn_forward_eval", &w::bn_forward_eval<CudaRuntime>);
  m.impl("bn_backward", &w::bn_backward<CudaRuntime>);
}

// The kernels' tensor accesses: a load or a store of one whole word (the CUDA vector type of an
// item's size, 2 to 16 bytes; see load_whole and store_whole in bn_device.cuh), written in PTX
// because nvcc keeps neither whole: a store of a uint4 built from an item's bytes compiles to the
// item's pieces (4 st.global.v2.u16 for 8 bf16: nvcc 13.0, sm_90), and the cache-operator
// intrinsics that it does keep whole (__ldca, __stwb) become strong accesses in SASS
// (LDG.E.128.STRONG.SM), memory-model operations that tensor traffic has no need of. These are
// plain weak accesses (LDG.E.128, STG.E.128), the loads free to be scheduled as any other.
// The CPU emulator (tests/cuda_emu/include/cuda/word_access.cuh) replaces this header with one
// that also checks each access's alignment, which a GPU faults on.
#pragma once
#include <cuda_runtime.h>

namespace cnnkern::cuda {

__device__ __forceinline__ unsigned short load_word(const unsigned short* p) {
  unsigned short w;
  asm("ld.global.u16 %0, [%1];" : "=h"(w) : "l"(p));
  return w;
}
__device__ __forceinline__ unsigned load_word(const unsigned* p) {
  unsigned w;
  asm("ld.global.u32 %0, [%1];" : "=r"(w) : "l"(p));
  return w;
}
__device__ __forceinline__ uint2 load_word(const uint2* p) {
  uint2 w;
  asm("ld.global.v2.u32 {%0, %1}, [%2];" : "=r"(w.x), "=r"(w.y) : "l"(p));
  return w;
}
__device__ __forceinline__ uint4 load_word(const uint4* p) {
  uint4 w;
  asm("ld.global.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(w.x), "=r"(w.y), "=r"(w.z), "=r"(w.w) : "l"(p));
  return w;
}

__device__ __forceinline__ void store_word(unsigned short* p, unsigned short w) {
  asm volatile("st.global.u16 [%0], %1;" ::"l"(p), "h"(w));
}
__device__ __forceinline__ void store_word(unsigned* p, unsigned w) {
  asm volatile("st.global.u32 [%0], %1;" ::"l"(p), "r"(w));
}
__device__ __forceinline__ void store_word(uint2* p, uint2 w) {
  asm volatile("st.global.v2.u32 [%0], {%1, %2};" ::"l"(p), "r"(w.x), "r"(w.y));
}
__device__ __forceinline__ void store_word(uint4* p, uint4 w) {
  asm volatile("st.global.v4.u32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(w.x), "r"(w.y), "r"(w.z), "r"(w.w));
}

}  // namespace cnnkern::cuda

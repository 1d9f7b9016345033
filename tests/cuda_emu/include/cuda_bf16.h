// Stand-in for <cuda_bf16.h> in the CPU emulation: c10::BFloat16 has __nv_bfloat16's bits and
// its round-to-nearest-even conversion.
#pragma once
#include <c10/util/BFloat16.h>

using __nv_bfloat16 = c10::BFloat16;
inline float __bfloat162float(__nv_bfloat16 x) { return static_cast<float>(x); }
inline __nv_bfloat16 __float2bfloat16_rn(float x) { return __nv_bfloat16(x); }

// Stand-in for <cuda_fp16.h> in the CPU emulation: c10::Half has __half's bits and its
// round-to-nearest-even conversion.
#pragma once
#include <c10/util/Half.h>

using __half = c10::Half;
inline float __half2float(__half x) { return static_cast<float>(x); }
inline __half __float2half_rn(float x) { return __half(x); }

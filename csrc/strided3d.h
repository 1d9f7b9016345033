// A tensor read as (N, C, L): batch, channel, and all spatial dims collapsed into
// one, each with its own element stride. NCHW-contiguous (sL == 1),
// channels_last (sC == 1), channel slices of a larger tensor (DenseNet/Inception
// buffers) and broadcast gradients (stride 0) are all just strides here, so no
// kernel ever needs a layout copy. Plain C++: included by .cu files too.
#pragma once
#include <cstdint>

namespace cnnkern {

struct Strided3d {
  int64_t N, C, L;     // sizes
  int64_t sN, sC, sL;  // element strides

  int64_t numel() const { return N * C * L; }
  // Offset of element (n, c, l).
  int64_t offset(int64_t n, int64_t c, int64_t l) const { return n * sN + c * sC + l * sL; }
};

}  // namespace cnnkern

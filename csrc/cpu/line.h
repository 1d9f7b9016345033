// One line of a tensor, the unit the CPU kernels' loops walk (bn_lines.h): elements along the
// tensor's unit-stride dim, addressed with the tensor's own stride.
#pragma once
#include <c10/util/Exception.h>

#include <cstdint>
#include <type_traits>

namespace cnnkern::cpu {

// Line strides known at compile time: Unit makes loads contiguous (vectorizable),
// Bcast is a per-channel array on an L line (one value, hoisted out of the loop).
using Unit = std::integral_constant<int64_t, 1>;
using Bcast = std::integral_constant<int64_t, 0>;

template <typename S>
S line_stride(int64_t s) {
  if constexpr (std::is_same_v<S, int64_t>) {
    return s;
  } else {
    TORCH_INTERNAL_ASSERT(s == S::value);
    return S{};
  }
}

// One line of a tensor: element k is p[k * stride].
template <typename T, typename S>
struct Line {
  T* p;
  S stride;
  T& operator[](int64_t k) const { return p[k * stride]; }
};

// A per-channel array's line along L: one channel's value for every element, held by value, so
// that the loops keep it in a register. Through a pointer, it was loaded again after every store
// that may alias it: a 16-bit line's vector stores (csrc/cpu/in_registers.h) may alias anything.
template <typename T>
struct Line<T, Bcast> {
  std::remove_const_t<T> v;
  std::remove_const_t<T> operator[](int64_t) const { return v; }
};

}  // namespace cnnkern::cpu

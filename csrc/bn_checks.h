// Argument checks shared by the CPU and CUDA registrations of the batch-norm ops,
// and the (N, C, L) view of a tensor. Users normally meet the friendlier checks
// of cnnkern.functional first; these guard direct torch.ops.cnnkern calls.
#pragma once
#include <ATen/ATen.h>

#include <optional>

#include "strided3d.h"

namespace cnnkern {

// The (N, C, L) view of `t` (dim >= 2), or std::nullopt when its spatial dims cannot be
// addressed with one stride (e.g. x[:, :, ::2, :]).
inline std::optional<Strided3d> try_view3d(const at::Tensor& t) {
  Strided3d v{t.size(0), t.size(1), 1, t.stride(0), t.stride(1), 1};
  bool have_inner = false;
  for (int64_t d = t.dim() - 1; d >= 2; --d) {
    if (t.size(d) == 1) continue;
    if (!have_inner) {
      v.sL = t.stride(d);
      have_inner = true;
    } else if (t.stride(d) != v.L * v.sL) {
      return std::nullopt;
    }
    v.L *= t.size(d);
  }
  return v;
}

// try_view3d, or a TORCH_CHECK naming `name`.
inline Strided3d view3d(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() >= 2, name, " must have at least 2 dims (N, C, ...), got ", t.dim());
  const std::optional<Strided3d> v = try_view3d(t);
  TORCH_CHECK(v, name, ": spatial dims must collapse into one strided dim (got sizes ", t.sizes(), ", strides ",
              t.strides(), "); pass a contiguous or channels_last tensor");
  return *v;
}

// Accumulation / statistics dtype: float64 for float64 input, else float32.
inline at::ScalarType stat_dtype(const at::Tensor& input) {
  return input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_input(const at::Tensor& input) {
  const auto st = input.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16,
              "input must be float16, bfloat16, float32 or float64, got ", st);
  view3d(input, "input");
}

// weight, bias, running_mean, running_var: 1-D of size C, on input's device, all
// of one dtype: input's, or float32 for half/bfloat16 input. Returns that dtype.
inline at::ScalarType check_params(const at::Tensor& input,
                                   std::initializer_list<std::pair<const at::Tensor*, const char*>> params) {
  const int64_t C = input.size(1);
  c10::optional<at::ScalarType> dtype;
  for (const auto& [t, name] : params) {
    if (t == nullptr || !t->defined()) continue;
    TORCH_CHECK(t->dim() == 1 && t->size(0) == C, name, " must have shape (", C, ",), matching input's channels, got ",
                t->sizes());
    TORCH_CHECK(t->device() == input.device(), name, " is on ", t->device(), " but input is on ", input.device());
    TORCH_CHECK(t->is_contiguous(), name, " must be contiguous");
    const auto st = t->scalar_type();
    TORCH_CHECK(st == input.scalar_type() || (st == at::kFloat && input.element_size() == 2), name,
                " must be ", input.scalar_type(), " (or float32 for float16/bfloat16 input), got ", st);
    TORCH_CHECK(!dtype || *dtype == st, name, " is ", st, " but another parameter is ", *dtype,
                "; weight, bias and running stats must share one dtype");
    dtype = st;
  }
  return dtype.value_or(stat_dtype(input));
}

// A tensor that must match input's shape, dtype and device (its strides may differ).
inline void check_like_input(const at::Tensor& t, const at::Tensor& input, const char* name) {
  TORCH_CHECK(t.sizes() == input.sizes(), name, " must have input's shape ", input.sizes(), ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == input.scalar_type(), name, " must be ", input.scalar_type(), " like input, got ",
              t.scalar_type());
  TORCH_CHECK(t.device() == input.device(), name, " is on ", t.device(), " but input is on ", input.device());
  view3d(t, name);
}

// save_mean / save_invstd / mean / invstd: (C,) in the statistics dtype.
inline void check_stats(const at::Tensor& t, const at::Tensor& input, const char* name) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == input.size(1), name, " must have shape (", input.size(1), ",), got ",
              t.sizes());
  TORCH_CHECK(t.scalar_type() == stat_dtype(input), name, " must be ", stat_dtype(input), ", got ", t.scalar_type());
  TORCH_CHECK(t.device() == input.device(), name, " is on ", t.device(), " but input is on ", input.device());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

}  // namespace cnnkern

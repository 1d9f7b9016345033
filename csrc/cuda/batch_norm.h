// Launchers of the batch-norm family's CUDA kernels (csrc/cuda/batch_norm.cu):
// y = act(batch_norm(x) + residual) and its backward, as the schemas in csrc/ops.cpp define them.
//
// Plain C++, no torch header: bindings.cpp fills these structs from tensors, plain nvcc compiles
// the .cu. Every pointer is device memory on the current device; an absent optional tensor is
// nullptr (its view is then ignored). Tensors of the input's shape are (N, C, L) views with their
// own strides (strided3d.h); (C,) vectors are contiguous. Calls are asynchronous on `stream` and
// return the launch status (cudaErrorInvalidValue for arguments outside the contract).
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>

#include "strided3d.h"

namespace cnnkern::cuda {

// Element types. Input-like tensors may be any of them. "Param" tensors (weight, bias, running
// stats, grad_weight, grad_bias) are the input's type, or kFloat32 for 16-bit inputs.
// Statistics (save_mean, save_invstd, mean, invstd) use the accumulation type: kFloat64 for
// kFloat64 input, else kFloat32.
enum class DType { kFloat16, kBFloat16, kFloat32, kFloat64 };

struct BnForwardArgs {
  DType input_dtype;  // of input, residual, output
  DType param_dtype;  // of weight, bias, running_mean, running_var

  const void* input;  // x
  Strided3d input_view;
  const void* residual;  // r, added after the affine, before the activation; nullptr: none
  Strided3d residual_view;
  void* output;  // y = act((x - mean) * (w * invstd) + b + r)
  Strided3d output_view;

  const void* weight;  // (C,) w, or nullptr for w = 1
  const void* bias;    // (C,) b, or nullptr for b = 0
  void* running_mean;  // (C,) training: updated in place (nullptr: not tracked); eval: the mean used
  void* running_var;   // (C,) as running_mean; holds the unbiased variance
  void* save_mean;     // training: (C,) statistics dtype, written: the batch mean
  void* save_invstd;   // training: (C,) statistics dtype, written: 1 / sqrt(batch var + eps)

  double momentum;  // training: running = (1 - momentum) * running + momentum * batch statistic
  double eps;
  bool relu;  // act = ReLU, else identity
};

// Bytes of scratch memory bn_forward_train needs for `args` (per-split partial statistics).
cudaError_t bn_forward_train_workspace(const BnForwardArgs& args, size_t* bytes);

// Training forward: batch statistics, output, save_mean / save_invstd, running stats. Needs
// N * L >= 2 values per channel and `workspace` of bn_forward_train_workspace() bytes that no
// other work uses until these kernels finish (e.g. from the caching allocator on `stream`).
cudaError_t bn_forward_train(const BnForwardArgs& args, void* workspace, cudaStream_t stream);

// Eval forward: normalizes with running_mean / running_var (both required). One launch.
cudaError_t bn_forward_eval(const BnForwardArgs& args, cudaStream_t stream);

struct BnBackwardArgs {
  DType input_dtype;  // of grad_output, input, output, grad_input, grad_residual
  DType param_dtype;  // of weight, grad_weight, grad_bias (statistics dtype when weight is absent)

  const void* grad_output;  // g
  Strided3d grad_output_view;
  const void* input;  // x
  Strided3d input_view;
  // The forward's output, read when relu: gz = g * (output > 0). nullptr with relu: the mask is
  // recomputed from input, mean, invstd, weight and bias as the forward computed its output, which
  // holds after a training forward without residual given its save_mean / save_invstd (input
  // dtypes for which bn_backward_recomputes_relu_mask).
  const void* output;
  Strided3d output_view;

  const void* weight;  // (C,) or nullptr for w = 1
  const void* bias;    // (C,) or nullptr for b = 0; read only to recompute the ReLU mask
  const void* mean;    // (C,) statistics dtype: the mean the forward normalized with
  const void* invstd;  // (C,) statistics dtype: the invstd it normalized with

  // Outputs; nullptr: not wanted, and its work is skipped.
  void* grad_input;  // same shape as input
  Strided3d grad_input_view;
  void* grad_weight;  // (C,) param dtype: sum(gz * (x - mean)) * invstd
  void* grad_bias;    // (C,) param dtype: sum(gz)
  void* grad_residual;  // same shape as input: gz
  Strided3d grad_residual_view;

  bool training;  // mean / invstd are batch statistics (grad_input flows through them)
  bool relu;
};

// Bytes of scratch memory bn_backward needs for `args` (0 when it needs no reduction).
cudaError_t bn_backward_workspace(const BnBackwardArgs& args, size_t* bytes);

// Whether bn_backward recomputes the ReLU mask (output nullptr) for `input` dtype: float32 and
// float64. In 16 bits the kernels read it from the output (their recomputing versions spilled).
bool bn_backward_recomputes_relu_mask(DType input);

// Backward of either forward; `workspace` as for bn_forward_train, of bn_backward_workspace() bytes.
cudaError_t bn_backward(const BnBackwardArgs& args, void* workspace, cudaStream_t stream);

}  // namespace cnnkern::cuda

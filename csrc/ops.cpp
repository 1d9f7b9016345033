// Every cnnkern op's schema, in one place. Kernels register per backend in
// csrc/cpu/<family>.cpp and csrc/cuda/bindings.cpp, autograd in csrc/autograd/<family>.cpp;
// fake (meta) impls live in cnnkern/ops/<family>.py.
#include <Python.h>
#include <torch/library.h>

#include <string>

#include "cpu/features.h"

extern "C" {
static PyObject* cpu_features(PyObject*, PyObject*) {
  return PyUnicode_FromString(cnnkern::cpu::features().c_str());
}

// Importing cnnkern._C runs the static registrations below; its one function says which loops the
// CPU kernels take here (cnnkern.backends()).
PyObject* PyInit__C(void) {
  static PyMethodDef methods[] = {
      {"cpu_features", cpu_features, METH_NOARGS, "The CPU kernels' choices of loops on this machine."},
      {nullptr, nullptr, 0, nullptr}};
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(cnnkern, m) {
  // Each op is defined twice: cnnkern::<op> runs the C++ kernels (csrc/cpu,
  // csrc/cuda) and cnnkern::triton_<op> the Triton ones (registered from
  // cnnkern/ops/). The dispatcher picks a kernel by device alone, and both
  // backends run CUDA tensors, so they cannot share one op.
  for (const std::string prefix : {"", "triton_"}) {
    const auto def = [&](const std::string& schema) { m.def((prefix + schema).c_str()); };

    // ---- batch norm family: y = act(batch_norm(x) + residual) ---------------
    // Tensors are read as (N, C, L) with one stride per dim (spatial dims must
    // collapse into one stride). Statistics (save_mean, save_invstd) are float32,
    // float64 for float64 input. Parameters and running stats share one dtype:
    // the input's, or float32 for float16/bfloat16 input.
    //
    // Training forward: batch statistics; running stats (if given) updated in
    // place with `momentum` and the unbiased variance, as F.batch_norm does.
    def("bn_forward_train(Tensor input, Tensor? weight, Tensor? bias, Tensor? residual, "
        "Tensor(a!)? running_mean, Tensor(b!)? running_var, float momentum, float eps, bool relu) "
        "-> (Tensor output, Tensor save_mean, Tensor save_invstd)");
    // Eval forward: one pass with the running statistics.
    def("bn_forward_eval(Tensor input, Tensor? weight, Tensor? bias, Tensor? residual, "
        "Tensor running_mean, Tensor running_var, float eps, bool relu) -> Tensor");
    // Backward of either forward. `mean`/`invstd` are the statistics the forward
    // normalized with (batch ones when training, running ones in eval), in the
    // statistics dtype. With relu, the mask is where the forward's output is > 0:
    // read from `output`, or, with `output` None, recomputed from `input` with mean,
    // invstd, weight and bias as the forward computed it. The recomputed mask holds for
    // a forward without a residual, given the very mean and invstd it normalized with
    // (save_mean, save_invstd); a backend that cannot recompute it in the input's dtype
    // refuses output None (RECOMPUTES_RELU_MASK, cnnkern/ops/batch_norm.py). Without relu, `output` is not
    // read (it may since have been overwritten); `bias` serves the recomputed mask only.
    // output_mask: [grad_input, grad_weight, grad_bias, grad_residual]; with relu
    // false grad_residual is grad_output itself, so it is never asked for then.
    // grad_weight and grad_bias take the parameters' dtype (the statistics dtype
    // without weight and bias).
    def("bn_backward(Tensor grad_output, Tensor input, Tensor? output, Tensor? weight, "
        "Tensor? bias, Tensor mean, Tensor invstd, bool training, bool relu, bool[4] output_mask) "
        "-> (Tensor? grad_input, Tensor? grad_weight, Tensor? grad_bias, Tensor? grad_residual)");
    // The family's entry point: the training or eval forward above, differentiable
    // (csrc/autograd/batch_norm.cpp). Where a gradient is wanted it keeps what bn_backward
    // needs: the output only for the ReLU mask, and not even then where the backward
    // can recompute it, that is in training without a residual when
    // `backward_recomputes_relu_mask` (the backend's bn_backward does, for input's dtype).
    def("batch_norm(Tensor input, Tensor? weight, Tensor? bias, Tensor? residual, "
        "Tensor(a!)? running_mean, Tensor(b!)? running_var, bool training, float momentum, float eps, "
        "bool relu, bool backward_recomputes_relu_mask) -> Tensor");
  }
}

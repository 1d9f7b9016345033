// What the CPU kernels' loops take on this machine, in words: cnnkern.backends() reports it
// (cnnkern._C.cpu_features(), csrc/ops.cpp).
#pragma once
#include <string>

namespace cnnkern::cpu {

std::string features();

}  // namespace cnnkern::cpu

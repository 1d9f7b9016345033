// Stand-in for <cuda_runtime.h> in the CPU emulation: the runtime API and CUDA C++'s
// device-side language (qualifiers, built-in indices, barriers, shuffles, <<<>>> launches).
#pragma once
#include "cuda_runtime_api.h"
#include "../emulator.h"

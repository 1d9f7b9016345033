// The emulator's self-test kernels (selftest.cu), by name: block_sums, divergent_barrier,
// exit_before_barrier, shuffle_after_exit, missing_barrier, misaligned_load, misaligned_store;
// spin_meeting (cooperative, blocks meet at a counter), spin_deadlock (wait for one block more
// than there are), spin_uncooperative (a plain launch); grid_rotate (cooperative, meetings and
// 64 KB of dynamic shared memory), grid_rotate_unraised (without raising the kernel's shared memory limit). `in` holds
// blocks * 128 floats, `out` one more (the meetings' counter).
#pragma once
#include <cuda_runtime.h>

cudaError_t cuda_emu_selftest(const char* kernel, const float* in, float* out, unsigned blocks, unsigned threads);

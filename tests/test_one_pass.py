"""The one-pass training kernels of the cuda backend (bn_forward_resident_kernel,
bn_backward_resident_kernel) on a GPU: inputs larger than L2 take them, and match the oracle.
Without a GPU, tests/test_cuda_emulator.py runs them on emulated small GPUs."""
import pytest
import torch

from helpers import make_input, require, run_and_compare

# Larger than the L2 of an H100 (50 MB) and an H200 (60 MB).
LARGE = [
    pytest.param((64, 256, 56, 56), torch.bfloat16, "nchw", id="64x256x56x56-nchw-bf16"),
    pytest.param((64, 256, 56, 56), torch.bfloat16, "channels_last", id="64x256x56x56-cl-bf16"),
    pytest.param((32, 512, 28, 28), torch.float32, "channels_last", id="32x512x28x28-cl-f32"),
    pytest.param((24, 65, 113, 113), torch.float32, "slice", id="24x65x113x113-slice-f32"),
]


def cuda_kernel_names(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return {event.name for event in prof.events() if event.device_type == torch.autograd.DeviceType.CUDA}


@pytest.mark.cuda
@pytest.mark.parametrize("shape,dtype,layout", LARGE)
def test_large_inputs_run_in_one_pass(shape, dtype, layout):
    require("cuda", "cuda", dtype)
    x = make_input(shape, dtype, "cuda", layout, mean=3.0)
    names = cuda_kernel_names(lambda: run_and_compare("cuda", "cuda", x, residual=True, activation="relu"))
    resident = sorted(name for name in names if "resident" in name)
    assert any("bn_forward_resident_kernel" in n for n in resident), sorted(names)
    assert any("bn_backward_resident_kernel" in n for n in resident), sorted(names)

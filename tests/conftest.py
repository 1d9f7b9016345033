"""Test set-up. With no GPU, Triton kernels run on the CPU under the interpreter,
which must be switched on before triton is imported."""
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import cnnkern  # noqa: E402  (after TRITON_INTERPRET)


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU: torch.cuda.is_available() is False on this machine")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def cuda_emulator():
    """The CPU emulation of csrc/cuda's kernels (built on first use), or a skip with the reason."""
    import cuda_emulator

    reason = cuda_emulator.unsupported_reason()
    if reason:
        pytest.skip(f"the CUDA emulator cannot run here: {reason}")
    return cuda_emulator.load()


@pytest.fixture(autouse=True)
def _emulate_cuda(request):
    """Tests marked `cuda_emulated` run the cnnkern ops' CPU kernels from csrc/cuda, emulated."""
    if request.node.get_closest_marker("cuda_emulated") is None:
        yield
        return
    import cuda_emulator

    with cuda_emulator.cuda_kernels_on_cpu(request.getfixturevalue("cuda_emulator")):
        yield

"""Every Triton kernel launch the host wrappers make compiles for sm_80 and sm_90, on a
machine with no GPU (tests/triton_aot.py: the interpreter the other tests run under
accepts programs the GPU compiler rejects)."""
import os
import pathlib
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")
from triton.backends import backends  # noqa: E402

from cnnkern.triton import batch_norm  # noqa: E402

HERE = pathlib.Path(__file__).resolve().parent
KERNELS = sorted(name for name in vars(batch_norm) if name.startswith("_bn_") and name.endswith("_kernel"))


@pytest.mark.skipif("nvidia" not in backends, reason=f"triton {triton.__version__} has no nvidia backend here")
@pytest.mark.parametrize("arch", [80, 90], ids=lambda a: f"sm_{a}")
def test_triton_kernels_compile_for_gpu(arch):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, str(HERE / "triton_aot.py"), "--arch", str(arch)],
                            capture_output=True, text=True, env=env, cwd=HERE.parent)
    assert result.returncode == 0, result.stderr[-4000:]
    summary = result.stdout.strip().splitlines()[-1]
    assert summary == "compiled {} kernels: {}".format(summary.split()[1], ", ".join(KERNELS)), summary

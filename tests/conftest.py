import os

# Triton kernels run on CPU tensors through the interpreter; must be set before triton is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def rel_err(out, ref):
    """||out - ref|| / ||ref|| in float64."""
    out = out.detach().double()
    ref = ref.detach().double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-300)).item()

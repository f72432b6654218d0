import os

# Triton kernels run on CPU tensors through the interpreter; must be set before triton is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_sessionstart(session):
    # CI sets this so that a broken Triton install fails loudly instead of turning kernel tests into skips
    if os.environ.get("VEXPERT_REQUIRE_TRITON") == "1":
        from vexpert_kernels._triton_compat import HAS_TRITON, TRITON_IMPORT_ERROR
        if not HAS_TRITON:
            pytest.exit(f"VEXPERT_REQUIRE_TRITON=1 but triton failed to import: {TRITON_IMPORT_ERROR}", returncode=3)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


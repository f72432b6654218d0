"""Test setup: real CUDA when there is a GPU, the Triton CPU interpreter only when there is none.

* ``TRITON_INTERPRET=1`` is set (before anything imports triton) only when ``torch.cuda.is_available()`` is False,
  so on a GPU machine every Triton kernel test compiles and launches real kernels.
* ``device`` fixture / :data:`DEVICE`: ``"cuda"`` when present, else ``"cpu"``. Tests build their tensors with
  ``device=device`` (or ``DEVICE`` in parametrisation / module-level helpers) so the same test checks the interpreter
  on CPU CI and the compiled kernels on a GPU.
* ``gpu`` marker: tests that only make sense on CUDA are skipped elsewhere (a skip is not a pass).
"""
import os

import torch  # torch does not import triton; deciding here keeps the interpreter off on GPU machines

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
if not HAS_CUDA:
    # Triton kernels run on CPU tensors through the interpreter; must be set before triton is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_sessionstart(session):
    # CI sets this so that a broken Triton install fails loudly instead of turning kernel tests into skips
    if os.environ.get("VEXPERT_REQUIRE_TRITON") == "1":
        from vexpert_kernels._triton_compat import HAS_TRITON, TRITON_IMPORT_ERROR
        if not HAS_TRITON:
            pytest.exit(f"VEXPERT_REQUIRE_TRITON=1 but triton failed to import: {TRITON_IMPORT_ERROR}", returncode=3)


def pytest_report_header(config):
    if HAS_CUDA:
        return f"vexpert tests: CUDA ({torch.cuda.get_device_name(0)}), compiled Triton kernels (no interpreter)"
    return f"vexpert tests: no CUDA -> CPU tensors, Triton interpreter (TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')})"


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (skipped: a skip is not a pass)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def device() -> str:
    """"cuda" when a GPU is present, else "cpu" (the Triton interpreter)."""
    return DEVICE


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def fp32_highest():
    """fp32 comparisons stay tight on CUDA: no TF32 in the PyTorch matmuls (test modules opt in with
    ``pytestmark = pytest.mark.usefixtures("fp32_highest")``; the Triton GEMMs follow the same setting)."""
    prev = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(prev)

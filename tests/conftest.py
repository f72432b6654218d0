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


# ------------------------------------------------------------------------------------ sm_90a compiles in a child
# The test process runs under TRITON_INTERPRET=1 (its kernels are InterpretedFunctions), so AOT compiles happen in a
# child process: ``specs_src`` defines ``specs(payload) -> [CompileSpec]``; each is compiled for sm_90a by
# ``compile_report.compile_spec(..., sass=True)`` (the report's own compile path, SASS counts included).
SMEM_LIMIT_SM90 = 232448  # 227 KiB: the most dynamic shared memory one sm_90 CTA may use
_SM90_CHILD = r"""
import json, sys
from vexpert_kernels import compile_report as cr
ns = {}
exec(sys.argv[1], ns)
for spec in ns["specs"](json.loads(sys.argv[2])):
    print(json.dumps(cr.compile_spec(spec, 90, sass=True).to_dict()), flush=True)
"""


def compile_sm90_in_child(specs_src: str, payload) -> list:
    """CompileResult dicts (``compile_report``) of the specs ``specs_src`` builds from ``payload``; every one must
    have compiled."""
    import json
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")
    env["PYTHONPATH"] = os.pathsep.join([root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    out = subprocess.run([sys.executable, "-c", _SM90_CHILD, specs_src, json.dumps(payload)], capture_output=True,
                         text=True, env=env, timeout=900, cwd=root)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    for r in rows:
        assert r["ok"], f"{r['name']}: {r['error']}"
    return rows


def tma_runnable() -> bool:
    """Can tensor-descriptor (TMA) kernels run here? CUDA: an sm_90 GPU and Triton's descriptor API; CPU: the
    interpreter runs descriptors from Triton 3.9 on."""
    from vexpert_kernels._triton_compat import HAS_TRITON, triton
    if not HAS_TRITON or not hasattr(triton, "set_allocator"):
        return False
    if HAS_CUDA:
        return torch.cuda.get_device_capability()[0] == 9 and hasattr(triton.language, "make_tensor_descriptor")
    return tuple(int(x) for x in triton.__version__.split(".")[:2]) >= (3, 9)

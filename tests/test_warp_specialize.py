"""Warp specialisation of the sm_90 grouped GEMMs (docs/warp_specialization.md), checked without a GPU.

* Every ``:ws`` config of ``SM90_CONFIGS`` / ``SM90_WGRAD_CONFIGS`` / ``SM90_SWIGLU_CONFIGS`` AOT-compiled for sm_90a
  (subprocess, the installed Triton) must really be split: a ``ttg.warp_specialize`` op in the TTGIR, 12 warps
  (one TMA producer + two wgmma consumer warpgroups), ``USETMAXREG`` in the SASS, no spill, shared memory within
  the 227 KiB an sm_90 CTA may use.
* The observed gate of Triton 3.6 / 3.9 is pinned: the same request with ``num_warps=8`` or ``flatten=True`` is
  dropped (no partitions). If a future Triton starts splitting those, this test fails so that the doc and the
  configs are revisited (more configs could then be ``:ws``).
* Interpreter numerics (Triton >= 3.9) of the kernels with ``warp_specialize=True, flatten=False``: the launch path
  of a ``:ws`` config (the interpreter ignores the hint; the GPU numerics are the autotuner's check).
"""
import os

import pytest
import torch

from vexpert_kernels._triton_compat import HAS_TRITON, TRITON_VERSION
from conftest import SMEM_LIMIT_SM90, compile_sm90_in_child

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="needs Triton")

if HAS_TRITON:
    from vexpert_kernels.ops.gemm_sm90 import (SM90_CONFIGS, SM90_SWIGLU_CONFIGS, SM90_WGRAD_CONFIGS,
                                               grouped_gemm_dx_sm90, grouped_gemm_sm90, grouped_swiglu_sm90,
                                               grouped_wgrad_sm90)
    from vexpert_kernels.ops.gemm_sm90.configs import SM90Config, hopper_ws_pass_available



def _version(v):
    return tuple(int(p) for p in (v or "0.0").split(".")[:2] if p.isdigit())


def _ws_configs():
    return [("gemm", c) for c in SM90_CONFIGS if c.warp_specialize] + \
           [("wgrad", c) for c in SM90_WGRAD_CONFIGS if c.warp_specialize] + \
           [("swiglu", c) for c in SM90_SWIGLU_CONFIGS if c.warp_specialize]


def test_ws_configs_follow_the_gate():
    """The pass exists in the supported Triton versions, so every GEMM family offers a :ws config, and each one
    satisfies what Triton 3.6/3.9 need to split a kernel (4 warps, loop not flattened, whole-tile stores)."""
    assert hopper_ws_pass_available(), f"Triton {TRITON_VERSION} lacks nvidia.passes.hopper.add_hopper_warpspec"
    kinds = {k for k, _ in _ws_configs()}
    assert kinds == {"gemm", "wgrad", "swiglu"}, kinds
    for kind, c in _ws_configs():
        assert c.name.endswith(":ws:noflat"), c.name
        assert c.num_warps == 4 and not c.flatten and c.epi_split == 1 and c.num_stages > 1, (kind, c)


# ----------------------------------------------------------------------------------------------- sm_90a compiles
_SPECS = r"""
from vexpert_kernels.ops.gemm_sm90 import aot
from vexpert_kernels.ops.gemm_sm90.configs import SM90Config

def specs(jobs):
    build = {"gemm": lambda c: aot.gemm_spec(c, aot.GEMM_VARIANTS[3]), "wgrad": aot.wgrad_spec,
             "swiglu": aot.swiglu_spec}
    return [build[kind](SM90Config(**args)) for kind, args in jobs]
"""


def _compile(jobs):
    return compile_sm90_in_child(_SPECS, [(k, dict(block_m=c.block_m, block_n=c.block_n, block_k=c.block_k,
                                                   num_warps=c.num_warps, num_stages=c.num_stages, group_m=c.group_m,
                                                   epi_split=c.epi_split, warp_specialize=c.warp_specialize,
                                                   flatten=c.flatten)) for k, c in jobs])


# the same 128x128 tile asking for warp specialisation in the two forms Triton 3.6 / 3.9 ignore
_DROPPED = [("gemm", SM90Config(128, 128, 64, 8, 3, warp_specialize=True, flatten=False)),   # 8 warps
            ("gemm", SM90Config(128, 128, 64, 4, 3, warp_specialize=True, flatten=True))]    # flattened loop


@pytest.fixture(scope="module")
def compiled():
    rows = _compile(_ws_configs() + _DROPPED)
    assert len(rows) == len(_ws_configs()) + len(_DROPPED)
    return rows[:len(_ws_configs())], rows[len(_ws_configs()):]


def test_ws_configs_are_warp_specialised_on_sm90(compiled):
    for r in compiled[0]:
        assert r["ws"], f"{r['name']}: Triton {TRITON_VERSION} did not split it (no ttg.warp_specialize)"
        assert r["launch_warps"] == 12 and r["setmaxreg"] > 0, f"{r['name']}: expected 3 warpgroups + setmaxnreg: {r}"
        assert r["hgmma"] > 0 and r["utmaldg"] > 0, f"{r['name']}: lost wgmma / TMA loads: {r}"
        assert r["stack_bytes"] == 0 and r["local_bytes"] == 0, f"{r['name']} spills: {r}"
        assert r["shared_bytes"] <= SMEM_LIMIT_SM90, f"{r['name']}: {r['shared_bytes']} B shared memory > 227 KiB"


def test_observed_gate_num_warps_4_and_no_flatten(compiled):
    """Pins Triton 3.6 / 3.9 behaviour (docs/warp_specialization.md): a failure here means this Triton now
    warp-specialises 8-warp or flattened loops on sm_90 -- update the doc and consider more :ws configs."""
    for r in compiled[1]:
        assert not r["ws"] and r["setmaxreg"] == 0 and r["launch_warps"] in (4, 8), (
            f"Triton {TRITON_VERSION} (observed gate pinned for 3.6/3.9) now warp-specialises {r['name']}: {r}")


# ----------------------------------------------------------------------------------------------- interpreter
_INTERP_OK = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") and _version(TRITON_VERSION) >= (3, 9)
_WS_TINY = SM90Config(16, 16, 16, 1, 2, group_m=2, warp_specialize=True, flatten=False) if HAS_TRITON else None


def _rel(out, ref):
    assert torch.isfinite(out).all(), "unwritten (NaN) or non-finite outputs"
    return ((out.double() - ref).norm() / ref.norm()).item()


@pytest.mark.skipif(not _INTERP_OK, reason="needs the Triton >= 3.9 interpreter (tensor descriptors)")
def test_ws_launch_path_numerics_interpreter():
    torch.manual_seed(0)
    dt = torch.bfloat16
    T, nv, N, K = 37, 13, 40, 24
    off = torch.tensor([0, nv, T], dtype=torch.int32)
    x, wv, wl, res = (torch.randn(*s).to(dt) for s in ((T, K), (N, K), (N, K), (T, N)))
    nan = lambda *s: torch.full(s, float("nan"), dtype=dt)  # noqa: E731
    xd, wvd, wld = x.double(), wv.double(), wl.double()
    y = grouped_gemm_sm90(x, wv, wl, off, residual=res, config=_WS_TINY, out=nan(T, N))
    ref = torch.cat([xd[:nv] @ wvd.T, xd[nv:] @ wld.T]) + res.double()
    assert _rel(y, ref) < 1e-2
    dy = torch.randn(T, N).to(dt)
    dx = grouped_gemm_dx_sm90(dy, wv, wl, off, config=_WS_TINY, out=nan(T, K))
    assert _rel(dx, torch.cat([dy[:nv].double() @ wvd, dy[nv:].double() @ wld])) < 1e-2
    dwv, dwl = grouped_wgrad_sm90(dy, x, off, config=SM90Config(16, 16, 32, 1, 2, group_m=2, warp_specialize=True,
                                                                  flatten=False))
    assert _rel(dwv, dy[:nv].double().T @ xd[:nv]) < 1e-2 and _rel(dwl, dy[nv:].double().T @ xd[nv:]) < 1e-2
    gv, uv, gl, ul = (torch.randn(N, K).to(dt) for _ in range(4))
    h, gu = grouped_swiglu_sm90(x, gv, uv, gl, ul, off, config=_WS_TINY, out=(nan(T, N), nan(T, 2 * N)))
    g = torch.cat([xd[:nv] @ gv.double().T, xd[nv:] @ gl.double().T])
    u = torch.cat([xd[:nv] @ uv.double().T, xd[nv:] @ ul.double().T])
    assert _rel(h, torch.nn.functional.silu(g) * u) < 2e-2 and _rel(gu, torch.cat([g, u], 1)) < 1e-2


# ----------------------------------------------------------------------------------------------- compile report
def test_compile_report_ws_column_and_problem():
    from vexpert_kernels import compile_report as cr
    assert cr.ttgir_warp_specialized("    ttg.warp_specialize(%a, %b)\n    default {")
    assert not cr.ttgir_warp_specialized("} {tt.warp_specialize} loc(#loc2)")  # a dropped request: attribute only
    base = dict(module="m", index=0, name="k", num_warps=4, num_stages=3, ok=True, stack_bytes=0, local_bytes=0)
    lost = cr.CompileResult(**base, arch=90, expects_ws=True, ws=False)
    assert any("warp specialisation" in p for p in lost.problems())
    assert cr.CompileResult(**base, arch=90, expects_ws=True, ws=True).problems() == []
    assert cr.CompileResult(**base, arch=80, expects_ws=True, ws=False).problems() == []  # sm_90 only
    assert "ws" in cr.COLUMNS and cr._row(lost)[cr.COLUMNS.index("ws")] == "no (expected)"

"""sm_90 grouped GEMMs (vexpert_kernels.ops.gemm_sm90), checked with or without a GPU.

* Numerics through the Triton interpreter (it executes device-side tensor descriptors from Triton 3.9 on; the 3.6
  interpreter cannot) with its tiny tile configs, or, on a machine with an sm_90 GPU, the compiled kernels on
  CUDA tensors with every GPU config, against float64 references: odd T, N, K (partial tiles in every dimension),
  an expert boundary inside a tile, empty experts, bias / residual on and off, forward, dX and dW, NaN-poisoned
  outputs, fp32 accumulation of bf16 operands, deterministic dW.
* Every GPU config compiled for sm_90a in a subprocess; its SASS must hold HGMMA (wgmma), UTMALDG and UTMASTG (TMA
  loads and stores) and no local memory (spills).
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from vexpert_kernels._triton_compat import HAS_TRITON, TRITON_VERSION
from conftest import DEVICE, HAS_CUDA

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="needs Triton")

if HAS_TRITON:
    from vexpert_kernels.ops.gemm_sm90 import (INTERP_CONFIGS, INTERP_WGRAD_CONFIGS, SM90_CONFIGS,
                                               SM90_SWIGLU_CONFIGS, SM90_WGRAD_CONFIGS, grouped_gemm_dx_sm90,
                                               grouped_gemm_sm90, grouped_swiglu_sm90, grouped_wgrad_sm90,
                                               sm90_unsupported_reason)


def _version(v):
    return tuple(int(p) for p in (v or "0.0").split(".")[:2] if p.isdigit())


_INTERP_OK = HAS_TRITON and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") and \
    _version(TRITON_VERSION) >= (3, 9)
if HAS_CUDA:  # the compiled kernels on an sm_90 GPU, with the GPU configs
    _RUN_OK = HAS_TRITON and torch.cuda.get_device_capability()[0] == 9
    if _RUN_OK:
        from vexpert_kernels.ops.gemm_sm90.configs import triton_sm90_reason
        _RUN_OK = triton_sm90_reason() is None
    FWD_CONFIGS, WGRAD_CONFIGS, SWIGLU_CONFIGS = ((SM90_CONFIGS, SM90_WGRAD_CONFIGS, SM90_SWIGLU_CONFIGS) if HAS_TRITON
                                                  else ([], [], []))
else:  # CPU: the interpreter with its tiny tiles
    _RUN_OK = _INTERP_OK
    FWD_CONFIGS, WGRAD_CONFIGS, SWIGLU_CONFIGS = ((INTERP_CONFIGS, INTERP_WGRAD_CONFIGS, INTERP_CONFIGS) if HAS_TRITON
                                                  else ([], [], []))
needs_interp = pytest.mark.skipif(not _RUN_OK, reason="numerics need an sm_90 GPU, or the Triton >= 3.9 interpreter "
                                                      "(tensor descriptors; the 3.6 interpreter cannot run them)")

TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3}


def _rel(out, ref):
    assert torch.isfinite(out).all(), "unwritten (NaN) or non-finite outputs"
    return ((out.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def _randn(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype).to(DEVICE)  # CPU generator: the same values on CPU and CUDA


def _nan(shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)


def _offsets(nv, T):
    return torch.tensor([0, nv, T], dtype=torch.int32, device=DEVICE)


def _ref_fwd(x, wv, wl, nv, bv=None, bl=None, res=None):
    x = x.double()
    y = torch.cat([x[:nv] @ wv.double().T, x[nv:] @ wl.double().T])
    if bv is not None:
        y[:nv] += bv.double()
    if bl is not None:
        y[nv:] += bl.double()
    if res is not None:
        y += res.double()
    return y


# (T, n_vision, N, K): T and the boundary off the 16-row tiles, partial N / K tiles, empty experts, one row
SHAPES = [(37, 13, 40, 24), (29, 0, 24, 40), (21, 21, 40, 24), (1, 1, 16, 16), (34, 17, 8, 56)]


@needs_interp
@pytest.mark.parametrize("T,nv,N,K", SHAPES)
@pytest.mark.parametrize("epi", ["plain", "bias_v", "bias_both_residual"])
def test_forward(T, nv, N, K, epi):
    dt = torch.bfloat16
    x, wv, wl = _randn(T, K, dtype=dt), _randn(N, K, dtype=dt), _randn(N, K, dtype=dt)
    bv = _randn(N, dtype=dt) if epi != "plain" else None
    bl = _randn(N, dtype=dt) if epi == "bias_both_residual" else None
    res = _randn(T, N, dtype=dt) if epi == "bias_both_residual" else None
    ref = _ref_fwd(x, wv, wl, nv, bv, bl, res)
    for cfg in FWD_CONFIGS:
        y = grouped_gemm_sm90(x, wv, wl, _offsets(nv, T), bias_v=bv, bias_l=bl, residual=res, config=cfg,
                              out=_nan((T, N), dt))
        assert _rel(y, ref) < TOL[dt], cfg.name


@needs_interp
@pytest.mark.parametrize("dt", [torch.bfloat16, torch.float16])
def test_forward_default_config_and_dtype(dt):
    T, nv, N, K = 45, 30, 32, 48
    x, wv, wl = _randn(T, K, dtype=dt), _randn(N, K, dtype=dt), _randn(N, K, dtype=dt)
    y = grouped_gemm_sm90(x[:, :], wv, wl, _offsets(nv, T))
    assert y.shape == (T, N) and y.dtype == dt
    assert _rel(y, _ref_fwd(x, wv, wl, nv)) < TOL[dt]


@needs_interp
@pytest.mark.parametrize("T,nv,N,K", SHAPES)
def test_dx(T, nv, N, K):
    dt = torch.bfloat16
    dy, wv, wl = _randn(T, N, dtype=dt), _randn(N, K, dtype=dt), _randn(N, K, dtype=dt)
    ref = torch.cat([dy[:nv].double() @ wv.double(), dy[nv:].double() @ wl.double()])
    for cfg in FWD_CONFIGS:
        dx = grouped_gemm_dx_sm90(dy, wv, wl, _offsets(nv, T), config=cfg, out=_nan((T, K), dt))
        assert dx.shape == (T, K)
        assert _rel(dx, ref) < TOL[dt], cfg.name


@needs_interp
@pytest.mark.parametrize("T,nv,N,K", SHAPES + [(40, 3, 24, 32)])
def test_wgrad(T, nv, N, K):
    dt = torch.bfloat16
    dy, x = _randn(T, N, dtype=dt), _randn(T, K, dtype=dt)
    ref_v = dy[:nv].double().T @ x[:nv].double()
    ref_l = dy[nv:].double().T @ x[nv:].double()
    for cfg in WGRAD_CONFIGS:
        dwv, dwl = grouped_wgrad_sm90(dy, x, _offsets(nv, T), config=cfg, out=(_nan((N, K), dt), _nan((N, K), dt)))
        for got, ref, name in ((dwv, ref_v, "dwv"), (dwl, ref_l, "dwl")):
            if ref.abs().max() == 0:  # empty expert: exact zeros, every element written
                assert torch.equal(got, torch.zeros_like(got)), (cfg.name, name)
            else:
                assert _rel(got, ref) < TOL[dt], (cfg.name, name)
        again = grouped_wgrad_sm90(dy, x, _offsets(nv, T), config=cfg)
        assert torch.equal(again[0], dwv) and torch.equal(again[1], dwl), "dW is not deterministic"


@needs_interp
@pytest.mark.parametrize("T,nv,I,K", [(37, 13, 40, 24), (20, 0, 24, 16), (19, 19, 8, 40)])
def test_swiglu(T, nv, I, K):
    """h = silu(x Wg^T) * (x Wu^T) and the saved gu = [g | u]; I = 40 is not a multiple of the 16/32-column tiles,
    so a partial g tile must stop at column I (not spill into u's columns)."""
    dt = torch.bfloat16
    x = _randn(T, K, dtype=dt)
    gv, uv, gl, ul = (_randn(I, K, dtype=dt) for _ in range(4))
    xd = x.double()
    g = torch.cat([xd[:nv] @ gv.double().T, xd[nv:] @ gl.double().T])
    u = torch.cat([xd[:nv] @ uv.double().T, xd[nv:] @ ul.double().T])
    h_ref = torch.nn.functional.silu(g) * u
    for cfg in SWIGLU_CONFIGS:
        h, gu = grouped_swiglu_sm90(x, gv, uv, gl, ul, _offsets(nv, T), config=cfg,
                                    out=(_nan((T, I), dt), _nan((T, 2 * I), dt)))
        assert _rel(h, h_ref) < TOL[dt], cfg.name
        assert _rel(gu[:, :I], g) < TOL[dt] and _rel(gu[:, I:], u) < TOL[dt], cfg.name


@needs_interp
def test_wgrad_no_rows():
    dwv, dwl = grouped_wgrad_sm90(_randn(0, 16, dtype=torch.bfloat16), _randn(0, 24, dtype=torch.bfloat16),
                                  _offsets(0, 0))
    assert dwv.shape == (16, 24) and not dwv.any() and not dwl.any()


@needs_interp
def test_fp32_accumulation():
    """A bf16 running sum of 1.0s stops at 256 (8-bit mantissa); an fp32 accumulator reaches K exactly."""
    T, nv, N, K = 17, 9, 16, 512
    def ones(*shape, dtype):
        return torch.ones(*shape, dtype=dtype, device=DEVICE)

    def full(shape, value):
        return torch.full(shape, value, device=DEVICE)

    x, w = ones(T, K, dtype=torch.bfloat16), ones(N, K, dtype=torch.bfloat16)
    cfg = FWD_CONFIGS[0]
    y = grouped_gemm_sm90(x, w, w, _offsets(nv, T), config=cfg, out=_nan((T, N), torch.bfloat16))
    assert torch.equal(y.float(), full((T, N), float(K)))
    dx = grouped_gemm_dx_sm90(ones(T, K, dtype=torch.bfloat16), ones(K, N, dtype=torch.bfloat16),
                              ones(K, N, dtype=torch.bfloat16), _offsets(nv, T), config=cfg)
    assert torch.equal(dx.float(), full((T, N), float(K)))
    T2 = 520
    dwv, dwl = grouped_wgrad_sm90(ones(T2, 16, dtype=torch.bfloat16), ones(T2, 16, dtype=torch.bfloat16),
                                  _offsets(T2 - 8, T2), config=WGRAD_CONFIGS[1])
    assert torch.equal(dwv.float(), full((16, 16), float(T2 - 8)))
    assert torch.equal(dwl.float(), full((16, 16), 8.0))


def test_unsupported_reasons_and_errors():
    bf = torch.bfloat16
    x, w = _randn(4, 16, dtype=bf), _randn(8, 16, dtype=bf)
    assert "[T, K]" in sm90_unsupported_reason(x, _randn(8, 24, dtype=bf))
    if not _RUN_OK:  # no sm_90 GPU / CPU tensors without the (>= 3.9) interpreter: a reason, whatever it is
        assert sm90_unsupported_reason(x, w) is not None
        return
    assert sm90_unsupported_reason(x, w) is None
    assert "bf16/fp16" in sm90_unsupported_reason(x.float(), w.float())
    assert "multiples of 16" in sm90_unsupported_reason(_randn(4, 12, dtype=bf), _randn(8, 12, dtype=bf))
    off = _offsets(2, 4)
    with pytest.raises(TypeError, match="offsets"):
        grouped_gemm_sm90(x, w, w, off.long())
    with pytest.raises(ValueError, match="offsets must be"):
        grouped_gemm_sm90(x, w, w, _offsets(2, 5))
    with pytest.raises(ValueError, match="offsets must be"):
        grouped_wgrad_sm90(_randn(4, 8, dtype=bf), x, _offsets(6, 4))
    with pytest.raises(ValueError, match="wl"):
        grouped_gemm_sm90(x, w, w[:4], off)
    with pytest.raises(TypeError, match="bias_v"):
        grouped_gemm_sm90(x, w, w, off, bias_v=_randn(8))
    with pytest.raises(ValueError, match="residual"):
        grouped_gemm_sm90(x, w, w, off, residual=_randn(4, 9, dtype=bf))
    with pytest.raises(ValueError, match="sm_90 grouped GEMM unsupported"):
        grouped_gemm_sm90(x.float(), w.float(), w.float(), off)
    with pytest.raises(ValueError, match="disagree on N"):
        grouped_gemm_dx_sm90(_randn(4, 9, dtype=bf), w, w, off)
    with pytest.raises(ValueError, match="x must have shape"):
        grouped_wgrad_sm90(_randn(4, 8, dtype=bf), _randn(5, 16, dtype=bf), off)


def test_config_names_stable_and_unique():
    names = [c.name for c in SM90_CONFIGS] + [c.name for c in SM90_WGRAD_CONFIGS]
    assert "sm90:128x256x64:w8:s3:sub2" in names and "sm90:256x128x64:w8:s3:sub2" in names
    assert len(set(c.name for c in SM90_CONFIGS)) == len(SM90_CONFIGS)
    assert all(n.startswith("sm90:") for n in names)


# ----------------------------------------------------------------------------------------------- sm_90a SASS
@pytest.fixture(scope="module")
def sass_rows():
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    out = subprocess.run([sys.executable, "-m", "vexpert_kernels.ops.gemm_sm90.aot"], capture_output=True, text=True,
                         env=env, timeout=1500, cwd=root)
    assert out.returncode == 0, out.stderr[-2000:]
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def test_sass_every_gpu_config_has_wgmma_tma_and_no_spill(sass_rows):
    from vexpert_kernels.ops.gemm_sm90.aot import sass_check_specs
    assert [r["name"] for r in sass_rows] == [s.name for s in sass_check_specs()]
    covered = {r["name"].split(",")[-1].rstrip("]") for r in sass_rows}
    from vexpert_kernels.ops.gemm_sm90.configs import SM90_DSWIGLU_CONFIGS
    assert covered == {c.name for c in SM90_CONFIGS + SM90_WGRAD_CONFIGS + SM90_SWIGLU_CONFIGS + SM90_DSWIGLU_CONFIGS}
    for r in sass_rows:
        assert "error" not in r, r
        assert r["HGMMA"] > 0, f"{r['name']}: no wgmma (HGMMA) in the SASS"
        assert r["UTMALDG"] > 0 and r["UTMASTG"] > 0, f"{r['name']}: TMA loads/stores missing"
        assert r["LDL"] == 0 and r["STL"] == 0 and r["stack"] == 0 and r["local"] == 0, f"{r['name']} spills: {r}"
        assert r["shared"] <= 232448, f"{r['name']}: {r['shared']} B of shared memory > the sm_90 227 KiB limit"

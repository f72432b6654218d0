"""sm_90 QKV + RoPE + attention-layout kernel and the sm_90 dW kernel's fused dbias (vexpert_kernels.ops.gemm_sm90).

* Numerics through the Triton >= 3.9 interpreter (it executes device-side tensor descriptors) with the tiny
  interpreter configs (1 and 2 heads per tile), or the GPU configs on an sm_90 GPU, against float64 references:
  GQA, head_dim 16 / 32, an expert boundary inside a tile, empty vision / language expert, B > 1 with padding rows
  (a real RoutingPlan), a vision-only bias (CogVLM2), NaN-poisoned outputs; bf16 (the TMA path has no fp32) with
  "error <= 2x the same-dtype PyTorch error, or the bf16 tolerance".
* The whole op: backend "auto" picks the sm_90 candidates (forward, dX, dW with fused dbias) -> q, k, v and every
  gradient vs float64.
* Every QKV GPU config compiled for sm_90a: wgmma, TMA loads, no spill (its store is a pointer scatter: no TMA store).
"""
import dataclasses
import importlib
import json
import os
import subprocess
import sys

import pytest
import torch

from vexpert_kernels import RoutingPlan
from vexpert_kernels._triton_compat import HAS_TRITON, TRITON_VERSION
from vexpert_kernels.testing import random_token_types, rel_err
from conftest import DEVICE, HAS_CUDA

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="needs Triton")

RL = importlib.import_module("vexpert_kernels.ops.routed_linear")
API = importlib.import_module("vexpert_kernels.ops.routed_linear.api")
OPS = importlib.import_module("vexpert_kernels.ops.routed_linear.custom_ops")
ROPE = importlib.import_module("vexpert_kernels.ops.routed_linear.rope")
autotune = importlib.import_module("vexpert_kernels.autotune")
if HAS_TRITON:
    from vexpert_kernels.ops import gemm_sm90 as SM90
    from vexpert_kernels.ops.gemm_sm90.configs import INTERP_QKV_CONFIGS, SM90_QKV_CONFIGS, qkv_config_reason
    from vexpert_kernels.ops.gemm_sm90.qkv import grouped_qkv_rope_sm90, qkv_sm90_reason


def _version(v):
    return tuple(int(p) for p in (v or "0.0").split(".")[:2] if p.isdigit())


if HAS_CUDA:
    _RUN_OK = HAS_TRITON and torch.cuda.get_device_capability()[0] == 9 and SM90.triton_sm90_reason() is None
    QKV_CONFIGS, WGRAD_CONFIGS = (SM90_QKV_CONFIGS, SM90.SM90_WGRAD_CONFIGS) if HAS_TRITON else ([], [])
else:
    _RUN_OK = HAS_TRITON and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") and \
        _version(TRITON_VERSION) >= (3, 9)
    QKV_CONFIGS, WGRAD_CONFIGS = (INTERP_QKV_CONFIGS, SM90.INTERP_WGRAD_CONFIGS) if HAS_TRITON else ([], [])
needs_run = pytest.mark.skipif(not _RUN_OK, reason="numerics need an sm_90 GPU, or the Triton >= 3.9 interpreter "
                                                    "(tensor descriptors; the 3.6 interpreter cannot run them)")
BF16_TOL = 1.5e-2
BF = torch.bfloat16


def _hd(hd, KV):
    """head_dim for the device: the interpreter's configs are 16 / 32 columns wide (1 or 2 heads of 16, 1 of 32);
    the GPU configs 128 (2 heads of 64 where KV is even, else 1 of 128)."""
    if not HAS_CUDA:
        return hd
    return 64 if hd == 16 and KV % 2 == 0 else 128


def _randn(*shape, scale=1.0, dtype=BF):
    return (torch.randn(*shape) * scale).to(dtype).to(DEVICE)  # CPU generator: same values on CPU and CUDA


class _Plan:
    """What the QKV op reads from a RoutingPlan, with an arbitrary expert split (0 or T vision rows)."""

    def __init__(self, B, L, nv, seed=0):
        g = torch.Generator().manual_seed(seed)
        T = B * L
        self.perm = torch.randperm(T, generator=g).to(DEVICE)
        self.inv_perm = torch.empty_like(self.perm)
        self.inv_perm[self.perm] = torch.arange(T, device=DEVICE)
        pos = torch.randint(0, 3 * L + 5, (B, L), generator=g).to(DEVICE)
        self.position_ids, self.routed_position_ids = pos, pos.reshape(-1)[self.perm]
        self.expert_offsets = torch.tensor([0, nv, T], dtype=torch.int32, device=DEVICE)
        self.batch_size, self.seq_len, self.num_vision = B, L, nv


def _cos_sin(plan, hd, theta=1e4):
    return ROPE._rope_cos_sin(plan.routed_position_ids.float(), ROPE._rope_inv_freq(hd, theta, DEVICE))


def _torch_err(x, wv, wl, plan, bv, bl, H, KV, refs):
    """Error of the plain PyTorch path run in x.dtype: the bar of the 2x rule."""
    cos, sin = _cos_sin(plan, wv.shape[0] // (H + 2 * KV))
    outs = OPS._qkv_fwd_impl(x, wv, wl, plan.expert_offsets, plan.num_vision, bv, bl, plan.perm, cos, sin,
                             plan.batch_size, plan.seq_len, H, KV, "torch")
    return [rel_err(o, r) for o, r in zip(outs, refs)]


# (B, L, n_vision, H, KV, hd, vision bias, language bias)
QKV_CASES = [
    (2, 19, 11, 4, 2, 16, True, False),    # GQA, CogVLM2-style vision-only bias, B > 1, boundary inside a tile
    (1, 37, 37, 2, 2, 32, False, False),   # MHA, all vision (empty language expert), head_dim 32
    (3, 13, 0, 2, 1, 16, True, True),      # GQA 2:1, all language (empty vision expert), both biases
    (1, 1, 1, 2, 1, 16, False, True),      # one row
    (2, 10, 7, 4, 4, 32, True, False),     # 2 heads per tile (hd 16 configs) / 1 head (hd 32)
]


@needs_run
@pytest.mark.parametrize("B,L,nv,H,KV,hd,has_bv,has_bl", QKV_CASES)
def test_qkv_forward_every_config(B, L, nv, H, KV, hd, has_bv, has_bl):
    hd = _hd(hd, KV)
    plan = _Plan(B, L, nv, seed=B * 100 + L)
    T, K, N = B * L, 48, (H + 2 * KV) * hd
    x, wv, wl = _randn(T, K), _randn(N, K, scale=K ** -0.5), _randn(N, K, scale=K ** -0.5)
    bv = _randn(N) if has_bv else None
    bl = _randn(N) if has_bl else None
    refs = RL.routed_qkv_rope_reference(x, wv, wl, plan, num_heads=H, num_kv_heads=KV, rope_theta=1e4,
                                        bias_vision=bv, bias_language=bl)
    bar = _torch_err(x, wv, wl, plan, bv, bl, H, KV, refs)
    cos, sin = _cos_sin(plan, hd)
    ran = 0
    for cfg in QKV_CONFIGS:
        if qkv_config_reason(cfg, hd, H, KV) is not None:
            continue
        out = tuple(torch.full(r.shape, float("nan"), dtype=BF, device=DEVICE) for r in refs)
        got = grouped_qkv_rope_sm90(x, wv, wl, plan.expert_offsets, plan.perm, cos, sin, batch_size=B, seq_len=L,
                                    num_heads=H, num_kv_heads=KV, bias_v=bv, bias_l=bl, config=cfg, out=out)
        ran += 1
        for name, o, r, e in zip("qkv", got, refs, bar):
            assert o.data_ptr() == out["qkv".index(name)].data_ptr()
            err = rel_err(o, r)  # inf when an element stayed NaN (unwritten)
            assert err <= max(2 * e, BF16_TOL), (cfg.name, name, err, e)
    assert ran >= 1


@needs_run
def test_qkv_real_plan_with_padding_and_default_config():
    """B = 2 rows with left / right padding and images: the padding rows are routed (language) rows like any other
    and land at their own sequence positions."""
    tt = random_token_types(2, 21, images_per_row=(1, 2), image_len=(3, 9), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(2, 21, dtype=torch.long)
    mask[0, :4] = 0   # left padding
    mask[1, -5:] = 0  # right padding
    plan = RoutingPlan.build(tt.to(DEVICE), mask.to(DEVICE))
    H, KV, hd, K = 2, 1, _hd(16, 1), 32
    N = (H + 2 * KV) * hd
    x, wv, wl = _randn(42, K), _randn(N, K, scale=K ** -0.5), _randn(N, K, scale=K ** -0.5)
    bv = _randn(N)
    cos, sin = _cos_sin(plan, hd)
    got = grouped_qkv_rope_sm90(x, wv, wl, plan.expert_offsets, plan.perm, cos, sin, batch_size=2, seq_len=21,
                                num_heads=H, num_kv_heads=KV, bias_v=bv)
    refs = RL.routed_qkv_rope_reference(x, wv, wl, plan, num_heads=H, num_kv_heads=KV, rope_theta=1e4, bias_vision=bv)
    for o, r in zip(got, refs):
        assert o.shape == r.shape and o.dtype == BF and o.is_contiguous()
        assert rel_err(o, r) < BF16_TOL


def _sm90_first(monkeypatch, ran):
    """autotune.select stand-in: checks every candidate once against the reference, then picks the first sm_90
    one (the path under test) and records it."""
    def select(op, key, candidates, reference, *, static, dtype):
        ref = reference()
        names = [n for n in candidates if n.startswith("sm90:")]
        assert names, (op, list(candidates))
        for n in names:
            out = candidates[n]()
            outs, refs = (out, ref) if isinstance(out, tuple) else ((out,), (ref,))
            for o, r in zip(outs, refs):
                assert o.shape == r.shape and rel_err(o, r) < 2e-2, (op, n)
        ran.append((op, names[0]))
        return names[0]
    monkeypatch.setattr(autotune, "select", select)
    monkeypatch.setattr(API, "select_backend", lambda backend, x, *a, **k: "auto")  # as on CUDA


@needs_run
@pytest.mark.parametrize("B,L,nv,H,KV,hd", [(2, 13, 9, 4, 2, 16), (1, 21, 21, 2, 1, 32), (1, 19, 0, 2, 2, 16)])
def test_auto_picks_sm90_forward_and_backward(monkeypatch, B, L, nv, H, KV, hd):
    """backend="auto" with the sm_90 candidates chosen for the forward, dX and dW (dbias fused in the dW kernel):
    q, k, v and the gradients of x, both weights and the vision bias (CogVLM2: no language bias) vs float64."""
    hd = _hd(hd, KV)
    ran = []
    _sm90_first(monkeypatch, ran)
    wgrad_calls = []
    real_wgrad = SM90.grouped_wgrad_sm90

    def spy(*a, **k):
        wgrad_calls.append(k.get("dbias"))
        return real_wgrad(*a, **k)
    monkeypatch.setattr(SM90, "grouped_wgrad_sm90", spy)
    plan = _Plan(B, L, nv, seed=7)
    T, K, N = B * L, 32, (H + 2 * KV) * hd
    x = _randn(T, K).requires_grad_()
    wv = _randn(N, K, scale=K ** -0.5).requires_grad_()
    wl = _randn(N, K, scale=K ** -0.5).requires_grad_()
    bv = _randn(N).requires_grad_()
    kw = dict(num_heads=H, num_kv_heads=KV, rope_theta=1e4)
    q, k, v = RL.routed_qkv_rope(x, wv, wl, plan, bias_vision=bv, **kw)
    assert RL.last_backend("routed_qkv_rope").startswith("auto/sm90:")
    ins64 = [t.detach().double().requires_grad_() for t in (x, wv, wl, bv)]
    refs = RL.routed_qkv_rope_reference(*ins64[:3], plan, bias_vision=ins64[3], **kw)
    for o, r in zip((q, k, v), refs):
        assert o.dtype == BF and rel_err(o, r) < BF16_TOL
    gs = [torch.randn(t.shape).to(BF).to(DEVICE) for t in (q, k, v)]
    grads = torch.autograd.grad((q, k, v), [x, wv, wl, bv], gs)
    grads64 = torch.autograd.grad(refs, ins64, [g.double() for g in gs])
    assert [op for op, _ in ran] == ["routed_qkv_rope", "routed_linear_dx", "routed_linear_dw"]
    # the chosen dW run got the dbias buffers (vision only); the tuning candidates run without them
    assert any(d is not None and d[0] is not None and d[1] is None for d in wgrad_calls), wgrad_calls
    for name, g, r in zip(("dx", "dwv", "dwl", "dbv"), grads, grads64):
        if r.norm() == 0:  # an empty expert: exact zeros
            assert torch.equal(g, torch.zeros_like(g)), name
        else:
            assert rel_err(g, r) < BF16_TOL, (name, rel_err(g, r))


# ---------------------------------------------------------------------------------------------- dW + dbias
@needs_run
@pytest.mark.parametrize("T,nv,N,K", [(37, 13, 40, 24), (29, 0, 24, 40), (21, 21, 40, 24), (40, 3, 24, 32)])
def test_wgrad_fused_dbias(T, nv, N, K):
    dy, x = _randn(T, N), _randn(T, K)
    off = torch.tensor([0, nv, T], dtype=torch.int32, device=DEVICE)
    ref_v, ref_l = dy[:nv].double().sum(0), dy[nv:].double().sum(0)
    for cfg in WGRAD_CONFIGS:
        dbv, dbl = (torch.full((N,), float("nan"), device=DEVICE) for _ in range(2))
        dwv, dwl = SM90.grouped_wgrad_sm90(dy, x, off, config=cfg, dbias=(dbv, dbl))
        # fp32 sums of bf16 values: far below bf16 resolution (fp32 rounding only)
        torch.testing.assert_close(dbv.double(), ref_v, atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(dbl.double(), ref_l, atol=1e-4, rtol=1e-5)
        ref_w = dy[nv:].double().T @ x[nv:].double()
        assert (ref_w.norm() == 0 and not dwl.any()) or rel_err(dwl, ref_w) < 1e-2
        again = (torch.empty(N, device=DEVICE), torch.empty(N, device=DEVICE))
        SM90.grouped_wgrad_sm90(dy, x, off, config=cfg, dbias=again)
        assert torch.equal(again[0], dbv) and torch.equal(again[1], dbl), "dbias is not deterministic"
        # both in bf16 (the bias dtype): the kernel casts its fp32 sums on the store
        both = tuple(torch.full((N,), float("nan"), dtype=BF, device=DEVICE) for _ in range(2))
        SM90.grouped_wgrad_sm90(dy, x, off, config=cfg, dbias=both)
        for got, ref in zip(both, (ref_v, ref_l)):  # (the interpreter's fp32 -> bf16 cast truncates)
            assert rel_err(got, ref) < 1e-2 if ref.norm() > 0 else torch.equal(got, torch.zeros_like(got))
        # one expert wanted, in bf16: the other gets a scratch buffer
        only_l = torch.full((N,), float("nan"), dtype=BF, device=DEVICE)
        SM90.grouped_wgrad_sm90(dy, x, off, config=cfg, dbias=(None, only_l))
        assert rel_err(only_l, ref_l) < 1e-2 if ref_l.norm() > 0 else torch.equal(only_l, torch.zeros_like(only_l))


@needs_run
def test_wgrad_dbias_no_rows_and_bad_buffers():
    dbv, dbl = torch.full((16,), float("nan"), device=DEVICE), torch.full((16,), float("nan"), device=DEVICE)
    SM90.grouped_wgrad_sm90(_randn(0, 16), _randn(0, 24), torch.zeros(3, dtype=torch.int32, device=DEVICE),
                            dbias=(dbv, dbl))
    assert not dbv.any() and not dbl.any()
    off = torch.tensor([0, 2, 4], dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match=r"dbias\[1\]"):
        SM90.grouped_wgrad_sm90(_randn(4, 16), _randn(4, 16), off, dbias=(None, torch.empty(15, device=DEVICE)))
    with pytest.raises(TypeError, match="dbias"):
        SM90.grouped_wgrad_sm90(_randn(4, 16), _randn(4, 16), off, dbias=torch.empty(16, device=DEVICE))


# ---------------------------------------------------------------------------------------------- bad input
def test_qkv_reasons_and_errors():
    cfg = QKV_CONFIGS[0] if QKV_CONFIGS else None
    if cfg is None:
        return
    assert "power of two" in qkv_config_reason(cfg, 24, 2, 1)
    assert "mix q/k/v" in qkv_config_reason(INTERP_QKV_CONFIGS[1], 16, 2, 1)   # 2 heads / tile, KV = 1
    assert qkv_config_reason(INTERP_QKV_CONFIGS[1], 16, 4, 2) is None
    x, w = _randn(6, 16), _randn(4 * 16, 16)
    assert "whole heads" in qkv_sm90_reason(x, _randn(66, 16), 2, 1)
    if not _RUN_OK:
        assert qkv_sm90_reason(x, w, 2, 1) is not None
        return
    assert qkv_sm90_reason(x, w, 2, 1) is None
    assert "bf16/fp16" in qkv_sm90_reason(x.float(), w.float(), 2, 1)
    plan = _Plan(2, 3, 2)
    cos, sin = _cos_sin(plan, 16)
    args = (x, w, w, plan.expert_offsets, plan.perm, cos, sin)
    kw = dict(batch_size=2, seq_len=3, num_heads=2, num_kv_heads=1)
    with pytest.raises(ValueError, match="batch_size"):
        grouped_qkv_rope_sm90(*args, **dict(kw, batch_size=3))
    with pytest.raises(ValueError, match="perm"):
        grouped_qkv_rope_sm90(x, w, w, plan.expert_offsets, plan.perm[:5], cos, sin, **kw)
    with pytest.raises(TypeError, match="cos"):
        grouped_qkv_rope_sm90(x, w, w, plan.expert_offsets, plan.perm, cos.double(), sin, **kw)
    with pytest.raises(ValueError, match="whole heads"):
        grouped_qkv_rope_sm90(*args, **dict(kw, num_heads=3))
    with pytest.raises(ValueError, match="mix q/k/v"):
        grouped_qkv_rope_sm90(*args, **kw, config=dataclasses.replace(QKV_CONFIGS[0], block_n=32))  # 2 heads / tile


# ----------------------------------------------------------------------------------------------- sm_90a SASS
def test_sass_every_qkv_config_has_wgmma_tma_loads_and_no_spill():
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    out = subprocess.run([sys.executable, "-m", "vexpert_kernels.ops.gemm_sm90.aot", "--qkv"], capture_output=True,
                         text=True, env=env, timeout=900, cwd=root)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert {r["name"].split(",")[-1].rstrip("]") for r in rows} == {c.name for c in SM90_QKV_CONFIGS}
    for r in rows:
        assert "error" not in r, r
        assert r["HGMMA"] > 0, f"{r['name']}: no wgmma (HGMMA) in the SASS"
        assert r["UTMALDG"] > 0, f"{r['name']}: no TMA loads"
        assert r["LDL"] == 0 and r["STL"] == 0 and r["stack"] == 0 and r["local"] == 0, f"{r['name']} spills: {r}"
        assert r["shared"] <= 232448, f"{r['name']}: {r['shared']} B of shared memory > the sm_90 227 KiB limit"

"""Routed linears (grouped GEMM + fused epilogues): Triton (interpreter) and torch backends vs float64 PyTorch."""
import importlib
import os
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch

from vexpert_kernels import RoutingPlan
from vexpert_kernels._triton_compat import HAS_TRITON
from vexpert_kernels.ops import routed_linear, routed_qkv_rope, routed_swiglu
from vexpert_kernels.testing import rel_err, random_token_types
from conftest import DEVICE

RL = importlib.import_module("vexpert_kernels.ops.routed_linear")
RL_AOT = importlib.import_module("vexpert_kernels.ops.routed_linear.aot")
RL_API = importlib.import_module("vexpert_kernels.ops.routed_linear.api")
RL_K = importlib.import_module("vexpert_kernels.ops.routed_linear.kernels")
RL_CFG = importlib.import_module("vexpert_kernels.ops.routed_linear.configs")
RL_LAUNCH = importlib.import_module("vexpert_kernels.ops.routed_linear.launch")
RL_OPS = importlib.import_module("vexpert_kernels.ops.routed_linear.custom_ops")
RL_ROPE = importlib.import_module("vexpert_kernels.ops.routed_linear.rope")
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")

TOL = {torch.float32: 1e-5, torch.bfloat16: 1.5e-2, torch.float16: 3e-3}


@dataclass
class SplitPlan:
    """Just what the routed linears read from a RoutingPlan, with an arbitrary expert split (0 or all vision rows
    is impossible for a real plan: the last token of a row is always language)."""
    expert_offsets: torch.Tensor
    perm: torch.Tensor
    inv_perm: torch.Tensor
    routed_position_ids: torch.Tensor
    position_ids: torch.Tensor
    batch_size: int
    seq_len: int
    num_vision: int


def split_plan(B, L, nv, seed=0):
    g = torch.Generator().manual_seed(seed)
    T = B * L
    perm = torch.randperm(T, generator=g)
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(T)
    pos = torch.randint(0, 3 * L + 5, (B, L), generator=g)
    perm, inv, pos = perm.to(DEVICE), inv.to(DEVICE), pos.to(DEVICE)
    offsets = torch.tensor([0, nv, T], dtype=torch.int32, device=DEVICE)
    return SplitPlan(offsets, perm, inv, pos.reshape(-1)[perm], pos, B, L, nv)


@pytest.fixture
def poison(monkeypatch):
    monkeypatch.setattr(RL_LAUNCH, "_POISON_OUTPUTS", True)


pytestmark = pytest.mark.usefixtures("fp32_highest")  # conftest: no TF32 in fp32 comparisons on CUDA


def _randn(*shape, requires_grad=False):
    """torch.randn from the (seeded) CPU generator, moved to the test device: same values on CPU and CUDA."""
    return torch.randn(*shape).to(DEVICE).requires_grad_(requires_grad)


def _rand(*shape, dtype, scale=1.0):
    return (_randn(*shape) * scale).to(dtype).requires_grad_()


def _leaf64(ts):
    return [t.detach().double().requires_grad_() if t is not None else None for t in ts]


# (B, L, n_vision): T = 1 (all language / all vision), splits at 0 / all, mid-tile (interpreter BLOCK_M 16/32)
SPLITS = [(1, 1, 0), (1, 1, 1), (1, 37, 0), (1, 37, 37), (1, 37, 21), (3, 50, 67)]


# ---------------------------------------------------------------------------------------------- routed_linear
@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,L,nv", SPLITS)
def test_linear_triton_all_grads(B, L, nv, dtype, poison):
    plan = split_plan(B, L, nv)
    T, K, N = B * L, 40, 56
    x, wv, wl = _rand(T, K, dtype=dtype), _rand(N, K, dtype=dtype, scale=K ** -0.5), _rand(N, K, dtype=dtype, scale=K ** -0.5)
    bv, bl, res = _rand(N, dtype=dtype), _rand(N, dtype=dtype), _rand(T, N, dtype=dtype)
    y = routed_linear(x, wv, wl, plan, bias_vision=bv, bias_language=bl, residual=res, backend="triton")
    ins64 = _leaf64([x, wv, wl, bv, bl, res])
    ref = RL.routed_linear_reference(ins64[0], ins64[1], ins64[2], plan, bias_vision=ins64[3], bias_language=ins64[4],
                                     residual=ins64[5])
    assert y.dtype == dtype and y.shape == (T, N)
    assert rel_err(y, ref) < TOL[dtype]
    dy = _randn(T, N).to(dtype)
    grads = torch.autograd.grad(y, [x, wv, wl, bv, bl, res], dy)
    grads64 = torch.autograd.grad(ref, ins64, dy.double())
    for name, g, r in zip(["dx", "dW_v", "dW_l", "db_v", "db_l", "dresidual"], grads, grads64):
        assert g.dtype == dtype, name
        if r.norm() == 0:  # an expert with no rows: its dW/db must be exactly zero
            assert torch.equal(g, torch.zeros_like(g)), name
        else:
            assert rel_err(g, r) < TOL[dtype], (name, rel_err(g, r))


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("epi", ["plain", "bias_v", "bias_l", "residual", "bias_residual"])
def test_linear_triton_epilogues(epi, dtype, poison):
    plan = split_plan(1, 37, 21, seed=1)
    T, K, N = 37, 72, 24
    x, wv, wl = _rand(T, K, dtype=dtype), _rand(N, K, dtype=dtype, scale=0.1), _rand(N, K, dtype=dtype, scale=0.1)
    kw = {}
    if epi in ("bias_v", "bias_residual"):
        kw["bias_vision"] = _rand(N, dtype=dtype)
    if epi in ("bias_l", "bias_residual"):
        kw["bias_language"] = _rand(N, dtype=dtype)
    if "residual" in epi:
        kw["residual"] = _rand(T, N, dtype=dtype)
    for backend in ("triton", "torch"):
        y = routed_linear(x, wv, wl, plan, backend=backend, **kw)
        names = ["x", "wv", "wl"] + list(kw)
        ins = [x, wv, wl] + list(kw.values())
        ins64 = _leaf64(ins)
        ref = RL.routed_linear_reference(*ins64[:3], plan, **dict(zip(list(kw), ins64[3:])))
        assert rel_err(y, ref) < TOL[dtype], backend
        dy = _randn(T, N).to(dtype)
        for n, g, r in zip(names, torch.autograd.grad(y, ins, dy), torch.autograd.grad(ref, ins64, dy.double())):
            assert rel_err(g, r) < TOL[dtype], (backend, n)


@needs_triton
def test_linear_frozen_weights_and_no_input_grad():
    plan = split_plan(1, 37, 10)
    x = _randn(37, 24, requires_grad=True)
    wv, wl = _randn(40, 24), _randn(40, 24)  # frozen
    bv = _randn(40, requires_grad=True)
    for backend in ("triton", "torch"):
        y = routed_linear(x, wv, wl, plan, bias_vision=bv, backend=backend)
        dx, dbv = torch.autograd.grad(y.sum(), [x, bv])
        ref_dx = torch.cat([torch.ones(10, 40, device=DEVICE) @ wv, torch.ones(27, 40, device=DEVICE) @ wl])
        assert rel_err(dx, ref_dx) < 1e-5
        assert rel_err(dbv, torch.full((40,), 10.0, device=DEVICE)) < 1e-6
    # only weights require grad: dX is skipped, dW still right
    wv.requires_grad_()
    xd = x.detach()
    y = routed_linear(xd, wv, wl, plan, backend="triton")
    (g,) = torch.autograd.grad(y.sum(), [wv])
    assert rel_err(g, torch.ones(40, 10, device=DEVICE) @ xd[:10]) < 1e-5


@needs_triton
def test_wgrad_deterministic_and_poisoned():
    plan = split_plan(3, 50, 67, seed=3)
    dy, x = _randn(150, 56), _randn(150, 40)
    outs = []
    for _ in range(2):
        dwv, dwl = (torch.full((56, 40), float("nan"), device=DEVICE) for _ in range(2))
        dbv, dbl = (torch.full((56,), float("nan"), device=DEVICE) for _ in range(2))
        RL_LAUNCH._launch_wgrad(dy, x, plan.expert_offsets, dwv, dwl, dbv, dbl)
        outs.append((dwv, dwl, dbv, dbl))
    for a, b in zip(*outs):
        assert torch.equal(a, b)  # bitwise: fixed reduction order, no atomics
    dwv, dwl, dbv, dbl = outs[0]
    assert rel_err(dwv, dy[:67].double().t() @ x[:67].double()) < 1e-6
    assert rel_err(dwl, dy[67:].double().t() @ x[67:].double()) < 1e-6
    assert rel_err(dbv, dy[:67].double().sum(0)) < 1e-6 and rel_err(dbl, dy[67:].double().sum(0)) < 1e-6


@needs_triton
def test_real_plan_and_fp16():
    tt = random_token_types(2, 29, images_per_row=(1, 2), image_len=(4, 12), generator=torch.Generator().manual_seed(5))
    plan = RoutingPlan.build(tt.to(DEVICE))
    x = _randn(58, 48).half()
    wv, wl = (_randn(33, 48) * 0.1).half(), (_randn(33, 48) * 0.1).half()
    y = routed_linear(x, wv, wl, plan, backend="triton")
    ref = RL.routed_linear_reference(x, wv, wl, plan)
    assert rel_err(y, ref) < TOL[torch.float16]
    assert rel_err(routed_linear(x.float(), wv.float(), wl.float(), plan, backend="torch"), ref) < 1e-5


# ---------------------------------------------------------------------------------------------- routed_swiglu
@pytest.mark.parametrize("backend", [pytest.param("triton", marks=needs_triton), "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("B,L,nv", [(1, 1, 0), (1, 37, 37), (1, 37, 21), (3, 50, 67)])
def test_swiglu(B, L, nv, recompute, dtype, backend, poison):
    plan = split_plan(B, L, nv, seed=2)
    T, K, I = B * L, 40, 36
    x = _rand(T, K, dtype=dtype)
    ws = [_rand(I, K, dtype=dtype, scale=K ** -0.5) for _ in range(4)]
    y = routed_swiglu(x, *ws, plan, recompute=recompute, backend=backend)
    ins64 = _leaf64([x] + ws)
    ref = RL.routed_swiglu_reference(*ins64, plan)
    assert y.shape == (T, I) and y.dtype == dtype
    assert rel_err(y, ref) < TOL[dtype]
    dy = _randn(T, I).to(dtype)
    names = ["dx", "dWg_v", "dWu_v", "dWg_l", "dWu_l"]
    for n, g, r in zip(names, torch.autograd.grad(y, [x] + ws, dy), torch.autograd.grad(ref, ins64, dy.double())):
        if r.norm() == 0:
            assert torch.equal(g, torch.zeros_like(g)), n
        else:
            assert rel_err(g, r) < TOL[dtype], (n, rel_err(g, r))


# ---------------------------------------------------------------------------------------------- routed_qkv_rope
QKV_CASES = [  # (B, L, nv, H, KV, hd, vision bias, language bias)
    (2, 19, 11, 4, 2, 8, True, False),     # GQA, CogVLM2-style vision-only bias
    (1, 37, 37, 2, 2, 16, False, False),   # MHA, all vision
    (3, 13, 0, 3, 1, 8, True, True),       # GQA 3:1, all language, both biases
    (1, 1, 1, 2, 1, 16, False, True),
    (2, 9, 5, 2, 1, 64, False, True),      # hd/2 = 32 > interpreter BLOCK_N 16: two chunks per half-head
    (1, 23, 9, 1, 1, 48, True, True),      # hd/2 = 24: a full 16-chunk + a padded (masked) one
]


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=needs_triton), "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,L,nv,H,KV,hd,has_bv,has_bl", QKV_CASES)
def test_qkv_rope(B, L, nv, H, KV, hd, has_bv, has_bl, dtype, backend, poison):
    plan = split_plan(B, L, nv, seed=4)
    T, K, N = B * L, 24, (H + 2 * KV) * hd
    x = _rand(T, K, dtype=dtype)
    wv, wl = _rand(N, K, dtype=dtype, scale=K ** -0.5), _rand(N, K, dtype=dtype, scale=K ** -0.5)
    bv = _rand(N, dtype=dtype) if has_bv else None
    bl = _rand(N, dtype=dtype) if has_bl else None
    kw = dict(num_heads=H, num_kv_heads=KV, rope_theta=10000.0)
    q, k, v = routed_qkv_rope(x, wv, wl, plan, bias_vision=bv, bias_language=bl, backend=backend, **kw)
    ins = [t for t in (x, wv, wl, bv, bl) if t is not None]
    ins64 = _leaf64([x, wv, wl, bv, bl])
    refs = RL.routed_qkv_rope_reference(*ins64[:3], plan, bias_vision=ins64[3], bias_language=ins64[4], **kw)
    for name, o, r, heads in zip("qkv", (q, k, v), refs, (H, KV, KV)):
        assert o.shape == (B, heads, L, hd) and o.dtype == dtype, name
        assert o.is_contiguous()
        # element by element (layout: [B, heads, L, hd] at sequence position perm[row])
        atol = 1e-5 if dtype == torch.float32 else 3e-2
        torch.testing.assert_close(o.double(), r.detach(), atol=atol, rtol=atol)
    gs = [torch.randn_like(t) for t in (q, k, v)]
    grads = torch.autograd.grad((q, k, v), ins, gs)
    grads64 = torch.autograd.grad(refs, [t for t in ins64 if t is not None], [g.double() for g in gs])
    for g, r in zip(grads, grads64):
        if r.norm() == 0:
            assert torch.equal(g, torch.zeros_like(g))
        else:
            assert rel_err(g, r) < TOL[dtype]


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=needs_triton), "torch"])
def test_qkv_rope_positions_and_bf16_quirk(backend):
    plan = split_plan(1, 17, 9, seed=6)
    T, K, H, KV, hd = 17, 16, 2, 1, 16
    N = (H + 2 * KV) * hd
    x, wv, wl = _randn(T, K), _randn(N, K) * 0.2, _randn(N, K) * 0.2
    pos = torch.randint(300, 5000, (T,)).to(DEVICE)  # > 256: bf16 rounding changes them
    kw = dict(num_heads=H, num_kv_heads=KV, rope_theta=500000.0)
    out = routed_qkv_rope(x, wv, wl, plan, positions=pos, position_dtype=torch.bfloat16, backend=backend, **kw)
    ref = RL.routed_qkv_rope_reference(x, wv, wl, plan, positions=pos, position_dtype=torch.bfloat16, **kw)
    exact = RL.routed_qkv_rope_reference(x, wv, wl, plan, positions=pos, **kw)
    for o, r, e in zip(out, ref, exact):
        torch.testing.assert_close(o.double(), r, atol=2e-5, rtol=1e-5)
    assert rel_err(out[0], exact[0]) > 1e-4  # the quirk is visible: rounding really happened
    # default positions = plan.routed_position_ids
    out = routed_qkv_rope(x, wv, wl, plan, backend=backend, **kw)
    ref = RL.routed_qkv_rope_reference(x, wv, wl, plan, **kw)
    for o, r in zip(out, ref):
        torch.testing.assert_close(o.double(), r, atol=2e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- backends, errors
def test_torch_backend_matches_reference_real_plan():
    tt = random_token_types(2, 23, images_per_row=(1, 2), image_len=(3, 9), generator=torch.Generator().manual_seed(7))
    plan = RoutingPlan.build(tt.to(DEVICE))
    T = plan.num_tokens
    x, wv, wl, res = _randn(T, 24), _randn(40, 24), _randn(40, 24), _randn(T, 40)
    y = routed_linear(x, wv, wl, plan, residual=res, backend="torch")
    assert rel_err(y, RL.routed_linear_reference(x, wv, wl, plan, residual=res)) < 1e-6


def test_backend_selection(monkeypatch):
    plan = split_plan(1, 5, 2)
    x = _randn(5, 8)
    with pytest.raises(ValueError, match="backend must be one of"):
        RL.select_backend("cuda", x, "linear", 8, 8)
    monkeypatch.setenv("VEXPERT_GEMM_BACKEND", "torch")
    assert RL.select_backend("auto", x, "linear", 8, 8) == "torch"
    routed_linear(x, _randn(4, 8), _randn(4, 8), plan)
    assert RL.last_backend("routed_linear") == "torch"
    monkeypatch.setenv("VEXPERT_GEMM_BACKEND", "bogus")
    with pytest.raises(ValueError, match="VEXPERT_GEMM_BACKEND"):
        routed_linear(x, _randn(4, 8), _randn(4, 8), plan)
    monkeypatch.delenv("VEXPERT_GEMM_BACKEND")
    if HAS_TRITON and DEVICE == "cpu":  # interpreter on, CPU: auto -> our Triton kernels (how CI tests them)
        assert RL.select_backend("auto", x, "linear", 8, 8) == "triton"
        routed_linear(x, _randn(4, 8), _randn(4, 8), plan)
        assert RL.last_backend("routed_linear") == "triton"
    if not RL_API._grouped_mm_available(x.device):  # torch._grouped_mm needs a CUDA device with sm_90+
        with pytest.raises(ValueError, match="grouped_mm"):
            routed_linear(x, _randn(4, 8), _randn(4, 8), plan, backend="grouped_mm")
    with pytest.raises(ValueError, match="op must be one of"):
        RL.last_backend("nope")


def test_bad_inputs():
    plan = split_plan(1, 5, 2)
    x, w = _randn(5, 8), _randn(4, 8)
    with pytest.raises(ValueError, match="weight_language"):
        routed_linear(x, w, _randn(4, 7), plan)
    with pytest.raises(TypeError, match="weight_language"):
        routed_linear(x, w, w.double(), plan)
    with pytest.raises(ValueError, match="weight_vision"):
        routed_linear(x, _randn(4, 9), w, plan)
    with pytest.raises(ValueError, match="x must"):
        routed_linear(_randn(6, 8), w, w, plan)
    with pytest.raises(ValueError, match="x must"):
        routed_linear(_randn(1, 5, 8), w, w, plan)
    with pytest.raises(TypeError, match="x must"):
        routed_linear(x.long(), w, w, plan)
    with pytest.raises(ValueError, match="bias_vision"):
        routed_linear(x, w, w, plan, bias_vision=_randn(5))
    with pytest.raises(ValueError, match="residual"):
        routed_linear(x, w, w, plan, residual=_randn(5, 5))
    with pytest.raises(TypeError, match="plan"):
        routed_linear(x, w, w, object())
    with pytest.raises(ValueError, match="up_language"):
        routed_swiglu(x, w, w, w, _randn(3, 8), plan)
    wq = _randn(32, 8)
    with pytest.raises(ValueError, match="num_heads"):
        routed_qkv_rope(x, wq, wq, plan, num_heads=0, num_kv_heads=1, rope_theta=1e4)
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        routed_qkv_rope(x, wq, wq, plan, num_heads=3, num_kv_heads=2, rope_theta=1e4)
    with pytest.raises(ValueError, match="head_dim"):
        routed_qkv_rope(x, _randn(30, 8), _randn(30, 8), plan, num_heads=2, num_kv_heads=1, rope_theta=1e4)
    with pytest.raises(ValueError, match="positions"):
        routed_qkv_rope(x, wq, wq, plan, num_heads=2, num_kv_heads=1, rope_theta=1e4,
                        positions=torch.arange(4, device=DEVICE))
    with pytest.raises(ValueError, match="rope_theta"):
        routed_qkv_rope(x, wq, wq, plan, num_heads=2, num_kv_heads=1, rope_theta=-1.0)


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=needs_triton), "torch"])
def test_qkv_non_power_of_two_head_dim(backend):
    plan = split_plan(1, 6, 3)
    x, w, w2 = _randn(6, 8), _randn(4 * 12, 8), _randn(4 * 12, 8)
    kw = dict(num_heads=2, num_kv_heads=1, rope_theta=1e4)
    out = routed_qkv_rope(x, w, w2, plan, backend=backend, **kw)  # hd = 12: hd/2 = 6 padded to a 16-wide chunk
    for o, r in zip(out, RL.routed_qkv_rope_reference(x, w, w2, plan, **kw)):
        torch.testing.assert_close(o.double(), r, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- torch.compile / opcheck
def test_opcheck_fake_impls():
    plan = split_plan(1, 9, 4)
    x, wv, wl, b, r = _randn(9, 8), _randn(6, 8), _randn(6, 8), _randn(6), _randn(9, 6)
    torch.library.opcheck(RL_OPS._routed_linear_op, (x, wv, wl, plan.expert_offsets, 4, b, None, r, "torch"),
                          test_utils=("test_schema", "test_faketensor"))
    for recompute in (False, True):
        torch.library.opcheck(RL_OPS._routed_swiglu_op, (x, wv, wv, wl, wl, plan.expert_offsets, 4, recompute, "torch"),
                              test_utils=("test_schema", "test_faketensor"))
    wq = _randn(16, 8)
    torch.library.opcheck(RL_OPS._routed_qkv_rope_op,
                          (x, wq, wq, plan.expert_offsets, 4, None, None, plan.perm,
                           *RL_ROPE._rope_cos_sin(plan.routed_position_ids.float(), RL_ROPE._rope_inv_freq(4, 1e4, x.device)),
                           1, 9, 2, 1, "torch"),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_torch_compile_fullgraph(backend):
    plan = split_plan(2, 7, 5)
    _ = plan.num_vision
    T, K, N, I = 14, 16, 16, 8
    x = _randn(T, K, requires_grad=True)
    wv, wl = _randn(N, K, requires_grad=True), _randn(N, K, requires_grad=True)
    g = [_randn(I, K, requires_grad=True) for _ in range(4)]
    d = [_randn(K, I, requires_grad=True) for _ in range(2)]
    bv = _randn(N, requires_grad=True)

    def layer(x):
        q, k, v = routed_qkv_rope(x, wv, wl, plan, num_heads=2, num_kv_heads=1, rope_theta=1e4, bias_vision=bv,
                                  backend=backend)
        o = (q.sum(1, keepdim=True) + k + v).transpose(1, 2).reshape(T, 4)
        h = routed_linear(x, wv, wl, plan, bias_vision=bv, residual=x[:, :N] * 2, backend=backend)
        a = routed_swiglu(h, *g, plan, backend=backend)
        return routed_linear(a, *d, plan, residual=h, backend=backend).sum() + o.sum()

    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    out_c = compiled(x)
    grads_c = torch.autograd.grad(out_c, [x, wv, bv] + g + d)
    out_e = layer(x)
    grads_e = torch.autograd.grad(out_e, [x, wv, bv] + g + d)
    assert rel_err(out_c, out_e) < 1e-6
    for a, b in zip(grads_c, grads_e):
        assert rel_err(a, b) < 1e-6


# ---------------------------------------------------------------------------------------------- AOT specs
@needs_triton
def test_aot_specs_cover_dispatch():
    specs = RL_AOT.aot_compile_specs()
    names = {s.name for s in specs}
    assert len(names) == len(specs)
    for cc, table in RL_CFG._GEMM_CONFIGS.items():
        for dt_key, cfgs in table.items():
            for key, (BM, BN, BK, GM, nw, ns) in cfgs.items():
                hits = [s for s in specs if s.fn is RL_K._routed_gemm_kernel and s.targets == (cc,)
                        and s.constexprs["BLOCK_M"] == BM and s.constexprs["BLOCK_K"] == BK and s.num_warps == nw]
                assert hits, (cc, dt_key, key)
    epis = {s.constexprs.get("EPILOGUE") for s in specs if s.fn is RL_K._routed_gemm_kernel}
    assert epis == {RL_K.EPI_LINEAR, RL_K.EPI_SWIGLU, RL_K.EPI_SWIGLU_BWD, RL_K.EPI_QKV_ROPE, RL_K.EPI_DSWIGLU}
    # the QKV spec carries the BLOCK_N the launcher really passes (half-head chunk), not the table's maximum
    for s in specs:
        if s.fn is RL_K._routed_gemm_kernel and s.constexprs["EPILOGUE"] == RL_K.EPI_QKV_ROPE:
            hd = s.constexprs["HEAD_DIM"]
            assert s.constexprs["BLOCK_N"] == min(64, max(16, 1 << (hd // 2 - 1).bit_length())), s.name
    assert any(s.fn is RL_K._routed_wgrad_kernel for s in specs)


_AOT_SCRIPT = r"""
import importlib, sys
from vexpert_kernels.compile_report import compile_spec  # same compile + cuobjdump path as the compile report
R = importlib.import_module("vexpert_kernels.ops.routed_linear.aot")
want = sys.argv[1:]
for s in R.aot_compile_specs():
    if s.name in want:
        r = compile_spec(s, s.targets[0])
        print(s.name, r.ok, r.stack_bytes, r.local_bytes, r.registers, r.wgmma, r.mma, r.error)
"""


@needs_triton
def test_aot_compile_gpu_configs_no_spill():
    """Compile GPU specs for sm_90 / sm_80 in a subprocess (the interpreter's kernels cannot be compiled); the QKV +
    RoPE epilogue spilled (255 registers + stack) before it took cos/sin tables and one head per tile."""
    specs = RL_AOT.aot_compile_specs()
    want = [next(s.name for s in specs if s.name.startswith("routed_gemm[swiglu_bwd,bf16") and "sm90" in s.name),
            next(s.name for s in specs if s.name.startswith("routed_wgrad[dw_db,bf16") and "sm80" in s.name),
            next(s.name for s in specs if s.name.startswith("routed_gemm[qkv_bias_v_hd128,bf16") and "sm90" in s.name)]
    env = dict(os.environ, TRITON_INTERPRET="0")
    r = subprocess.run([sys.executable, "-c", _AOT_SCRIPT, *want], capture_output=True, text=True, env=env,
                       timeout=280)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("routed_")]
    assert len(lines) == 3, r.stdout
    for ln in lines:
        name, ok, stack, local, regs, wgmma, mma = ln.split()[:7]
        assert ok == "True", ln
        assert stack == "0" and local == "0", ln  # no spill (cuobjdump STACK/LOCAL)
        assert (wgmma == "True") if "sm90" in name else (mma == "True"), ln  # tensor cores: wgmma on sm_90


# ---------------------------------------------------------------------------------------------- design costs (issue 13)
@needs_triton
@pytest.mark.parametrize("recompute", [False, True])
def test_swiglu_saved_preactivations_no_recompute(recompute, monkeypatch):
    """Default: forward saves gate|up, backward runs ONE dX GEMM (K = 2I) and no EPI_SWIGLU_BWD recompute GEMM."""
    plan = split_plan(1, 37, 21, seed=8)
    x = _randn(37, 24, requires_grad=True)
    ws = [(_randn(20, 24) * 0.2).requires_grad_() for _ in range(4)]
    calls = []
    real = RL_OPS._launch_gemm
    monkeypatch.setattr(RL_OPS, "_launch_gemm", lambda *a, **k: calls.append(k) or real(*a, **k))
    y = routed_swiglu(x, *ws, plan, recompute=recompute, backend="triton")
    fwd = list(calls)
    grads = torch.autograd.grad(y.sum(), [x] + ws)
    bwd = calls[len(fwd):]
    assert [k.get("save_gu") for k in fwd] == [not recompute]
    epis = [k.get("epilogue", RL_K.EPI_LINEAR) for k in bwd]
    assert epis == ([RL_K.EPI_SWIGLU_BWD] if recompute else []) + [RL_K.EPI_LINEAR]
    assert bwd[-1]["k_split"] == 20  # one grouped GEMM over K = 2I
    x64 = _leaf64([x] + ws)
    r64 = torch.autograd.grad(RL.routed_swiglu_reference(*x64, plan).sum(), x64)
    for g, r in zip(grads, r64):
        assert rel_err(g, r) < 1e-5


def test_fp32_precision_follows_torch_setting(monkeypatch):
    monkeypatch.setattr(RL_LAUNCH, "interpret_mode", lambda: False)
    old = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert RL_LAUNCH._precision(torch.float32) == "ieee"
        torch.set_float32_matmul_precision("high")
        assert RL_LAUNCH._precision(torch.float32) == "tf32"
        assert RL_LAUNCH._precision(torch.bfloat16) == "tf32"  # ignored by 16-bit dots
    finally:
        torch.set_float32_matmul_precision(old)


def test_torch_wgrad_stays_in_input_dtype(monkeypatch):
    """The torch path's dW is one GEMM in the input dtype (no fp32 upcast GEMM)."""
    plan = split_plan(1, 9, 4)
    x, dy = _randn(9, 8).bfloat16(), _randn(9, 6).bfloat16()
    w = _randn(6, 8).bfloat16()
    seen = []
    real = torch.matmul
    monkeypatch.setattr(torch, "matmul", lambda a, b, **k: seen.append((a.dtype, b.dtype)) or real(a, b, **k))
    _, dwv, dwl, _, _ = RL_OPS._torch_linear_bwd(dy, x, w, w, 4, False, True, False, False)
    assert seen == [(torch.bfloat16, torch.bfloat16)] * 2 and dwv.dtype == torch.bfloat16
    assert rel_err(dwv, dy[:4].double().t() @ x[:4].double()) < 1e-2

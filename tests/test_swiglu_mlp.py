"""routed_swiglu_mlp: the routed SwiGLU MLP as one op whose backward runs the SwiGLU backward in the epilogue of the
down projection's dX GEMM (EPI_DSWIGLU; the sm_90 TMA variant as an autotune candidate). Forward and every gradient
vs a float64 oracle: fp32 / bf16, odd sizes (I = 36 is not a multiple of the 16-wide interpreter tiles; T and the
expert split ragged), empty experts, T = 1, residual on / off, recompute on / off, NaN-poisoned outputs."""
import importlib
import os

import pytest
import torch

from vexpert_kernels._triton_compat import HAS_TRITON, TRITON_VERSION
from vexpert_kernels.ops import routed_swiglu_mlp
from vexpert_kernels.testing import rel_err

from conftest import DEVICE, HAS_CUDA
from test_routed_linear import RL, RL_K, RL_LAUNCH, RL_OPS, TOL, _leaf64, _randn, split_plan  # noqa: F401

pytestmark = pytest.mark.usefixtures("fp32_highest")
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")

MLP = importlib.import_module("vexpert_kernels.ops.routed_linear.mlp")
API = importlib.import_module("vexpert_kernels.ops.routed_linear.api")
autotune = importlib.import_module("vexpert_kernels.autotune")


def _version(v):
    return tuple(int(p) for p in (v or "0.0").split(".")[:2] if p.isdigit())


# the sm_90 kernels run through the >= 3.9 interpreter (tensor descriptors) or on an sm_90 GPU
_SM90_OK = HAS_TRITON and (
    (not HAS_CUDA and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") and _version(TRITON_VERSION) >= (3, 9))
    or (HAS_CUDA and torch.cuda.get_device_capability()[0] == 9))
needs_sm90 = pytest.mark.skipif(not _SM90_OK, reason="needs the Triton >= 3.9 interpreter or an sm_90 GPU")


@pytest.fixture
def poison(monkeypatch):
    monkeypatch.setattr(RL_LAUNCH, "_POISON_OUTPUTS", True)


def _weights(K, I, D, dtype):
    """(gate_v, up_v, down_v, gate_l, up_l, down_l), leaf tensors with requires_grad."""
    shapes = [(I, K), (I, K), (D, I)] * 2
    return [(_randn(*s) * s[1] ** -0.5).to(dtype).requires_grad_() for s in shapes]


def _check(plan, T, K, I, D, dtype, backend, recompute, with_res, seed=0):
    torch.manual_seed(seed)
    x = _randn(T, K).to(dtype).requires_grad_()
    ws = _weights(K, I, D, dtype)
    res = _randn(T, D).to(dtype).requires_grad_() if with_res else None
    y = routed_swiglu_mlp(x, *ws, plan, residual=res, recompute=recompute, backend=backend)
    ins = [x] + ws + ([res] if with_res else [])
    ins64 = _leaf64(ins)
    ref = RL.routed_swiglu_mlp_reference(*ins64[:7], plan, residual=ins64[7] if with_res else None)
    assert y.shape == (T, D) and y.dtype == dtype
    assert rel_err(y, ref) < TOL[dtype], rel_err(y, ref)
    dy = _randn(T, D).to(dtype)
    names = ["dx", "dWg_v", "dWu_v", "dWd_v", "dWg_l", "dWu_l", "dWd_l", "dres"]
    for n, g, r in zip(names, torch.autograd.grad(y, ins, dy), torch.autograd.grad(ref, ins64, dy.double())):
        assert g.shape == r.shape and g.dtype == dtype, n
        if r.norm() == 0:  # an expert without rows: exact zeros, every element written
            assert torch.equal(g, torch.zeros_like(g)), n
        else:
            assert rel_err(g, r) < TOL[dtype], (n, rel_err(g, r))


# (B, L, n_vision): T = 1 (all language / all vision), empty vision, empty language, ragged split
CASES = [(1, 1, 0), (1, 1, 1), (1, 37, 0), (1, 37, 37), (3, 13, 22)]


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=needs_triton), "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,L,nv", CASES)
def test_forward_and_grads(B, L, nv, dtype, backend, poison):
    plan = split_plan(B, L, nv, seed=B + L + nv)
    # residual and recompute vary with the case (every combination is covered across CASES)
    i = CASES.index((B, L, nv))
    _check(plan, B * L, 24, 36, 40, dtype, backend, recompute=i % 2 == 1, with_res=i % 3 != 1)


@needs_triton
@pytest.mark.parametrize("recompute,with_res", [(False, False), (True, True)])
def test_forward_and_grads_more(recompute, with_res, poison):
    _check(split_plan(2, 19, 11, seed=5), 38, 40, 20, 24, torch.bfloat16, "triton", recompute, with_res, seed=1)


@needs_triton
@pytest.mark.parametrize("recompute", [False, True])
def test_fused_backward_path(recompute, monkeypatch):
    """Saved gu: the backward's first GEMM is the EPI_DSWIGLU one (dh never stored: no elementwise pass), then ONE
    dX GEMM with K = 2I; recompute keeps the two-op path (dh GEMM, then the EPI_SWIGLU_BWD recompute GEMM)."""
    plan = split_plan(1, 37, 21, seed=8)
    x = _randn(37, 24, requires_grad=True)
    ws = _weights(24, 20, 24, torch.float32)
    calls = []
    for mod in (RL_OPS, MLP):
        real = mod._launch_gemm
        monkeypatch.setattr(mod, "_launch_gemm", lambda *a, _r=real, **k: calls.append(k) or _r(*a, **k))
    elementwise = []
    real_ew = RL_OPS._launch_swiglu_bwd_elementwise
    monkeypatch.setattr(RL_OPS, "_launch_swiglu_bwd_elementwise", lambda *a: elementwise.append(1) or real_ew(*a))
    y = routed_swiglu_mlp(x, *ws, plan, recompute=recompute, backend="triton")
    n_fwd = len(calls)
    grads = torch.autograd.grad(y.sum(), [x] + ws)
    epis = [k.get("epilogue", RL_K.EPI_LINEAR) for k in calls[n_fwd:]]
    if recompute:
        assert epis == [RL_K.EPI_LINEAR, RL_K.EPI_SWIGLU_BWD, RL_K.EPI_LINEAR]
    else:
        assert epis == [RL_K.EPI_DSWIGLU, RL_K.EPI_LINEAR] and not elementwise
    assert calls[-1]["k_split"] == 20
    ins64 = _leaf64([x] + ws)
    for g, r in zip(grads, torch.autograd.grad(RL.routed_swiglu_mlp_reference(*ins64, plan).sum(), ins64)):
        assert rel_err(g, r) < 1e-5


@needs_triton
def test_frozen_weights_and_no_input_grad():
    plan = split_plan(1, 21, 9, seed=4)
    x = _randn(21, 16)
    ws = _weights(16, 24, 16, torch.float32)
    for w in ws[:2] + ws[3:5]:
        w.requires_grad_(False)
    y = routed_swiglu_mlp(x, *ws, plan, backend="triton")
    gd = torch.autograd.grad(y.square().sum(), [ws[2], ws[5]])
    ins64 = _leaf64([x] + ws)
    r = torch.autograd.grad(RL.routed_swiglu_mlp_reference(*ins64, plan).square().sum(), [ins64[3], ins64[6]])
    assert all(rel_err(a, b) < 1e-5 for a, b in zip(gd, r))


# ---------------------------------------------------------------------------------------------- sm_90 variant
def _dgu_ref(dy, wv, wl, gu, nv):
    I = wv.shape[1]
    dh = torch.cat([dy[:nv].double() @ wv.double(), dy[nv:].double() @ wl.double()])
    g, u = gu[:, :I].double(), gu[:, I:].double()
    s = torch.sigmoid(g)
    return torch.cat([dh * u * s * (1 + g * (1 - s)), dh * g * s], 1)


@needs_sm90
@pytest.mark.parametrize("T,nv,D,I", [(37, 13, 24, 40), (20, 0, 16, 24), (19, 19, 40, 8), (1, 1, 16, 16)])
def test_sm90_dx_dswiglu(T, nv, D, I):
    """The TMA kernel: g/u/dgate/dup descriptors of width I (I = 40, 24, 8: partial column tiles stop at I)."""
    from vexpert_kernels.ops.gemm_sm90.configs import INTERP_CONFIGS, SM90_DSWIGLU_CONFIGS
    from vexpert_kernels.ops.gemm_sm90.launch import grouped_dx_dswiglu_sm90
    dt = torch.bfloat16
    dy, wv, wl, gu = (_randn(*s).to(dt) for s in ((T, D), (D, I), (D, I), (T, 2 * I)))
    off = torch.tensor([0, nv, T], dtype=torch.int32, device=DEVICE)
    ref = _dgu_ref(dy, wv, wl, gu, nv)
    for cfg in (SM90_DSWIGLU_CONFIGS if HAS_CUDA else INTERP_CONFIGS):
        out = torch.full((T, 2 * I), float("nan"), dtype=dt, device=DEVICE)
        dgu = grouped_dx_dswiglu_sm90(dy, wv, wl, gu, off, config=cfg, out=out)
        assert rel_err(dgu, ref) < 1e-2, cfg.name
    with pytest.raises(ValueError, match="gu"):
        grouped_dx_dswiglu_sm90(dy, wv, wl, gu[:, :I], off)


@pytest.fixture
def fake_select(monkeypatch):
    """autotune.select that runs every candidate against the reference, records, and picks by prefix."""
    calls = []

    def select(op, key, candidates, reference, *, static, dtype):
        ref = reference()
        ok = {}
        for n, fn in candidates.items():
            out = fn()
            ok[n] = all(rel_err(o, r) < 2e-2 for o, r in zip(*((out, ref) if isinstance(out, tuple)
                                                                else ((out,), (ref,)))))
        calls.append(dict(op=op, key=key, names=list(candidates), static=static, ok=ok))
        want = select.pick.get(op)
        return next((n for n in candidates if want and n.startswith(want)), static)
    select.pick = {}
    monkeypatch.setattr(autotune, "select", select)
    monkeypatch.setattr(API, "select_backend", lambda backend, x, *a, **k: "auto")  # as on CUDA
    return select, calls


@needs_triton
@pytest.mark.parametrize("pick", ["triton:", "sm90:", "torch"])
def test_auto_tunes_fused_dx_step(fake_select, pick):
    """backend="auto": the dX + SwiGLU-backward step is one autotune.select ("routed_swiglu_mlp_dx", static torch,
    reference = dY W then the elementwise formula) over torch, our Triton configs and the sm_90 launcher."""
    if pick == "sm90:" and not _SM90_OK:
        pytest.skip("sm_90 kernels need the Triton >= 3.9 interpreter or an sm_90 GPU")
    select, calls = fake_select
    select.pick = {"routed_swiglu": "triton:", "routed_linear": "triton:", "routed_swiglu_mlp_dx": pick,
                   "routed_linear_dw": "triton:"}
    plan = split_plan(1, 37, 21, seed=3)
    dt = torch.bfloat16
    x = _randn(37, 32).to(dt).requires_grad_()
    ws = _weights(32, 24, 16, dt)
    res = _randn(37, 16).to(dt).requires_grad_()
    y = routed_swiglu_mlp(x, *ws, plan, residual=res)
    assert [c["op"] for c in calls] == ["routed_swiglu", "routed_linear"]
    assert RL.last_backend("routed_swiglu_mlp").startswith("auto/triton:")
    dy = _randn(37, 16).to(dt)
    grads = torch.autograd.grad(y, [x] + ws + [res], dy)
    dx_call = next(c for c in calls if c["op"] == "routed_swiglu_mlp_dx")
    assert dx_call["static"] == "torch" and dx_call["names"][0] == "torch"
    assert dx_call["key"] == ("bfloat16", 24, 16, "dswiglu", False, False, 64)
    assert any(n.startswith("triton:") for n in dx_call["names"])
    assert any(n.startswith("sm90:") for n in dx_call["names"]) == _SM90_OK
    assert all(dx_call["ok"].values()), dx_call["ok"]
    ins64 = _leaf64([x] + ws + [res])
    ref = RL.routed_swiglu_mlp_reference(*ins64[:7], plan, residual=ins64[7])
    assert rel_err(y, ref) < TOL[dt]
    for g, r in zip(grads, torch.autograd.grad(ref, ins64, dy.double())):
        assert rel_err(g, r) < TOL[dt]


@needs_triton
@pytest.mark.skipif(HAS_CUDA, reason="CPU dispatch rule")
def test_auto_on_cpu_runs_triton_through_the_interpreter():
    plan = split_plan(1, 9, 4)
    y = routed_swiglu_mlp(_randn(9, 16), *_weights(16, 8, 16, torch.float32), plan)
    assert RL.last_backend("routed_swiglu_mlp") == "triton" and y.shape == (9, 16)


@needs_sm90
def test_sm90_candidates_offered_for_dx_ops():
    """The sm_90 launcher's dX candidates are checked on the dy [T, N] @ W [N, K] orientation (N != K here)."""
    tun = importlib.import_module("vexpert_kernels.ops.routed_linear.tuning")
    ln = next(ln for ln in tun._extra_candidates if ln.prefix == "sm90")
    dy, w = _randn(5, 16).bfloat16(), _randn(16, 40).bfloat16()
    assert ln.configs("routed_linear_dx", dy, w) and ln.configs("routed_swiglu_mlp_dx", dy, w)
    assert not ln.configs("routed_swiglu_mlp_dx", dy, _randn(16, 36).bfloat16())  # 36 * 2 B: no TMA alignment


# ---------------------------------------------------------------------------------------------- errors, compile
def test_bad_inputs():
    plan = split_plan(1, 5, 2)
    x = _randn(5, 8)
    g, d = _randn(6, 8), _randn(4, 6)
    with pytest.raises(ValueError, match="down_vision"):
        routed_swiglu_mlp(x, g, g, _randn(4, 5), g, g, d, plan)
    with pytest.raises(ValueError, match="down_language"):
        routed_swiglu_mlp(x, g, g, d, g, g, _randn(3, 6), plan)
    with pytest.raises(TypeError, match="down_language"):
        routed_swiglu_mlp(x, g, g, d, g, g, d.double(), plan)
    with pytest.raises(ValueError, match="up_language"):
        routed_swiglu_mlp(x, g, g, d, g, _randn(6, 7), d, plan)
    with pytest.raises(ValueError, match="gate_vision"):
        routed_swiglu_mlp(x, _randn(6, 9), g, d, g, g, d, plan)
    with pytest.raises(ValueError, match="residual"):
        routed_swiglu_mlp(x, g, g, d, g, g, d, plan, residual=_randn(5, 5))
    with pytest.raises(TypeError, match="recompute"):
        routed_swiglu_mlp(x, g, g, d, g, g, d, plan, recompute=1)
    with pytest.raises(ValueError, match="backend"):
        routed_swiglu_mlp(x, g, g, d, g, g, d, plan, backend="cublas")
    with pytest.raises(ValueError, match="grouped_mm"):
        routed_swiglu_mlp(x, g, g, d, g, g, d, plan, backend="grouped_mm")
    with pytest.raises(ValueError, match="x must"):
        routed_swiglu_mlp(_randn(6, 8), g, g, d, g, g, d, plan)
    with pytest.raises(TypeError, match="plan"):
        routed_swiglu_mlp(x, g, g, d, g, g, d, object())


def test_opcheck_fake_impls():
    plan = split_plan(1, 9, 4)
    x, g, d, r = _randn(9, 8), _randn(6, 8), _randn(5, 6), _randn(9, 5)
    for recompute, res in ((False, r), (True, None)):
        args = (x, g, g, g, g, d, d, plan.expert_offsets, 4, res, recompute, "torch", "torch")
        torch.library.opcheck(MLP._routed_swiglu_mlp_op, args, test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_torch_compile_fullgraph(backend):
    plan = split_plan(2, 7, 5)
    _ = plan.num_vision
    T, K, I = 14, 16, 8
    x = _randn(T, K, requires_grad=True)
    ws = _weights(K, I, K, torch.float32)

    def layer(x):
        return routed_swiglu_mlp(x, *ws, plan, residual=x, backend=backend).square().sum()

    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    out_c = compiled(x)
    grads_c = torch.autograd.grad(out_c, [x] + ws)
    out_e = layer(x)
    grads_e = torch.autograd.grad(out_e, [x] + ws)
    assert rel_err(out_c, out_e) < 1e-6
    for a, b in zip(grads_c, grads_e):
        assert rel_err(a, b) < 1e-6

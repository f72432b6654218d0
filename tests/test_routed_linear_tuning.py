"""backend="auto" tuning hook of the routed GEMMs (CPU: a fake autotune.select records the candidates) and bad /
strided inputs on the Triton path (issue 12)."""
import importlib

import pytest
import torch

from vexpert_kernels._triton_compat import HAS_TRITON
from vexpert_kernels.ops import routed_linear, routed_qkv_rope, routed_swiglu
from vexpert_kernels.testing import rel_err

from conftest import DEVICE
# same tiny plans on the test device; the fp32_highest fixture (conftest) keeps fp32 torch matmuls off TF32 on CUDA
from test_routed_linear import RL, _randn, split_plan  # noqa: E402,F401

pytestmark = pytest.mark.usefixtures("fp32_highest")

autotune = importlib.import_module("vexpert_kernels.autotune")
API = importlib.import_module("vexpert_kernels.ops.routed_linear.api")
TUN = importlib.import_module("vexpert_kernels.ops.routed_linear.tuning")
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")


def _close(a, b, tol):
    if isinstance(a, torch.Tensor):
        return a.shape == b.shape and (a.numel() == 0 or rel_err(a, b.double()) < tol)
    return all(_close(u, v, tol) for u, v in zip(a, b))


@pytest.fixture
def fake_select(monkeypatch):
    """autotune.select that runs every candidate, checks it against the reference, records, picks ``pick``."""
    calls = []

    def select(op, key, candidates, reference, *, static, dtype):
        ref = reference()
        outs = {n: fn() for n, fn in candidates.items()}
        calls.append(dict(op=op, key=key, names=list(candidates), static=static, dtype=dtype,
                          ok={n: _close(o, ref, 1e-4) for n, o in outs.items()}))
        want = select.pick.get(op)
        return next((n for n in candidates if want and n.startswith(want)), static)
    select.pick = {}
    monkeypatch.setattr(autotune, "select", select)
    monkeypatch.setattr(API, "select_backend", lambda backend, x, *a, **k: "auto")  # as on CUDA
    return select, calls


@needs_triton
def test_auto_linear_candidates_forward_dx_dw(fake_select):
    select, calls = fake_select
    select.pick = {"routed_linear": "triton:", "routed_linear_dx": "triton:", "routed_linear_dw": "torch"}
    plan = split_plan(1, 37, 21, seed=3)
    x = _randn(37, 24, requires_grad=True)
    wv, wl = (_randn(40, 24) * 0.2).requires_grad_(), (_randn(40, 24) * 0.2).requires_grad_()
    bv, res = _randn(40, requires_grad=True), _randn(37, 40, requires_grad=True)
    res0 = res.detach().clone()
    y = routed_linear(x, wv, wl, plan, bias_vision=bv, residual=res)
    assert torch.equal(res.detach(), res0)  # no candidate wrote into the residual
    fwd = calls[0]
    assert fwd["op"] == "routed_linear" and fwd["static"] == "torch" and fwd["dtype"] == torch.float32
    assert fwd["key"] == ("float32", 40, 24, "residual", True, True, 64)
    tri = [n for n in fwd["names"] if n.startswith("triton:")]
    assert fwd["names"][0] == "torch" and 1 <= len(tri) <= 4 and "grouped_mm" not in fwd["names"]  # CPU: no grouped_mm
    # fp32 tables share one tile; 16-bit shape classes time 2-4 configs
    assert 2 <= len(TUN.triton_configs("routed_linear", torch.device("cpu"), torch.bfloat16)) <= 4
    assert all(fwd["ok"].values()), fwd["ok"]
    assert RL.last_backend("routed_linear").startswith("auto/triton:")
    grads = torch.autograd.grad(y.sum(), [x, wv, wl, bv, res])
    ops = [c["op"] for c in calls[1:]]
    assert ops == ["routed_linear_dx", "routed_linear_dw"]
    for c in calls[1:]:
        assert c["names"][0] == "torch" and any(n.startswith("triton:") for n in c["names"]) and all(c["ok"].values())
    ins64 = [t.detach().double().requires_grad_() for t in (x, wv, wl, bv, res)]
    ref = RL.routed_linear_reference(*ins64[:3], plan, bias_vision=ins64[3], residual=ins64[4])
    assert rel_err(y, ref) < 1e-5
    for g, r in zip(grads, torch.autograd.grad(ref.sum(), ins64)):
        assert rel_err(g, r) < 1e-5


@needs_triton
def test_auto_swiglu_and_qkv_candidates(fake_select):
    select, calls = fake_select
    select.pick = {"routed_swiglu": "triton:", "routed_qkv_rope": "triton:"}
    plan = split_plan(2, 9, 7, seed=5)
    x = _randn(18, 16)
    ws = [_randn(12, 16) * 0.3 for _ in range(4)]
    h = routed_swiglu(x, *ws, plan)
    assert calls[-1]["op"] == "routed_swiglu" and all(calls[-1]["ok"].values())
    assert calls[-1]["key"][3] == "swiglu_save"
    assert rel_err(h, RL.routed_swiglu_reference(x, *ws, plan)) < 1e-5
    wq = _randn(4 * 8, 16) * 0.3
    out = routed_qkv_rope(x, wq, wq * 0.5, plan, num_heads=2, num_kv_heads=1, rope_theta=1e4)
    assert calls[-1]["op"] == "routed_qkv_rope" and all(calls[-1]["ok"].values())
    assert any(n.startswith("triton:") for n in calls[-1]["names"])
    for o, r in zip(out, RL.routed_qkv_rope_reference(x, wq, wq * 0.5, plan, num_heads=2, num_kv_heads=1,
                                                       rope_theta=1e4)):
        torch.testing.assert_close(o.double(), r, atol=1e-5, rtol=1e-5)


def test_extra_candidates_registry(fake_select, monkeypatch):
    """A registered launcher's configs join the candidates with one entry, and the chosen one really runs."""
    select, calls = fake_select
    ran = []

    def run(op, config, **t):
        ran.append((op, config))
        return t["x"] @ t["wv"].t() * 0 + (t["x"][:, :1] * 0 + config)  # deliberately wrong: the check sees it
    monkeypatch.setattr(TUN, "_extra_candidates", [TUN.ExtraLauncher("fake", lambda op, x, w: {"c1": 1.0}, run)])
    monkeypatch.setattr(API, "_extra_candidates", TUN._extra_candidates)
    plan = split_plan(1, 5, 2)
    x, w = _randn(5, 8), _randn(4, 8)
    routed_linear(x, w, w, plan)
    assert "fake:c1" in calls[-1]["names"] and calls[-1]["ok"]["fake:c1"] is False and calls[-1]["ok"]["torch"]
    select.pick = {"routed_linear": "fake:"}
    y = routed_linear(x, w, w, plan)
    assert RL.last_backend("routed_linear") == "auto/fake:c1" and ran[-1] == ("routed_linear", 1.0)
    assert torch.equal(y, torch.ones(5, 4, device=DEVICE))


def test_backend_names_round_trip():
    cfg = (128, 256, 64, 8, 8, 3)
    assert TUN.parse_backend(TUN.config_name(cfg)) == ("triton", cfg, False)
    assert TUN.parse_backend("auto/" + TUN.wgrad_config_name((64, 128, 128, 8, 3))) == ("triton", (64, 128, 128, 8, 3),
                                                                                         True)
    assert TUN.parse_backend("torch") == ("torch", None, False)
    assert TUN.token_bucket(37) == 64 and TUN.token_bucket(64) == 64 and TUN.token_bucket(1) == 1


# ---------------------------------------------------------------------------------------------- strided inputs
@needs_triton
def test_strided_bias_residual_x_weights_triton():
    """Strided views on the Triton path (the old epilogue read bias_ptr + col: wrong for a strided bias)."""
    plan = split_plan(1, 21, 9, seed=2)
    T, K, N = 21, 16, 12
    x_big, w_big = _randn(T, 2 * K), _randn(K, 3 * N)
    x = x_big[:, ::2]                     # column-strided x
    wv = w_big[:, :N].t()                 # transposed view [N, K], stride (1, 3N)
    wl = _randn(N, 2 * K)[:, 1::2]   # column-strided weight
    bv, bl = _randn(2 * N)[::2], _randn(3 * N)[1::3]   # strided biases
    res = _randn(N, T).t()           # transposed residual
    y = routed_linear(x, wv, wl, plan, bias_vision=bv, bias_language=bl, residual=res, backend="triton")
    ref = RL.routed_linear_reference(x, wv, wl, plan, bias_vision=bv, bias_language=bl, residual=res)
    assert rel_err(y, ref) < 1e-5
    wq = _randn(4 * 8, 32)[:, ::2]
    bq = _randn(64)[::2]
    kw = dict(num_heads=2, num_kv_heads=1, rope_theta=1e4)
    out = routed_qkv_rope(x, wq, wq, plan, bias_vision=bq, backend="triton", **kw)
    for o, r in zip(out, RL.routed_qkv_rope_reference(x, wq, wq, plan, bias_vision=bq, **kw)):
        torch.testing.assert_close(o.double(), r, atol=1e-5, rtol=1e-5)


def test_bad_inputs_named_before_any_kernel():
    plan = split_plan(1, 5, 2)
    x, w = _randn(5, 8), _randn(4, 8)
    with pytest.raises(ValueError, match="backend must be one of"):
        routed_swiglu(x, w, w, w, w, plan, backend="cuda")
    with pytest.raises(TypeError, match="backend must be a str"):
        routed_linear(x, w, w, plan, backend=None)
    with pytest.raises(TypeError, match="recompute"):
        routed_swiglu(x, w, w, w, w, plan, recompute="yes")
    with pytest.raises(TypeError, match="bias_language"):
        routed_linear(x, w, w, plan, bias_language=_randn(4).double())
    with pytest.raises(ValueError, match="rope_theta"):
        routed_qkv_rope(x, _randn(32, 8), _randn(32, 8), plan, num_heads=2, num_kv_heads=1,
                        rope_theta=float("inf"))
    with pytest.raises(TypeError, match="num_heads"):
        routed_qkv_rope(x, _randn(32, 8), _randn(32, 8), plan, num_heads=2.0, num_kv_heads=1,
                        rope_theta=1e4)
    with pytest.raises(TypeError, match="x must"):
        routed_linear([[1.0]], w, w, plan)

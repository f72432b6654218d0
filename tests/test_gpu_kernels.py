"""CUDA-only checks (``gpu`` marker; skipped without a GPU -- a skip is not a pass):

* a CUDA run really launches our compiled Triton kernels (torch.profiler sees their names), forward and backward;
* every op at a real, ragged CogVLM shape, forward and backward, backend="triton" vs the plain-PyTorch path in the
  same dtype against a float32 oracle (error <= 2x the PyTorch bf16 error + a floor), outputs NaN-free;
* 64-bit addressing: tensors with more than 2^31 elements (routed linear fwd/dX/dW, attention fwd/bwd).
"""
import importlib
import pkgutil

import pytest
import torch

pytestmark = pytest.mark.gpu

CUDA = torch.cuda.is_available()
DEV = "cuda"  # module-level so the helpers can be smoke-run on CPU (interpreter) by patching it


def _our_kernel_names() -> set:
    """Names of every @triton.jit / autotuned kernel defined in vexpert_kernels.ops (any module layout)."""
    from triton.runtime.jit import KernelInterface  # JITFunction, InterpretedFunction, Autotuner, Heuristics
    import vexpert_kernels.ops as ops
    names = set()
    mods = [ops] + [importlib.import_module(m.name) for m in pkgutil.walk_packages(ops.__path__, ops.__name__ + ".")]
    for mod in mods:
        for obj in vars(mod).values():
            if not isinstance(obj, KernelInterface):
                continue
            fn = obj
            while hasattr(fn, "fn"):  # wrappers -> ... -> the decorated Python function, whose name the kernel has
                fn = fn.fn
            names.add(fn.__name__)
    return names


def _launched(fn) -> set:
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return {e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA}


def _plan(B, L, n_img, device, offset=1):
    from vexpert_kernels.routing import RoutingPlan
    tt = torch.zeros(B, L, dtype=torch.long)
    for b in range(B):
        s = offset + (b % 3)
        tt[b, s:s + n_img] = 1
    return RoutingPlan.build(tt.to(device))


def _rand(*shape, dtype=torch.bfloat16, scale=1.0, grad=True):
    # bf16-rounded values whatever the dtype, so a float32 copy built from the same seed is the exact oracle input
    return (torch.randn(*shape, device=DEV) * scale).to(torch.bfloat16).to(dtype).requires_grad_(grad)


def _layer_ops(B=2, L=200, D=256, I=344, H=4, KV=2, hd=64, dtype=torch.bfloat16, backend="triton", n_img=77):
    """(name, thunk returning outputs) for each op at a ragged shape; inputs built once (same values per seed)."""
    from functools import partial
    from vexpert_kernels.ops import (mixed_attention, rmsnorm, routed_linear, routed_qkv_rope, routed_swiglu,
                                     routed_swiglu_mlp)
    r = partial(_rand, dtype=dtype)
    plan = _plan(B, L, n_img, DEV)
    T, N = B * L, (H + 2 * KV) * hd
    x, wv, wl = r(T, D), r(N, D, scale=D ** -0.5), r(N, D, scale=D ** -0.5)
    xo, wo1, wo2, res = r(T, H * hd), r(D, H * hd, scale=(H * hd) ** -0.5), r(D, H * hd, scale=(H * hd) ** -0.5), \
        r(T, D)
    g1, u1, g2, u2 = (r(I, D, scale=D ** -0.5) for _ in range(4))
    d1, d2 = r(D, I, scale=I ** -0.5), r(D, I, scale=I ** -0.5)
    q, k, v = r(B, H, L, hd), r(B, KV, L, hd), r(B, KV, L, hd)
    nw = r(D)
    return [
        ("routed_linear", lambda: routed_linear(xo, wo1, wo2, plan, residual=res, backend=backend)),
        ("routed_swiglu", lambda: routed_swiglu(x, g1, u1, g2, u2, plan, backend=backend)),
        ("routed_swiglu_mlp", lambda: routed_swiglu_mlp(x, g1, u1, d1, g2, u2, d2, plan, residual=res,
                                                        backend=backend)),
        ("routed_qkv_rope", lambda: routed_qkv_rope(x, wv, wl, plan, num_heads=H, num_kv_heads=KV, rope_theta=1e4,
                                                    backend=backend)),
        ("mixed_attention", lambda: mixed_attention(q, k, v, plan, backend=backend if backend == "triton" else "math")),
        ("rmsnorm", lambda: rmsnorm(x, nw, 1e-5, backend=backend)),
    ]


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_cuda_run_launches_our_triton_kernels():
    ours = _our_kernel_names()
    assert len(ours) >= 4, f"found only {sorted(ours)} @triton.jit kernels in vexpert_kernels.ops"
    missing = []
    for name, thunk in _layer_ops():
        out = thunk()  # compile outside the profile
        outs = out if isinstance(out, tuple) else (out,)
        torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
        fwd = _launched(thunk)
        outs = thunk()
        outs = outs if isinstance(outs, tuple) else (outs,)
        bwd = _launched(lambda: torch.autograd.backward(outs, [torch.ones_like(o) for o in outs]))
        if not (fwd & ours):
            missing.append(f"{name} forward launched {sorted(fwd)[:8]}")
        if not (bwd & ours):
            missing.append(f"{name} backward launched {sorted(bwd)[:8]}")
    assert not missing, "CUDA run did not launch our Triton kernels: " + "; ".join(missing)


def _grads_of(thunk, leaves, seed=1):
    for t in leaves:
        t.grad = None
    out = thunk()
    outs = out if isinstance(out, tuple) else (out,)
    g = torch.Generator(device=DEV).manual_seed(seed)
    torch.autograd.backward(outs, [torch.randn(o.shape, device=DEV, generator=g).to(o.dtype) for o in outs])
    return [o.detach().float() for o in outs] + [t.grad.float() if t.grad is not None else None for t in leaves]


def _rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("op", ["routed_linear", "routed_swiglu", "routed_swiglu_mlp", "routed_qkv_rope",
                                "mixed_attention", "rmsnorm"])
def test_real_ragged_shape_fwd_bwd_matches_torch(op):
    """CogVLM-17B widths (D=4096, hd=128, I=11008) at 2 x 1031 ragged tokens, image 517 tokens at shifted offsets."""
    torch.manual_seed(0)
    kw = dict(B=2, L=1031, D=4096, I=11008, H=32, KV=32, hd=128, n_img=517)
    ops_tr = dict(_layer_ops(backend="triton", **kw))
    torch.manual_seed(0)
    ops_32 = dict(_layer_ops(backend="torch", dtype=torch.float32, **kw))
    torch.manual_seed(0)
    ops_bf = dict(_layer_ops(backend="torch", **kw))

    def leaves(thunk):
        cl = thunk.__closure__ or ()
        seen = []
        for c in cl:
            v = c.cell_contents
            if isinstance(v, torch.Tensor) and v.requires_grad and all(v is not s for s in seen):
                seen.append(v)
        return seen
    got = _grads_of(ops_tr[op], leaves(ops_tr[op]))
    want = _grads_of(ops_32[op], leaves(ops_32[op]))
    base = _grads_of(ops_bf[op], leaves(ops_bf[op]))
    for i, (g, w, b) in enumerate(zip(got, want, base)):
        if w is None:
            continue
        assert g is not None and torch.isfinite(g).all(), f"{op} output/grad {i} missing or non-finite"
        err, ref_err = _rel(g, w), _rel(b, w)
        assert err <= 2 * ref_err + 2e-3, f"{op} output/grad {i}: rel err {err:.3g} > 2x torch bf16 {ref_err:.3g}"


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_routed_linear_beyond_2_31_elements():
    """out/dY [T, N] with T*N > 2^31 elements: rows past the 32-bit boundary must be right (fwd, dX, dW)."""
    N, K = 4096, 64
    T = 2 ** 31 // N + 4099  # 528387 rows: 2.16e9 output elements
    _check_routed_linear_big(T, N, K, step=65536)
    assert T * N > 2 ** 31


def _check_routed_linear_big(T, N, K, step):
    from vexpert_kernels.ops import routed_linear
    from vexpert_kernels.routing import RoutingPlan
    tt = torch.zeros(1, T, dtype=torch.long)
    tt[0, 1:T // 2 + 13] = 1
    plan = RoutingPlan.build(tt.to(DEV))
    nv = int(plan.num_vision)
    x = _rand(T, K)
    wv, wl = _rand(N, K, scale=K ** -0.5), _rand(N, K, scale=K ** -0.5)
    y = routed_linear(x, wv, wl, plan, backend="triton")
    assert y.shape == (T, N)
    dy = torch.randn(T, N, device=DEV, dtype=torch.bfloat16)
    y.backward(dy)
    y = y.detach()
    gx, gwv, gwl = x.grad, wv.grad, wl.grad
    x, wv, wl = x.detach(), wv.detach(), wl.detach()
    dx_ref = torch.empty(T, K, device=DEV)
    dwv_ref = torch.zeros(N, K, device=DEV)
    dwl_ref = torch.zeros(N, K, device=DEV)
    worst = 0.0
    for s in range(0, T, step):
        e = min(T, s + step)
        for lo, hi, w, dw in ((s, min(e, nv), wv, dwv_ref), (max(s, nv), e, wl, dwl_ref)):
            if lo >= hi:
                continue
            ref = x[lo:hi].float() @ w.float().t()
            worst = max(worst, float((y[lo:hi].float() - ref).abs().max() / ref.abs().max()))
            dx_ref[lo:hi] = dy[lo:hi].float() @ w.float()
            dw += dy[lo:hi].float().t() @ x[lo:hi].float()
    assert worst < 2e-2, f"forward rel max err {worst:.3g}"
    assert _rel(gx.float()[-step:], dx_ref[-step:]) < 1e-2  # rows past 2^31 / N
    assert _rel(gx.float(), dx_ref) < 1e-2
    assert _rel(gwv.float(), dwv_ref) < 1e-2 and _rel(gwl.float(), dwl_ref) < 1e-2


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_attention_beyond_2_31_elements():
    """q/k/v/out [B, H, L, hd] with B*H*L*hd > 2^31: the last batches (past the 32-bit boundary) fwd and bwd."""
    B, H, L, hd = 2100, 32, 256, 128
    assert B * H * L * hd > 2 ** 31
    _check_attention_big(B, H, L, hd)


def _check_attention_big(B, H, L, hd):
    from vexpert_kernels.ops import mixed_attention
    q, k, v = (torch.randn(B, H, L, hd, device=DEV, dtype=torch.bfloat16) for _ in range(3))
    for t in (q, k, v):
        t.requires_grad_(True)
    out = mixed_attention(q, k, v, backend="triton")
    do = torch.randn_like(out)
    out.backward(do)
    for sl in (slice(0, 2), slice(B - 3, B)):
        qs, ks, vs = (t.detach()[sl].float().requires_grad_(True) for t in (q, k, v))
        ref = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=True)
        ref.backward(do[sl].float())
        assert _rel(out[sl].float(), ref) < 1e-2, f"forward batches {sl}"
        for name, g, r in (("dq", q.grad, qs.grad), ("dk", k.grad, ks.grad), ("dv", v.grad, vs.grad)):
            assert _rel(g[sl].float(), r) < 2e-2, f"{name} batches {sl}"

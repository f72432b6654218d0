"""Attention output straight in the routing plan's row order (``out_index=``): forward, lse and every gradient
against float64, on our kernel (interpreter on CPU; CUDA tensors in bf16 when there is a GPU) and on the torch backends
(scatter, CPU), padded and packed."""
import pytest
import torch

from vexpert_kernels.ops.attention import last_backend, mixed_attention, mixed_attention_varlen
from vexpert_kernels.ops.flash_attention import launch as fa_launch
from vexpert_kernels.routing import RoutingPlan
from vexpert_kernels.testing import random_token_types, rel_err
from conftest import DEVICE, HAS_CUDA

TRITON_DTYPE = torch.bfloat16 if HAS_CUDA else torch.float32  # our Triton attention: fp32 only in the interpreter
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def _where(backend):
    """(device, dtype) a case runs in: our kernel on the test device, the torch backends on CPU in fp32."""
    return (DEVICE, TRITON_DTYPE) if backend == "triton" else ("cpu", torch.float32)


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(fa_launch, "_POISON_OUTPUTS", True)


def _plan_inputs(B=2, L=11, H=4, KV=2, hd=16, dtype=torch.float32, pad=True, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    tt = random_token_types(B, L, images_per_row=(1, 2), image_len=(2, 5), generator=g)
    keep = torch.ones(B, L, dtype=torch.bool)
    if pad:
        keep[0, :2] = False   # left padding
        keep[1, -3:] = False  # right padding
    tt, keep = tt.to(device), keep.to(device)
    plan = RoutingPlan.build(tt, keep)
    q = torch.randn(B, H, L, hd, generator=g, dtype=dtype).to(device)
    k = torch.randn(B, KV, L, hd, generator=g, dtype=dtype).to(device)
    v = torch.randn(B, KV, L, hd, generator=g, dtype=dtype).to(device)
    return plan, keep, q, k, v


def _grads(out, lse, inputs, seed=3):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.device)
    loss = (out.double() * w).sum()
    if lse is not None:
        fin = torch.isfinite(lse)
        loss = loss + (lse.double()[fin] * 0.37).sum()
    return torch.autograd.grad(loss, inputs)


@pytest.mark.parametrize("backend", ["triton", "math", "sdpa"])
@pytest.mark.parametrize("mode", ["causal", "bidirectional"])
def test_routed_output_matches_permuted_reference(backend, mode):
    dev, dtype = _where(backend)
    tol = TOL[dtype]
    plan, keep, q, k, v = _plan_inputs(dtype=dtype, device=dev)
    B, H, L, hd = q.shape
    spans = plan.image_span_ids if mode == "bidirectional" else None
    kw = dict(key_padding_mask=keep, image_span_ids=spans, image_attention=mode)
    lse_wanted = backend != "sdpa"
    qs, ks, vs = (t.clone().requires_grad_() for t in (q, k, v))
    res = mixed_attention(qs, ks, vs, backend=backend, return_lse=lse_wanted, out_index=plan.inv_perm.view(B, L),
                          **kw)
    out, lse = res if lse_wanted else (res, None)
    assert last_backend() == backend
    assert out.shape == (B * L, H * hd)
    # float64 oracle, then the two copies the block does today
    qd, kd, vd = (t.double().requires_grad_() for t in (q, k, v))
    ref, rlse = mixed_attention(qd, kd, vd, backend="math", return_lse=True, **kw)
    ref = plan.permute(ref.transpose(1, 2).reshape(B, L, H * hd))
    assert rel_err(out, ref) < tol
    if lse is not None:
        fin = torch.isfinite(rlse)
        assert torch.equal(fin, torch.isfinite(lse)) and rel_err(lse[fin], rlse[fin]) < tol
    got = _grads(out, lse, (qs, ks, vs))
    want = _grads(ref, rlse if lse is not None else None, (qd, kd, vd))
    for name, a, b in zip("qkv", got, want):
        assert rel_err(a, b) < (tol if dtype == torch.float32 else 4 * tol), name


def test_routed_triton_half_precision_and_no_padding():
    plan, keep, q, k, v = _plan_inputs(B=3, L=9, pad=False, dtype=torch.bfloat16, seed=1, device=DEVICE)
    B, H, L, hd = q.shape
    out = mixed_attention(q, k, v, backend="triton", out_index=plan.inv_perm.view(B, L))
    plain = mixed_attention(q, k, v, backend="triton")
    assert torch.equal(out, plan.permute(plain.transpose(1, 2).reshape(B, L, H * hd)))  # same kernel, same bits


@pytest.mark.parametrize("backend", ["triton", "math"])
def test_routed_varlen(backend):
    dev, dtype = _where(backend)
    tol = TOL[dtype]
    g = torch.Generator().manual_seed(2)
    lens = [5, 1, 7]
    T, H, KV, hd = sum(lens), 2, 1, 16
    cu = torch.tensor([0, 5, 6, 13], device=dev)
    q, k, v = (torch.randn(T, h, hd, generator=g).to(dev, dtype).requires_grad_() for h in (H, KV, KV))
    span = torch.zeros(T, dtype=torch.int32, device=dev)
    span[7:11] = 1
    inv = torch.randperm(T, generator=g).to(dev)
    kw = dict(image_span_ids=span, image_attention="bidirectional")
    out, lse = mixed_attention_varlen(q, k, v, cu, cu, 7, 7, return_lse=True, out_index=inv, backend=backend, **kw)
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, rlse = mixed_attention_varlen(qd, kd, vd, cu, cu, 7, 7, return_lse=True, backend="math", **kw)
    ref = torch.zeros(T, H * hd, dtype=torch.float64, device=dev).index_copy(0, inv, ref.reshape(T, H * hd))
    assert rel_err(out, ref) < tol and rel_err(lse, rlse) < tol
    for a, b in zip(_grads(out, lse, (q, k, v)), _grads(ref, rlse, (qd, kd, vd))):
        assert rel_err(a, b) < (tol if dtype == torch.float32 else 4 * tol)


@pytest.mark.parametrize("bad,exc,phrase", [
    (lambda B, L: torch.arange(B * L), ValueError, "shape"),
    (lambda B, L: torch.zeros(B, L, dtype=torch.long), ValueError, "permutation"),
    (lambda B, L: torch.arange(B * L).view(B, L) + 1, ValueError, "permutation"),
    (lambda B, L: torch.arange(B * L).view(B, L).float(), TypeError, "integer"),
])
def test_bad_out_index(bad, exc, phrase, monkeypatch):
    if HAS_CUDA:  # CUDA index values are checked on the device only under VEXPERT_DEBUG=1
        monkeypatch.setenv("VEXPERT_DEBUG", "1")
    plan, keep, q, k, v = _plan_inputs(dtype=TRITON_DTYPE, device=DEVICE)
    B, L = plan.batch_size, plan.seq_len
    with pytest.raises(exc, match=phrase):
        mixed_attention(q, k, v, backend="triton", out_index=bad(B, L).to(DEVICE))

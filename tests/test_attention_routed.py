"""Attention output straight in the routing plan's row order (``out_index=``): forward, lse and every gradient
against float64, on our kernel (interpreter) and on the torch backends (scatter), padded and packed."""
import pytest
import torch

from vexpert_kernels.ops.attention import last_backend, mixed_attention, mixed_attention_varlen
from vexpert_kernels.ops.flash_attention import launch as fa_launch
from vexpert_kernels.routing import RoutingPlan
from vexpert_kernels.testing import random_token_types, rel_err


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(fa_launch, "_POISON_OUTPUTS", True)


def _plan_inputs(B=2, L=11, H=4, KV=2, hd=16, dtype=torch.float32, pad=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    tt = random_token_types(B, L, images_per_row=(1, 2), image_len=(2, 5), generator=g)
    keep = torch.ones(B, L, dtype=torch.bool)
    if pad:
        keep[0, :2] = False   # left padding
        keep[1, -3:] = False  # right padding
    plan = RoutingPlan.build(tt, keep)
    q = torch.randn(B, H, L, hd, generator=g, dtype=dtype)
    k = torch.randn(B, KV, L, hd, generator=g, dtype=dtype)
    v = torch.randn(B, KV, L, hd, generator=g, dtype=dtype)
    return plan, keep, q, k, v


def _grads(out, lse, inputs, seed=3):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out.shape, generator=g, dtype=torch.float64)
    loss = (out.double() * w).sum()
    if lse is not None:
        fin = torch.isfinite(lse)
        loss = loss + (lse.double()[fin] * 0.37).sum()
    return torch.autograd.grad(loss, inputs)


@pytest.mark.parametrize("backend", ["triton", "math", "sdpa"])
@pytest.mark.parametrize("mode", ["causal", "bidirectional"])
def test_routed_output_matches_permuted_reference(backend, mode):
    plan, keep, q, k, v = _plan_inputs()
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
    assert rel_err(out, ref) < 1e-5
    if lse is not None:
        fin = torch.isfinite(rlse)
        assert torch.equal(fin, torch.isfinite(lse)) and rel_err(lse[fin], rlse[fin]) < 1e-5
    got = _grads(out, lse, (qs, ks, vs))
    want = _grads(ref, rlse if lse is not None else None, (qd, kd, vd))
    for name, a, b in zip("qkv", got, want):
        assert rel_err(a, b) < 1e-5, name


def test_routed_triton_half_precision_and_no_padding():
    plan, keep, q, k, v = _plan_inputs(B=3, L=9, pad=False, dtype=torch.bfloat16, seed=1)
    B, H, L, hd = q.shape
    out = mixed_attention(q, k, v, backend="triton", out_index=plan.inv_perm.view(B, L))
    plain = mixed_attention(q, k, v, backend="triton")
    assert torch.equal(out, plan.permute(plain.transpose(1, 2).reshape(B, L, H * hd)))  # same kernel, same bits


@pytest.mark.parametrize("backend", ["triton", "math"])
def test_routed_varlen(backend):
    g = torch.Generator().manual_seed(2)
    lens = [5, 1, 7]
    T, H, KV, hd = sum(lens), 2, 1, 16
    cu = torch.tensor([0, 5, 6, 13])
    q = torch.randn(T, H, hd, generator=g, requires_grad=True)
    k = torch.randn(T, KV, hd, generator=g, requires_grad=True)
    v = torch.randn(T, KV, hd, generator=g, requires_grad=True)
    span = torch.zeros(T, dtype=torch.int32)
    span[7:11] = 1
    inv = torch.randperm(T, generator=g)
    kw = dict(image_span_ids=span, image_attention="bidirectional")
    out, lse = mixed_attention_varlen(q, k, v, cu, cu, 7, 7, return_lse=True, out_index=inv, backend=backend, **kw)
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, rlse = mixed_attention_varlen(qd, kd, vd, cu, cu, 7, 7, return_lse=True, backend="math", **kw)
    ref = torch.zeros(T, H * hd, dtype=torch.float64).index_copy(0, inv, ref.reshape(T, H * hd))
    assert rel_err(out, ref) < 1e-5 and rel_err(lse, rlse) < 1e-5
    for a, b in zip(_grads(out, lse, (q, k, v)), _grads(ref, rlse, (qd, kd, vd))):
        assert rel_err(a, b) < 1e-5


@pytest.mark.parametrize("bad,exc,phrase", [
    (lambda B, L: torch.arange(B * L), ValueError, "shape"),
    (lambda B, L: torch.zeros(B, L, dtype=torch.long), ValueError, "permutation"),
    (lambda B, L: torch.arange(B * L).view(B, L) + 1, ValueError, "permutation"),
    (lambda B, L: torch.arange(B * L).view(B, L).float(), TypeError, "integer"),
])
def test_bad_out_index(bad, exc, phrase):
    plan, keep, q, k, v = _plan_inputs()
    B, L = plan.batch_size, plan.seq_len
    with pytest.raises(exc, match=phrase):
        mixed_attention(q, k, v, backend="triton", out_index=bad(B, L))

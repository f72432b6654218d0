"""mixed_attention / mixed_attention_varlen: our Triton kernel (interpreter) and every CPU backend vs a float64 oracle.

The oracle is the math backend run on float64 inputs; its mask comes from ``attention_keep_mask``, which is itself
checked against a per-element Python loop of the rule. Shapes stay small: the interpreter runs tiles in numpy.
"""
import math

import pytest
import torch

from vexpert_kernels.ops.attention import api as att_api
from vexpert_kernels.ops.attention import backends as att_backends
from vexpert_kernels.ops.attention import dispatch as att
from vexpert_kernels.ops.flash_attention import api as fa_api
from vexpert_kernels.ops.flash_attention import configs as fa_configs
from vexpert_kernels.ops.flash_attention import kernels as fa_kernels
from vexpert_kernels.ops.flash_attention import launch as fa_launch
from vexpert_kernels.ops.flash_attention import masks as fa_masks
from vexpert_kernels.ops import available_attention_backends, mixed_attention, mixed_attention_varlen
from vexpert_kernels.routing import RoutingPlan
from vexpert_kernels.testing import rel_err
from conftest import DEVICE, HAS_CUDA

TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 2e-2}
# our Triton attention runs fp32 only under the CPU interpreter; on CUDA it takes fp16/bf16 (GPU tiles sized for 2-byte
# inputs), so the "fp32" Triton cases run in bf16 there, against the same float64 oracle with the bf16 tolerance
TRITON_DTYPE = torch.bfloat16 if HAS_CUDA else torch.float32
cpu_interpreter_only = pytest.mark.skipif(HAS_CUDA, reason="checks the CPU interpreter's behaviour (tiles / dispatch)")


pytestmark = pytest.mark.usefixtures("fp32_highest")  # conftest: no TF32 in fp32 comparisons on CUDA


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    # every Triton output buffer starts as NaN: an element a kernel forgets to write fails the comparison
    monkeypatch.setattr(fa_launch, "_POISON_OUTPUTS", True)


def _cpu_backends():
    avail = available_attention_backends()
    return [b for b in ("triton", "sdpa", "flex", "math") if avail[b] is None]


def _make(B, H, KV, Lq, Lk, hd, dtype=torch.float32, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Lq, hd, generator=g).to(dtype).to(device)
    k = torch.randn(B, KV, Lk, hd, generator=g).to(dtype).to(device)
    v = torch.randn(B, KV, Lk, hd, generator=g).to(dtype).to(device)
    return q, k, v


def _make_triton(B, H, KV, Lq, Lk, hd, dtype=None, seed=0):
    """Inputs for a Triton-kernel test: on the test device, fp32 on CPU / bf16 on CUDA unless ``dtype`` is given."""
    return _make(B, H, KV, Lq, Lk, hd, dtype or TRITON_DTYPE, seed, device=DEVICE)


def _mask_loop(B, Lq, Lk, kpm, span, bidir):
    """The visibility rule, element by element (independent of attention_keep_mask's vectorised code)."""
    off = Lk - Lq
    keep = torch.zeros(B, Lq, Lk, dtype=torch.bool)
    for b in range(B):
        for i in range(Lq):
            for j in range(Lk):
                ok = j <= off + i
                if bidir and span is not None and j >= off:
                    si, sj = int(span[b, i]), int(span[b, j - off])
                    # same contiguous run of one nonzero id
                    lo, hi = min(i, j - off), max(i, j - off)
                    ok = ok or (si != 0 and all(int(span[b, t]) == si for t in range(lo, hi + 1)))
                if kpm is not None:
                    ok = ok and bool(kpm[b, j])
                keep[b, i, j] = ok
    return keep


def _grads(out, lse, q, k, v, seed=1):
    g = torch.Generator().manual_seed(seed)
    do = torch.randn(out.shape, generator=g).to(out.dtype).to(out.device)
    loss = (out.float() * do.float()).sum()
    dl = None
    if lse is not None:
        dl = torch.randn(lse.shape, generator=g).to(lse.device)
        loss = loss + (torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse)) * dl).sum()
    return torch.autograd.grad(loss, (q, k, v)), do, dl


def _check(backend, q, k, v, *, with_lse=True, with_grad=True, dtype_tol=None, **kw):
    """Run ``backend`` and the float64 math oracle on the same inputs; compare out, lse and dq/dk/dv."""
    tol = dtype_tol or TOL[q.dtype]
    qs, ks, vs = (t.clone().requires_grad_(with_grad) for t in (q, k, v))
    res = mixed_attention(qs, ks, vs, return_lse=with_lse, backend=backend, **kw)
    out, lse = res if with_lse else (res, None)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert torch.isfinite(out).all()
    q64, k64, v64 = (t.detach().double().requires_grad_(with_grad) for t in (q, k, v))
    ref, ref_lse = mixed_attention(q64, k64, v64, return_lse=True, backend="math", **kw)
    assert rel_err(out, ref) < tol, (backend, rel_err(out, ref))
    if with_lse:
        assert lse.dtype == torch.float32 and lse.shape == q.shape[:3]
        assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse)), "rows with no visible key must give lse=-inf"
        fin = torch.isfinite(ref_lse)
        assert rel_err(lse[fin], ref_lse[fin]) < tol
    if with_grad:
        grads, do, dl = _grads(out, lse, qs, ks, vs)
        loss = (ref * do.double()).sum()
        if dl is not None:
            loss = loss + (torch.where(torch.isfinite(ref_lse), ref_lse, torch.zeros_like(ref_lse)).double()
                           * dl.double()).sum()
        ref_grads = torch.autograd.grad(loss, (q64, k64, v64))
        for name, gr, rg in zip("qkv", grads, ref_grads):
            assert gr.shape == rg.shape and torch.isfinite(gr).all(), f"d{name} not finite ({backend})"
            assert rel_err(gr, rg) < 4 * tol, (backend, f"d{name}", rel_err(gr, rg))
    return out, lse


def _spans(B, Lq, runs, device="cpu"):
    s = torch.zeros(B, Lq, dtype=torch.int32)
    for b, start, stop, sid in runs:
        s[b, start:stop] = sid
    return s.to(device)


# ---------------------------------------------------------------------------------------------------- the mask rule
def test_keep_mask_matches_loop():
    B, Lq, Lk = 2, 9, 12
    kpm = torch.ones(B, Lk, dtype=torch.bool)
    kpm[0, :2] = False
    kpm[1, -1] = False
    # row 0: two spans with the same id separated by text (= two different images), row 1: span at the row end
    span = _spans(B, Lq, [(0, 1, 3, 1), (0, 5, 7, 1), (1, 6, 9, 4)])
    for bidir in (False, True):
        got = att_backends.attention_keep_mask(B, Lq, Lk, "cpu", kpm, span, bidir)[:, 0]
        assert torch.equal(got, _mask_loop(B, Lq, Lk, kpm, span, bidir))
    assert not torch.equal(att_backends.attention_keep_mask(B, Lq, Lk, "cpu", kpm, span, True),
                           att_backends.attention_keep_mask(B, Lq, Lk, "cpu", kpm, span, False))


def test_span_bounds():
    span = torch.tensor([[0, 3, 3, 0, 3, 5, 5, 5, 0, 2]])
    canon = fa_masks.canonical_span_ids(span)
    assert canon.tolist() == [[0, 1, 1, 0, 2, 3, 3, 3, 0, 4]]
    start, end = fa_masks.span_bounds(canon)
    assert start.tolist() == [[0, 1, 1, 3, 4, 5, 5, 5, 8, 9]]
    assert end.tolist() == [[1, 3, 3, 4, 5, 8, 8, 8, 9, 10]]


# ---------------------------------------------------------------------------------------------------- triton kernel
TRITON_CASES = {
    # name: (B, H, KV, Lq, Lk, hd, mask builder)
    "causal": (2, 2, 2, 33, 33, 16, None),
    "gqa_kv_offset": (1, 4, 1, 20, 45, 32, None),
    "decode_lq1": (2, 2, 1, 1, 37, 16, None),
    "left_right_pad_gqa": (2, 4, 2, 40, 40, 16, "pad"),
    "bidir_spans_pad": (2, 2, 1, 45, 45, 16, "bidir"),
    "bidir_kv_offset": (1, 2, 2, 30, 50, 32, "bidir_off"),
}


def _case_kwargs(kind, B, Lq, Lk, device="cpu"):
    if kind is None:
        return {}
    kpm = torch.ones(B, Lk, dtype=torch.bool, device=device)
    if kind == "pad":
        kpm[0, :13] = False          # left padding: query rows 0..12 see nothing -> 0, lse -inf
        kpm[1, -7:] = False          # right padding
        return {"key_padding_mask": kpm}
    if kind == "bidir":
        kpm[1, :5] = False
        span = _spans(B, Lq, [(0, 2, 9, 1), (0, 14, 31, 2), (0, 33, 35, 3), (1, 5, 20, 1), (1, 38, 45, 2)], device)
        return {"key_padding_mask": kpm, "image_span_ids": span, "image_attention": "bidirectional"}
    if kind == "bidir_off":
        span = _spans(B, Lq, [(0, 0, 6, 1), (0, 10, 27, 2)], device)
        return {"image_span_ids": span, "image_attention": "bidirectional"}
    raise AssertionError(kind)


@pytest.mark.parametrize("case", list(TRITON_CASES))
def test_triton_matches_reference(case):
    B, H, KV, Lq, Lk, hd, kind = TRITON_CASES[case]
    q, k, v = _make_triton(B, H, KV, Lq, Lk, hd)
    kw = _case_kwargs(kind, B, Lq, Lk, DEVICE)
    out, lse = _check("triton", q, k, v, **kw)
    if kind == "pad":
        assert (out[0, :, :13] == 0).all() and torch.isinf(lse[0, :, :13]).all()
    if kind in ("bidir", "bidir_off"):  # the image mask must matter for this case, or the test proves nothing
        causal = mixed_attention(q, k, v, backend="math", key_padding_mask=kw.get("key_padding_mask"))
        assert rel_err(causal, out) > 1e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_half_precision(dtype):
    q, k, v = _make_triton(2, 2, 1, 24, 30, 32, dtype)
    kpm = torch.ones(2, 30, dtype=torch.bool, device=DEVICE)
    kpm[1, :4] = False
    span = _spans(2, 24, [(0, 3, 12, 1), (1, 16, 24, 1)], DEVICE)
    _check("triton", q, k, v, key_padding_mask=kpm, image_span_ids=span, image_attention="bidirectional")


def test_triton_head_dim_80():
    q, k, v = _make_triton(1, 2, 1, 20, 20, 80)  # padded to BLOCK_D=128 with masking
    _check("triton", q, k, v)


def test_triton_transposed_layout_and_default_scale():
    # [B, L, H, hd] storage viewed as [B, H, L, hd] (what a fused QKV projection produces)
    q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in _make_triton(1, 2, 2, 18, 18, 16))
    assert not q.is_contiguous()
    _check("triton", q, k, v, softmax_scale=0.3, with_lse=False)


@pytest.mark.parametrize("cfg", [
    {"fwd": (32, 16, 4, 1), "dq": (16, 32, 4, 1), "dkdv": (16, 32, 4, 1)},
    {"fwd": (16, 32, 4, 1), "dq": (32, 16, 4, 1), "dkdv": (32, 16, 4, 1)},
], ids=["m32n16", "m16n32"])
@cpu_interpreter_only  # patches the interpreter's tile table; the GPU tables are rectangular already
def test_triton_rectangular_tiles(monkeypatch, cfg):
    # GPU configs use BLOCK_M != BLOCK_N: tile-range arithmetic (skipping, interior/edge split) must not assume squares
    monkeypatch.setattr(fa_configs, "_INTERPRET_CONFIG", cfg)
    B, Lq, Lk = 2, 41, 53
    q, k, v = _make(B, 2, 1, Lq, Lk, 16)
    kpm = torch.ones(B, Lk, dtype=torch.bool)
    kpm[0, :20] = False
    kpm[1, -3:] = False
    span = _spans(B, Lq, [(0, 0, 5, 1), (0, 9, 30, 2), (1, 17, 41, 1)])
    _check("triton", q, k, v, key_padding_mask=kpm, image_span_ids=span, image_attention="bidirectional")
    _check("triton", q, k, v, with_lse=False)


@pytest.mark.parametrize("case", ["gqa_kv_offset", "left_right_pad_gqa", "bidir_spans_pad"])
def test_triton_deterministic_backward_matches_reference(case):
    """The two-kernel (no atomics) backward behind deterministic=True; the default one-pass backward is what
    test_triton_matches_reference checks."""
    B, H, KV, Lq, Lk, hd, kind = TRITON_CASES[case]
    q, k, v = _make_triton(B, H, KV, Lq, Lk, hd)
    _check("triton", q, k, v, deterministic=True, **_case_kwargs(kind, B, Lq, Lk, DEVICE))


def test_triton_backward_deterministic():
    q, k, v = _make_triton(1, 4, 1, 20, 20, 16)
    runs = {True: [], False: []}
    for det in (True, True, False):
        qs, ks, vs = (t.clone().requires_grad_() for t in (q, k, v))
        out = mixed_attention(qs, ks, vs, backend="triton", deterministic=det)
        runs[det].append(torch.autograd.grad(out.sum(), (qs, ks, vs)))
    for a, b in zip(*runs[True]):
        assert torch.equal(a, b)
    tol = 1e-6 if q.dtype == torch.float32 else 1e-2  # bf16 on CUDA: one rounding of the output apart
    for a, b in zip(runs[True][0], runs[False][0]):  # one-pass vs two-kernel: same numbers up to fp32 summation order
        assert rel_err(a, b) < tol


# ---------------------------------------------------------------------------------------------------- other backends
@pytest.mark.parametrize("backend", [b for b in _cpu_backends() if b != "triton"])
@pytest.mark.parametrize("case", list(TRITON_CASES))
def test_cpu_backends_match_reference(backend, case):
    B, H, KV, Lq, Lk, hd, kind = TRITON_CASES[case]
    q, k, v = _make(B, H, KV, Lq, Lk, hd)
    kw = _case_kwargs(kind, B, Lq, Lk)
    _check(backend, q, k, v, with_lse=backend != "sdpa", with_grad=backend != "flex", **kw)


@pytest.mark.parametrize("backend", [b for b in _cpu_backends() if b != "triton"])
def test_cpu_backends_bf16(backend):
    q, k, v = _make(2, 2, 1, 20, 26, 16, torch.bfloat16)
    kpm = torch.ones(2, 26, dtype=torch.bool)
    kpm[0, :8] = False
    _check(backend, q, k, v, with_lse=backend != "sdpa", with_grad=backend != "flex", key_padding_mask=kpm,
           image_span_ids=_spans(2, 20, [(1, 4, 15, 1)]), image_attention="bidirectional")


def test_flex_on_cpu_refuses_grad():
    if available_attention_backends()["flex"] is not None:
        pytest.skip("flex unavailable")
    q, k, v = (t.requires_grad_() for t in _make(1, 2, 1, 8, 8, 16))
    with pytest.raises(ValueError, match="backward on CPU"):
        mixed_attention(q, k, v, backend="flex")


def test_attn_bias_replaces_masks():
    q, k, v = _make(1, 2, 2, 10, 10, 16)
    bias = torch.randn(1, 1, 10, 10)
    bias[..., 3] = float("-inf")
    ref = mixed_attention(q.double(), k.double(), v.double(), attn_bias=bias.double(), backend="math")
    # no causal mask applied on top: query 0 sees key 9
    scores = torch.softmax((q.double() @ k.double().transpose(-1, -2)) / 4 + bias.double(), -1)
    assert rel_err(ref, scores @ v.double()) < 1e-12
    assert rel_err(mixed_attention(q, k, v, attn_bias=bias, backend="sdpa"), ref) < 1e-5
    for be in ("triton", "flex"):
        with pytest.raises(ValueError, match="attn_bias"):
            mixed_attention(q, k, v, attn_bias=bias, backend=be)


# ---------------------------------------------------------------------------------------------------- varlen
def _varlen_inputs(lq, lk, H, KV, hd, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(3)
    cq = torch.tensor([0] + lq).cumsum(0).to(torch.int32).to(device)
    ck = torch.tensor([0] + lk).cumsum(0).to(torch.int32).to(device)
    q = torch.randn(sum(lq), H, hd, generator=g).to(dtype).to(device)
    k = torch.randn(sum(lk), KV, hd, generator=g).to(dtype).to(device)
    v = torch.randn(sum(lk), KV, hd, generator=g).to(dtype).to(device)
    return q, k, v, cq, ck


@pytest.mark.parametrize("mode", ["causal", "bidirectional"])
@pytest.mark.parametrize("backend", [b for b in _cpu_backends() if b != "flex"])
def test_varlen_matches_reference(backend, mode):
    lq, lk = [1, 17, 30, 6], [1, 17, 34, 11]  # the last two have a KV-cache offset
    # the Triton case runs on the test device (bf16 on CUDA, with the bf16 tolerance); the others on CPU in fp32
    dev, dtype = (DEVICE, TRITON_DTYPE) if backend == "triton" else ("cpu", torch.float32)
    tol = 1e-5 if dtype == torch.float32 else TOL[dtype]
    q, k, v, cq, ck = _varlen_inputs(lq, lk, 4, 2, 16, dtype, dev)
    # spans: one crossing the boundary between sequences 1 and 2 (must be cut there), one at a sequence end
    span = torch.zeros(sum(lq), dtype=torch.int32, device=dev)
    span[10:24] = 7
    span[40:48] = 2
    span[50:] = 1
    kw = dict(image_span_ids=span, image_attention=mode)
    want_lse = backend != "sdpa"
    qs, ks, vs = (t.clone().requires_grad_() for t in (q, k, v))
    res = mixed_attention_varlen(qs, ks, vs, cq, ck, max(lq), max(lk), return_lse=want_lse, backend=backend, **kw)
    out, lse = res if want_lse else (res, None)
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    # oracle: each sequence separately through the padded math path, spans restricted to the sequence
    refs, ref_lses = [], []
    for s in range(len(lq)):
        a, b_, c, d = int(cq[s]), int(cq[s + 1]), int(ck[s]), int(ck[s + 1])
        r, rl = mixed_attention(q64[a:b_].transpose(0, 1)[None], k64[c:d].transpose(0, 1)[None],
                                v64[c:d].transpose(0, 1)[None], image_span_ids=span[a:b_][None],
                                image_attention=mode, return_lse=True, backend="math")
        refs.append(r[0].transpose(0, 1))
        ref_lses.append(rl[0])
    ref, ref_lse = torch.cat(refs), torch.cat(ref_lses, 1)
    assert out.shape == q.shape and rel_err(out, ref) < tol
    if want_lse:
        assert lse.shape == (4, sum(lq)) and rel_err(lse, ref_lse) < tol
    do = torch.randn_like(out)
    loss, ref_loss = (out * do).sum(), (ref * do.double()).sum()
    if want_lse:  # lse is differentiable too (folded into the backward's D = rowsum(dO*O) - dlse)
        dl = torch.randn_like(lse)
        loss, ref_loss = loss + (lse * dl).sum(), ref_loss + (ref_lse * dl.double()).sum()
    grads = torch.autograd.grad(loss, (qs, ks, vs))
    ref_grads = torch.autograd.grad(ref_loss, (q64, k64, v64))
    for gr, rg in zip(grads, ref_grads):
        assert rel_err(gr, rg) < 4 * tol


def test_varlen_triton_bf16():
    lq = [5, 19]
    q, k, v, cq, ck = _varlen_inputs(lq, lq, 2, 1, 16, torch.bfloat16, DEVICE)
    out = mixed_attention_varlen(q, k, v, cq, ck, 19, 19, backend="triton")
    ref = mixed_attention_varlen(q.double(), k.double(), v.double(), cq, ck, 19, 19, backend="math")
    assert rel_err(out, ref) < 1e-2


# ---------------------------------------------------------------------------------------------------- plan + dispatch
def test_plan_defaults():
    tt = torch.zeros(2, 24, dtype=torch.long)
    tt[0, 3:12] = 1
    tt[1, 15:24] = 1
    am = torch.ones(2, 24, dtype=torch.long)
    am[1, :4] = 0  # left padding
    plan = RoutingPlan.build(tt, am)
    q, k, v = _make(2, 2, 2, 24, 24, 16)
    got = mixed_attention(q, k, v, plan, image_attention="bidirectional", backend="math")
    want = mixed_attention(q, k, v, key_padding_mask=plan.attention_mask, image_span_ids=plan.image_span_ids,
                           image_attention="bidirectional", backend="math")
    assert torch.equal(got, want)
    # prefill chunk: the last 10 positions as queries, spans come from the plan's last columns
    got = mixed_attention(q[:, :, -10:], k, v, plan, image_attention="bidirectional", backend="math")
    assert torch.equal(got, want[:, :, -10:])


@cpu_interpreter_only  # asserts what auto picks under the interpreter and runs fp32 Triton attention on CPU tensors
def test_auto_and_env_override(monkeypatch):
    q, k, v = _make(1, 2, 1, 8, 8, 16)
    monkeypatch.delenv(att.ENV_VAR, raising=False)
    base = dict(device="cpu", dtype=torch.float32, head_dim=16, gqa=True, kv_offset=False, padding=False,
                bidir=False, bias=False, need_lse=False, varlen=False)
    req = att._Request(**base)
    # CPU under the interpreter: auto runs our kernel wherever it serves (CI tests it), else torch
    assert att._select_backend("auto", req) == "triton"
    assert att._select_backend("auto", att._Request(**dict(base, need_lse=True))) == "triton"
    assert att._select_backend("auto", att._Request(**dict(base, bidir=True, padding=True))) == "triton"
    assert att._select_backend("auto", att._Request(**dict(base, head_dim=160))) == "sdpa"
    assert att._select_backend("auto", att._Request(**dict(base, head_dim=160, need_lse=True))) == "math"
    assert att._select_backend("auto", att._Request(**dict(base, device="cuda"))) == "auto"  # tuned by the caller
    monkeypatch.setenv(att.ENV_VAR, "triton")
    assert att._select_backend("auto", req) == "triton"
    calls = []
    monkeypatch.setattr(att_api, "flash_attention", lambda *a, **kw: calls.append(1) or fa_api.flash_attention(*a, **kw))
    mixed_attention(q, k, v)
    assert calls, "VEXPERT_ATTENTION_BACKEND=triton must route auto to triton"
    monkeypatch.setenv(att.ENV_VAR, "sdpa")
    with pytest.raises(ValueError, match="sdpa"):  # the override is explicit: it cannot serve lse -> error
        mixed_attention(q, k, v, return_lse=True)
    assert set(att.TUNE_CANDIDATES) | set(att.STATIC_ORDER) | set(att.CPU_ORDER) <= set(att.BACKENDS)


def test_explicit_backend_that_cannot_serve_raises(monkeypatch):
    q, k, v = _make(1, 2, 1, 8, 8, 16)
    avail = available_attention_backends()
    assert set(avail) == set(att.BACKENDS) and avail["math"] is None
    for be in ("flash_attn", "xformers", "varlen"):
        if avail[be] is not None:
            with pytest.raises(ValueError, match=be):
                mixed_attention(q, k, v, backend=be)
    with pytest.raises(ValueError, match="lse"):
        mixed_attention(q, k, v, return_lse=True, backend="sdpa")
    with pytest.raises(ValueError, match="backend"):
        mixed_attention(q, k, v, backend="cudnn_magic")
    monkeypatch.setattr(att, "interpret_mode", lambda: False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        mixed_attention(q, k, v, backend="triton")


def test_bad_inputs():
    q, k, v = _make(2, 4, 2, 8, 10, 16)
    with pytest.raises(ValueError, match="4-D"):
        mixed_attention(q[0], k, v)
    with pytest.raises(ValueError, match="multiple"):
        mixed_attention(q[:, :3], k, v)
    with pytest.raises(ValueError, match="Lk >= Lq"):
        mixed_attention(q, k[:, :, :5], v[:, :, :5])
    with pytest.raises(ValueError, match="head dim"):
        mixed_attention(q, k[..., :8], v[..., :8])
    with pytest.raises(TypeError, match="dtype"):
        mixed_attention(q, k.double(), v.double())
    with pytest.raises(TypeError, match="floating"):
        mixed_attention(q.long(), k.long(), v.long())
    with pytest.raises(ValueError, match="key_padding_mask"):
        mixed_attention(q, k, v, key_padding_mask=torch.ones(2, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="image_span_ids"):
        mixed_attention(q, k, v, image_span_ids=torch.zeros(2, 10, dtype=torch.int32),
                        image_attention="bidirectional")
    with pytest.raises(TypeError, match="image_span_ids"):
        mixed_attention(q, k, v, image_span_ids=torch.zeros(2, 8), image_attention="bidirectional")
    with pytest.raises(ValueError, match="image_attention"):
        mixed_attention(q, k, v, image_attention="full")
    with pytest.raises(ValueError, match="softmax_scale"):
        mixed_attention(q, k, v, softmax_scale=-1.0)
    with pytest.raises(ValueError, match="attn_bias"):
        mixed_attention(q, k, v, attn_bias=torch.zeros(3, 1, 8, 10))
    qv, kv_, vv = q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1)  # [8,4,16], [10,2,16]
    with pytest.raises((TypeError, ValueError), match="cu_seqlens_q"):
        mixed_attention_varlen(qv, kv_, vv, torch.tensor([0.0, 8.0]), torch.tensor([0, 10]), 8, 10)
    with pytest.raises(ValueError, match="max_seqlen_q"):
        mixed_attention_varlen(qv, kv_, vv, torch.tensor([0, 8]), torch.tensor([0, 10]), -1, 10)
    with pytest.raises(ValueError, match="same number of sequences"):
        mixed_attention_varlen(qv, kv_, vv, torch.tensor([0, 8]), torch.tensor([0, 5, 10]), 8, 10)


# ---------------------------------------------------------------------------------------------------- compile, AOT
def test_torch_compile_fullgraph():
    q, k, v = _make(1, 2, 1, 12, 12, 16)
    kpm = torch.ones(1, 12, dtype=torch.bool)
    kpm[0, :2] = False
    span = _spans(1, 12, [(0, 3, 8, 1)])

    def f(q, k, v):
        return mixed_attention(q, k, v, key_padding_mask=kpm, image_span_ids=span, image_attention="bidirectional",
                               backend="math")

    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v)
    assert rel_err(got, f(q, k, v)) < 1e-6


def test_triton_op_traces_under_compile():
    # the Triton path is a torch.library custom op with a fake impl: dynamo traces it without graph breaks
    q, k, v = (t.requires_grad_() for t in _make_triton(1, 2, 1, 16, 16, 16))

    def f(q, k, v):
        return mixed_attention(q, k, v, backend="triton")

    torch._dynamo.reset()
    out = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v)
    ref = mixed_attention(q.double(), k.double(), v.double(), backend="math")
    assert rel_err(out, ref) < TOL[q.dtype]
    g = torch.autograd.grad(out.sum(), q)[0]
    assert torch.isfinite(g).all()


def test_aot_compile_specs():
    specs = fa_kernels.aot_compile_specs()
    names = [s.name for s in specs]
    assert len(names) == len(set(names)) and len(specs) > 0
    kernels = {s.fn for s in specs}
    assert {s.constexprs.get("FUSED_DQ") for s in specs if s.fn is fa_kernels._attn_bwd_dkdv_kernel} == {True, False}
    assert kernels == {fa_kernels._attn_fwd_kernel, fa_kernels._attn_bwd_dq_kernel, fa_kernels._attn_bwd_dkdv_kernel,
                       fa_kernels._attn_bwd_preprocess_kernel}
    for s in specs:
        assert list(s.signature)[: len(s.fn.arg_names)] == list(s.fn.arg_names), s.name
    hds = {s.constexprs["HEAD_DIM"] for s in specs}
    assert {64, 80, 96, 128} <= hds


def test_gpu_config_table_complete():
    for cc in (8, 9):
        for bucket in (64, 128):
            for masked in (False, True):
                cfgs = fa_configs._GPU_CONFIGS[(cc, bucket, masked)]
                for kname in ("fwd", "dq", "dkdv"):
                    bm, bn, nw, ns = cfgs[kname]
                    assert bm >= 16 and bn >= 16 and nw in (4, 8) and ns >= 1
    # CPU tensors (interpreter) always get the small interpreter tiles
    assert fa_configs._configs_for(torch.device("cpu"), 128, True, True) == fa_configs._INTERPRET_CONFIG
    assert fa_configs._pick({"dkdv": 1, "dkdv_varlen": 2}, "dkdv", True) == 2
    assert fa_configs._pick({"dkdv": 1, "dkdv_varlen": 2}, "dkdv", False) == 1


def test_empty_inputs():
    q, k, v = _make_triton(1, 2, 1, 0, 5, 16)
    for be in ("triton", "math", "sdpa"):
        assert mixed_attention(q, k, v, backend=be).shape == (1, 2, 0, 16)
    # varlen with an empty sequence (0 queries, 0 keys) between real ones
    lq = [3, 0, 18]
    qv, kv_, vv, cq, ck = _varlen_inputs(lq, lq, 2, 1, 16, TRITON_DTYPE, DEVICE)
    tol = TOL[qv.dtype]
    qs, ks, vs = (t.clone().requires_grad_() for t in (qv, kv_, vv))
    out, lse = mixed_attention_varlen(qs, ks, vs, cq, ck, 18, 18, backend="triton", return_lse=True)
    ref, rlse = mixed_attention_varlen(qv.double(), kv_.double(), vv.double(), cq, ck, 18, 18, backend="math",
                                       return_lse=True)
    assert rel_err(out, ref) < tol and rel_err(lse, rlse) < tol
    grads = torch.autograd.grad(out.sum(), (qs, ks, vs))
    assert all(torch.isfinite(g).all() for g in grads)


def test_triton_refuses_fp32_on_cuda():
    req = att._Request(device="cuda", dtype=torch.float32, head_dim=64, gqa=False, kv_offset=False, padding=True,
                       bidir=False, bias=False, need_lse=False, varlen=False)
    if available_attention_backends()["triton"] is None:
        assert "fp16/bf16" in att._unsupported_reason("triton", req)
    assert att._unsupported_reason("triton", att._Request(**dict(req.__dict__, head_dim=256))) is not None


def test_attention_backend_reason():
    q, k, v = _make_triton(1, 2, 1, 8, 8, 16)
    assert att_api.attention_backend_reason("math", q, k, v) is None
    assert "lse" in att_api.attention_backend_reason("sdpa", q, k, v, return_lse=True)
    bias = torch.zeros(1, 1, 8, 8, device=DEVICE, dtype=q.dtype)
    assert "attn_bias" in att_api.attention_backend_reason("triton", q, k, v, attn_bias=bias)
    assert att_api.attention_backend_reason("nope", q, k, v) is not None

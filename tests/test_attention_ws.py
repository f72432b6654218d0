"""The warp-specialised sm_90 attention forward (``flash_attention.kernels_ws``), checked without a GPU.

* Every ``_WS_FWD_CONFIGS`` tile AOT-compiled for sm_90a (subprocess, the installed Triton; at its head dim, the
  variant with the most live state for its mask kind) is really split: ``ttg.warp_specialize`` in the TTGIR, 12 warps (one
  TMA producer + two wgmma consumer warpgroups), ``USETMAXREG`` in the SASS, wgmma, TMA loads, no spill, shared
  memory within the 227 KiB of an sm_90 CTA. (The compile report compiles every ws spec for spills/TMA/ws too.)
* Numerics vs float64 (Triton >= 3.9 interpreter on CPU -- it runs tensor descriptors and ignores the
  warp-specialisation hint; on an sm_90 GPU the compiled kernel with a real tile): out and lse for causal with
  Lk > Lq and GQA, key padding on both sides and a hole with inf under the padding, with and without
  bidirectional image spans, varlen with spans (an empty and a short sequence: query tiles past a sequence end run
  an empty loop) in routed output order, routed dense output, grads through the standard backward; outputs
  NaN-poisoned before launch, and the ws launcher must have run.
* When the dispatcher offers the candidate: sm_90 with the Hopper pass, TMA-addressable tensors, not decode lengths
  (and sequences < 2**16 queries with image spans).
"""

import pytest
import torch

from vexpert_kernels._triton_compat import HAS_TRITON, TRITON_VERSION, triton
from vexpert_kernels.ops.flash_attention import flash_attention
from vexpert_kernels.ops.flash_attention import launch as fa_launch
from vexpert_kernels.ops.flash_attention.configs_ws import _WS_FWD_CONFIGS, WS_FWD, ws_fwd_tune_configs
from vexpert_kernels.testing import rel_err
from conftest import DEVICE, HAS_CUDA, SMEM_LIMIT_SM90, compile_sm90_in_child

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="needs Triton")



def _version(v):
    return tuple(int(p) for p in (v or "0.0").split(".")[:2] if p.isdigit())


def _ws_runnable():
    if not HAS_TRITON or not hasattr(triton, "set_allocator"):
        return False
    if HAS_CUDA:
        return torch.cuda.get_device_capability()[0] == 9 and hasattr(triton.language, "make_tensor_descriptor")
    return _version(TRITON_VERSION) >= (3, 9)


needs_ws = pytest.mark.skipif(not _ws_runnable(), reason="the ws forward needs sm_90 on CUDA; the Triton "
                              "interpreter runs tensor descriptors from 3.9 on")
# interpreter: the smallest legal tiles (several query and key tiles per sequence); GPU: a real warp-specialised tile
WS_TILE = (128, 64, 4, 2, WS_FWD) if HAS_CUDA else (16, 16, 4, 1, WS_FWD)
DTYPE = torch.bfloat16 if HAS_CUDA else torch.float32
TOL = 1e-5 if DTYPE == torch.float32 else 2e-2


# ----------------------------------------------------------------------------------------------- configs / dispatch
def test_ws_configs_follow_the_gate():
    """What Triton 3.6 / 3.9 need to split an sm_90 kernel (docs/warp_specialization.md), and the task's tiles."""
    tiles = [t for ts in _WS_FWD_CONFIGS.values() for t in ts]
    assert tiles
    for bm, bn, nw, ns, kind in tiles:
        assert (bm, nw, kind) == (128, 4, WS_FWD) and bn in (64, 128) and ns in (2, 3), (bm, bn, nw, ns, kind)


def _offered(req_kw, lq=2048, tma=True):
    """The ':ws' names the attention dispatcher hands autotune.select for a CUDA request."""
    from vexpert_kernels.ops.attention import api as att_api
    from vexpert_kernels.ops.attention.dispatch import _Request

    kw = dict(device="cuda", dtype=torch.bfloat16, head_dim=128, gqa=True, kv_offset=False, padding=False,
              bidir=False, bias=False, need_lse=True, varlen=False)
    kw.update(req_kw)
    req = _Request(**kw)
    names = list(att_api._candidates(req, lambda name: None, torch.device("cuda"), req.padding or req.bidir, lq, tma))
    return [n for n in names if n.endswith(":ws")], names


def test_ws_offered_only_on_sm90_with_tma(monkeypatch):
    from vexpert_kernels.ops.attention import dispatch
    from vexpert_kernels.ops.flash_attention import configs_ws

    monkeypatch.setitem(dispatch._AVAILABILITY, "triton", None)  # as on a GPU machine
    monkeypatch.setattr(configs_ws, "hopper_ws_pass_available", lambda: True)
    for major, has in ((9, True), (8, False), (10, False)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, m=major: (m, 0))
        for masked in (False, True):
            ws, names = _offered(dict(padding=masked))
            tiles = _WS_FWD_CONFIGS[(128, masked)]  # _offered asks for head dim 128
            want = [f"triton:{bm}x{bn}:w{nw}s{ns}:ws" for bm, bn, nw, ns, _ in tiles] if has else []
            assert ws == want, (major, masked, names)
            assert not names[0].endswith(":ws"), "never the table's (untuned) choice"
        assert _offered(dict(varlen=True))[0] == (list(want) if has else [])
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert _offered({})[0] and _offered(dict(bidir=True))[0]
    assert _offered(dict(bidir=True), lq=1 << 16)[0] == []  # span ends travel as two bytes
    assert _offered({}, tma=False)[0] == []       # tensors not TMA-addressable
    assert _offered({}, lq=1)[0] == []            # decode
    assert ws_fwd_tune_configs(torch.device("cpu"), 128, False, tma=True) == []
    monkeypatch.setattr(configs_ws, "hopper_ws_pass_available", lambda: False)
    assert _offered({})[0] == []                  # no Hopper ws pass in this Triton


def test_ws_candidate_name_round_trips():
    from vexpert_kernels.ops.attention import api as att_api

    for cfg in ((128, 64, 4, 3, WS_FWD), (128, 128, 8, 2, 1), (128, 64, 8, 3)):
        assert att_api.parse_triton_name(att_api.triton_name(cfg)) == cfg
    assert att_api.triton_name((128, 64, 4, 3, WS_FWD)).endswith(":ws")


# ----------------------------------------------------------------------------------------------- numerics
@pytest.fixture
def _poison(monkeypatch):
    """NaN-poisoned outputs, and the ws launcher must really run (not the pointer/TMA kernel)."""
    monkeypatch.setattr(fa_launch, "_POISON_OUTPUTS", True)
    calls = []
    real = fa_launch.ws_fwd_launch

    def spy(*args, **kwargs):
        calls.append(args[8:10])  # (BLOCK_M, BLOCK_N)
        return real(*args, **kwargs)

    monkeypatch.setattr(fa_launch, "ws_fwd_launch", spy)
    yield
    assert calls and all(c in (WS_TILE[:2], (32, 32)) for c in calls), calls


def _leaf(*shape, g):
    return torch.randn(*shape, generator=g).to(DEVICE, DTYPE)


def _compare(out, lse, ref, rlse):
    assert rel_err(out, ref) < TOL
    fin = torch.isfinite(rlse)
    assert torch.equal(fin.cpu(), torch.isfinite(lse).cpu()) and rel_err(lse[fin], rlse[fin]) < TOL


def _math(q, k, v, **kw):
    from vexpert_kernels.ops import mixed_attention

    return mixed_attention(*(t.detach().double().nan_to_num(posinf=0.0) for t in (q, k, v)), backend="math",
                           return_lse=True, **kw)


@needs_ws
@pytest.mark.usefixtures("_poison")
def test_ws_causal_gqa_offset_and_grads():
    """Lk > Lq (bottom-right causal), GQA 4:2, odd lengths; grads of the ws forward's out/lse via the backward."""
    g = torch.Generator().manual_seed(11)
    B, H, KV, Lq, Lk, hd = 2, 4, 2, 37, 45, 16
    q, k, v = _leaf(B, H, Lq, hd, g=g), _leaf(B, KV, Lk, hd, g=g), _leaf(B, KV, Lk, hd, g=g)
    q.requires_grad_()
    k.requires_grad_()
    out, lse = flash_attention(q, k, v, fwd_config=WS_TILE)
    ref, rlse = _math(q, k, v)
    _compare(out, lse, ref, rlse)
    plain = flash_attention(q.detach(), k.detach(), v)[0]  # the pointer kernel: same semantics
    assert rel_err(out, plain) < (1e-6 if DTYPE == torch.float32 else 1e-2)
    w = torch.randn(out.shape, generator=g, dtype=torch.float64).to(DEVICE)
    qd, kd = (t.detach().double().requires_grad_() for t in (q, k))
    from vexpert_kernels.ops import mixed_attention

    want = torch.autograd.grad((mixed_attention(qd, kd, v.double(), backend="math") * w).sum(), (qd, kd))
    got = torch.autograd.grad((out.double() * w).sum(), (q, k))
    for a, b in zip(got, want):
        assert rel_err(a, b) < (TOL if DTYPE == torch.float32 else 4 * TOL)


@needs_ws
@pytest.mark.usefixtures("_poison")
@pytest.mark.parametrize("spans", [False, True])
def test_ws_padding_both_sides_and_spans(spans):
    """Lk > Lq, left padding (the K/V descriptors start at the first kept key: negative TMA coordinates), right
    padding, a hole, inf in K and V under the left/right padding (must not leak), a fully padded row (out 0, lse
    -inf), GQA; with bidirectional image spans (one starting inside the left padding, one crossing a query tile)."""
    g = torch.Generator().manual_seed(12)
    B, H, KV, Lq, Lk, hd = 3, 4, 2, 29, 35, 16  # queries are the last Lq key positions
    q, k, v = _leaf(B, H, Lq, hd, g=g), _leaf(B, KV, Lk, hd, g=g), _leaf(B, KV, Lk, hd, g=g)
    kpm = torch.ones(B, Lk, dtype=torch.bool, device=DEVICE)
    kpm[0, :9] = False     # left padding (not tile-aligned; 3 query positions of it)
    kpm[0, 25:28] = False  # a hole: masked through the keep flags
    kpm[1, -7:] = False    # right padding
    kpm[2, :] = False      # nothing kept: every row empty
    for t in (k, v):
        t[0, :, :9] = float("inf")
        t[1, :, -7:] = float("inf")
    kw, mkw = dict(key_padding_mask=kpm), dict(key_padding_mask=kpm)
    if spans:
        span = torch.zeros(B, Lq, dtype=torch.int32, device=DEVICE)
        span[0, 1:12] = 1    # starts inside the left padding
        span[1, 10:22] = 2   # crosses the 16-row query tile boundary
        span[1, 24:27] = 2   # same id, separate run: a separate span
        span[2, 1:4] = 1
        kw.update(image_span_ids=span, bidirectional=True)
        mkw.update(image_span_ids=span, image_attention="bidirectional")
    out, lse = flash_attention(q, k, v, fwd_config=WS_TILE, **kw)
    ref, rlse = _math(q, k, v, **mkw)
    assert torch.isneginf(lse[2]).all() and (out[2] == 0).all()
    _compare(out, lse, ref, rlse)


@needs_ws
@pytest.mark.usefixtures("_poison")
def test_ws_spans_past_256_queries():
    """Span ends >= 256 (their high byte), a span across position 256."""
    g = torch.Generator().manual_seed(15)
    L, hd = 272, 16
    q, k, v = (_leaf(1, 1, L, hd, g=g) for _ in range(3))
    span = torch.zeros(1, L, dtype=torch.int32, device=DEVICE)
    span[0, 240:262] = 1
    span[0, 264:271] = 2
    tile = WS_TILE if HAS_CUDA else (32, 32, 4, 1, WS_FWD)
    out, lse = flash_attention(q, k, v, image_span_ids=span, bidirectional=True, fwd_config=tile)
    ref, rlse = _math(q, k, v, image_span_ids=span, image_attention="bidirectional")
    _compare(out, lse, ref, rlse)


def test_ws_span_limit():
    from vexpert_kernels.ops.flash_attention import launch_ws
    from vexpert_kernels.ops.flash_attention.configs_ws import WS_MAX_SPAN_LQ

    assert WS_MAX_SPAN_LQ == launch_ws.MAX_SPAN_POS - 1  # span ends travel as two bytes


@needs_ws
@pytest.mark.usefixtures("_poison")
def test_ws_varlen_bidirectional_routed():
    """Packed sequences (long, empty, short: query tiles past a sequence end run an empty loop) with image spans
    (local to each sequence), output in a routed row order."""
    from vexpert_kernels.ops import mixed_attention_varlen

    g = torch.Generator().manual_seed(13)
    H, KV, hd = 2, 1, 16
    cu = torch.tensor([0, 35, 35, 41], dtype=torch.int32, device=DEVICE)
    T = 41
    q, k, v = _leaf(T, H, hd, g=g), _leaf(T, KV, hd, g=g), _leaf(T, KV, hd, g=g)
    span = torch.zeros(T, dtype=torch.int32, device=DEVICE)
    span[4:20] = 3
    span[33:39] = 3  # crosses the boundary of sequences 0 and 2: two spans
    oidx = torch.randperm(T, generator=g).to(DEVICE)
    kw = dict(cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=35, max_seqlen_k=35)
    out, lse = flash_attention(q, k, v, image_span_ids=span, bidirectional=True, fwd_config=WS_TILE,
                               out_index=oidx, **kw)
    ref, rlse = mixed_attention_varlen(*(t.double() for t in (q, k, v)), cu, cu, 35, 35, image_span_ids=span,
                                       image_attention="bidirectional", backend="math", return_lse=True)
    routed = torch.zeros(T, H * hd, dtype=torch.float64, device=DEVICE)
    routed[oidx] = ref.reshape(T, H * hd)
    _compare(out, lse, routed, rlse)


@needs_ws
@pytest.mark.usefixtures("_poison")
def test_ws_routed_output_order():
    g = torch.Generator().manual_seed(14)
    B, H, KV, L, hd = 2, 2, 1, 21, 16
    q, k, v = _leaf(B, H, L, hd, g=g), _leaf(B, KV, L, hd, g=g), _leaf(B, KV, L, hd, g=g)
    oidx = torch.randperm(B * L, generator=g).view(B, L).to(DEVICE)
    out, lse = flash_attention(q, k, v, fwd_config=WS_TILE, out_index=oidx)
    ref, rlse = _math(q, k, v)
    routed = torch.zeros(B * L, H * hd, dtype=torch.float64, device=DEVICE)
    routed[oidx.reshape(-1)] = ref.transpose(1, 2).reshape(B * L, H * hd)
    _compare(out, lse, routed, rlse)


# ----------------------------------------------------------------------------------------------- sm_90a compiles
_SPECS = r"""
from vexpert_kernels.ops.flash_attention import aot_ws

def specs(jobs):
    return [aot_ws.ws_fwd_spec(tuple(tile), "bf16", hd, tuple(variant)) for tile, hd, variant in jobs]
"""


def test_ws_specs_are_listed_for_the_compile_report():
    """The compile report (and its CI test: compile errors, spills, missing TMA, lost warp specialisation) sees a
    spec of every ws tile, all sm_90-only, asking for TMA and warp specialisation."""
    from vexpert_kernels import compile_report as cr

    specs = cr.load_specs("vexpert_kernels.ops.flash_attention.kernels_ws")
    assert all(s.targets == (90,) and s.expects_tma and s.constexprs["WARP_SPEC"] and s.num_warps == 4
               for s in specs)
    tiles = {(s.constexprs["BLOCK_M"], s.constexprs["BLOCK_N"], s.num_warps, s.num_stages, WS_FWD) for s in specs}
    assert tiles == {t for ts in _WS_FWD_CONFIGS.values() for t in ts}
    assert {s.name.split(",")[1] for s in specs} == {"causal", "causal_gqa4_routed", "padded_bidir",
                                                     "varlen_bidir_routed"}


def test_ws_configs_are_warp_specialised_on_sm90():
    from vexpert_kernels.ops.flash_attention.aot_ws import WS_VARIANTS

    # per tile: the variant with the most live state of its mask kind (routed GQA / padding + image spans)
    jobs = [(tile, hd, WS_VARIANTS[masked][0 if masked else 1]) for (hd, masked), tiles in
            sorted(_WS_FWD_CONFIGS.items()) for tile in tiles]
    rows = compile_sm90_in_child(_SPECS, jobs)
    assert len(rows) == len(jobs)
    for r in rows:
        assert r["ws"], f"{r['name']}: Triton {TRITON_VERSION} did not split it (no ttg.warp_specialize)"
        assert r["launch_warps"] == 12 and r["setmaxreg"] > 0, f"{r['name']}: expected 3 warpgroups + setmaxnreg: {r}"
        assert r["wgmma"] and r["hgmma"] > 0 and r["utmaldg"] > 0, f"{r['name']}: lost wgmma / TMA loads: {r}"
        assert r["stack_bytes"] == 0 and r["local_bytes"] == 0, f"{r['name']} spills: {r}"
        assert r["shared_bytes"] <= SMEM_LIMIT_SM90, f"{r['name']}: {r['shared_bytes']} B shared memory > 227 KiB"

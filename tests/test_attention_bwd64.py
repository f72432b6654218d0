"""The backward's 64-query dK/dV steps and its TMA variant (K/V, Q and dO through device-side tensor descriptors,
dQ by TMA reductions on a GPU): numerics of forced backward tiles (``flash_attention(..., bwd_config=...)``)
through the Triton interpreter vs float64 (dq, dk, dv; causal with Lk > Lq, GQA, padding on both sides,
bidirectional image spans, varlen with an empty sequence, routed order, odd lengths), the sm_90 tuning candidates,
and the AOT compile of every new sm_90a config (no spills, wgmma, TMA where claimed) under the installed Triton.
On a GPU machine the same numerics run compiled (bf16; TMA cases on sm_90 only)."""
import os

import pytest
import torch

from vexpert_kernels._triton_compat import HAS_TRITON
from vexpert_kernels.ops import mixed_attention, mixed_attention_varlen
from vexpert_kernels.ops.flash_attention import configs as fa_configs
from vexpert_kernels.ops.flash_attention import flash_attention
from vexpert_kernels.ops.flash_attention import launch as fa_launch
from vexpert_kernels.testing import rel_err
from conftest import DEVICE, HAS_CUDA, tma_runnable

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="needs Triton")


needs_tma = pytest.mark.skipif(not tma_runnable(), reason="TMA backward needs sm_90 on CUDA; the Triton "
                               "interpreter runs tensor descriptors from 3.9 on")
DTYPE = torch.bfloat16 if HAS_CUDA else torch.float32
TOL = 1e-5 if DTYPE == torch.float32 else 2e-2
# the interpreter runs small tiles (several query steps and key tiles per program); the real 64-query tiles run
# once with longer sequences
SMALL = {"ptr": (16, 16, 4, 1), "tma": (16, 16, 4, 1, 1)}


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(fa_launch, "_POISON_OUTPUTS", True)


def _leaf(*shape, g):
    return torch.randn(*shape, generator=g).to(DEVICE, DTYPE).requires_grad_()


def _case(case, g, Lq=19, Lk=27, hd=16):
    """(q, k, v, flash kwargs, reference fn(qd, kd, vd) -> out) for one mask case."""
    B, H, KV = 2, 4, 2
    if case == "varlen_bidir":
        cu = torch.tensor([0, 9, 9, Lq + 7], device=DEVICE)  # an empty sequence in the middle, odd lengths
        T = Lq + 7
        mx = max(9, T - 9)
        q, k, v = _leaf(T, H, hd, g=g), _leaf(T, KV, hd, g=g), _leaf(T, KV, hd, g=g)
        span = torch.zeros(T, dtype=torch.int32, device=DEVICE)
        span[2:6] = 1
        span[12:20] = 1
        kw = dict(image_span_ids=span, bidirectional=True, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=mx,
                  max_seqlen_k=mx)

        def ref(qd, kd, vd):
            return mixed_attention_varlen(qd, kd, vd, cu, cu, mx, mx, image_span_ids=span,
                                          image_attention="bidirectional", backend="math")
        return q, k, v, kw, ref
    q, k, v = _leaf(B, H, Lq, hd, g=g), _leaf(B, KV, Lk, hd, g=g), _leaf(B, KV, Lk, hd, g=g)
    kw, mkw = {}, {}
    if case in ("padded_bidir", "padded_bidir_routed"):
        kpm = torch.ones(B, Lk, dtype=torch.bool, device=DEVICE)
        kpm[0, :5] = False    # left padding
        kpm[1, -6:] = False   # right padding
        span = torch.zeros(B, Lq, dtype=torch.int32, device=DEVICE)
        span[0, 3:9] = 1
        span[1, 10:16] = 2
        kw = dict(key_padding_mask=kpm, image_span_ids=span, bidirectional=True)
        mkw = dict(key_padding_mask=kpm, image_span_ids=span, image_attention="bidirectional")
    if case.endswith("routed"):
        perm = torch.randperm(B * Lq, generator=g).to(DEVICE).view(B, Lq)
        kw["out_index"] = perm
        mkw["out_index"] = perm

    def ref(qd, kd, vd):
        return mixed_attention(qd, kd, vd, backend="math", **mkw)
    return q, k, v, kw, ref


def _check_grads(case, cfg, deterministic, g, **shape):
    q, k, v, kw, ref = _case(case, g, **shape)
    out, _ = flash_attention(q, k, v, bwd_config=cfg, deterministic=deterministic, **kw)
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    want_out = ref(qd, kd, vd)
    w = torch.randn(out.shape, generator=g, dtype=torch.float64).to(DEVICE)
    got = torch.autograd.grad((out.double() * w).sum(), (q, k, v))
    want = torch.autograd.grad((want_out * w).sum(), (qd, kd, vd))
    for name, a, b in zip("qkv", got, want):
        assert rel_err(a, b) < (TOL if DTYPE == torch.float32 else 4 * TOL), f"d{name} {case} {cfg}"


CASES = ["causal_gqa_offset", "padded_bidir", "varlen_bidir", "padded_bidir_routed"]


@needs_tma
@pytest.mark.parametrize("deterministic", [False, True], ids=["onepass", "deterministic"])
@pytest.mark.parametrize("case", CASES)
def test_tma_backward_matches_float64(case, deterministic):
    if HAS_CUDA:
        cfg = (64, 64, 8, 2, 1)
    else:
        cfg = SMALL["tma"]
    _check_grads(case, cfg, deterministic, torch.Generator().manual_seed(11))


def _descriptor_reduce(self, kind, desc, value, indices):
    """Stand-in for the TMA reduction (cp.reduce.async.bulk.tensor.add) the 3.9 interpreter lacks: an fp32 atomic
    add over the descriptor's in-bounds elements (out-of-bounds rows/columns dropped, as TMA does)."""
    from triton._C.libtriton import ir

    assert kind == ir.DESCRIPTOR_REDUCE_KIND.ADD
    ptrs, mask = desc.materialize_pointers(indices)
    return self.create_atomic_rmw(ir.ATOMIC_OP.FADD, ptrs, value, mask, ir.MEM_SEMANTIC.RELAXED,
                                  ir.MEM_SYNC_SCOPE.GPU)


@needs_tma
@pytest.mark.skipif(HAS_CUDA, reason="the GPU runs the real TMA reduction in test_tma_backward_matches_float64")
@pytest.mark.parametrize("case", ["causal_gqa_offset", "varlen_bidir", "padded_bidir_routed"])
def test_tma_dq_reduction_path_matches_float64(case, monkeypatch):
    """The one-pass TMA backward's dQ by descriptor reductions (DQ_REDUCE, the GPU path) through the interpreter."""
    from triton.runtime import interpreter

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_descriptor_reduce", _descriptor_reduce, raising=False)
    monkeypatch.setattr(fa_launch, "_DQ_REDUCE_OFF_GPU", True)
    _check_grads(case, SMALL["tma"], False, torch.Generator().manual_seed(17))


@pytest.mark.parametrize("deterministic", [False, True], ids=["onepass", "deterministic"])
@pytest.mark.parametrize("case", ["causal_gqa_offset", "padded_bidir"])
def test_forced_pointer_backward_tile_matches_float64(case, deterministic):
    cfg = (64, 64, 8, 2) if HAS_CUDA else SMALL["ptr"]
    _check_grads(case, cfg, deterministic, torch.Generator().manual_seed(12))


# the sm_90 tuning tiles themselves, one per distinct (BLOCK_M, BLOCK_N, TMA)
REAL_TILES = sorted({c[:2] + (8, 2) + tuple(c[4:]) for cs in fa_configs._BWD64_CONFIGS.values() for c in cs})


@pytest.mark.parametrize("cfg", REAL_TILES, ids=lambda c: "x".join(map(str, c)))
def test_real_64_query_tiles_match_float64(cfg):
    """64 queries per step over 64/128 keys: two query steps and 1-2 key tiles per (batch row, kv head)."""
    if len(cfg) == 5 and not tma_runnable():
        pytest.skip("TMA backward needs sm_90 on CUDA / the Triton >= 3.9 interpreter")
    case = "padded_bidir" if cfg[1] == 64 else "causal_gqa_offset"
    _check_grads(case, cfg, False, torch.Generator().manual_seed(13), Lq=70, Lk=75)


def test_bad_bwd_config_names_tma():
    g = torch.Generator().manual_seed(14)
    q = _leaf(1, 2, 8, 80, g=g)  # head dim 80 is not its own tile: no descriptors
    out, _ = flash_attention(q, q, q, bwd_config=(16, 16, 4, 1, 1))
    with pytest.raises(ValueError, match="TMA backward"):
        out.sum().backward()


def test_bwd_tune_configs_offer_64_query_tiles_on_sm90_only(monkeypatch):
    dev = torch.device("cuda")
    for major in (9, 8):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, m=major: (m, 0))
        for bd in (64, 128):
            for masked in (False, True):
                for det in (False, True):
                    cands = fa_configs.bwd_tune_configs(dev, bd, masked, False, det, tma=True)
                    table = fa_configs._configs_for(dev, bd, masked)["dkdv" if det else "dkdv_fused"]
                    assert cands[0] == tuple(table)  # the table's tile first
                    assert len(set(cands)) == len(cands)
                    has64 = any(c[0] == 64 for c in cands)
                    assert has64 == (major == 9), (major, bd, masked, det, cands)
                    assert all(len(c) == 4 for c in fa_configs.bwd_tune_configs(dev, bd, masked, False, det))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    # dO in routed order with padding/spans at hd 128: the one-pass TMA tile spills there, the deterministic one fits
    assert all(c[0] != 64 for c in fa_configs.bwd_tune_configs(dev, 128, True, False, False, tma=True, routed=True))
    assert any(c[0] == 64 for c in fa_configs.bwd_tune_configs(dev, 128, True, False, True, tma=True, routed=True))
    assert fa_configs.bwd_tune_configs(torch.device("cpu"), 128, False, False, False) == \
        [fa_configs._INTERPRET_CONFIG["dkdv_fused"]]


# ------------------------------------------------------------------------------------------------ AOT compile
def _new_specs():
    from vexpert_kernels.ops.flash_attention.aot import build_aot_specs

    return [s for s in build_aot_specs() if s.name.startswith("flash_attn_dkdv") and ",64x" in s.name
            and s.targets == (90,)]


def test_every_64_query_config_has_an_sm90_spec():
    names = [s.name for s in _new_specs()]
    for cc_major in (9,):
        for d in (64, 128):
            for masked in (False, True):
                for det in (False, True):
                    for c in fa_configs._BWD64_CONFIGS[(d, masked)]:
                        if det and c not in fa_configs._BWD64_DET_OK[(d, masked)]:
                            continue
                        tag = f"{c[0]}x{c[1]},w{c[2]}s{c[3]}" + (",tma" if len(c) == 5 and c[4] else "")
                        kname = "flash_attn_dkdv_det[" if det else "flash_attn_dkdv["
                        assert any(n.startswith(kname) and n.endswith(tag + "]") for n in names), (kname, tag)


@pytest.mark.slow
def test_64_query_tma_configs_compile_for_sm90a_without_spills():
    """The hd-128 TMA specs (the ones at the register limit): compile for sm_90a with wgmma and TMA, no spill. The
    package-wide test_compile_report checks every new spec (hd 64 too) for compile errors, spills and TMA."""
    from vexpert_kernels import compile_report as cr

    specs = [s for s in _new_specs() if ",hd128," in s.name]
    assert specs and all(s.expects_tma for s in specs)
    mod = "vexpert_kernels.ops.flash_attention.kernels"
    from vexpert_kernels.ops.flash_attention.kernels import aot_compile_specs

    index = {s.name: i for i, s in enumerate(aot_compile_specs())}
    jobs = [(mod, index[s.name], 90) for s in specs]
    results = cr.run_jobs(jobs, n_procs=min(2, os.cpu_count() or 1))
    bad = [f"{r.name}: {r.problems() or 'no wgmma/TMA'}" for r in results if r.problems() or not (r.wgmma and r.tma)]
    assert not bad, bad


# ------------------------------------------------------------------------------------------------ backward tuning
def test_bwd_config_auto_off_cuda_runs_the_table_tile():
    g = torch.Generator().manual_seed(15)
    q, k, v, kw, _ = _case("padded_bidir", g)
    w = torch.randn(q.shape, generator=g).to(DEVICE, DTYPE)
    grads = []
    for cfg in (None, "auto"):
        out, _ = flash_attention(q, k, v, bwd_config=cfg, deterministic=True, **kw)
        grads.append(torch.autograd.grad((out * w).sum(), (q, k, v)))
    for a, b in zip(*grads):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="bwd_config"):
        flash_attention(q, k, v, bwd_config="fast")
    with pytest.raises(ValueError, match="bwd_config"):
        flash_attention(q, k, v, bwd_config=(64, 64, 8))


def test_bwd_names_round_trip():
    from vexpert_kernels.ops.flash_attention import bwd_tuning as bt

    for cfg in ((64, 64, 8, 3, 1), (16, 128, 8, 3)):
        assert bt.parse_bwd_name(bt.bwd_name(cfg)) == cfg
    assert bt.parse_bwd_name(bt.STATIC) is None


@pytest.mark.parametrize("case", ["padded_bidir_routed", "varlen_bidir"])
def test_select_bwd_checks_every_tile_against_the_plain_gradient(case, tmp_path, monkeypatch):
    """The backward tuner (driven on CPU tensors by an injected Tuner): each tile candidate is verified against the
    plain-PyTorch gradient (also the static choice), a wrong one is dropped, and the grads returned are right."""
    from vexpert_kernels import autotune
    from vexpert_kernels.ops.flash_attention import bwd_tuning as bt

    tiles = [SMALL["ptr"], (16, 32, 4, 1)]
    monkeypatch.setattr(bt, "bwd_tune_configs", lambda *a, **k: list(tiles))
    g = torch.Generator().manual_seed(16)
    q, k, v, kw, ref = _case(case, g)
    out, lse = flash_attention(q, k, v, **kw)
    do = torch.randn(out.shape, generator=g).to(DEVICE, DTYPE)
    dlse = torch.randn(lse.shape, generator=g).to(DEVICE)
    varlen = "cu_seqlens_q" in kw
    args = (do, q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(), dlse, kw.get("key_padding_mask"),
            kw.get("image_span_ids"), kw.get("cu_seqlens_q"), kw.get("cu_seqlens_k"),
            kw.get("max_seqlen_q", 0 if varlen else q.shape[2]), kw.get("max_seqlen_k", 0 if varlen else k.shape[2]),
            q.shape[-1] ** -0.5, True, kw.get("out_index"), False)

    def run(cfg):
        dq, dk, dv = fa_launch._bwd_impl(*args, bwd_cfg=list(cfg))
        if cfg == tiles[1]:
            dk = dk * 1.5  # a broken candidate: must be dropped
        return dq, dk, dv

    tuner = autotune.Tuner(cache_dir=str(tmp_path), timer=lambda fn: 1.0, can_tune=lambda out: None,
                           fingerprint=lambda device: {"gpu": "test"}, device_available=lambda: True, budget_s=60.0)
    with autotune.using(tuner):
        grads = bt.select_bwd(*args, run)
        (rec,) = [d for d in autotune.decisions() if d["op"] == "attention_bwd"]
    assert rec["candidates"][bt.bwd_name(tiles[0])]["verdict"] == "ok"
    assert rec["candidates"][bt.bwd_name(tiles[1])]["verdict"].startswith("wrong")
    assert rec["chosen"] in (bt.STATIC, bt.bwd_name(tiles[0]))
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    if varlen:
        want_out, want_lse = mixed_attention_varlen(qd, kd, vd, kw["cu_seqlens_q"], kw["cu_seqlens_k"],
                                                    kw["max_seqlen_q"], kw["max_seqlen_k"],
                                                    image_span_ids=kw["image_span_ids"],
                                                    image_attention="bidirectional", backend="math", return_lse=True)
    else:
        want_out, want_lse = mixed_attention(qd, kd, vd, key_padding_mask=kw["key_padding_mask"],
                                             image_span_ids=kw["image_span_ids"], image_attention="bidirectional",
                                             backend="math", return_lse=True, out_index=kw["out_index"])
    want = torch.autograd.grad((want_out, want_lse), (qd, kd, vd), (do.double(), dlse.double()))
    for name, a, b in zip("qkv", grads, want):
        assert rel_err(a, b) < (TOL if DTYPE == torch.float32 else 4 * TOL), f"d{name}"


@pytest.mark.parametrize("backend, expect", [("auto", "auto"), ("triton", None)])
@pytest.mark.parametrize("varlen", [False, True])
def test_mixed_attention_tunes_the_backward_tile_only_under_auto(backend, expect, varlen, monkeypatch):
    """mixed_attention / mixed_attention_varlen pass bwd_config="auto" to our kernel when the user asked for
    backend="auto" (the backward tile is then tuned on CUDA), and the table's tile for an explicit backend."""
    import vexpert_kernels.ops.attention.api as api
    seen = []
    real = api.flash_attention

    def spy(*a, **kw):
        seen.append(kw.get("bwd_config"))
        return real(*a, **kw)

    monkeypatch.setattr(api, "flash_attention", spy)
    monkeypatch.delenv("VEXPERT_ATTENTION_BACKEND", raising=False)
    monkeypatch.setattr(api, "_dispatch", lambda b, req, key, run, *rest: run("triton"))  # force our kernel
    g = torch.Generator().manual_seed(0)
    if varlen:
        cu = torch.tensor([0, 5, 11], device=DEVICE, dtype=torch.int32)
        q, k, v = (_leaf(11, 2, 16, g=g) for _ in range(3))
        mixed_attention_varlen(q, k, v, cu, cu, 6, 6, backend=backend)
    else:
        q, k, v = (_leaf(1, 2, 7, 16, g=g) for _ in range(3))
        mixed_attention(q, k, v, backend=backend)
    assert seen == [expect]

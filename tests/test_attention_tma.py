"""The sm_90 TMA forward (K/V through device-side tensor descriptors): numerics through the Triton interpreter
(Triton >= 3.9 runs descriptors after triton.set_allocator; 3.6 can only compile them, see the compile report's
",tma" specs), and when the dispatcher may offer it. On a GPU machine the same cases run the compiled TMA kernel on
CUDA tensors (bf16, sm_90 only) instead of the interpreter."""
import pytest
import torch

from vexpert_kernels._triton_compat import triton
from vexpert_kernels.ops import mixed_attention
from vexpert_kernels.ops.flash_attention import configs as fa_configs
from vexpert_kernels.ops.flash_attention import flash_attention, tma_usable
from vexpert_kernels.ops.flash_attention import launch as fa_launch
from vexpert_kernels.testing import rel_err
from conftest import DEVICE, HAS_CUDA, tma_runnable


needs_tma_interpreter = pytest.mark.skipif(not tma_runnable(), reason="TMA forward needs sm_90 on CUDA; the Triton "
                                           "interpreter runs tensor descriptors from 3.9 on")
TMA_TILE = (16, 16, 4, 1, 1)
DTYPE = torch.bfloat16 if HAS_CUDA else torch.float32  # our CUDA attention takes fp16/bf16; fp32 only interpreted
TOL = 1e-5 if DTYPE == torch.float32 else 2e-2


def _leaf(*shape, g, grad=True):
    return torch.randn(*shape, generator=g).to(DEVICE, DTYPE).requires_grad_(grad)


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(fa_launch, "_POISON_OUTPUTS", True)


def _compare(out, lse, ref, rlse):
    assert rel_err(out, ref) < TOL
    fin = torch.isfinite(rlse)
    assert torch.equal(fin, torch.isfinite(lse)) and rel_err(lse[fin], rlse[fin]) < TOL


@needs_tma_interpreter
@pytest.mark.parametrize("case", ["causal_gqa_offset", "padded_bidir", "varlen_bidir"])
def test_tma_forward_and_grads_match_float64(case):
    g = torch.Generator().manual_seed(7)
    B, H, KV, Lq, Lk, hd = 2, 4, 2, 19, 27, 16
    if case == "varlen_bidir":
        cu = torch.tensor([0, 9, 9, 26], device=DEVICE)  # an empty sequence in the middle
        T = 26
        q, k, v = _leaf(T, H, hd, g=g), _leaf(T, KV, hd, g=g), _leaf(T, KV, hd, g=g)
        span = torch.zeros(T, dtype=torch.int32, device=DEVICE)
        span[2:6] = 1
        span[12:20] = 1
        kw = dict(image_span_ids=span, bidirectional=True, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=17,
                  max_seqlen_k=17)
        out, lse = flash_attention(q, k, v, fwd_config=TMA_TILE, **kw)
        qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
        from vexpert_kernels.ops import mixed_attention_varlen

        ref, rlse = mixed_attention_varlen(qd, kd, vd, cu, cu, 17, 17, image_span_ids=span,
                                           image_attention="bidirectional", backend="math", return_lse=True)
    else:
        q, k, v = _leaf(B, H, Lq, hd, g=g), _leaf(B, KV, Lk, hd, g=g), _leaf(B, KV, Lk, hd, g=g, grad=False)
        mkw, kw = {}, {}
        if case == "padded_bidir":
            kpm = torch.ones(B, Lk, dtype=torch.bool, device=DEVICE)
            kpm[0, :5] = False    # left padding
            kpm[1, -6:] = False   # right padding
            with torch.no_grad():
                v[1, :, -6:] = float("inf")  # non-finite values under padding must not leak into the output
            span = torch.zeros(B, Lq, dtype=torch.int32, device=DEVICE)
            span[0, 3:9] = 1
            span[1, 10:16] = 2
            kw = dict(key_padding_mask=kpm, image_span_ids=span, bidirectional=True)
            mkw = dict(key_padding_mask=kpm, image_span_ids=span, image_attention="bidirectional")
        v.requires_grad_()
        out, lse = flash_attention(q, k, v, fwd_config=TMA_TILE, **kw)
        qd, kd, vd = (t.detach().double().nan_to_num(posinf=0.0).requires_grad_() for t in (q, k, v))
        ref, rlse = mixed_attention(qd, kd, vd, backend="math", return_lse=True, **mkw)
        if case == "padded_bidir":  # forward checked with inf under the padding; grads (pointer backward) finite
            _compare(out, lse, ref, rlse)
            v = v.detach().nan_to_num(posinf=0.0).requires_grad_()
            out, lse = flash_attention(q, k, v, fwd_config=TMA_TILE, **kw)
    _compare(out, lse, ref, rlse)
    w = torch.randn(out.shape, generator=g, dtype=torch.float64).to(DEVICE)
    got = torch.autograd.grad((out.double() * w).sum(), (q, k))
    want = torch.autograd.grad((ref * w).sum(), (qd, kd))
    for a, b in zip(got, want):
        assert rel_err(a, b) < (TOL if DTYPE == torch.float32 else 4 * TOL)


@needs_tma_interpreter
def test_tma_candidate_runs_through_mixed_attention():
    g = torch.Generator().manual_seed(8)
    q, k, v = (_leaf(1, 2, 21, 16, g=g, grad=False) for _ in range(3))
    from vexpert_kernels.ops.attention import api as att_api

    out = att_api.mixed_attention(q, k, v, backend="triton")
    tma = flash_attention(q, k, v, fwd_config=TMA_TILE)[0]
    assert att_api.parse_triton_name(att_api.triton_name(TMA_TILE)) == TMA_TILE
    assert rel_err(tma, out) < (1e-6 if DTYPE == torch.float32 else 1e-2)  # bf16: one output rounding apart


def test_tma_usable_and_offered_only_on_sm90(monkeypatch):
    x = torch.randn(1, 2, 8, 16)
    assert tma_usable(x, x, x) == (hasattr(triton, "set_allocator") and hasattr(triton.language,
                                                                                "make_tensor_descriptor"))
    odd = torch.randn(1, 2, 8, 80)
    assert not tma_usable(odd, odd, odd)  # head dim is not its own tile
    strided = torch.randn(1, 2, 8, 17)[..., :16]
    assert not tma_usable(strided, strided, strided)  # 68-byte rows: not 16-byte aligned
    with pytest.raises(ValueError, match="TMA"):
        odd_dev = odd.to(DEVICE, DTYPE)
        flash_attention(odd_dev, odd_dev, odd_dev, fwd_config=TMA_TILE)
    dev = torch.device("cuda")
    for major, has in ((9, True), (8, False)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, m=major: (m, 0))
        cands = fa_configs.fwd_tune_configs(dev, 128, False, False, 2048, tma=True)
        assert any(len(c) == 5 for c in cands) == has
        masked = fa_configs.fwd_tune_configs(dev, 128, True, False, 2048, tma=True)
        assert all(c[1] <= 64 for c in masked if len(c) == 5)  # the 128-key TMA tile spills when masked
    assert fa_configs.fwd_tune_configs(dev, 128, False, False, 2048, tma=False) == \
        fa_configs.fwd_tune_configs(dev, 128, False, False, 2048)


def test_tma_specs_are_compiled_for_sm90():
    from vexpert_kernels.ops.flash_attention.kernels import aot_compile_specs

    tma = [s for s in aot_compile_specs() if s.expects_tma]
    assert tma and all(s.targets == (90,) and s.constexprs["USE_TMA"] for s in tma)
    fwd = [s for s in tma if s.name.startswith("flash_attn_fwd[")]
    assert {s.name.split(",")[1] for s in fwd} == {"causal", "padded_bidir", "varlen_bidir"}
    bwd = [s for s in tma if s.name.startswith("flash_attn_dkdv")]  # the backward's (test_attention_bwd64)
    assert {s.name.split(",")[1] for s in bwd} == {"causal", "causal_routed", "padded_bidir", "varlen_bidir",
                                                   "padded_bidir_routed"}
    assert all(s.constexprs["DQ_REDUCE"] == s.constexprs["FUSED_DQ"] for s in bwd)

"""Fused VisualExpertBlock vs the HF-exact reference: outputs and every parameter gradient, on both kernel paths."""
import pytest
import torch

from vexpert_kernels import RoutingPlan, VisualExpertConfig, build_position_ids
from vexpert_kernels.block import VisualExpertBlock, VisualExpertStack, visual_expert_layers
from vexpert_kernels.testing import reference_and_fused, rel_err

TT = torch.tensor([[0, 1, 1, 1, 1, 0, 0, 1, 1, 1, 0, 0, 0],     # two images
                   [0, 0, 0, 0, 1, 1, 1, 1, 1, 0, 0, 1, 1]])    # image at the row end


def pair(cfg, dtype=torch.float32, backend="auto", seed=0):
    return reference_and_fused(cfg, dtype, backend, seed)


def grads(module):
    return {n: p.grad.detach().clone() for n, p in module.named_parameters()}


def run_both(ref, fused, x, tt, dtype, **kw):
    xr = x.double().requires_grad_()
    xf = x.to(dtype).requires_grad_()
    (yr,) = ref(xr, tt, **kw)
    (yf,) = fused(xf, tt, **kw)
    dy = torch.randn_like(yr)
    rows = kw["attention_mask"].bool() if kw.get("attention_mask") is not None else torch.ones(tt.shape, dtype=torch.bool)
    dy = dy * rows[..., None]   # padded rows are ignored downstream: give them no gradient
    yr.backward(dy)
    yf.backward(dy.to(dtype))
    return yr, yf, xr.grad, xf.grad, rows


TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("variant", ["gqa_vbias", "mha_nobias"])
def test_block_matches_reference(backend, variant):
    over = {} if variant == "gqa_vbias" else dict(num_key_value_heads=4, vision_qkv_bias=False)
    cfg = VisualExpertConfig.tiny(**over)
    ref, fused = pair(cfg, backend=backend)
    x = torch.randn(*TT.shape, cfg.hidden_size)
    yr, yf, gxr, gxf, _ = run_both(ref, fused, x, TT, torch.float32)
    assert fused.backend == ("triton" if backend == "auto" else "torch")
    assert rel_err(yf, yr) < TOL[torch.float32]
    assert rel_err(gxf, gxr) < TOL[torch.float32]
    gr, gf = grads(ref), grads(fused)
    assert set(gr) == set(gf)
    for name in gr:
        assert rel_err(gf[name], gr[name]) < 1e-4, name


@pytest.mark.parametrize("pad", ["left", "right"])
def test_block_padding(pad):
    cfg = VisualExpertConfig.tiny()
    ref, fused = pair(cfg)
    keep = torch.ones(TT.shape, dtype=torch.long)
    if pad == "left":
        keep[0, :2] = 0
    else:
        keep[1, -3:] = 0
    x = torch.randn(*TT.shape, cfg.hidden_size)
    yr, yf, gxr, gxf, rows = run_both(ref, fused, x, TT, torch.float32, attention_mask=keep)
    assert torch.isfinite(yf).all() and torch.isfinite(gxf).all()
    assert rel_err(yf[rows], yr[rows]) < TOL[torch.float32]
    assert rel_err(gxf[rows], gxr[rows]) < TOL[torch.float32]
    gr, gf = grads(ref), grads(fused)
    for name in gr:
        assert rel_err(gf[name], gr[name]) < 1e-4, name


def test_block_bf16():
    cfg = VisualExpertConfig.tiny()
    ref, fused = pair(cfg, dtype=torch.bfloat16)
    x = torch.randn(*TT.shape, cfg.hidden_size)
    yr, yf, gxr, gxf, _ = run_both(ref, fused, x, TT, torch.bfloat16)
    assert rel_err(yf, yr) < TOL[torch.bfloat16]
    assert rel_err(gxf, gxr) < 3e-2
    gr, gf = grads(ref), grads(fused)
    for name in gr:
        assert rel_err(gf[name], gr[name]) < 5e-2, name


def test_block_bidirectional_images():
    cfg = VisualExpertConfig.tiny(image_attention="bidirectional")
    ref, fused = pair(cfg)
    x = torch.randn(*TT.shape, cfg.hidden_size)
    yr, yf, gxr, gxf, _ = run_both(ref, fused, x, TT, torch.float32)
    assert rel_err(yf, yr) < TOL[torch.float32] and rel_err(gxf, gxr) < TOL[torch.float32]


def test_kv_cache_prefill_and_decode():
    cfg = VisualExpertConfig.tiny()
    ref, fused = pair(cfg)
    tt = TT[:1]
    x = torch.randn(1, tt.shape[1], cfg.hidden_size)
    pos = build_position_ids(tt)
    with torch.no_grad():
        (full,) = ref(x.double(), tt)
        y, cache = fused(x[:, :10], tt[:, :10], use_cache=True)  # prefill ends after an image (see spec)
        outs = [y]
        for i in range(10, tt.shape[1]):
            y, cache = fused(x[:, i:i + 1], torch.zeros(1, 1, dtype=torch.long), position_ids=pos[:, i:i + 1],
                             past_key_value=cache, use_cache=True)
            assert fused.backend == "dense-language"     # decode takes the dense language-only path
            outs.append(y)
    # tt at the decode positions is language anyway (the tail of TT[0] is text)
    assert rel_err(torch.cat(outs, 1), full) < TOL[torch.float32]
    assert cache[0].shape == (1, cfg.num_key_value_heads, tt.shape[1], cfg.head_dim)


def test_stack_one_plan_two_layers():
    cfg = VisualExpertConfig.tiny()
    refs, fuseds = zip(*(pair(cfg, seed=s) for s in range(2)))
    stack = VisualExpertStack(cfg, 2)
    stack.layers[0].load_state_dict(fuseds[0].state_dict())
    stack.layers[1].load_state_dict(fuseds[1].state_dict())
    x = torch.randn(*TT.shape, cfg.hidden_size)
    h = x.double()
    for r in refs:
        (h,) = r(h, TT)
    xf = x.clone().requires_grad_()
    y = stack(xf, TT)
    assert rel_err(y, h) < TOL[torch.float32]
    plan = RoutingPlan.build(TT)
    y2 = visual_expert_layers(stack.layers, x, TT, plan=plan, checkpoint=True)
    assert torch.allclose(y, y2, atol=1e-6)


def test_hf_4d_mask_and_output_flags():
    cfg = VisualExpertConfig.tiny()
    ref, fused = pair(cfg)
    B, L = TT.shape
    keep = torch.ones(B, L, dtype=torch.bool)
    keep[0, :2] = False
    allowed = torch.ones(L, L).tril().bool()[None] & keep[:, None, :]
    m4 = torch.zeros(B, 1, L, L).masked_fill(~allowed[:, None], torch.finfo(torch.float32).min)
    pos = build_position_ids(TT, keep)
    x = torch.randn(B, L, cfg.hidden_size)
    with torch.no_grad():
        (yr,) = ref(x.double(), TT, pos, attention_mask=m4.double())
        out = fused(x, TT, pos, attention_mask=m4, output_attentions=True, use_cache=True)
    assert len(out) == 3 and out[1] is None
    assert rel_err(out[0][keep], yr[keep]) < TOL[torch.float32]


def test_block_bad_inputs():
    cfg = VisualExpertConfig.tiny()
    fused = VisualExpertBlock(cfg)
    x = torch.randn(2, 5, cfg.hidden_size)
    with pytest.raises(ValueError, match="hidden_size"):
        fused(torch.randn(2, 5, 8), torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="plan was built"):
        fused(x, torch.zeros(2, 5, dtype=torch.long), plan=RoutingPlan.build(torch.zeros(2, 6, dtype=torch.long)))
    with pytest.raises(ValueError, match="backend"):
        VisualExpertBlock(cfg, backend="cuda")


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_block_packed_plan_keeps_sequences_apart(backend):
    # regression: a plan built with cu_seqlens used to run causal attention over the whole packed row (sequence 2
    # saw sequence 1) with position ids that did not restart -> silently wrong; now varlen attention + plan positions
    cfg = VisualExpertConfig.tiny()
    ref, fused = pair(cfg, backend=backend)
    tts = [torch.tensor([[0, 1, 1, 1, 0, 0]]), torch.tensor([[0, 0, 1, 1, 0]])]
    xs = [torch.randn(1, t.shape[1], cfg.hidden_size) for t in tts]
    tt, x = torch.cat(tts, 1), torch.cat(xs, 1)
    with torch.no_grad():
        yr = torch.cat([ref(xi.double(), ti)[0] for xi, ti in zip(xs, tts)], 1)
        (yf,) = fused(x, tt, plan=RoutingPlan.build(tt, cu_seqlens=torch.tensor([0, 6, 11])))
    assert rel_err(yf, yr) < TOL[torch.float32]
    with pytest.raises(ValueError, match="packed plan"):
        fused(x, tt, attention_mask=torch.ones(1, 11), plan=RoutingPlan.build(tt, cu_seqlens=torch.tensor([0, 6, 11])))

"""patch_cogvlm on a small HF-shaped model, the thin LM (fused vs reference training), torch.compile."""
import os

import pytest
import torch
from torch import nn

from vexpert_kernels import VisualExpertConfig
from vexpert_kernels import reference as R
from vexpert_kernels.block import VisualExpertBlock
from vexpert_kernels.integrations import config_from_hf_layer, patch_cogvlm
from vexpert_kernels.model import VisualExpertLM
from vexpert_kernels.testing import rel_err, synthetic_batch


# HF class names, built from our reference modules (the HF code is not a dependency)
class VisionExpertAttention(R.VisionExpertAttention):
    pass


class VisionExpertMLP(R.VisionExpertMLP):
    pass


class CogVLMDecoderLayer(R.VisualExpertBlock):
    def __init__(self, config):
        super().__init__(config)
        self.self_attn = VisionExpertAttention(config)
        self.mlp = VisionExpertMLP(config)


class TinyCogVLM(nn.Module):
    def __init__(self, config, n):
        super().__init__()
        self.layers = nn.ModuleList(CogVLMDecoderLayer(config) for _ in range(n))

    def forward(self, x, tt):
        for layer in self.layers:
            (x,) = layer(x, tt)
        return x


class LoraLinear(nn.Module):
    """A PEFT-style wrapper: base_layer + low-rank delta."""

    def __init__(self, base, r=2):
        super().__init__()
        self.base_layer = base
        self.lora_A = nn.Linear(base.in_features, r, bias=False)
        self.lora_B = nn.Linear(r, base.out_features, bias=False)
        nn.init.normal_(self.lora_B.weight, std=0.1)

    def forward(self, x):
        return self.base_layer(x) + self.lora_B(self.lora_A(x))


def test_patch_cogvlm_shares_parameters_and_matches():
    cfg = VisualExpertConfig.tiny()
    model = TinyCogVLM(cfg, 2)
    tt = torch.tensor([[0, 1, 1, 1, 1, 0, 0, 0]])
    x = torch.randn(1, 8, cfg.hidden_size)
    with torch.no_grad():
        before = model(x, tt)
    params_before = {n: p for n, p in model.named_parameters()}
    keys_before = list(model.state_dict())
    report = patch_cogvlm(model)
    assert report.patched == ["layers.0", "layers.1"]
    assert report.config.replace(max_position_embeddings=cfg.max_position_embeddings) == cfg
    assert all(isinstance(layer, VisualExpertBlock) for layer in model.layers)
    params_after = {n: p for n, p in model.named_parameters()}
    assert params_before.keys() == params_after.keys()
    assert all(params_before[n] is params_after[n] for n in params_before)   # shared, not copied
    assert list(model.state_dict()) == keys_before                             # HF keys unchanged
    with torch.no_grad():
        after = model(x, tt)
    assert rel_err(after, before) < 2e-5
    assert "patched 2" in str(report)


def test_patch_keeps_peft_wrappers_working():
    cfg = VisualExpertConfig.tiny()
    model = TinyCogVLM(cfg, 1)
    attn, mlp = model.layers[0].self_attn, model.layers[0].mlp
    attn.vision_expert_query_key_value = LoraLinear(attn.vision_expert_query_key_value)
    mlp.language_mlp.down_proj = LoraLinear(mlp.language_mlp.down_proj)
    tt = torch.tensor([[0, 1, 1, 1, 0, 0]])
    x = torch.randn(1, 6, cfg.hidden_size)
    with torch.no_grad():
        before = model(x, tt)
    report = patch_cogvlm(model)
    assert report.config.hidden_size == cfg.hidden_size and report.config.vision_qkv_bias
    with torch.no_grad():
        after = model(x, tt)
    assert rel_err(after, before) < 2e-5


def test_config_inference_and_errors():
    cfg = VisualExpertConfig.tiny(rope_theta=500000.0, intermediate_size=40)
    inferred = config_from_hf_layer(CogVLMDecoderLayer(cfg), max_position_embeddings=cfg.max_position_embeddings)
    assert inferred == cfg  # max_position_embeddings is not visible in a layer
    with pytest.raises(ValueError, match="no module of class CogVLMDecoderLayer"):
        patch_cogvlm(nn.Linear(2, 2))


# 50 steps through the fused layer structure with the PyTorch kernels, and a few steps through the Triton kernels
# (interpreted on CPU: ~1-2 s per step, so 50 would dominate CI; on a GPU gpu_check.sh runs the 50 Triton steps)
@pytest.mark.parametrize("kernel_backend,steps", [("torch", 50), ("auto", 4)])
def test_tiny_lm_fused_and_reference_train_identically(kernel_backend, steps):
    steps = int(os.environ.get("VEXPERT_TRAIN_STEPS", steps))
    torch.manual_seed(0)
    cfg = VisualExpertConfig.tiny()
    ref = VisualExpertLM(cfg, 2, 32, backend="reference")
    fused = VisualExpertLM(cfg, 2, 32, backend="fused", kernel_backend=kernel_backend)
    fused.load_state_dict(ref.state_dict())
    opt_r = torch.optim.SGD(ref.parameters(), lr=0.05)
    opt_f = torch.optim.SGD(fused.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(0)
    curve = []
    for step in range(steps):
        ids, tt, feats, labels = synthetic_batch(2, 12, 32, cfg.hidden_size, 4, g, "cpu")
        losses = []
        for model, opt in ((ref, opt_r), (fused, opt_f)):
            loss, _ = model(ids, tt, image_features=feats, labels=labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert abs(losses[0] - losses[1]) <= 1e-4 * max(1.0, abs(losses[0])), (step, losses)
        curve.append(losses[0])
    if steps >= 50:
        assert curve[-1] < curve[0]  # it actually trains


def test_torch_compile_fullgraph():
    cfg = VisualExpertConfig.tiny()
    block = VisualExpertBlock(cfg)
    tt = torch.tensor([[0, 1, 1, 1, 0, 0, 0]])
    x = torch.randn(1, 7, cfg.hidden_size)
    from vexpert_kernels import RoutingPlan
    plan = RoutingPlan.build(tt)
    eager = block(x, tt, plan=plan)[0]
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    out = compiled(x, tt, plan=plan)[0]
    assert rel_err(out, eager) < 1e-6


def test_rope_table_cached_and_exact():
    """RoutingPlan.rope_table: fp32 (cos, sin) [T, hd/2] in routed order, positions rounded through position_dtype,
    built once per (inv_freq, position_dtype, position_ids) and rebuilt after an in-place change."""
    from vexpert_kernels import RoutingPlan
    tt = torch.tensor([[0, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 0]])
    plan = RoutingPlan.build(tt)
    inv = 1.0 / (10000 ** (torch.arange(0, 8, 2).float() / 8))
    pos = torch.arange(6).expand(2, -1) * 101 + 250
    cos, sin = plan.rope_table(inv, torch.bfloat16, pos)
    assert cos.shape == (12, 4) and cos.dtype == torch.float32
    ang = pos.to(torch.bfloat16).float().reshape(-1)[plan.perm][:, None] * inv
    assert torch.equal(cos, ang.cos()) and torch.equal(sin, ang.sin())
    assert plan.rope_table(inv, torch.bfloat16, pos)[0] is cos                 # cached
    assert plan.rope_table(inv, None, pos)[0] is not cos                       # other position dtype
    inv.mul_(1.0)
    assert plan.rope_table(inv, torch.bfloat16, pos)[0] is not cos             # in-place change -> rebuilt
    default = plan.rope_table(inv)[0]
    assert torch.equal(default, (plan.routed_position_ids.float()[:, None] * inv).cos())


@pytest.mark.parametrize("past", [0, 3])
def test_keep_mask_from_hf_4d_mask(past):
    """The HF decoders' 4-D additive mask (causal + key padding, finfo.min or -inf) gives back the key padding."""
    from upstream.common import decoder_attention_mask
    from vexpert_kernels.layer_context import keep_mask_from_additive
    L = 4
    keep = torch.ones(3, past + L, dtype=torch.bool)
    keep[0, :2] = False           # left padding
    keep[1, -1] = False           # right padding
    for dtype in (torch.float32, torch.bfloat16):
        mask = decoder_attention_mask(keep.long(), 3, L, dtype, "cpu", past)
        assert torch.equal(keep_mask_from_additive(mask, 3), keep)
    no_pad = decoder_attention_mask(None, 1, L, torch.float32, "cpu", past)
    assert torch.equal(keep_mask_from_additive(no_pad, 2), torch.ones(2, past + L, dtype=torch.bool))

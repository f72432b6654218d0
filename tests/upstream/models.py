"""Builders for the three upstream model kinds and a padded multimodal batch (used by tests/test_upstream_*.py)."""
from __future__ import annotations

import torch

from . import cogagent, cogvlm2, cogvlm_v1
from .common import TinyConfig

KINDS = ("cogvlm", "cogvlm2", "cogagent")


def make_model(kind: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    if kind == "cogvlm":
        model = cogvlm_v1.CogVLMForCausalLM(TinyConfig(**overrides))
    elif kind == "cogvlm2":
        model = cogvlm2.CogVLMForCausalLM(TinyConfig(num_multi_query_heads=2, **overrides))
    elif kind == "cogagent":
        model = cogagent.CogAgentForCausalLM(TinyConfig(**overrides))
    else:
        raise ValueError(kind)
    with torch.no_grad():  # non-trivial norms and biases
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                p.add_(0.1 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.normal_(0, 0.1)
    return model.eval()


def make_batch(model, padding: str = "left", seed: int = 1):
    """Two rows: [bos] image(4) text..., one of them padded on ``padding`` side. Returns a kwargs dict for
    ``model(...)`` / ``model.generate(...)`` and the bool keep mask [B, L]."""
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    B, L = 2, 11
    tt = torch.zeros(B, L, dtype=torch.long)
    keep = torch.ones(B, L, dtype=torch.bool)
    tt[0, 1:6] = 1                     # bos, boi + 3 patches + eoi, text
    if padding == "left":
        keep[1, :3] = False
        tt[1, 4:8] = 1
    else:
        keep[1, -3:] = False
        tt[1, 1:5] = 1
    ids = torch.randint(1, cfg.vocab_size, (B, L), generator=g)
    ids[~keep] = 0
    feats = torch.randn(int((tt == 1).sum()), cfg.hidden_size, generator=g)
    kw = dict(input_ids=ids, token_type_ids=tt, attention_mask=keep.long(), images_features=feats)
    if hasattr(cfg, "cross_hidden_size") and type(model).__name__.startswith("CogAgent"):
        kw["encoder_outputs"] = torch.randn(B, cfg.cross_image_tokens, cfg.cross_hidden_size, generator=g)
    return kw, keep

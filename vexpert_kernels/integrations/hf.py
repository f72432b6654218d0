"""Patch an already-loaded Hugging Face CogVLM model to use the fused layer, in place, sharing its parameters."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from ..config import VisualExpertConfig

DECODER_LAYER_NAMES = ("CogVLMDecoderLayer",)
SUBMODULE_NAMES = ("VisionExpertAttention", "VisionExpertMLP")


@dataclass
class PatchReport:
    patched: list = field(default_factory=list)      # qualified names of replaced decoder layers
    skipped: list = field(default_factory=list)      # (name, why)
    config: Optional[VisualExpertConfig] = None
    backend: Optional[str] = None

    def __str__(self):
        lines = [f"patched {len(self.patched)} CogVLM decoder layer(s) -> vexpert_kernels.VisualExpertBlock "
                 f"(backend {self.backend})"]
        lines += [f"  skipped {n}: {why}" for n, why in self.skipped]
        return "\n".join(lines)


def _base_linear(module):
    """The nn.Linear under a PEFT-style wrapper (``base_layer``), or the module itself."""
    while not isinstance(module, nn.Linear) and hasattr(module, "base_layer"):
        module = module.base_layer
    return module


def config_from_hf_layer(layer: nn.Module, **overrides) -> VisualExpertConfig:
    """Infer a VisualExpertConfig from an HF CogVLM decoder layer's modules and weights."""
    attn, mlp = layer.self_attn, layer.mlp
    qkv_v = _base_linear(attn.vision_expert_query_key_value)
    qkv_l = _base_linear(attn.language_expert_query_key_value)
    hidden = qkv_v.in_features
    heads = getattr(attn, "num_heads", None) or getattr(attn, "num_attention_heads", None)
    if heads is None:
        raise ValueError("cannot infer num_attention_heads from the layer; pass config=")
    head_dim = hidden // heads
    kv_heads = (qkv_v.out_features // head_dim - heads) // 2
    inv_freq = attn.rotary_emb.inv_freq.float()
    theta = float(inv_freq[1].double() ** (-head_dim / 2.0)) if inv_freq.numel() > 1 else 10000.0
    # snap to the usual round numbers (inv_freq is stored in fp32)
    theta = float(round(theta, -int(max(0, len(str(int(theta))) - 3))))
    eps = getattr(layer.input_layernorm, "variance_epsilon", getattr(layer.input_layernorm, "eps", 1e-5))
    base = dict(hidden_size=hidden, intermediate_size=_base_linear(mlp.vision_mlp.gate_proj).out_features,
                num_attention_heads=heads, num_key_value_heads=kv_heads, rms_norm_eps=float(eps), rope_theta=theta,
                vision_qkv_bias=qkv_v.bias is not None, language_qkv_bias=qkv_l.bias is not None)
    base.update(overrides)
    return VisualExpertConfig(**base)


def patch_cogvlm(model: nn.Module, config: Optional[VisualExpertConfig] = None, *, backend: str = "auto",
                 attention_backend: str = "auto") -> PatchReport:
    """Replace every ``CogVLMDecoderLayer`` of ``model`` (in place) by a fused :class:`VisualExpertBlock` that shares
    the layer's submodules — no parameter is copied, so optimizers, PEFT/LoRA wrappers and state dicts keep working.

    ``config`` defaults to one inferred from the first layer. Returns a :class:`PatchReport`.
    """
    from ..block import VisualExpertBlock
    from ..validation import check_patch_args

    check_patch_args(model, config, backend, attention_backend)  # before any layer is touched
    report = PatchReport()
    if type(model).__name__ in DECODER_LAYER_NAMES:
        raise ValueError("model is itself a CogVLMDecoderLayer; use VisualExpertBlock.from_hf_layer(layer, config)")
    targets = [(name, mod) for name, mod in model.named_modules() if type(mod).__name__ in DECODER_LAYER_NAMES]
    if not targets:
        raise ValueError("patch_cogvlm found no module of class CogVLMDecoderLayer in the model")
    for name, layer in targets:
        cfg = config or config_from_hf_layer(layer)
        report.config = report.config or cfg
        fused = VisualExpertBlock.from_hf_layer(layer, cfg, backend=backend, attention_backend=attention_backend)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, fused)
        report.patched.append(name)
        report.backend = fused.backend
    for name, mod in model.named_modules():
        if type(mod).__name__ in SUBMODULE_NAMES and not any(name.startswith(p + ".") for p in report.patched):
            report.skipped.append((name, f"{type(mod).__name__} outside a CogVLMDecoderLayer: left as is"))
    return report

"""Patch an already-loaded Hugging Face CogVLM / CogVLM2 / CogAgent model to use the fused layer, in place, sharing
its parameters (no copy: optimizers, PEFT/LoRA wrappers, state dicts and checkpoints keep working).

What a patched layer does differently from a plain :class:`VisualExpertBlock`:

* RoPE from the model's own rotary module: its ``inv_freq`` buffer as stored (a bf16 checkpoint's bf16 values —
  theta is never inferred) and the position dtype that module would use (``inv_freq``'s dtype for both upstream
  modules); ONE cos/sin table per model forward for all layers (a shared
  :class:`~vexpert_kernels.layer_context.RopeCache` keyed on the position ids tensor the decoder hands every layer —
  ``[B, L]`` or ``[1, L]``, any integer dtype — and on the rotary buffers, whose equality across layers is checked
  once, not per forward);
* one RoutingPlan per model forward, shared by all layers through a :class:`~vexpert_kernels.block.PlanCache` (the
  decoder hands every layer the same ``token_type_ids`` and mask tensors); decode steps build one tiny plan per
  token, not per layer;
* the decoder's 4-D additive mask is read as causal + key padding (its last query row), so attention gets a
  key-padding mask and can use our kernels / the fastest backend instead of SDPA with a dense bias — no host sync;
* DeepSpeed ZeRO-3: the fused layer reads ``.weight`` of submodules it never calls, so each patched layer is flagged
  as a ZeRO-3 *leaf module* (``_z3_leaf = True``, what ``deepspeed.utils.set_z3_leaf_modules`` sets): DeepSpeed then
  gathers all of the layer's parameters in the layer's own forward and backward hooks. Patch before
  ``deepspeed.initialize`` (or call ``set_z3_leaf_modules(model, [VisualExpertBlock])`` yourself).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from ...config import VisualExpertConfig

DECODER_LAYER_NAMES = ("CogVLMDecoderLayer",)        # CogVLM v1 (cogvlm-chat-hf) and CogVLM2
CROSS_DECODER_LAYER_NAMES = ("CogAgentDecoderLayer",)  # CogAgent: + cross-attention to high-res image features
SUBMODULE_NAMES = ("VisionExpertAttention", "VisionExpertMLP")


@dataclass
class PatchReport:
    """What ``patch_cogvlm`` did. ``str(report)`` is a readable summary."""
    patched: list = field(default_factory=list)      # qualified names of replaced decoder layers
    left_alone: list = field(default_factory=list)   # (name, why)
    config: Optional[VisualExpertConfig] = None
    backend: Optional[str] = None
    rope_source: Optional[str] = None                # where the fused layers' RoPE table comes from
    kinds: dict = field(default_factory=dict)        # HF layer class -> fused class
    plan_sharing: str = ""
    zero3: str = ""

    @property
    def skipped(self):  # older name
        return self.left_alone

    def __str__(self):
        kinds = ", ".join(f"{k} -> {v}" for k, v in self.kinds.items())
        lines = [f"patched {len(self.patched)} decoder layer(s) ({kinds}), backend {self.backend}",
                 f"  RoPE: {self.rope_source}", f"  routing: {self.plan_sharing}", f"  ZeRO-3: {self.zero3}"]
        lines += [f"  left alone {n}: {why}" for n, why in self.left_alone]
        return "\n".join(lines)


def _base_linear(module):
    """The nn.Linear under a PEFT-style wrapper (``base_layer``), or the module itself."""
    while not isinstance(module, nn.Linear) and hasattr(module, "base_layer"):
        module = module.base_layer
    return module


def _theta_of(rotary) -> float:
    """The rotary base, for the config only (the patched layer uses the module's inv_freq, never this)."""
    base = getattr(rotary, "base", None)
    if isinstance(base, (int, float)) and base > 0:
        return float(base)
    inv = getattr(rotary, "inv_freq", None)
    if not isinstance(inv, torch.Tensor) or inv.numel() < 2:
        return 10000.0
    head_dim = 2 * inv.numel()
    theta = float(inv[1].double() ** (-head_dim / 2.0))
    return float(round(theta, -int(max(0, len(str(int(theta))) - 3))))  # snap to the usual round numbers


def config_from_hf_layer(layer: nn.Module, **overrides) -> VisualExpertConfig:
    """Infer a VisualExpertConfig from an HF CogVLM/CogAgent decoder layer's modules and weights.

    ``rope_theta`` is the rotary module's ``base`` when it has one (else inferred from an fp32 ``inv_freq``); it is
    informational for patched layers, which read the module's ``inv_freq`` itself."""
    attn, mlp = layer.self_attn, layer.mlp
    qkv_v = _base_linear(attn.vision_expert_query_key_value)
    qkv_l = _base_linear(attn.language_expert_query_key_value)
    hidden = qkv_v.in_features
    heads = getattr(attn, "num_heads", None) or getattr(attn, "num_attention_heads", None)
    if heads is None:
        raise ValueError("cannot infer num_attention_heads from the layer; pass config=")
    head_dim = hidden // heads
    kv_heads = (qkv_v.out_features // head_dim - heads) // 2
    eps = getattr(layer.input_layernorm, "variance_epsilon", getattr(layer.input_layernorm, "eps", 1e-5))
    base = dict(hidden_size=hidden, intermediate_size=_base_linear(mlp.vision_mlp.gate_proj).out_features,
                num_attention_heads=heads, num_key_value_heads=kv_heads, rms_norm_eps=float(eps),
                rope_theta=_theta_of(attn.rotary_emb), vision_qkv_bias=qkv_v.bias is not None,
                language_qkv_bias=qkv_l.bias is not None)
    base.update(overrides)
    return VisualExpertConfig(**base)


def _shared_rotary(layers):
    """The first layer's rotary module if every layer's rotary state is identical (``same_rope_state``: checked once
    here, on the host; for the report — the layers' shared RopeCache checks it again whenever a buffer changes),
    else None."""
    from ...layer_context import same_rope_state

    rots = [getattr(layer.self_attn, "rotary_emb", None) for layer in layers]
    if not all(isinstance(getattr(r, "inv_freq", None), torch.Tensor) for r in rots):
        return None
    return rots[0] if all(same_rope_state(r, rots[0]) for r in rots) else None


def _ordered_like(fused: nn.Module, layer: nn.Module):
    """Register the fused layer's submodules in the HF layer's order, so state-dict keys come out in the same order."""
    order = [n for n in layer._modules if n in fused._modules] + [n for n in fused._modules if n not in layer._modules]
    fused._modules = type(fused._modules)((n, fused._modules[n]) for n in order)


def patch_cogvlm(model: nn.Module, config: Optional[VisualExpertConfig] = None, *, backend: str = "auto",
                 attention_backend: str = "auto", rope_positions: str = "module") -> PatchReport:
    """Replace every ``CogVLMDecoderLayer`` (CogVLM v1, CogVLM2) and ``CogAgentDecoderLayer`` of ``model``, in place,
    by a fused layer that shares the layer's submodules — no parameter is copied.

    Args:
        model: the HF model (``...ForCausalLM``, its ``.model``, or a PEFT model wrapping it).
        config: VisualExpertConfig for every layer; default: inferred from each layer.
        backend / attention_backend: as :class:`VisualExpertBlock`.
        rope_positions: ``"module"`` (default) rounds positions exactly as the model's rotary module does (bf16 in a
            bf16 model — what the checkpoint was evaluated with); ``"fp32"`` uses exact positions.
    Returns a :class:`PatchReport`: layers patched, modules left alone and why, the RoPE source.
    Raises ValueError if the model has no such layer or is itself one.
    """
    from ...block import VisualExpertBlock
    from ...layer_context import PlanCache, RopeCache
    from .cogagent import CogAgentExpertBlock

    from ...validation import check_patch_args

    check_patch_args(model, config, backend, attention_backend)  # before any layer is touched
    if rope_positions not in ("module", "fp32"):
        raise ValueError(f"rope_positions must be 'module' or 'fp32', got {rope_positions!r}")
    all_names = DECODER_LAYER_NAMES + CROSS_DECODER_LAYER_NAMES
    if type(model).__name__ in all_names:
        raise ValueError(f"model is itself a {type(model).__name__}; use VisualExpertBlock.from_hf_layer(layer, "
                         "config) (or CogAgentExpertBlock.from_hf_layer)")
    targets = [(name, mod) for name, mod in model.named_modules() if type(mod).__name__ in all_names]
    if not targets:
        raise ValueError("patch_cogvlm found no module of class CogVLMDecoderLayer or CogAgentDecoderLayer in the "
                         "model")
    report = PatchReport()
    cache = PlanCache()  # one RoutingPlan per model forward, shared by all patched layers
    rope = RopeCache()   # one RoPE table per model forward, shared by all patched layers
    shared_rope = _shared_rotary([layer for _, layer in targets])
    for name, layer in targets:
        cfg = config or config_from_hf_layer(layer)
        report.config = report.config or cfg
        cross = type(layer).__name__ in CROSS_DECODER_LAYER_NAMES
        cls = CogAgentExpertBlock if cross else VisualExpertBlock
        fused = cls.from_hf_layer(layer, cfg, backend=backend, attention_backend=attention_backend)
        _ordered_like(fused, layer)
        fused.plan_cache = cache
        fused.rope_cache = rope
        fused.hf_decoder_mask = True
        fused.rope_positions = rope_positions
        fused._z3_leaf = True  # DeepSpeed ZeRO-3: gather the whole layer in its own forward/backward
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, fused)
        report.patched.append(name)
        report.kinds[type(layer).__name__] = cls.__name__
        report.backend = fused.backend
        if report.rope_source is None:
            report.rope_source = fused.rope_source + (
                f"; identical in all {len(targets)} layers: one cos/sin table per forward" if shared_rope is not None
                else "; differs between layers: one table per layer per forward")
        if cross:
            report.left_alone.append((f"{name}.cross_attn", f"{type(layer.cross_attn).__name__}: called as is "
                                      "between the fused self-attention and MLP (sequence order)"))
    report.plan_sharing = ("one RoutingPlan per model forward shared by all patched layers (keyed on the "
                           "token_type_ids/attention_mask tensors); 4-D decoder masks read as causal + key padding")
    report.zero3 = ("patched layers flagged as DeepSpeed ZeRO-3 leaf modules (_z3_leaf=True): their parameters are "
                    "gathered in the layer's own forward/backward")
    patched = tuple(report.patched)
    for name, mod in model.named_modules():
        cls_name = type(mod).__name__
        if any(name == p or name.startswith(p + ".") for p in patched):
            continue
        if cls_name in SUBMODULE_NAMES:
            report.left_alone.append((name, f"{cls_name} outside a CogVLM decoder layer: left as is"))
        elif cls_name.endswith("DecoderLayer") or cls_name.endswith("EncoderLayer"):
            report.left_alone.append((name, f"{cls_name} is not a visual-expert layer (e.g. the vision tower)"))
    return report

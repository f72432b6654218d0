"""Model-level inputs: ``VisualExpertLM`` construction and forward, ``VisualExpertConfig`` fields,
``patch_cogvlm`` arguments."""
from __future__ import annotations

import torch

from .backends import BLOCK_BACKENDS, MODEL_BACKENDS, check_backend_names
from .plan import check_token_type_ids
from .scalars import check_bool, check_choice, check_positive_finite, check_positive_int
from .tensors import check_tensor, debug_checks_enabled


def check_lm_init(config, num_layers, vocab_size, backend, kernel_backend, checkpoint) -> None:
    from ..config import VisualExpertConfig

    if not isinstance(config, VisualExpertConfig):
        raise TypeError(f"config must be a VisualExpertConfig, got {type(config).__name__}")
    check_positive_int("num_layers", num_layers)
    check_positive_int("vocab_size", vocab_size)
    check_choice("backend", backend, MODEL_BACKENDS)
    check_choice("kernel_backend", kernel_backend, BLOCK_BACKENDS)
    check_bool("checkpoint", checkpoint)


def check_lm_forward(lm, input_ids, token_type_ids, image_features, attention_mask, labels) -> None:
    """``VisualExpertLM.forward``: ids [B, L] in range, token types [B, L], image_features [n_image_tokens, D]
    (count checked on the host for CPU tensors or under VEXPERT_DEBUG=1), attention_mask 2-D [B, L], labels [B, L]."""
    dev = lm.embed_tokens.weight.device
    V, D = lm.embed_tokens.num_embeddings, lm.config.hidden_size
    check_tensor("input_ids", input_ids, dims=(2,), integer=True, device=dev)
    B, L = input_ids.shape
    if input_ids.numel() == 0:
        raise ValueError(f"input_ids must not be empty, got shape {tuple(input_ids.shape)}")
    tt = check_token_type_ids(token_type_ids)
    if tuple(tt.shape) != (B, L):
        raise ValueError(f"token_type_ids must have input_ids' shape {(B, L)}, got {tuple(tt.shape)}")
    if tt.device != dev:
        raise ValueError(f"token_type_ids is on {tt.device} but the model is on {dev}")
    host = dev.type == "cpu" or debug_checks_enabled()
    if host and not torch.compiler.is_compiling():
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= V:
            raise ValueError(f"input_ids must be in [0, vocab_size={V}), got values in [{lo}, {hi}]")
    if image_features is not None:
        check_tensor("image_features", image_features, dims=(2,), device=dev)
        if not image_features.is_floating_point():
            raise TypeError(f"image_features must be floating point, got {image_features.dtype}")
        if image_features.shape[-1] != D:
            raise ValueError(f"image_features must be [n_image_tokens, {D}], got {tuple(image_features.shape)}")
        if host and not torch.compiler.is_compiling():
            n = int((tt == 1).sum())
            if image_features.shape[0] != n:
                raise ValueError(f"image_features must have one row per image token (token_type_ids == 1: {n}), got "
                                 f"{image_features.shape[0]} rows")
    if attention_mask is not None:
        check_tensor("attention_mask", attention_mask, shape=(B, L), device=dev)
    if labels is not None:
        check_tensor("labels", labels, shape=(B, L), integer=True, device=dev)


def check_config(cfg) -> None:
    """Every field of a VisualExpertConfig (called from ``__post_init__``: bad values fail at construction)."""
    n = "VisualExpertConfig."
    for name in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
                 "max_position_embeddings"):
        check_positive_int(n + name, getattr(cfg, name))
    if cfg.hidden_size % cfg.num_attention_heads:
        raise ValueError(f"{n}num_attention_heads ({cfg.num_attention_heads}) must divide hidden_size "
                         f"({cfg.hidden_size})")
    if cfg.num_attention_heads % cfg.num_key_value_heads:
        raise ValueError(f"{n}num_key_value_heads ({cfg.num_key_value_heads}) must divide num_attention_heads "
                         f"({cfg.num_attention_heads})")
    if (cfg.hidden_size // cfg.num_attention_heads) % 2:
        raise ValueError(f"{n[:-1]} head_dim (hidden_size / num_attention_heads = "
                         f"{cfg.hidden_size // cfg.num_attention_heads}) must be even for rotary embeddings")
    check_positive_finite(n + "rms_norm_eps", cfg.rms_norm_eps)
    check_positive_finite(n + "rope_theta", cfg.rope_theta)
    for name in ("vision_qkv_bias", "language_qkv_bias"):
        check_bool(n + name, getattr(cfg, name))
    if not isinstance(cfg.image_attention, str) or cfg.image_attention not in ("causal", "bidirectional"):
        raise ValueError(f"{n}image_attention must be 'causal' or 'bidirectional', got {cfg.image_attention!r}")
    if cfg.rope_position_dtype is not None and cfg.rope_position_dtype not in (torch.bfloat16, torch.float16,
                                                                               torch.float32):
        raise ValueError(f"{n}rope_position_dtype must be None, torch.bfloat16, torch.float16 or torch.float32, got "
                         f"{cfg.rope_position_dtype!r}")


def check_patch_args(model, config, backend, attention_backend) -> None:
    from ..config import VisualExpertConfig

    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if config is not None and not isinstance(config, VisualExpertConfig):
        raise TypeError(f"config must be a VisualExpertConfig or None (inferred from the model), got "
                        f"{type(config).__name__}")
    check_backend_names(backend, attention_backend)

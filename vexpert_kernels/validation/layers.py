"""Whole calls of the layers: ``VisualExpertBlock`` construction and forward, ``visual_expert_layers``,
``VisualExpertStack`` — every argument checked, and checked against the others, before any kernel runs."""
from __future__ import annotations

import torch

from .backends import check_backend_names, env_attention_backend, resolve_gemm_path
from .layer_inputs import (check_attention_mask, check_forward_args, check_hidden_states, check_past_key_value,
                           check_position_ids)
from .plan import check_packed_plan, check_plan, check_plan_matches
from .scalars import check_bool, check_positive_int


def check_block_init(config, backend, attention_backend) -> None:
    from ..config import VisualExpertConfig

    if not isinstance(config, VisualExpertConfig):
        raise TypeError(f"config must be a VisualExpertConfig, got {type(config).__name__}")
    check_backend_names(backend, attention_backend)


def check_block_forward(block, hidden_states, token_type_ids, position_ids, attention_mask, past_key_value, plan,
                        routed: bool):
    """Everything ``VisualExpertBlock.forward`` is given, checked before any kernel runs.

    Returns ``(token_type_ids [B, L] or None when routed, position_ids or None)``; position ids come back as given
    (integer ``[B, L]`` or ``[1, L]``: the layer's RoPE cache broadcasts them once per forward). See
    :func:`check_plan_matches` for when plan values are compared."""
    cfg = block.config
    check_bool("routed", routed)
    if block.requested_backend == "auto":  # env overrides are read (and rejected if unknown) before any kernel
        resolve_gemm_path("auto", hidden_states if isinstance(hidden_states, torch.Tensor) else torch.empty(0))
    if block.attention_backend == "auto":
        env_attention_backend()
    if routed:
        if plan is None:
            raise ValueError("routed=True needs plan= (the RoutingPlan that defines the routed order)")
        check_plan(plan)
        check_hidden_states(hidden_states, block.hidden_size, block=block, dims=2)
        if hidden_states.shape[0] != plan.num_tokens:
            raise ValueError(f"routed hidden_states must be [T={plan.num_tokens}, {block.hidden_size}] (the plan's "
                             f"B*L rows in routed order), got {tuple(hidden_states.shape)}")
        if plan.device != hidden_states.device:
            raise ValueError(f"plan is on {plan.device} but hidden_states is on {hidden_states.device}")
        B, L = plan.batch_size, plan.seq_len
        tt = None
    else:
        if token_type_ids is None and plan is not None:
            check_plan(plan)
            token_type_ids = plan.token_type_ids
        tt = check_forward_args(hidden_states, token_type_ids, block.hidden_size, block=block)
        B, L = tt.shape
    dev = hidden_states.device
    past = check_past_key_value(past_key_value, B, cfg.num_key_value_heads, cfg.head_dim, hidden_states.dtype, dev)
    check_attention_mask(attention_mask, B, L, past + L, dev, cfg.num_attention_heads)
    position_ids = check_position_ids(position_ids, B, L, dev, broadcast=False)
    if plan is not None:
        if tt is not None:
            check_plan_matches(plan, tt, attention_mask)
        if plan.packed_cu_seqlens is not None:
            check_packed_plan(plan, attention_mask, past_key_value)
    return tt, position_ids


def check_layers_call(layers, hidden_states, token_type_ids, position_ids, attention_mask, plan, checkpoint):
    """``visual_expert_layers`` arguments -> (token_type_ids [B, L], position_ids [B, L] or None)."""
    from ..block import VisualExpertBlock

    check_bool("checkpoint", checkpoint)
    if isinstance(layers, torch.nn.Module) and not isinstance(layers, torch.nn.ModuleList):
        raise TypeError(f"layers must be a list / nn.ModuleList of VisualExpertBlock, got {type(layers).__name__}")
    try:
        layers = list(layers)
    except TypeError:
        raise TypeError(f"layers must be a list / nn.ModuleList of VisualExpertBlock, got "
                        f"{type(layers).__name__}") from None
    for i, layer in enumerate(layers):
        if not isinstance(layer, VisualExpertBlock):
            raise TypeError(f"layers[{i}] must be a VisualExpertBlock, got {type(layer).__name__}")
    first = layers[0] if layers else None
    hidden = first.hidden_size if first is not None else getattr(hidden_states, "shape", [None])[-1]
    for i, layer in enumerate(layers):
        if layer.hidden_size != hidden:
            raise ValueError(f"layers[{i}] has hidden_size {layer.hidden_size} but layers[0] has {hidden}")
    if token_type_ids is None and plan is not None:
        check_plan(plan)
        token_type_ids = plan.token_type_ids
    # dtype/device against the parameters is checked by each layer's forward (under FSDP the parameters are only
    # unsharded, in their compute dtype, inside that forward)
    tt = check_forward_args(hidden_states, token_type_ids, hidden)
    B, L = tt.shape
    check_attention_mask(attention_mask, B, L, L, hidden_states.device,
                         first.config.num_attention_heads if first is not None else 1)
    position_ids = check_position_ids(position_ids, B, L, hidden_states.device)
    if plan is not None:
        check_plan_matches(plan, tt, attention_mask)
        if plan.packed_cu_seqlens is not None:
            check_packed_plan(plan, attention_mask, None)
    return tt, position_ids


def check_stack_init(config, num_layers, block_kwargs: dict) -> None:
    check_positive_int("num_layers", num_layers)
    check_block_init(config, block_kwargs.get("backend", "auto"), block_kwargs.get("attention_backend", "auto"))

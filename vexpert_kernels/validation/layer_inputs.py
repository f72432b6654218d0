"""One argument of a layer's forward at a time: hidden_states, token_type_ids with them, position_ids,
attention_mask, past_key_value, and the HF position ids used when none are given."""
from __future__ import annotations

from typing import Optional

import torch

from .plan import check_token_type_ids
from .tensors import FLOAT_DTYPES, check_tensor


def _block_weight(block):
    """A plain nn.Linear weight of the block (its dtype is what the fused GEMMs need), else None (wrapped modules)."""
    lin = block.self_attn.language_expert_query_key_value
    return lin.weight if type(lin) is torch.nn.Linear else None


def check_hidden_states(hidden_states, hidden_size: int, *, block=None, dims: int = 3, name: str = "hidden_states"):
    """Floating [B, L, hidden_size] (or [T, hidden_size] with dims=2), non-empty, on the block's device and in its
    parameters' dtype."""
    check_tensor(name, hidden_states)
    want = "[B, L, hidden_size]" if dims == 3 else "[T, hidden_size]"
    if hidden_states.dim() != dims:
        raise ValueError(f"{name} must be {want} with hidden_size={hidden_size}, got shape "
                         f"{tuple(hidden_states.shape)}")
    if hidden_states.shape[-1] != hidden_size:
        raise ValueError(f"{name} last dim must be hidden_size={hidden_size}, got shape {tuple(hidden_states.shape)}")
    if hidden_states.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(hidden_states.shape)}")
    if not hidden_states.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {hidden_states.dtype}")
    if block is not None:
        ref = block.input_layernorm.weight
        if hidden_states.device != ref.device:
            raise ValueError(f"{name} is on {hidden_states.device} but the block's parameters are on {ref.device}; "
                             f"move one of them (block.to(device))")
        if hidden_states.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be float32, float16 or bfloat16 for the fused block, got "
                            f"{hidden_states.dtype} (float64 runs in vexpert_kernels.reference)")
        w = _block_weight(block)
        if w is not None and w.dtype != hidden_states.dtype:
            raise TypeError(f"{name} has dtype {hidden_states.dtype} but the block's weights are {w.dtype}; cast the "
                            f"input or the block (block.to({hidden_states.dtype}))")
    return hidden_states


def check_forward_args(hidden_states, token_type_ids, hidden_size: int, *, block=None) -> torch.Tensor:
    """hidden_states [B, L, hidden_size] and token_type_ids [B, L] on one device -> token_type_ids (2-D)."""
    check_hidden_states(hidden_states, hidden_size, block=block)
    tt = check_token_type_ids(token_type_ids)
    if tuple(tt.shape) != tuple(hidden_states.shape[:2]):
        raise ValueError(f"token_type_ids shape {tuple(tt.shape)} must equal hidden_states' [B, L] "
                         f"{tuple(hidden_states.shape[:2])}")
    if tt.device != hidden_states.device:
        raise ValueError(f"token_type_ids is on {tt.device} but hidden_states is on {hidden_states.device}")
    return tt


def check_position_ids(position_ids, batch: int, length: int, device, *,
                       broadcast: bool = True) -> Optional[torch.Tensor]:
    """None, or integer [B, L] / [1, L] (broadcast over the batch, as HF does) -> int64 [B, L] (the given tensor
    itself when it already is int64 [B, L]). ``broadcast=False``: the given tensor itself, whatever its integer dtype
    and first dim (a layer's RoPE cache keys on the tensor the decoder hands every layer and broadcasts it once per
    forward, ``layer_context.RopeCache``)."""
    if position_ids is None:
        return None
    check_tensor("position_ids", position_ids, integer=True)
    if position_ids.dim() != 2 or position_ids.shape[1] != length or position_ids.shape[0] not in (1, batch):
        raise ValueError(f"position_ids must have shape [B={batch}, L={length}] (or [1, {length}], broadcast over "
                         f"the batch), got {tuple(position_ids.shape)}")
    if position_ids.device != device:
        raise ValueError(f"position_ids is on {position_ids.device} but hidden_states is on {device}")
    if not broadcast:
        return position_ids  # the same object: the RoPE caches key on it
    from ..layer_context import rope_position_ids

    return rope_position_ids(position_ids, batch, length)  # int64 [B, L] itself, else a broadcast int64 copy


def check_attention_mask(attention_mask, batch: int, q_len: int, kv_len: int, device, num_heads: int = 1):
    """None | 2-D keep mask [B, past+L] (1 keep, 0 pad; a batch-1 mask is NOT broadcast: padding is per row) |
    4-D additive float mask [B or 1, 1 or H, L, past+L]. Returns it unchanged."""
    if attention_mask is None:
        return None
    check_tensor("attention_mask", attention_mask)
    if attention_mask.device != device:
        raise ValueError(f"attention_mask is on {attention_mask.device} but hidden_states is on {device}")
    if attention_mask.dim() == 2:
        if tuple(attention_mask.shape) != (batch, kv_len):
            raise ValueError(f"attention_mask (2-D keep mask) must have shape [B={batch}, past+L={kv_len}], got "
                             f"{tuple(attention_mask.shape)}"
                             + ("; a batch-1 mask is not broadcast (padding differs per row): expand it"
                                if attention_mask.shape[0] == 1 and batch > 1 else ""))
        if attention_mask.is_complex():
            raise TypeError(f"attention_mask (2-D keep mask) must be bool/integer/float, got {attention_mask.dtype}")
        return attention_mask
    if attention_mask.dim() == 4:
        s = tuple(attention_mask.shape)
        if s[0] not in (1, batch) or s[1] not in (1, num_heads) or s[2:] != (q_len, kv_len):
            raise ValueError(f"attention_mask (4-D additive) must have shape [B={batch} or 1, 1, L={q_len}, "
                             f"past+L={kv_len}], got {s}")
        if not attention_mask.is_floating_point():
            raise TypeError(f"a 4-D attention_mask is additive (0 keep, large negative drop) and must be floating "
                            f"point, got {attention_mask.dtype}; pass a 2-D keep mask [B, past+L] for 0/1 masks")
        return attention_mask
    raise ValueError(f"attention_mask must be a 2-D keep mask [B={batch}, past+L={kv_len}] or a 4-D additive mask "
                     f"[B, 1, L={q_len}, past+L={kv_len}], got shape {tuple(attention_mask.shape)}")


def check_past_key_value(past_key_value, batch: int, kv_heads: int, head_dim: int, dtype, device) -> int:
    """None or a (k, v) pair, each [B, KV, past, hd] in hidden_states' dtype and device -> past length (0 if None)."""
    if past_key_value is None:
        return 0
    if not isinstance(past_key_value, (tuple, list)) or len(past_key_value) != 2:
        got = (f"a {type(past_key_value).__name__} of length {len(past_key_value)}"
               if isinstance(past_key_value, (tuple, list)) else type(past_key_value).__name__)
        raise TypeError(f"past_key_value must be a (k, v) pair of tensors [B, KV, past, hd] (the legacy tuple "
                        f"cache), got {got}")
    shape = (batch, kv_heads, None, head_dim)
    for name, t in zip(("past_key_value[0] (k)", "past_key_value[1] (v)"), past_key_value):
        check_tensor(name, t, shape=shape, device=device)
        if t.dtype != dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but hidden_states has {dtype}")
    k, v = past_key_value
    if k.shape != v.shape:
        raise ValueError(f"past_key_value k and v must have the same shape, got {tuple(k.shape)} and "
                         f"{tuple(v.shape)}")
    return k.shape[2]


def default_position_ids(token_type_ids, attention_mask, past_key_value):
    """HF rule when no position ids are given; a chunk after a KV cache cannot know its positions, so it must pass them."""
    from ..routing import build_position_ids

    if past_key_value is not None:
        raise ValueError("position_ids is required with past_key_value: image tokens compress positions, so a chunk "
                         "after a cache cannot infer its own (pass last_position + 1, ...)")
    keep = None
    if attention_mask is not None and attention_mask.dim() == 2:
        keep = attention_mask[:, -token_type_ids.shape[1]:] != 0
    return build_position_ids(token_type_ids, keep)

"""Routing inputs (``RoutingPlan.build``) and plans handed to layers: token types, keep masks, packed
``cu_seqlens``, a plan matching the call it is given to."""
from __future__ import annotations

from typing import Optional

import torch

from .tensors import check_cu_seqlens, check_tensor, debug_checks_enabled


def check_token_type_ids(token_type_ids, name: str = "token_type_ids") -> torch.Tensor:
    """int [B, L] (or [L] -> [1, L]) of 0 (language) / 1 (vision). Values are checked on the host for CPU tensors;
    on CUDA by a device-side assert (no host sync). Returns the 2-D tensor."""
    check_tensor(name, token_type_ids)
    if token_type_ids.dtype == torch.bool or token_type_ids.is_floating_point() or token_type_ids.is_complex():
        raise TypeError(f"{name} must be an integer tensor (0 = language, 1 = vision), got {token_type_ids.dtype}")
    if token_type_ids.dim() == 1:
        token_type_ids = token_type_ids.unsqueeze(0)
    if token_type_ids.dim() != 2:
        raise ValueError(f"{name} must have shape [B, L], got {tuple(token_type_ids.shape)}")
    if token_type_ids.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(token_type_ids.shape)}")
    if token_type_ids.device.type == "meta":  # no values (shape-only tracing)
        return token_type_ids
    bad = (token_type_ids != 0) & (token_type_ids != 1)
    if token_type_ids.device.type == "cpu" and not torch.compiler.is_compiling():
        if bool(bad.any()):
            raise ValueError(f"{name} may only hold 0 (language) or 1 (vision); found "
                             f"{sorted(set(token_type_ids[bad].tolist()))[:5]}")
    else:  # device-side assert: no host sync on the hot path (and no graph break under torch.compile)
        torch._assert_async(~bad.any(), f"{name} may only hold 0 (language) or 1 (vision)")
    return token_type_ids


def check_keep_mask(attention_mask, shape, device, name: str = "attention_mask") -> Optional[torch.Tensor]:
    """2-D keep mask of exactly ``shape`` (1/True keep, 0/False pad) -> bool tensor, or None."""
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(attention_mask).__name__}")
    if attention_mask.is_complex():
        raise TypeError(f"{name} must be a bool/integer/float keep mask, got {attention_mask.dtype}")
    if attention_mask.dim() == 1 and len(shape) == 2 and shape[0] == 1:
        attention_mask = attention_mask.unsqueeze(0)
    if tuple(attention_mask.shape) != tuple(shape):
        raise ValueError(f"{name} must be a 2-D keep mask of shape {tuple(shape)} (1 keep, 0 pad), "
                         f"got {tuple(attention_mask.shape)}; pass 4-D additive masks to the layer, not the plan")
    if attention_mask.device != device:
        raise ValueError(f"{name} is on {attention_mask.device} but token_type_ids is on {device}")
    return attention_mask != 0


def check_plan_cu_seqlens(cu_seqlens, total: int, device) -> torch.Tensor:
    """Packed-plan ``cu_seqlens`` int [S+1] -> int32 on ``device``. Values checked as :func:`check_cu_seqlens`
    (host already has them for CPU tensors; on CUDA only under ``VEXPERT_DEBUG=1``)."""
    check_tensor("cu_seqlens", cu_seqlens, dims=(1,), integer=True)
    packed = cu_seqlens.to(device=device, dtype=torch.int32)
    check_cu_seqlens("cu_seqlens", cu_seqlens, total=total)
    return packed


def check_plan(plan, *, name: str = "plan"):
    from ..routing import RoutingPlan

    if not isinstance(plan, RoutingPlan):
        raise TypeError(f"{name} must be a vexpert_kernels.RoutingPlan (RoutingPlan.build(token_type_ids, ...)), "
                        f"got {type(plan).__name__}")
    return plan


def check_plan_matches(plan, token_type_ids: torch.Tensor, attention_mask=None) -> None:
    """``plan`` must describe ``token_type_ids`` (and a 2-D ``attention_mask`` [B, L] given with it).

    Shapes and devices are always compared. Values are compared when the tensors are on the CPU (no sync needed) or
    under ``VEXPERT_DEBUG=1`` (one device->host copy); on CUDA otherwise a plan built from other token types than
    the ones passed is the caller's responsibility (no hidden host sync on the hot path)."""
    check_plan(plan)
    tt = token_type_ids
    if tuple(plan.token_type_ids.shape) != tuple(tt.shape):
        raise ValueError(f"plan was built for token_type_ids of shape [B, L] = {tuple(plan.token_type_ids.shape)}, "
                         f"but token_type_ids / hidden_states have {tuple(tt.shape)}")
    if plan.device != tt.device:
        raise ValueError(f"plan is on {plan.device} but token_type_ids is on {tt.device}")
    if torch.compiler.is_compiling() or not (tt.device.type == "cpu" or debug_checks_enabled()):
        return
    if not torch.equal(plan.token_type_ids, tt.to(plan.token_type_ids.dtype)):
        raise ValueError("plan was built from other token_type_ids than the ones passed (same shape, different "
                         "values); build the plan from these token_type_ids or pass plan=None")
    if (plan.attention_mask is not None and isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2
            and tuple(attention_mask.shape) == tuple(tt.shape)
            and not torch.equal(plan.attention_mask, attention_mask != 0)):
        raise ValueError("plan was built with another attention_mask than the one passed; build the plan with this "
                         "attention_mask or pass plan=None")


def check_packed_plan(plan, attention_mask, past_key_value) -> None:
    """A packed plan (built with cu_seqlens) describes whole sequences back to back: no padding mask, no KV cache."""
    if attention_mask is not None or past_key_value is not None or plan.attention_mask is not None:
        raise ValueError("a packed plan (RoutingPlan.build(..., cu_seqlens=...)) takes no attention_mask (in the plan "
                         "or the call) and no past_key_value: its cu_seqlens already separate the sequences")

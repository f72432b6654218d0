"""Input validation shared by every public entry point: one place, one message style.

Every check raises ``TypeError`` (wrong kind of object / dtype) or ``ValueError`` (wrong shape, device, range) with
a message naming the argument, what it got and what was expected — before any kernel runs. Checks that would need
device values (e.g. the contents of a CUDA ``cu_seqlens``) never add a host sync on the hot path: they run where
the values are already on the host (CPU tensors), or when ``VEXPERT_DEBUG=1`` (tests set it); kernels are written
bound-safe for every input that passes the host-side checks.

Sections: generic checks (tensor, dtype, choice, numbers, cu_seqlens) used by the ops; routing inputs
(``RoutingPlan.build``); layer inputs (``VisualExpertBlock`` construction/forward, ``visual_expert_layers``,
``VisualExpertStack``, ``VisualExpertLM``) including how a block's ``backend="auto"`` and the
``VEXPERT_GEMM_BACKEND`` / ``VEXPERT_ATTENTION_BACKEND`` overrides resolve; ``VisualExpertConfig``; ``patch_cogvlm``.
Package modules import from here only lazily where this module needs them (no import cycles).
"""
from __future__ import annotations

import math
import os
from typing import Iterable, Optional, Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def debug_checks_enabled() -> bool:
    """``VEXPERT_DEBUG=1``: also run the checks that need a device->host copy (off by default: no hidden syncs)."""
    return os.environ.get("VEXPERT_DEBUG", "0") not in ("", "0")


def _shape_str(shape: Sequence) -> str:
    return "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"


def check_tensor(name: str, t, *, shape: Optional[Sequence] = None, dims: Optional[Iterable[int]] = None,
                 dtypes: Optional[Iterable[torch.dtype]] = None, device=None, allow_none: bool = False,
                 integer: bool = False):
    """Check one tensor argument. ``shape`` entries may be None (any size). Returns ``t``."""
    if t is None:
        if allow_none:
            return None
        raise TypeError(f"{name} must be a torch.Tensor, got None")
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if integer and (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool):
        raise TypeError(f"{name} must be an integer tensor, got dtype {t.dtype}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if t.dtype not in dtypes:
            raise TypeError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    if dims is not None:
        dims = tuple(dims)
        if t.dim() not in dims:
            raise ValueError(f"{name} must have {' or '.join(map(str, dims))} dimensions, got shape {tuple(t.shape)}")
    if shape is not None:
        if t.dim() != len(shape) or any(s is not None and s != d for s, d in zip(shape, t.shape)):
            raise ValueError(f"{name} must have shape {_shape_str(shape)}, got {tuple(t.shape)}")
    if device is not None and t.device != torch.device(device):
        raise ValueError(f"{name} is on {t.device}, expected {device} (all inputs on one device)")
    return t


def check_same_dtype(pairs: Sequence) -> None:
    """``pairs``: [(name, tensor or None), ...]; all non-None tensors share the first one's dtype."""
    ts = [(n, t) for n, t in pairs if t is not None]
    for n, t in ts[1:]:
        if t.dtype != ts[0][1].dtype:
            raise TypeError(f"{n} has dtype {t.dtype} but {ts[0][0]} has {ts[0][1].dtype}; they must match")


def check_choice(name: str, value, choices: Iterable) -> None:
    """``value`` must be one of ``choices``; a non-string where the choices are names is a TypeError."""
    choices = tuple(choices)
    if choices and all(isinstance(c, str) for c in choices) and not isinstance(value, str):
        raise TypeError(f"{name} must be a string, one of {list(choices)}, got {type(value).__name__}")
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


def check_positive_finite(name: str, value, *, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    v = float(value)
    if not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
        raise ValueError(f"{name} must be a finite {'non-negative' if allow_zero else 'positive'} number, got {value!r}")
    return v


def check_positive_int(name: str, value, *, allow_zero: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be a {'non-negative' if allow_zero else 'positive'} int, got {value}")
    return value


def check_cu_seqlens(name: str, cu, *, total: int, max_seqlen: Optional[int] = None, device=None):
    """``cu`` int [S+1]: starts at 0, non-decreasing, ends at ``total`` rows, no segment longer than ``max_seqlen``.

    Structure (dims, dtype, device) is always checked. The values are checked when ``cu`` is on the CPU (no sync
    needed) or when :func:`debug_checks_enabled` (one device->host copy). Returns ``cu``."""
    check_tensor(name, cu, dims=(1,), integer=True, device=device)
    if cu.numel() < 2:
        raise ValueError(f"{name} must hold at least 2 entries [0, ..., total], got shape {tuple(cu.shape)}")
    if cu.device.type == "cpu" or debug_checks_enabled():
        if torch.compiler.is_compiling():
            return cu
        vals = cu.tolist()
        if vals[0] != 0 or vals[-1] != total or any(b < a for a, b in zip(vals, vals[1:])):
            raise ValueError(f"{name} must be non-decreasing from 0 to the number of rows ({total}), got "
                             f"{vals if len(vals) <= 12 else vals[:6] + ['...'] + vals[-6:]}")
        if max_seqlen is not None:
            longest = max(b - a for a, b in zip(vals, vals[1:]))
            if longest > max_seqlen:
                raise ValueError(f"{name} has a sequence of length {longest} but max_seqlen is {max_seqlen}; "
                                 "max_seqlen must be >= every sequence length")
    return cu


def check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def _short(vals: list) -> list:
    return vals if len(vals) <= 12 else vals[:6] + ["..."] + vals[-6:]


# ============================================================================ routing inputs (RoutingPlan.build)
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
    from .routing import RoutingPlan

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


# ============================================================================ layer inputs (block / stack / LM)
BLOCK_BACKENDS = ("auto", "triton", "torch")
MODEL_BACKENDS = ("fused", "reference")


def attention_backend_choices() -> tuple:
    from .ops.attention import BACKENDS

    return ("auto",) + tuple(BACKENDS)


def check_backend_names(backend, attention_backend) -> None:
    """Block/stack/patch construction: reject unknown ``backend`` / ``attention_backend`` strings right away."""
    check_choice("backend", backend, BLOCK_BACKENDS)
    check_choice("attention_backend", attention_backend, attention_backend_choices())


def check_block_init(config, backend, attention_backend) -> None:
    from .config import VisualExpertConfig

    if not isinstance(config, VisualExpertConfig):
        raise TypeError(f"config must be a VisualExpertConfig, got {type(config).__name__}")
    check_backend_names(backend, attention_backend)


def resolve_gemm_path(requested: str, x: torch.Tensor) -> str:
    """The GEMM path a block's routed ops take for tensors like ``x`` (what ``block.backend`` reports).

    ``requested="auto"`` is passed to the ops unchanged; like them it honours ``VEXPERT_GEMM_BACKEND``, then picks
    Triton where usable (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``), else torch. On CUDA the ops'
    own dispatch (measured table / autotuner) may still choose per projection."""
    from ._triton_compat import triton_usable_for

    if requested == "auto":
        env = os.environ.get("VEXPERT_GEMM_BACKEND", "").strip().lower()
        if env and env != "auto":
            from .ops.routed_linear import BACKENDS as GEMM_BACKENDS

            check_choice("VEXPERT_GEMM_BACKEND", env, GEMM_BACKENDS)
            return env
        return "triton" if triton_usable_for(x) else "torch"
    if requested == "triton" and not triton_usable_for(x):
        raise ValueError(f"backend='triton' needs CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 set before "
                         f"triton is imported; the tensors are on {x.device}")
    return requested


def env_attention_backend() -> Optional[str]:
    """``VEXPERT_ATTENTION_BACKEND`` when set to something other than auto (validated), else None."""
    env = os.environ.get("VEXPERT_ATTENTION_BACKEND", "").strip()
    if not env or env == "auto":
        return None
    check_choice("VEXPERT_ATTENTION_BACKEND", env, attention_backend_choices())
    return env


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


def check_position_ids(position_ids, batch: int, length: int, device) -> Optional[torch.Tensor]:
    """None, or integer [B, L] / [1, L] (broadcast over the batch, as HF does) -> int64 [B, L] (the given tensor
    itself when it already is int64 [B, L])."""
    if position_ids is None:
        return None
    check_tensor("position_ids", position_ids, integer=True)
    if position_ids.dim() != 2 or position_ids.shape[1] != length or position_ids.shape[0] not in (1, batch):
        raise ValueError(f"position_ids must have shape [B={batch}, L={length}] (or [1, {length}], broadcast over "
                         f"the batch), got {tuple(position_ids.shape)}")
    if position_ids.device != device:
        raise ValueError(f"position_ids is on {position_ids.device} but hidden_states is on {device}")
    if position_ids.dtype == torch.int64 and position_ids.shape[0] == batch:
        return position_ids  # the same object: per-plan caches (RoPE tables) key on it
    return position_ids.long().expand(batch, length)


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
    from .routing import build_position_ids

    if past_key_value is not None:
        raise ValueError("position_ids is required with past_key_value: image tokens compress positions, so a chunk "
                         "after a cache cannot infer its own (pass last_position + 1, ...)")
    keep = None
    if attention_mask is not None and attention_mask.dim() == 2:
        keep = attention_mask[:, -token_type_ids.shape[1]:] != 0
    return build_position_ids(token_type_ids, keep)


def check_packed_plan(plan, attention_mask, past_key_value) -> None:
    """A packed plan (built with cu_seqlens) describes whole sequences back to back: no padding mask, no KV cache."""
    if attention_mask is not None or past_key_value is not None or plan.attention_mask is not None:
        raise ValueError("a packed plan (RoutingPlan.build(..., cu_seqlens=...)) takes no attention_mask (in the plan "
                         "or the call) and no past_key_value: its cu_seqlens already separate the sequences")


def check_block_forward(block, hidden_states, token_type_ids, position_ids, attention_mask, past_key_value, plan,
                        routed: bool):
    """Everything ``VisualExpertBlock.forward`` is given, checked before any kernel runs.

    Returns ``(token_type_ids [B, L] or None when routed, position_ids [B, L] int64 or None)``; ``[1, L]`` position
    ids come back expanded to ``[B, L]``. See :func:`check_plan_matches` for when plan values are compared."""
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
    position_ids = check_position_ids(position_ids, B, L, dev)
    if plan is not None:
        if tt is not None:
            check_plan_matches(plan, tt, attention_mask)
        if plan.packed_cu_seqlens is not None:
            check_packed_plan(plan, attention_mask, past_key_value)
    return tt, position_ids


def check_layers_call(layers, hidden_states, token_type_ids, position_ids, attention_mask, plan, checkpoint):
    """``visual_expert_layers`` arguments -> (token_type_ids [B, L], position_ids [B, L] or None)."""
    from .block import VisualExpertBlock

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


def check_lm_init(config, num_layers, vocab_size, backend, kernel_backend, checkpoint) -> None:
    from .config import VisualExpertConfig

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


# ============================================================================ VisualExpertConfig
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


# ============================================================================ patch_cogvlm
def check_patch_args(model, config, backend, attention_backend) -> None:
    from .config import VisualExpertConfig

    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if config is not None and not isinstance(config, VisualExpertConfig):
        raise TypeError(f"config must be a VisualExpertConfig or None (inferred from the model), got "
                        f"{type(config).__name__}")
    check_backend_names(backend, attention_backend)

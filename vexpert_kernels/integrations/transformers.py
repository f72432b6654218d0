"""``attn_implementation="vexpert"`` for Hugging Face transformers models (decoder LMs: Llama, Qwen2, Mistral, ...).

    from vexpert_kernels.integrations.transformers import register
    register()                                   # once per process; returns the name
    model = AutoModelForCausalLM.from_pretrained(..., attn_implementation="vexpert")

This module imports nothing from transformers until :func:`register` is called.

What is registered (transformers >= 4.48 for the attention function — ``AttentionInterface`` from 4.50, the plain
``ALL_ATTENTION_FUNCTIONS`` dict in 4.48/4.49 — and >= 4.53 for the mask function; tested: 4.48.3, 4.57.6, 5.x):

* an **attention function** (``AttentionInterface``): receives q [B, H, Lq, hd], k/v [B, KV, Lk, hd] (GQA: K/V are
  never repeated) and returns ``(out [B, Lq, H, hd], None)``; it calls :func:`vexpert_kernels.ops.mixed_attention`
  (bottom-right causal: query i sits at key position Lk - Lq + i, which is what a KV ``Cache`` gives) or, for packed
  rows, :func:`vexpert_kernels.ops.mixed_attention_varlen`;
* a **mask function** (``AttentionMaskInterface``): without it transformers hands a custom backend
  ``attention_mask=None`` and padding would be silently ignored. It returns the cheapest exact description of the
  mask transformers wants::

      None             plain bottom-right causal, no padding          -> mixed_attention(...)
      bool [B, Lk]     bottom-right causal + key padding (True=keep)  -> mixed_attention(key_padding_mask=...)
      bool [B,1,Lq,Lk] anything else (sliding window that cuts, packed rows, static cache, model overlays): the
                       mask sdpa would get. Packed rows whose mask is block-diagonal causal go to
                       mixed_attention_varlen; any other 4-D mask is served exactly as an additive bias (sdpa/math).

transformers 4.48 - 4.52 (no mask interface): the model builds an eager-style 4-D additive mask itself (0 keep,
finfo.min drop); it is read back as the bool mask it stands for and served as above. Packed rows then come with a
plain causal mask, so, as transformers' own flash_attention_2 path does, restarting ``position_ids`` or
``cu_seq_lens_*`` split an unpadded row into sequences.

Packed / padding-free batches (``DataCollatorWithFlattening``): ``cu_seq_lens_q/k`` + ``max_length_q/k`` kwargs are
used as given; otherwise ``position_ids`` that restart inside a row split it into sequences. Sequences never attend
across each other.

Served or refused (ValueError naming the feature, before any kernel runs):
  attention dropout > 0 (training with ``config.attention_dropout``)   refused: set it to 0.0 or use "sdpa"
  softcapping (``softcap``)                                           refused: use "eager"
  attention sinks (``s_aux``)                                         refused: use "eager"
  ``output_attentions=True``                                          refused: use "eager"
  sliding windows                                                     served through the mask (exact)
  head dims a backend cannot take (e.g. triton > 128)                 another backend is picked, with one log line
"""
from __future__ import annotations

import functools
import logging
from typing import Optional

import torch

log = logging.getLogger("vexpert_kernels")

DEFAULT_NAME = "vexpert"


# ------------------------------------------------------------------------------------------------ refusals
def _refuse(feature: str, why: str):
    raise ValueError(f"attn_implementation 'vexpert' does not support {feature}: {why}")


def _check_request(module, dropout, kwargs) -> None:
    if dropout is not None and float(dropout) > 0.0:
        _refuse(f"attention dropout (dropout={dropout}, from config.attention_dropout in training mode)",
                "set config.attention_dropout=0.0 or use attn_implementation='sdpa'")
    if kwargs.get("softcap") is not None:
        _refuse(f"attention logit softcapping (softcap={kwargs['softcap']})", "use attn_implementation='eager'")
    if kwargs.get("s_aux") is not None or kwargs.get("sinks") is not None:
        _refuse("attention sinks (s_aux)", "use attn_implementation='eager'")
    if kwargs.get("output_attentions"):
        _refuse("output_attentions=True (the weights are never materialised)", "use attn_implementation='eager'")
    if kwargs.get("position_bias") is not None:
        _refuse("position_bias (relative position biases)", "use attn_implementation='sdpa'")


# ------------------------------------------------------------------------------------------------ mask function
def _bottom_right_causal(lq: int, lk: int, device) -> torch.Tensor:
    """bool [Lq, Lk]: query i (key position Lk - Lq + i) keeps keys j <= Lk - Lq + i."""
    return torch.ones(lq, lk, dtype=torch.bool, device=device).tril(lk - lq)


def compress_mask(mask: torch.Tensor):
    """bool [B, 1, Lq, Lk] -> None / bool [B, Lk] when it equals bottom-right causal (+ key padding), else ``mask``."""
    if not isinstance(mask, torch.Tensor) or mask.dim() != 4 or mask.dtype != torch.bool or mask.shape[1] != 1:
        return mask
    B, _, lq, lk = mask.shape
    if lq == 0 or lk < lq:
        return mask
    keep = mask[:, 0, -1, :]                                                   # [B, Lk]: the last query sees all kept
    expected = _bottom_right_causal(lq, lk, mask.device)[None] & keep[:, None, :]
    if not torch.equal(mask[:, 0], expected):
        return mask
    return None if bool(keep.all()) else keep.contiguous()


def binary_from_additive(mask: torch.Tensor) -> torch.Tensor:
    """A floating 4-D additive mask whose every entry is 0 (keep) or <= finfo.min / 2 (drop, -inf included) -> the
    bool keep mask it stands for (what transformers < 4.53 hands a custom backend); any other mask is returned as is
    (a real bias, e.g. ALiBi, stays additive). Fully masked query rows (left padding) then come out of the kernels
    as zeros instead of sdpa's uniform average over masked keys: both are padding, never read."""
    if not isinstance(mask, torch.Tensor) or not mask.is_floating_point() or mask.dim() != 4:
        return mask
    drop = mask <= torch.finfo(mask.dtype).min / 2
    if not bool((drop | (mask == 0)).all()):
        return mask
    return ~drop


def _mask_function(*args, **kwargs):
    """transformers mask interface: the exact mask, in the form :func:`_attention_forward` serves fastest."""
    from transformers import masking_utils as mu

    mf = kwargs.get("mask_function", getattr(mu, "causal_mask_function", None))
    q_offset, kv_offset = kwargs.get("q_offset"), kwargs.get("kv_offset", 0)
    q_length, kv_length = kwargs.get("q_length"), kwargs.get("kv_length")
    plain = (not args and mf is getattr(mu, "causal_mask_function", object()) and kwargs.get("local_size") is None
             and all(isinstance(x, int) and not isinstance(x, bool) for x in (q_offset, kv_offset, q_length, kv_length))
             and q_offset + q_length == kv_offset + kv_length)
    if plain:  # bottom-right causal by construction: only the key padding is left to describe
        am = kwargs.get("attention_mask")
        if am is None:
            return None
        am = mu.prepare_padding_mask(am, kv_length, kv_offset)[:, kv_offset:kv_offset + kv_length]
        am = am.to(torch.bool)
        return None if bool(am.all()) else am
    kwargs = dict(kwargs, allow_is_causal_skip=False, allow_is_bidirectional_skip=False)
    mask = mu.sdpa_mask(*args, **kwargs)
    if mask is None:
        raise RuntimeError("transformers' sdpa_mask returned None with every skip disabled; cannot tell the mask")
    return compress_mask(mask)


# ------------------------------------------------------------------------------------------------ packed rows
def _int(x) -> int:
    return int(x.item()) if isinstance(x, torch.Tensor) else int(x)


def _cu_from_position_ids(position_ids: torch.Tensor, B: int, L: int) -> Optional[torch.Tensor]:
    """int32 [S+1] over the flattened B*L tokens when position_ids restart inside a row (packed), else None."""
    pos = position_ids.reshape(-1, position_ids.shape[-1])
    if pos.shape[-1] != L or pos.shape[0] not in (1, B):
        return None
    pos = pos.expand(B, L)
    start = torch.ones(B, L, dtype=torch.bool, device=pos.device)
    start[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
    if not bool(start[:, 1:].any()):
        return None
    idx = start.reshape(-1).nonzero().flatten()
    return torch.cat([idx, idx.new_tensor([B * L])]).to(torch.int32)


def _segment_causal(cu: torch.Tensor, B: int, L: int, device) -> torch.Tensor:
    """bool [B, L, L]: block-diagonal causal mask of the flattened segments ``cu`` (segments never cross rows)."""
    seg = torch.zeros(B * L, dtype=torch.int64, device=device)
    seg[cu[1:-1].long()] = 1
    seg = seg.cumsum(0).view(B, L)
    return (seg[:, :, None] == seg[:, None, :]) & _bottom_right_causal(L, L, device)[None]


def _mask_is(mask: torch.Tensor, keep: torch.Tensor) -> bool:
    """bool 4-D ``mask`` [B|1, 1|H, Lq, Lk] equals ``keep`` [B, Lq, Lk] for every head."""
    return mask.shape[-2:] == keep.shape[-2:] and bool((mask == keep[:, None]).all())


# ------------------------------------------------------------------------------------------------ attention function
@functools.lru_cache(maxsize=64)
def _warn_once(msg: str) -> None:
    log.warning(msg)


def _call(fn, backend: str, *args, **kw):
    """``fn(*args, backend=backend, **kw)``; a backend that cannot serve the call (it raises before any kernel runs)
    is replaced by "auto", which picks one that can (e.g. triton's head-dim limit -> sdpa/flex/math)."""
    if backend != "auto":
        try:
            return fn(*args, backend=backend, **kw)
        except ValueError as exc:
            if "cannot serve" not in str(exc):
                raise
            _warn_once(f"vexpert attention: {exc}; using backend='auto' for such calls")
    return fn(*args, backend="auto", **kw)


def _attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, *,
                       backend="auto", exact_masks=True, **kwargs):
    """transformers attention interface: q [B, H, Lq, hd], k/v [B, KV, Lk, hd] -> (out [B, Lq, H, hd], None)."""
    from vexpert_kernels.ops import mixed_attention, mixed_attention_varlen

    _check_request(module, dropout, kwargs)
    B, H, Lq, hd = query.shape
    Lk = key.shape[2]
    mask = attention_mask
    four_d = isinstance(mask, torch.Tensor) and mask.dim() == 4
    if four_d:
        mask = mask[..., :Lk]  # a static cache's mask can be longer than the keys handed over (as sdpa does)
        mask = binary_from_additive(mask)  # transformers < 4.53 hands custom backends eager-style 0/min masks
    if isinstance(mask, torch.Tensor) and not four_d and (mask.dim() != 2 or tuple(mask.shape) != (B, Lk)):
        raise ValueError(f"vexpert attention: attention_mask must be None, bool [B={B}, Lk={Lk}] or 4-D "
                         f"[B, 1|H, Lq, Lk], got shape {tuple(mask.shape)}")
    if not four_d:
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        if not causal and Lq > 1:
            _refuse("non-causal attention without a 4-D mask", "decoder (causal) self-attention only")
        window = kwargs.get("sliding_window")
        if not exact_masks and window is not None and Lk > int(window):
            _refuse(f"a sliding window ({window} < {Lk} keys) without transformers' mask interface",
                    "upgrade transformers (>= 4.53) or use attn_implementation='sdpa'")

    # packed rows: explicit cu_seq_lens, else position_ids that restart inside a row (only when nothing is padded)
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is not None or cu_k is not None:
        if cu_q is None or cu_k is None or B != 1:
            raise ValueError("vexpert attention: packed batches need both cu_seq_lens_q and cu_seq_lens_k and one "
                             f"row (batch size 1), got batch size {B}")
        max_q = _int(kwargs["max_length_q"]) if kwargs.get("max_length_q") is not None else _int(cu_q.diff().max())
        max_k = _int(kwargs["max_length_k"]) if kwargs.get("max_length_k") is not None else _int(cu_k.diff().max())
        if four_d and mask.dtype == torch.bool and Lq == Lk and torch.equal(cu_q, cu_k):
            plain = not exact_masks and compress_mask(mask) is None  # < 4.53: the model's mask knows no packing
            if not plain and not _mask_is(mask, _segment_causal(cu_q, B, Lq, query.device)):
                raise ValueError("vexpert attention: cu_seq_lens_q/k disagree with the attention mask transformers "
                                 "built (from attention_mask / position_ids)")
        packed = (cu_q, cu_k, max_q, max_k)
    else:
        packed = None
        pid = kwargs.get("position_ids")
        if pid is not None and Lq == Lk and Lq > 1 and (mask is None or (four_d and mask.dtype == torch.bool)):
            cu = _cu_from_position_ids(pid, B, Lq)
            # transformers < 4.53 (no mask interface) builds a plain causal mask for packed rows; its
            # flash_attention_2 path splits them by position_ids, and so do we when nothing is padded
            if cu is not None and (mask is None or _mask_is(mask, _segment_causal(cu, B, Lq, query.device))
                                   or (not exact_masks and compress_mask(mask) is None)):
                m = _int(cu.diff().max())
                packed = (cu, cu, m, m)

    if packed is not None:
        cu_q, cu_k, max_q, max_k = packed
        q = query.transpose(1, 2).reshape(B * Lq, H, hd)                        # [T, H, hd]
        k = key.transpose(1, 2).reshape(B * Lk, key.shape[1], hd)               # [T, KV, hd]
        v = value.transpose(1, 2).reshape(B * Lk, value.shape[1], value.shape[-1])
        out = _call(mixed_attention_varlen, backend, q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale=scaling)
        return out.reshape(B, Lq, H, -1), None                                  # [B, Lq, H, hd]

    if four_d:  # the exact mask: try the cheap forms first, else an additive bias (sdpa / math)
        compact = compress_mask(mask) if mask.dtype == torch.bool else mask
        if compact is None or compact.dim() == 2:
            mask, four_d = compact, False
    if four_d:
        if mask.dtype == torch.bool:
            bias = torch.zeros(mask.shape, dtype=query.dtype, device=query.device)
            bias.masked_fill_(~mask, torch.finfo(query.dtype).min)  # finite: fully masked rows stay finite
        else:
            bias = mask.to(query.dtype)
        out = _call(mixed_attention, backend, query, key, value, attn_bias=bias, softmax_scale=scaling)
    else:
        out = _call(mixed_attention, backend, query, key, value, key_padding_mask=mask, softmax_scale=scaling)
    return out.transpose(1, 2).contiguous(), None                              # [B, Lq, H, hd]


# ------------------------------------------------------------------------------------------------ registration
def attention_function(backend: str = "auto", *, exact_masks: bool = True):
    """The attention callable for ``AttentionInterface`` (``backend`` as in :func:`mixed_attention`)."""
    fn = functools.partial(_attention_forward, backend=backend, exact_masks=exact_masks)
    functools.update_wrapper(fn, _attention_forward)
    return fn


def _attention_registry(transformers):
    """``fn(name, attention)`` registering an attention function with this transformers version:
    ``AttentionInterface.register`` (>= 4.50) or the plain ``ALL_ATTENTION_FUNCTIONS`` dict (4.48, 4.49), which
    ``from_pretrained(attn_implementation=...)`` and the model code read in those versions."""
    interface = getattr(transformers, "AttentionInterface", None)
    if interface is None:
        try:
            from transformers.modeling_utils import AttentionInterface as interface
        except ImportError:
            interface = None
    if interface is not None:
        return interface.register
    try:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    except ImportError:
        ALL_ATTENTION_FUNCTIONS = None
    if isinstance(ALL_ATTENTION_FUNCTIONS, dict):
        return ALL_ATTENTION_FUNCTIONS.__setitem__
    raise ImportError(f"attn_implementation='vexpert' needs transformers >= 4.48.3 (AttentionInterface or "
                      f"ALL_ATTENTION_FUNCTIONS); found transformers {transformers.__version__}: "
                      "pip install 'transformers>=4.48.3'")


def register(name: str = DEFAULT_NAME, *, backend: str = "auto") -> str:
    """Register ``attn_implementation=name`` with transformers (attention AND mask function); returns ``name``.

    ``backend`` is the :func:`vexpert_kernels.ops.mixed_attention` backend to prefer ("auto", "triton", "sdpa",
    "flex", "math", ...); a call it cannot serve (head dim, dtype, device) falls back to "auto" with a log line.
    Raises ImportError when transformers is missing or too old (< 4.48: neither ``AttentionInterface`` nor
    ``ALL_ATTENTION_FUNCTIONS``).
    """
    if not isinstance(name, str) or not name or name in ("eager", "sdpa", "flex_attention") \
            or name.startswith("flash_attention") or name.startswith("paged"):
        raise ValueError(f"name must be a new attn_implementation name (not a transformers built-in), got {name!r}")
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string ('auto' or a mixed_attention backend), got {type(backend).__name__}")
    try:
        import transformers
    except ImportError as exc:
        raise ImportError("vexpert_kernels.integrations.transformers.register() needs transformers "
                          "(pip install 'transformers>=4.48.3')") from exc
    register_attention = _attention_registry(transformers)
    try:
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError:
        AttentionMaskInterface = getattr(transformers, "AttentionMaskInterface", None)
    if AttentionMaskInterface is not None:
        AttentionMaskInterface.register(name, _mask_function)
    else:  # transformers < 4.53: models build sdpa/eager-style masks themselves; 4-D masks are served exactly
        log.warning("transformers %s has no AttentionMaskInterface: masks come from the model's own code",
                    transformers.__version__)
    register_attention(name, attention_function(backend, exact_masks=AttentionMaskInterface is not None))
    return name


__all__ = ["register", "attention_function", "compress_mask", "binary_from_additive", "DEFAULT_NAME"]

"""Causal attention over mixed image/text sequences: one public function, several backends behind it.

``mixed_attention`` (padded [B,H,L,hd]) and ``mixed_attention_varlen`` (packed [total,H,hd]) implement ONE masking
model on every backend (see :mod:`vexpert_kernels.ops.flash_attention` for the exact rule): bottom-right aligned
causal (KV-cache prefill/decode), key padding, GQA, and optionally bidirectional attention inside contiguous image
spans (the CogVLM paper's ablation). Backends:

  triton      ours (flash_attention.py): CUDA (fp16/bf16), or CPU tensors under TRITON_INTERPRET=1 (also fp32);
              head dim <= 128. Everything but attn_bias; returns lse; deterministic backward.
  sdpa        torch scaled_dot_product_attention; a boolean mask when the request needs one. No lse.
  flex        torch.nn.attention.flex_attention with a block mask (skips masked blocks; natural for image spans).
              On CPU it runs eagerly and has no backward (refused when inputs require grad).
  varlen      torch.nn.attention.varlen.varlen_attn (CUDA flash): packed causal only.
  flash_attn  flash-attn 2 when installed (CUDA, fp16/bf16): causal, no padding, no image spans.
  xformers    xformers when installed (CUDA): causal, no padding, no image spans.
  math        float reference on any device (the oracle; materialises scores).

``backend="auto"`` walks a preference table (data, below) and takes the first backend that can serve the request;
``VEXPERT_ATTENTION_BACKEND`` overrides auto. An explicit backend that cannot serve the request raises — there is
never a silent fallback to different semantics.
"""
from __future__ import annotations

import importlib.util
import logging
import math
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from vexpert_kernels._triton_compat import HAS_TRITON, TRITON_IMPORT_ERROR, interpret_mode
from vexpert_kernels.ops.flash_attention import canonical_span_ids, flash_attention

logger = logging.getLogger(__name__)

BACKENDS = ("triton", "sdpa", "flex", "varlen", "flash_attn", "xformers", "math")
ENV_VAR = "VEXPERT_ATTENTION_BACKEND"
IMAGE_ATTENTION_MODES = ("causal", "bidirectional")

# ------------------------------------------------------------------------------------------------- auto backend table
# Preference order (fastest first) per (device type, feature set). Every listed backend implements the same
# semantics, so walking the list only changes speed. CUDA rows are the design guess until the GPU benchmark
# (benchmarks/, "attention" suite) measures them at 4x2048 and 1x4096 tokens, 32 heads x 128; update from its table.
# Feature sets: "causal" (no padding, no image spans, no lse), "causal_lse" (same, lse wanted), "masked" (padding
# and/or bidirectional image spans), "bias" (caller's additive mask), "varlen" (packed sequences).
# On CPU the Triton interpreter and eager flex are orders of magnitude slower than sdpa/math: never auto-picked.
AUTO_TABLE = {
    ("cuda", "causal"): ("flash_attn", "sdpa", "triton", "flex", "xformers", "math"),
    ("cuda", "causal_lse"): ("triton", "flex", "math"),
    ("cuda", "masked"): ("triton", "flex", "sdpa", "math"),
    ("cuda", "masked_lse"): ("triton", "flex", "math"),
    ("cuda", "bias"): ("sdpa", "math"),
    ("cuda", "varlen"): ("varlen", "flash_attn", "triton", "math"),
    ("cuda", "varlen_lse"): ("triton", "math"),
    ("cpu", "causal"): ("sdpa", "math"),
    ("cpu", "causal_lse"): ("math",),
    ("cpu", "masked"): ("sdpa", "math"),
    ("cpu", "masked_lse"): ("math",),
    ("cpu", "bias"): ("sdpa", "math"),
    ("cpu", "varlen"): ("sdpa", "math"),
    ("cpu", "varlen_lse"): ("math",),
}


# ------------------------------------------------------------------------------------------------- availability
def _torch_version() -> tuple:
    parts = []
    for p in torch.__version__.split("+")[0].split(".")[:2]:
        digits = "".join(ch for ch in p if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


_SDPA_HAS_GQA = _torch_version() >= (2, 5)


def _probe_availability() -> dict:
    """Static availability on this machine (no request details). Cheap: find_spec, no heavy imports."""
    cuda = torch.cuda.is_available()
    avail = {}
    if not HAS_TRITON:
        avail["triton"] = f"triton failed to import ({TRITON_IMPORT_ERROR})"
    elif not cuda and not interpret_mode():
        avail["triton"] = "no CUDA device and TRITON_INTERPRET is not set (CPU tensors need the interpreter)"
    else:
        avail["triton"] = None
    avail["sdpa"] = None
    try:
        has_flex = importlib.util.find_spec("torch.nn.attention.flex_attention") is not None
    except Exception:  # pragma: no cover
        has_flex = False
    avail["flex"] = None if has_flex else f"torch {torch.__version__} has no torch.nn.attention.flex_attention"
    try:
        has_varlen = importlib.util.find_spec("torch.nn.attention.varlen") is not None
    except Exception:  # pragma: no cover
        has_varlen = False
    if not has_varlen:
        avail["varlen"] = f"torch {torch.__version__} has no torch.nn.attention.varlen"
    elif not cuda:
        avail["varlen"] = "torch.nn.attention.varlen.varlen_attn needs a CUDA device"
    else:
        avail["varlen"] = None
    for name, mod in (("flash_attn", "flash_attn"), ("xformers", "xformers")):
        if importlib.util.find_spec(mod) is None:
            avail[name] = f"{mod} is not installed"
            logger.debug("attention backend %s unavailable: %s not installed", name, mod)
        elif not cuda:
            avail[name] = f"{mod} needs a CUDA device"
        else:
            avail[name] = None
    avail["math"] = None
    return avail


_AVAILABILITY = _probe_availability()


def _varlen_attn_params() -> frozenset:
    """Keyword names of torch.nn.attention.varlen.varlen_attn (its signature changed across torch releases)."""
    try:
        import inspect

        from torch.nn.attention.varlen import varlen_attn

        return frozenset(inspect.signature(varlen_attn).parameters)
    except Exception:  # not importable / not introspectable: the backend is unavailable anyway
        return frozenset()


_VARLEN_PARAMS = _varlen_attn_params() if _AVAILABILITY["varlen"] is None else frozenset()


def available_attention_backends() -> dict:
    """backend name -> None if usable on this machine, else the reason why not (request details not considered)."""
    return dict(_AVAILABILITY)


# ------------------------------------------------------------------------------------------------- request model
@dataclass(frozen=True)
class _Request:
    device: str
    dtype: torch.dtype
    head_dim: int
    gqa: bool
    kv_offset: bool      # Lk > Lq
    padding: bool
    bidir: bool
    bias: bool
    need_lse: bool
    varlen: bool
    grad: bool = False   # any of q/k/v requires grad
    custom_scale: bool = False  # softmax_scale differs from 1/sqrt(hd)

    @property
    def feature(self) -> str:
        if self.varlen:
            base = "varlen"
        elif self.bias:
            base = "bias"
        elif self.padding or self.bidir:
            base = "masked"
        else:
            base = "causal"
        return base + ("_lse" if self.need_lse and base != "bias" else "")


def _unsupported_reason(backend: str, r: _Request) -> Optional[str]:
    """None if ``backend`` serves request ``r`` with exactly our semantics, else why not."""
    static = _AVAILABILITY.get(backend, f"unknown backend {backend!r}; choose from {BACKENDS} or 'auto'")
    if static is not None:
        return static
    if r.bias and backend not in ("sdpa", "math"):
        return f"{backend} does not take attn_bias (only sdpa and math do)"
    if backend == "math":
        return None
    if backend == "triton":
        if r.device == "cpu" and not interpret_mode():
            return "triton on CPU tensors needs TRITON_INTERPRET=1 set before triton is imported"
        if r.device not in ("cuda", "cpu"):
            return f"triton cannot run on {r.device} tensors"
        if r.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            return f"triton supports fp16/bf16/fp32, got {r.dtype}"
        if r.device == "cuda" and r.dtype == torch.float32:
            # the GPU tile configs are sized (and spill-checked) for 2-byte inputs; fp32 tiles would spill
            return "triton on CUDA takes fp16/bf16 (fp32 only under the CPU interpreter); use sdpa/flex/math for fp32"
        if r.head_dim > 128:
            return f"triton supports head dims up to 128 (larger ones spill registers), got {r.head_dim}"
        return None
    if backend == "sdpa":
        if r.need_lse:
            return "sdpa does not return the log-sum-exp (return_lse=True)"
        if r.gqa and not _SDPA_HAS_GQA:
            return f"sdpa GQA needs enable_gqa (torch >= 2.5), this is torch {torch.__version__}"
        return None
    if backend == "flex":
        if r.varlen:
            return "flex is wired for the padded layout only in this package"
        if r.device == "cpu" and r.grad:
            return "flex_attention has no backward on CPU (inputs require grad)"
        if r.device == "cpu" and _torch_version() < (2, 6):
            return f"flex_attention on CPU needs torch >= 2.6, this is torch {torch.__version__}"
        if r.dtype == torch.float64 and r.device == "cuda":
            return "flex on CUDA supports fp16/bf16/fp32"
        return None
    if backend == "varlen":
        if not r.varlen:
            return "the varlen backend serves mixed_attention_varlen only"
        if r.bidir:
            return "varlen_attn has no bidirectional image spans"
        if r.need_lse:
            return "varlen backend is wired without lse in this package"
        if r.dtype not in (torch.float16, torch.bfloat16):
            return f"varlen_attn (flash) needs fp16/bf16, got {r.dtype}"
        if not ({"window_size", "is_causal"} & _VARLEN_PARAMS):
            return "this torch's varlen_attn has neither window_size nor is_causal: cannot ask for causal"
        if r.gqa and "enable_gqa" not in _VARLEN_PARAMS:
            return "this torch's varlen_attn has no enable_gqa"
        if r.custom_scale and "scale" not in _VARLEN_PARAMS:
            return "this torch's varlen_attn takes no softmax scale"
        return None
    if backend in ("flash_attn", "xformers"):
        if r.device != "cuda":
            return f"{backend} needs CUDA tensors"
        if r.padding or r.bidir:
            return f"{backend} is wired for plain causal attention only (no key padding, no image spans)"
        if r.need_lse:
            return f"{backend} is wired without lse in this package"
        if r.dtype not in (torch.float16, torch.bfloat16):
            return f"{backend} needs fp16/bf16, got {r.dtype}"
        if backend == "xformers" and (r.gqa or r.varlen):
            return "xformers is wired without GQA/varlen in this package"
        if r.head_dim % 8 != 0 or r.head_dim > 256:
            return f"{backend} needs a head dim multiple of 8 and <= 256, got {r.head_dim}"
        return None
    return f"unknown backend {backend!r}"


def _select_backend(backend: str, r: _Request) -> str:
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {type(backend).__name__}")
    if backend == "auto":
        env = os.environ.get(ENV_VAR, "")
        if env and env != "auto":
            backend = env
    if backend != "auto":
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS} or 'auto', got {backend!r}")
        why = _unsupported_reason(backend, r)
        if why is not None:
            raise ValueError(f"attention backend {backend!r} cannot serve this request: {why}")
        return backend
    dev = "cuda" if r.device == "cuda" else "cpu"
    for cand in AUTO_TABLE[(dev, r.feature)]:
        if _unsupported_reason(cand, r) is None:
            return cand
    return "math"


# ------------------------------------------------------------------------------------------------- masks + math
def attention_keep_mask(B: int, Lq: int, Lk: int, device, key_padding_mask=None, image_span_ids=None,
                        bidirectional: bool = False) -> torch.Tensor:
    """bool [B, 1, Lq, Lk]: the exact visibility rule every backend implements."""
    qpos = torch.arange(Lq, device=device) + (Lk - Lq)
    kpos = torch.arange(Lk, device=device)
    keep = (kpos[None, :] <= qpos[:, None]).expand(B, Lq, Lk)
    if bidirectional and image_span_ids is not None:
        qs = canonical_span_ids(image_span_ids)
        ks = torch.zeros(B, Lk, dtype=qs.dtype, device=device)
        ks[:, Lk - Lq:] = qs
        keep = keep | ((qs[:, :, None] == ks[:, None, :]) & (qs[:, :, None] != 0))
    if key_padding_mask is not None:
        keep = keep & key_padding_mask[:, None, :]
    return keep[:, None]


def _math_attention(q, k, v, keep, attn_bias, scale, return_lse):
    """Float reference: fp32 (fp64 for fp64 inputs). Rows with nothing visible give 0 and lse=-inf, finite grads."""
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    H, KV = q.shape[1], k.shape[1]
    qf, kf, vf = q.to(cdt), k.to(cdt), v.to(cdt)
    if H != KV:
        kf = kf.repeat_interleave(H // KV, dim=1)
        vf = vf.repeat_interleave(H // KV, dim=1)
    s = torch.matmul(qf, kf.transpose(-1, -2)) * scale
    if attn_bias is not None:
        s = s + attn_bias.to(cdt)
        vis = torch.isfinite(s) if keep is None else keep & torch.isfinite(s)
    else:
        vis = keep
    if vis is not None:
        s = s.masked_fill(~vis, float("-inf"))
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m)).detach()
    p = torch.exp(s - m)
    l = p.sum(-1, keepdim=True)
    nonempty = l > 0
    out = torch.matmul(p, vf) / torch.where(nonempty, l, torch.ones_like(l))
    out = out.to(q.dtype)
    if not return_lse:
        return out
    lse = torch.where(nonempty, m + torch.log(torch.where(nonempty, l, torch.ones_like(l))),
                      torch.full_like(l, float("-inf"))).squeeze(-1).float()
    return out, lse


def _sdpa_attention(q, k, v, keep, attn_bias, scale, simple_causal):
    kw = {"enable_gqa": True} if q.shape[1] != k.shape[1] else {}
    if attn_bias is not None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias.to(q.dtype), scale=scale, **kw)
    if simple_causal:  # square causal, no padding/spans: the flash/cuDNN path
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, **kw)
    if keep is None:  # Lq < Lk, nothing masked, e.g. decode with one query
        return F.scaled_dot_product_attention(q, k, v, scale=scale, **kw)
    # rows with no visible key make SDPA produce NaN (and NaN grads): let them see key 0, then zero them out
    nonempty = keep.any(-1, keepdim=True)
    first = torch.zeros_like(keep)
    first[..., 0] = True
    mask = keep | (~nonempty & first)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, **kw)
    return torch.where(nonempty, out, torch.zeros_like(out))


def _flex_attention(q, k, v, key_padding_mask, span, bidir, scale, return_lse):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention as _flex

    B, H, Lq, _ = q.shape
    Lk = k.shape[2]
    off = Lk - Lq
    kpm = key_padding_mask
    if bidir and span is not None:
        qs = canonical_span_ids(span)
        ks = torch.zeros(B, Lk, dtype=qs.dtype, device=q.device)
        ks[:, off:] = qs
    else:
        qs = ks = None

    def mask_mod(b, h, qi, kj):
        ok = kj <= qi + off
        if qs is not None:
            sq = qs[b, qi]
            ok = ok | ((sq != 0) & (sq == ks[b, kj]))
        if kpm is not None:
            ok = ok & kpm[b, kj]
        return ok

    bm = create_block_mask(mask_mod, B, None, Lq, Lk, device=q.device)
    kw = {"enable_gqa": True} if H != k.shape[1] else {}
    if return_lse:
        try:
            from torch.nn.attention.flex_attention import AuxRequest

            out, aux = _flex(q, k, v, block_mask=bm, scale=scale, return_aux=AuxRequest(lse=True), **kw)
            lse = aux.lse
        except ImportError:  # older torch: return_lse
            out, lse = _flex(q, k, v, block_mask=bm, scale=scale, return_lse=True, **kw)
        return out, lse.float()
    return _flex(q, k, v, block_mask=bm, scale=scale, **kw)


def _flash_attn_backend(q, k, v, scale):
    from flash_attn import flash_attn_func  # optional dependency

    out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale, causal=True)
    return out.transpose(1, 2)


def _xformers_backend(q, k, v, scale):
    import xformers.ops as xops  # optional dependency
    from xformers.ops.fmha.attn_bias import LowerTriangularFromBottomRightMask

    out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          attn_bias=LowerTriangularFromBottomRightMask(), scale=scale)
    return out.transpose(1, 2)


# ------------------------------------------------------------------------------------------------- validation
def _check_tensor(name, t, dims):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != dims:
        raise ValueError(f"{name} must be {dims}-D, got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")


def _check_qkv(q, k, v, varlen):
    dims = 3 if varlen else 4
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_tensor(name, t, dims)
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.device != k.device or q.device != v.device:
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    hd_axis, h_axis = -1, (1 if varlen else 1)
    if q.shape[hd_axis] != k.shape[hd_axis]:
        raise ValueError(f"q and k must share the head dim, got {q.shape[-1]} and {k.shape[-1]}")
    H, KV = q.shape[h_axis], k.shape[h_axis]
    if KV == 0 or H % KV != 0:
        raise ValueError(f"the number of query heads ({H}) must be a multiple of the kv heads ({KV}) (GQA)")
    if not varlen:
        if q.shape[0] != k.shape[0]:
            raise ValueError(f"q and k must share the batch size, got {q.shape[0]} and {k.shape[0]}")
        if k.shape[2] < q.shape[2]:
            raise ValueError(f"need Lk >= Lq (queries are the last Lq key positions), got Lq={q.shape[2]}, "
                             f"Lk={k.shape[2]}")


def _check_mode(image_attention):
    if image_attention not in IMAGE_ATTENTION_MODES:
        raise ValueError(f"image_attention must be one of {IMAGE_ATTENTION_MODES}, got {image_attention!r}")


def _check_span(name, span, shape, device):
    if span is None:
        return None
    if not isinstance(span, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(span).__name__}")
    if span.is_floating_point() or span.is_complex() or span.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {span.dtype}")
    if tuple(span.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(span.shape)}")
    if span.device != device:
        raise ValueError(f"{name} is on {span.device} but q is on {device}")
    return span


def _needs_grad(q, k, v) -> bool:
    return torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)


def _default_scale(softmax_scale, hd):
    if softmax_scale is None:
        return 1.0 / math.sqrt(hd)
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)) or not softmax_scale > 0:
        raise ValueError(f"softmax_scale must be a positive float or None, got {softmax_scale!r}")
    return float(softmax_scale)


# ------------------------------------------------------------------------------------------------- public API
def _resolve_padded(q, k, v, plan, key_padding_mask, image_span_ids, image_attention, attn_bias, softmax_scale,
                    return_lse):
    """Validate a padded-layout request, apply the plan's defaults; -> (key_padding_mask, spans, bidir, scale, req)."""
    _check_qkv(q, k, v, varlen=False)
    _check_mode(image_attention)
    B, H, Lq, hd = q.shape
    KV, Lk = k.shape[1], k.shape[2]
    if plan is not None and Lk == plan.seq_len and B == plan.batch_size:
        if key_padding_mask is None:
            key_padding_mask = plan.attention_mask
        if image_span_ids is None and image_attention == "bidirectional":
            image_span_ids = plan.image_span_ids[:, Lk - Lq:]
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor):
            raise TypeError(f"key_padding_mask must be a bool torch.Tensor or None, got "
                            f"{type(key_padding_mask).__name__}")
        if tuple(key_padding_mask.shape) != (B, Lk):
            raise ValueError(f"key_padding_mask must have shape [B={B}, Lk={Lk}], got "
                             f"{tuple(key_padding_mask.shape)}")
        if key_padding_mask.device != q.device:
            raise ValueError(f"key_padding_mask is on {key_padding_mask.device} but q is on {q.device}")
        if key_padding_mask.dtype != torch.bool:
            key_padding_mask = key_padding_mask != 0
    image_span_ids = _check_span("image_span_ids", image_span_ids, (B, Lq), q.device)
    bidir = image_attention == "bidirectional" and image_span_ids is not None
    if attn_bias is not None:
        if not isinstance(attn_bias, torch.Tensor) or not attn_bias.is_floating_point():
            raise TypeError("attn_bias must be a floating-point torch.Tensor (additive mask) or None")
        try:
            torch.broadcast_shapes(attn_bias.shape, (B, H, Lq, Lk))
        except RuntimeError:
            raise ValueError(f"attn_bias of shape {tuple(attn_bias.shape)} does not broadcast to "
                             f"[B, H, Lq, Lk] = {(B, H, Lq, Lk)}") from None
    scale = _default_scale(softmax_scale, hd)
    req = _Request(device=q.device.type, dtype=q.dtype, head_dim=hd, gqa=H != KV, kv_offset=Lk > Lq,
                   padding=key_padding_mask is not None, bidir=bidir, bias=attn_bias is not None,
                   need_lse=bool(return_lse), varlen=False, grad=_needs_grad(q, k, v))
    return key_padding_mask, image_span_ids, bidir, scale, req


def attention_backend_reason(backend, q, k, v, plan=None, *, key_padding_mask=None, image_span_ids=None,
                             image_attention="causal", attn_bias=None, softmax_scale=None, return_lse=False):
    """None if ``mixed_attention(q, k, v, plan, ..., backend=backend)`` can run with exactly these semantics, else
    the reason it would raise (for benchmarks and callers that want to skip instead of catching ValueError)."""
    req = _resolve_padded(q, k, v, plan, key_padding_mask, image_span_ids, image_attention, attn_bias, softmax_scale,
                          return_lse)[-1]
    if backend not in BACKENDS:
        return f"backend must be one of {BACKENDS}, got {backend!r}"
    return _unsupported_reason(backend, req)


def mixed_attention(q, k, v, plan=None, *, key_padding_mask=None, image_span_ids=None, image_attention="causal",
                    attn_bias=None, softmax_scale=None, return_lse=False, backend="auto"):
    """Causal attention for mixed image/text sequences.

    Args:
        q: [B, H, Lq, hd]; k, v: [B, KV, Lk, hd] with H % KV == 0 (GQA, K/V never repeated in memory for
            triton/sdpa/flex) and Lk >= Lq: query i sits at key position Lk - Lq + i (bottom-right causal).
        plan: optional RoutingPlan; if Lk == plan.seq_len, key_padding_mask defaults to plan.attention_mask and
            image_span_ids to the last Lq columns of plan.image_span_ids.
        key_padding_mask: bool [B, Lk] keep mask (True = real key).
        image_span_ids: int [B, Lq]: 0 outside images, equal nonzero ids on one contiguous image span.
        image_attention: "causal" (default) or "bidirectional" (tokens of one image span see each other fully).
        attn_bias: additive float mask broadcastable to [B, H, Lq, Lk]; replaces causal/padding/span semantics
            (the caller's mask is the whole truth). sdpa and math only.
        softmax_scale: default 1/sqrt(hd). return_lse: also return lse fp32 [B, H, Lq] (natural log; -inf on rows
            with no visible key, whose output is 0). backend: "auto" or one of BACKENDS.
    Returns:
        out [B, H, Lq, hd] (q's dtype), or (out, lse).
    """
    key_padding_mask, image_span_ids, bidir, scale, req = _resolve_padded(
        q, k, v, plan, key_padding_mask, image_span_ids, image_attention, attn_bias, softmax_scale, return_lse)
    B, H, Lq, hd = q.shape
    Lk = k.shape[2]
    name = _select_backend(backend, req)

    if name == "triton":
        out, lse = flash_attention(q, k, v, key_padding_mask=key_padding_mask, image_span_ids=image_span_ids,
                                   bidirectional=bidir, softmax_scale=scale)
        return (out, lse) if return_lse else out
    if name == "flex":
        return _flex_attention(q, k, v, key_padding_mask, image_span_ids, bidir, scale, return_lse)
    if name == "flash_attn":
        return _flash_attn_backend(q, k, v, scale)
    if name == "xformers":
        return _xformers_backend(q, k, v, scale)
    simple_causal = Lq == Lk and key_padding_mask is None and not bidir
    if attn_bias is not None:
        keep = None
    elif Lq == 1 and key_padding_mask is None and name == "sdpa":
        keep = None  # decode: the single query sees every key
    else:
        keep = attention_keep_mask(B, Lq, Lk, q.device, key_padding_mask, image_span_ids, bidir)
    if name == "sdpa":
        return _sdpa_attention(q, k, v, None if simple_causal else keep, attn_bias, scale, simple_causal)
    return _math_attention(q, k, v, keep, attn_bias, scale, return_lse)


def _check_cu(name, cu, device):
    if not isinstance(cu, torch.Tensor) or cu.dim() != 1 or cu.numel() < 2 or cu.is_floating_point() \
            or cu.dtype == torch.bool:
        raise ValueError(f"{name} must be a 1-D integer tensor [S+1] of cumulative sequence lengths")
    if cu.device != device:
        raise ValueError(f"{name} is on {cu.device} but q is on {device}")


def mixed_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, image_span_ids=None,
                           image_attention="causal", softmax_scale=None, return_lse=False, backend="auto"):
    """Packed (varlen) variant: q [total_q, H, hd], k/v [total_k, KV, hd], cu_seqlens_q/k int [S+1].

    Sequence s has queries cu_seqlens_q[s]:cu_seqlens_q[s+1] and keys cu_seqlens_k[s]:cu_seqlens_k[s+1], with
    bottom-right causal alignment per sequence (len_k >= len_q). image_span_ids: int [total_q] (spans never cross
    sequences). Returns out [total_q, H, hd], or (out, lse fp32 [H, total_q]) as flash-attn does.
    """
    _check_qkv(q, k, v, varlen=True)
    _check_mode(image_attention)
    _check_cu("cu_seqlens_q", cu_seqlens_q, q.device)
    _check_cu("cu_seqlens_k", cu_seqlens_k, q.device)
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must describe the same number of sequences, got "
                         f"{cu_seqlens_q.numel() - 1} and {cu_seqlens_k.numel() - 1}")
    for name, val in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if isinstance(val, bool) or not isinstance(val, int) or val < 0:
            raise ValueError(f"{name} must be a non-negative int, got {val!r}")
    image_span_ids = _check_span("image_span_ids", image_span_ids, (q.shape[0],), q.device)
    bidir = image_attention == "bidirectional" and image_span_ids is not None
    total_q, H, hd = q.shape
    scale = _default_scale(softmax_scale, hd)
    req = _Request(device=q.device.type, dtype=q.dtype, head_dim=hd, gqa=H != k.shape[1], kv_offset=True,
                   padding=False, bidir=bidir, bias=False, need_lse=bool(return_lse), varlen=True,
                   grad=_needs_grad(q, k, v), custom_scale=abs(scale - 1.0 / math.sqrt(hd)) > 1e-12)
    name = _select_backend(backend, req)
    if name == "triton":
        out, lse = flash_attention(q, k, v, image_span_ids=image_span_ids, bidirectional=bidir, softmax_scale=scale,
                                   cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q,
                                   max_seqlen_k=max_seqlen_k)
        return (out, lse) if return_lse else out
    if name == "varlen":
        from torch.nn.attention.varlen import varlen_attn

        kw = {"window_size": (-1, 0)} if "window_size" in _VARLEN_PARAMS else {"is_causal": True}
        if H != k.shape[1]:
            kw["enable_gqa"] = True
        if "scale" in _VARLEN_PARAMS:
            kw["scale"] = scale
        return varlen_attn(q, k, v, cu_seqlens_q.to(torch.int32), cu_seqlens_k.to(torch.int32), max_seqlen_q,
                           max_seqlen_k, **kw)
    if name == "flash_attn":
        from flash_attn import flash_attn_varlen_func

        return flash_attn_varlen_func(q, k, v, cu_seqlens_q.to(torch.int32), cu_seqlens_k.to(torch.int32),
                                      max_seqlen_q, max_seqlen_k, softmax_scale=scale, causal=True)
    # sdpa / math: one padded call per sequence (host sync for the lengths: reference paths)
    cq = cu_seqlens_q.tolist()
    ck = cu_seqlens_k.tolist()
    outs, lses = [], []
    for s in range(len(cq) - 1):
        qs = q[cq[s]:cq[s + 1]].transpose(0, 1).unsqueeze(0)
        ks = k[ck[s]:ck[s + 1]].transpose(0, 1).unsqueeze(0)
        vs = v[ck[s]:ck[s + 1]].transpose(0, 1).unsqueeze(0)
        if ks.shape[2] < qs.shape[2]:
            raise ValueError(f"sequence {s}: need len_k >= len_q, got {qs.shape[2]} > {ks.shape[2]}")
        if qs.shape[2] == 0:
            outs.append(q.new_zeros(0, H, hd))
            lses.append(torch.zeros(H, 0, dtype=torch.float32, device=q.device))
            continue
        span = image_span_ids[cq[s]:cq[s + 1]].unsqueeze(0) if bidir else None
        res = mixed_attention(qs, ks, vs, image_span_ids=span, image_attention=image_attention,
                              softmax_scale=scale, return_lse=return_lse, backend=name)
        if return_lse:
            res, lse = res
            lses.append(lse[0])
        outs.append(res[0].transpose(0, 1))
    out = torch.cat(outs, 0)
    return (out, torch.cat(lses, 1)) if return_lse else out


# ------------------------------------------------------------------------------------------------- GPU self-check
def _gpu_selfcheck() -> int:  # pragma: no cover - needs a CUDA device
    """``python -m vexpert_kernels.ops.attention``: triton vs the fp32 math oracle on CUDA (fwd + grads, causal,
    padding, GQA, KV offset, bidirectional spans, varlen), then causal timings vs SDPA at 4x2048 and 1x4096, 32x128.
    Prints one JSON object per line; exit status 1 if a correctness check fails."""
    import json
    import time

    from vexpert_kernels.testing import rel_err

    if not torch.cuda.is_available():
        print(json.dumps({"skipped": "no CUDA device"}))
        return 0
    dev, failed = "cuda", 0
    torch.manual_seed(0)
    for hd in (64, 80, 128):
        for dtype in (torch.bfloat16, torch.float16):
            B, H, KV, Lq, Lk = 2, 8, 2, 700, 777
            q = torch.randn(B, H, Lq, hd, device=dev, dtype=dtype, requires_grad=True)
            k = torch.randn(B, KV, Lk, hd, device=dev, dtype=dtype, requires_grad=True)
            v = torch.randn(B, KV, Lk, hd, device=dev, dtype=dtype, requires_grad=True)
            kpm = torch.ones(B, Lk, dtype=torch.bool, device=dev)
            kpm[0, :100] = False
            kpm[1, -50:] = False
            span = torch.zeros(B, Lq, dtype=torch.int32, device=dev)
            span[0, 10:300] = 1
            span[1, 400:700] = 1
            for mode in ("causal", "bidirectional"):
                kw = dict(key_padding_mask=kpm, image_span_ids=span, image_attention=mode, return_lse=True)
                out, lse = mixed_attention(q, k, v, backend="triton", **kw)
                g = torch.autograd.grad(out.float().square().sum(), (q, k, v))
                qf, kf, vf = (t.detach().float().requires_grad_() for t in (q, k, v))
                ref, rlse = mixed_attention(qf, kf, vf, backend="math", **kw)
                rg = torch.autograd.grad(ref.square().sum(), (qf, kf, vf))
                fin = torch.isfinite(rlse)
                errs = {"out": rel_err(out, ref), "lse": rel_err(lse[fin], rlse[fin]),
                        **{f"d{n}": rel_err(a, b) for n, a, b in zip("qkv", g, rg)}}
                ok = all(e < (3e-2 if dtype == torch.bfloat16 else 1e-2) for e in errs.values())
                failed += not ok
                print(json.dumps({"check": f"hd{hd},{str(dtype)[6:]},{mode}", "ok": ok, **errs}), flush=True)

    def bench(fn, iters=20):
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
        return (time.perf_counter() - t0) / iters * 1e3

    for B, L in ((4, 2048), (1, 4096)):
        q, k, v = (torch.randn(B, 32, L, 128, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        do = torch.randn_like(q)
        row = {"shape": f"{B}x{L},32x128,bf16"}
        for be in ("triton", "sdpa"):
            row[f"{be}_fwd_ms"] = bench(lambda: mixed_attention(q, k, v, backend=be))
            out = mixed_attention(q, k, v, backend=be)
            row[f"{be}_bwd_ms"] = bench(lambda: torch.autograd.grad(out, (q, k, v), do, retain_graph=True))
        span = torch.zeros(B, L, dtype=torch.int32, device=dev)
        span[:, 1:1 + 1225] = 1  # one 35x35-patch image per row
        row["triton_bidir_fwd_ms"] = bench(lambda: mixed_attention(q, k, v, backend="triton", image_span_ids=span,
                                                                   image_attention="bidirectional"))
        print(json.dumps(row), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(_gpu_selfcheck())

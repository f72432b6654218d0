"""Backend dispatch: availability on this machine, the request model, which backend serves what, ``auto``."""
from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass
from typing import Optional

import torch

from vexpert_kernels._triton_compat import HAS_TRITON, TRITON_IMPORT_ERROR, interpret_mode

logger = logging.getLogger(__name__)

BACKENDS = ("triton", "sdpa", "flex", "varlen", "flash_attn", "xformers", "math")
ENV_VAR = "VEXPERT_ATTENTION_BACKEND"

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


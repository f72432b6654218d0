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

# ------------------------------------------------------------------------------------------------- auto: who competes
# ``backend="auto"`` never walks a hand-filled preference table. On CUDA every backend of TUNE_CANDIDATES that serves
# the request competes in vexpert_kernels.autotune.select (timed on the real inputs, each checked against the plain
# PyTorch result; our Triton kernel with a few tile configs); untuned (VEXPERT_AUTOTUNE=0, tracing, no decision yet)
# it runs the first serving backend of STATIC_ORDER: torch's own paths, never an unverified kernel. On CPU nothing
# is timed: CPU_ORDER, i.e. our Triton kernel when the interpreter serves it (that is how CI tests it), else torch.
TUNE_CANDIDATES = ("triton", "sdpa", "flex", "varlen", "flash_attn", "xformers")
STATIC_ORDER = ("sdpa", "flex", "math")
CPU_ORDER = ("triton", "sdpa", "math")


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


def requested_backend(backend) -> str:
    """``backend`` after the environment override: "auto" or a name of BACKENDS; anything else raises."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {type(backend).__name__}")
    if backend not in BACKENDS and backend != "auto":
        raise ValueError(f"backend must be one of {list(BACKENDS) + ['auto']}, got {backend!r}")
    if backend == "auto":
        env = os.environ.get(ENV_VAR, "")
        if env and env != "auto":
            if env not in BACKENDS:
                raise ValueError(f"environment variable {ENV_VAR} must be one of {list(BACKENDS) + ['auto']}, "
                                 f"got {env!r}")
            backend = env
    return backend


def serving_backends(r: _Request, order=BACKENDS) -> list:
    """The backends of ``order`` that serve request ``r`` with exactly our semantics."""
    return [b for b in order if _unsupported_reason(b, r) is None]


def _select_backend(backend: str, r: _Request) -> str:
    """A backend name, or "auto" when the caller must tune (CUDA; see TUNE_CANDIDATES)."""
    backend = requested_backend(backend)
    if backend != "auto":
        why = _unsupported_reason(backend, r)
        if why is not None:
            raise ValueError(f"attention backend {backend!r} cannot serve this request: {why}")
        return backend
    if r.device == "cuda":
        return "auto"
    return (serving_backends(r, CPU_ORDER) or ["math"])[0]


def static_backend(r: _Request) -> str:
    """What ``auto`` runs on CUDA when tuning cannot run: torch's own path (sdpa, else flex, else math)."""
    return (serving_backends(r, STATIC_ORDER) or ["math"])[0]


def length_bucket(n: int) -> int:
    """Power-of-two bucket of a sequence length for tuning keys (1, 2, 4, ..., capped at 2**20)."""
    return 1 << min(max(int(n) - 1, 0).bit_length(), 20)


def tune_key(r: _Request, H: int, KV: int, Lq: int, Lk: int) -> tuple:
    """(dtype, head dim, GQA ratio, mask kind, causal/bidirectional, varlen, lse, length buckets of Lq and Lk)."""
    mask = "bias" if r.bias else ("padded" if r.padding else "causal")
    return (str(r.dtype).replace("torch.", ""), r.head_dim, H // max(KV, 1), mask,
            "bidirectional" if r.bidir else "causal", "varlen" if r.varlen else "padded",
            "lse" if r.need_lse else "out", length_bucket(Lq), length_bucket(Lk))


def bwd_tune_key(dtype, head_dim: int, H: int, KV: int, mask: str, bidir: bool, varlen: bool, routed: bool,
                 lse_grad: bool, deterministic: bool, Lq: int, Lk: int) -> tuple:
    """Tuning key of the backward (op "attention_bwd", flash_attention(..., bwd_config="auto")): as :func:`tune_key`
    plus routed order, an lse gradient and the deterministic flag (its candidates differ)."""
    return (str(dtype).replace("torch.", ""), head_dim, H // max(KV, 1), mask,
            "bidirectional" if bidir else "causal", "varlen" if varlen else "padded", "routed" if routed else "seq",
            "dlse" if lse_grad else "out", "deterministic" if deterministic else "onepass", length_bucket(Lq),
            length_bucket(Lk))


class _LastBackend:
    """The backend the last attention call of this process ran (observable dispatch; not read by any code path)."""
    name: Optional[str] = None


def record_backend(name: str) -> None:
    if not torch.compiler.is_compiling():
        _LastBackend.name = name


def last_backend() -> Optional[str]:
    """Name of the backend the most recent ``mixed_attention``/``mixed_attention_varlen`` call ran (e.g. "sdpa" or
    "triton:128x64:w8s3" when auto tuned a Triton config); None before the first call. Not updated while tracing."""
    return _LastBackend.name

"""Tensor checks every op uses: kind, dtype, rank, shape, device; ``cu_seqlens``; the ``VEXPERT_DEBUG`` switch."""
from __future__ import annotations

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


def _short(vals: list) -> list:
    return vals if len(vals) <= 12 else vals[:6] + ["..."] + vals[-6:]


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
                             f"{_short(vals)}")
        if max_seqlen is not None:
            longest = max(b - a for a, b in zip(vals, vals[1:]))
            if longest > max_seqlen:
                raise ValueError(f"{name} has a sequence of length {longest} but max_seqlen is {max_seqlen}; "
                                 "max_seqlen must be >= every sequence length")
    return cu

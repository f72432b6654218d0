"""Does a candidate's output agree with the plain-PyTorch reference? (per-dtype tolerance, NaN/inf pattern exact)

The error measure is ``max|out - ref| / max(max|ref|, tiny)`` over every element of every output tensor, computed in
float32 (float64 for float64 outputs) (a max, not a norm: a kernel that is wrong on a few ragged rows must not hide behind millions of right ones).
Non-finite values must sit at exactly the same positions with the same value (NaN vs NaN, +inf vs +inf); a mismatch
is a wrong answer whatever the tolerance.
"""
from __future__ import annotations

from typing import Any, Optional

import torch

# Tolerances of the normalised max error above. Two correct implementations of one op in bf16 differ by about one
# output ulp (2^-8 of the largest value) plus accumulation-order noise, fp16 by 2^-11; fp32 depends on whether the
# user allows TF32 matmuls (torch.get_float32_matmul_precision(): "highest" keeps true fp32 accumulation).
_TOL = {
    torch.bfloat16: 3e-2,
    torch.float16: 5e-3,
    torch.float64: 1e-9,
}
_TOL_FP32_HIGHEST = 1e-4
_TOL_FP32_TF32 = 5e-3


def tolerance(dtype: torch.dtype) -> float:
    """Largest accepted ``max|out - ref| / max|ref|`` for outputs computed in ``dtype``."""
    if dtype == torch.float32:
        return _TOL_FP32_HIGHEST if torch.get_float32_matmul_precision() == "highest" else _TOL_FP32_TF32
    if dtype in _TOL:
        return _TOL[dtype]
    raise ValueError(f"tolerance: no tolerance defined for dtype {dtype!r} (expected float16/bfloat16/float32/float64)")


def _flatten(x: Any, path: str = "out") -> list:
    if isinstance(x, torch.Tensor):
        return [(path, x)]
    if isinstance(x, (tuple, list)):
        out = []
        for i, v in enumerate(x):
            out.extend(_flatten(v, f"{path}[{i}]"))
        return out
    if x is None:
        return [(path, None)]
    raise TypeError(f"candidate output at {path} is a {type(x).__name__}; expected tensors, tuples of tensors or None")


def mismatch(out: Any, ref: Any, dtype: torch.dtype) -> Optional[str]:
    """None when ``out`` agrees with ``ref`` within :func:`tolerance` (dtype); else a one-line reason."""
    got, want = _flatten(out), _flatten(ref)
    if len(got) != len(want):
        return f"returned {len(got)} outputs, reference has {len(want)}"
    tol = tolerance(dtype)
    for (path, o), (_, r) in zip(got, want):
        if (o is None) != (r is None):
            return f"{path}: {'None' if o is None else 'a tensor'} where the reference has " \
                   f"{'None' if r is None else 'a tensor'}"
        if o is None:
            continue
        if tuple(o.shape) != tuple(r.shape):
            return f"{path}: shape {tuple(o.shape)} != reference {tuple(r.shape)}"
        if o.numel() == 0:
            continue
        wide = torch.float64 if torch.float64 in (o.dtype, r.dtype, dtype) else torch.float32
        o64, r64 = o.detach().to(wide), r.detach().to(wide)
        fo, fr = torch.isfinite(o64), torch.isfinite(r64)
        if not torch.equal(fo, fr):
            bad = int((fo != fr).sum())
            return f"{path}: non-finite values at {bad} positions where the reference differs (NaN/inf pattern)"
        if not bool(fo.all()):
            nf = ~fo
            same = (o64[nf] == r64[nf]) | (torch.isnan(o64[nf]) & torch.isnan(r64[nf]))
            if not bool(same.all()):
                return f"{path}: non-finite values differ from the reference (NaN vs inf or sign)"
            o64, r64 = o64[fo], r64[fo]
            if o64.numel() == 0:
                continue
        scale = float(r64.abs().max())
        err = float((o64 - r64).abs().max()) / max(scale, 1e-30)
        if scale == 0.0:
            err = float((o64 - r64).abs().max())
        if err > tol:
            return f"{path}: max|out-ref|/max|ref| = {err:.3g} > tolerance {tol:.3g} for {str(dtype).replace('torch.', '')}"
    return None

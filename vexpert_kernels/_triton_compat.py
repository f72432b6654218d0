"""Guarded Triton import: the package imports without Triton; paths that need it raise a clear error."""
from __future__ import annotations

import os

try:  # pragma: no cover - exercised by the environment, not by a test
    import triton
    import triton.language as tl

    HAS_TRITON = True
    TRITON_IMPORT_ERROR = None
    TRITON_VERSION = triton.__version__
except Exception as exc:  # ImportError, or a broken install
    triton = None
    tl = None
    HAS_TRITON = False
    TRITON_IMPORT_ERROR = repr(exc)
    TRITON_VERSION = None


def interpret_mode() -> bool:
    """True when Triton kernels run through the CPU interpreter (TRITON_INTERPRET=1, set before import)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def require_triton(what: str) -> None:
    if not HAS_TRITON:
        raise RuntimeError(f"{what} needs Triton, which failed to import ({TRITON_IMPORT_ERROR}); "
                           "install it with `pip install triton` or pick backend='torch'")


def triton_usable_for(tensor) -> bool:
    """Whether the Triton path can run on this tensor: CUDA tensors, or CPU tensors under the interpreter."""
    if not HAS_TRITON:
        return False
    if tensor.is_cuda:
        return True
    return tensor.device.type == "cpu" and interpret_mode()

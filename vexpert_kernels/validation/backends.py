"""Backend names of blocks, stacks and models, and how ``backend="auto"`` and the ``VEXPERT_GEMM_BACKEND`` /
``VEXPERT_ATTENTION_BACKEND`` overrides resolve."""
from __future__ import annotations

import os
from typing import Optional

import torch

from .scalars import check_choice


BLOCK_BACKENDS = ("auto", "triton", "torch")
MODEL_BACKENDS = ("fused", "reference")


def attention_backend_choices() -> tuple:
    from ..ops.attention import BACKENDS

    return ("auto",) + tuple(BACKENDS)


def check_backend_names(backend, attention_backend) -> None:
    """Block/stack/patch construction: reject unknown ``backend`` / ``attention_backend`` strings right away."""
    check_choice("backend", backend, BLOCK_BACKENDS)
    check_choice("attention_backend", attention_backend, attention_backend_choices())


def resolve_gemm_path(requested: str, x: torch.Tensor) -> str:
    """The GEMM path a block's routed ops take for tensors like ``x`` (what ``block.backend`` reports).

    ``requested="auto"`` is passed to the ops unchanged; like them it honours ``VEXPERT_GEMM_BACKEND``, then picks
    Triton where usable (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``), else torch. On CUDA the ops'
    own dispatch (measured table / autotuner) may still choose per projection."""
    from .._triton_compat import triton_usable_for

    if requested == "auto":
        env = os.environ.get("VEXPERT_GEMM_BACKEND", "").strip().lower()
        if env and env != "auto":
            from ..ops.routed_linear import BACKENDS as GEMM_BACKENDS

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

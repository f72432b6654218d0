"""Self-verifying autotuned dispatch (contract; the tuner fills in the machinery behind it).

Every op's ``backend="auto"`` calls :func:`select` with its candidates. The contract every caller relies on:

``select(op, key, candidates, reference, *, static, dtype) -> str``

- ``op``: op name, e.g. ``"routed_linear"``, ``"routed_linear_dx"``, ``"routed_swiglu"``, ``"attention_fwd"``.
- ``key``: hashable tuple of ints/strs/bools describing the shape class (dtype, N, K, epilogue, token bucket; for
  attention head dim, GQA ratio, mask kind, length bucket). The tuner adds GPU name, torch and triton versions.
- ``candidates``: ``{name: fn}``; ``fn()`` runs one candidate on the caller's real inputs and returns its output
  (a tensor or a tuple of tensors), without mutating any input. Names are stable strings ("torch",
  "triton:128x256x64:w8:s3", "sdpa", ...) because decisions are cached on disk by name.
- ``reference``: ``fn()`` returning the plain-PyTorch result on the same inputs (what every candidate is checked
  against, within the dtype tolerance).
- ``static``: the name returned when tuning cannot or must not run (no CUDA, ``VEXPERT_AUTOTUNE=0``, while
  ``torch.compile`` traces or a CUDA graph captures, tuner error) and no cached decision exists. Callers pass a
  path that is correct everywhere (on CUDA: the plain PyTorch / SDPA path, never an unverified kernel).
- Returns the name of the fastest candidate that agreed with the reference (or ``static``).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import torch


def select(op: str, key: tuple, candidates: Mapping[str, Callable[[], Any]], reference: Callable[[], Any], *,
           static: str, dtype: torch.dtype) -> str:
    """Stub until the tuner lands: always the static choice."""
    if static not in candidates:
        raise ValueError(f"static choice {static!r} is not one of the candidates {sorted(candidates)}")
    return static

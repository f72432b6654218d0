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

Machinery (``tuner.py``, ``cache.py``, ``verify.py``):

- Key: ``op`` + the caller's ``key`` + the machine fingerprint (GPU name, compute capability, SM count, torch, triton
  and CUDA versions). A version or GPU change gives another key, so stale decisions are never used.
- First call of a key on CUDA tensors (not while ``torch.compile`` traces or a CUDA graph captures): the static path
  first, then every other candidate is run once (warm-up / compile), its output checked against ``reference()``
  (:func:`tolerance` of ``dtype``; a NaN/inf pattern mismatch is wrong; an exception drops it; each drop is logged
  once with the reason), the survivors timed with CUDA events (median of 5 calls); the fastest correct one wins.
- Time budget per key: ``VEXPERT_AUTOTUNE_BUDGET_S`` (default 2 s, compile time included); when it runs out the
  tuner stops (logged) and chooses among the candidates measured so far (the static path is always measured first).
- Decisions: in memory, and on disk under ``$VEXPERT_AUTOTUNE_CACHE_DIR``, else ``$VEXPERT_CACHE_DIR/autotune``, else
  ``~/.cache/vexpert_kernels/autotune``, one
  JSON file per fingerprint, merge-on-write under a lock file + atomic ``os.replace`` (safe across processes); a
  corrupt file is ignored. Under ``torch.compile`` / CUDA graph capture a cached decision is reused, else static.
- ``VEXPERT_AUTOTUNE=0``: no tuning and no cache: always the static choice (a reproducible, documented baseline).
- Only a candidate verified on this machine (now, or earlier and cached for this fingerprint) or ``static`` is ever
  returned. Logging: ``logging.getLogger("vexpert_kernels.autotune")``.
- Public helpers: :func:`decisions`, :func:`clear_cache`, :func:`token_bucket`, :func:`tolerance`, and
  :func:`get_tuner` / :func:`set_tuner` / :func:`using` to install a :class:`Tuner` with injected timer, clock and
  device checks (tests, ``python -m vexpert_kernels.tune``).
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Mapping, Optional

import torch

from .cache import clear_dir, default_cache_dir
from .tuner import Tuner, entry_key, tracing_reason, tuning_enabled
from .verify import mismatch, tolerance

__all__ = ["select", "decisions", "clear_cache", "token_bucket", "tolerance", "mismatch", "Tuner", "get_tuner",
           "set_tuner", "using", "default_cache_dir", "entry_key", "tracing_reason", "tuning_enabled"]

_ACTIVE: list = []  # the process's tuner (created on first use); set_tuner/using replace it explicitly


def get_tuner() -> Tuner:
    """The tuner ``select`` uses (created with the defaults on first use)."""
    if not _ACTIVE:
        _ACTIVE.append(Tuner())
    return _ACTIVE[0]


def set_tuner(tuner: Optional[Tuner]) -> Optional[Tuner]:
    """Install ``tuner`` (None: a fresh default one on next use); returns the previous one."""
    prev = _ACTIVE[0] if _ACTIVE else None
    _ACTIVE.clear()
    if tuner is not None:
        _ACTIVE.append(tuner)
    return prev


@contextlib.contextmanager
def using(tuner: Tuner) -> Iterator[Tuner]:
    """``with autotune.using(Tuner(timer=..., cache_dir=...)):`` select() goes through ``tuner`` inside."""
    prev = set_tuner(tuner)
    try:
        yield tuner
    finally:
        set_tuner(prev)


def _assume_constant(fn):
    try:
        from torch._dynamo import assume_constant_result
    except Exception:  # pragma: no cover - torch without dynamo
        return fn
    return assume_constant_result(fn)


@_assume_constant
def _choice_while_tracing(op: str, key: tuple, names: tuple, static: str) -> str:
    # torch.compile: dynamo runs this eagerly at trace time and bakes the returned name into the graph as a constant
    return get_tuner().choice_without_tuning(op, key, names, static)


def select(op: str, key: tuple, candidates: Mapping[str, Callable[[], Any]], reference: Callable[[], Any], *,
           static: str, dtype: torch.dtype) -> str:
    """Name of the fastest candidate that agrees with ``reference()`` for (op, key) on this machine, else ``static``.

    See the module docstring for the contract. Raises ValueError when ``static`` is not one of ``candidates``.
    Under ``torch.compile`` (also ``fullgraph=True``, for keys of constants) the choice is a trace-time constant: this
    process's or the disk cache's decision, else ``static`` (tune first: one eager step, or
    ``python -m vexpert_kernels.tune``). Nothing runs while tracing; the graph does not guard on the decision.
    """
    if torch.compiler.is_compiling():
        # the key must be constants (a symbolic size from dynamic shapes cannot be looked up: dynamo then breaks the
        # graph here and select() runs eagerly; fullgraph=True needs static shapes or a static-only key)
        return _choice_while_tracing(op, tuple(key), tuple(candidates), static)
    return get_tuner().select(op, key, candidates, reference, static=static, dtype=dtype)


def decisions() -> list:
    """This process's decisions, one dict per (op, key): op, key, chosen, status ("tuned" = measured now, "cached" =
    read from disk, "static" = not tuned, with ``reason``), and for tuned ones ``candidates`` = {name: {"ms",
    "verdict"}}, ``budget_hit``, ``tune_s``, ``fingerprint``."""
    return get_tuner().decisions()


def clear_cache(*, memory: bool = True, disk: bool = True) -> int:
    """Forget decisions: this process's memory and/or every decisions file in the cache dir. Returns files removed."""
    t = get_tuner()
    if memory:
        t.clear()
    return clear_dir(t.cache_dir) if disk else 0


def token_bucket(n: int) -> int:
    """Shape-class bucket of a token (row) count for tuning keys: 0 for 0, else the next power of two >= n."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"token_bucket: n must be a non-negative int, got {n!r}")
    return 0 if n == 0 else 1 << (n - 1).bit_length()

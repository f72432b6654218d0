"""Timing, memory and environment helpers for the benchmarks.

* CUDA: ``triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")`` (CUDA events; do_bench also
  flushes L2 between repetitions). Inputs are rotated among copies when they would fit in L2 (see ``rotating``).
* CPU: warm-up calls, then a ``time.perf_counter`` loop; median of the repetitions. These are real measurements of
  the tiny CPU cases, useful only to prove the suite runs, never as performance claims.
* pytest-benchmark (``benchmarks/conftest.py``): on CUDA its numbers are device time too. :class:`DeviceClock` is
  installed as the fixture's timer and each round runs one call between two CUDA events (L2 flushed before it, as
  do_bench does) and advances the clock by exactly that GPU time; so pytest-benchmark's min/median/mean are
  statistics of the per-call GPU time, comparable to the do_bench median of the record. On CPU it keeps its host
  clock (synchronous work, nothing to synchronise).
* Peak extra memory (CUDA only): ``max_memory_allocated`` during one call minus the memory allocated before it.
"""
from __future__ import annotations

import datetime as _dt
import os
import platform
import statistics
import time
from typing import Callable, Optional, Sequence

import torch


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn: Callable[[], object], device, *, warmup_ms: float = 25, rep_ms: float = 100,
              grad_to_none: Optional[Sequence[torch.Tensor]] = None, min_reps: int = 3, max_reps: int = 50) -> float:
    """Median time of ``fn()`` in milliseconds."""
    device = torch.device(device)
    if device.type == "cuda":
        from triton.testing import do_bench
        return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=grad_to_none, return_mode="median"))
    # CPU: one warm-up call (first-call costs stay out), then repetitions until rep_ms or max_reps.
    def call():
        if grad_to_none:
            for t in grad_to_none:
                t.grad = None
        fn()
    call()
    times = []
    start = time.perf_counter()
    while len(times) < min_reps or (len(times) < max_reps and (time.perf_counter() - start) * 1e3 < rep_ms):
        t0 = time.perf_counter()
        call()
        times.append((time.perf_counter() - t0) * 1e3)
    return float(statistics.median(times))


class DeviceClock:
    """A timer for pytest-benchmark whose time advances only by the GPU time of the calls made through :meth:`wrap`.

    pytest-benchmark measures a round as ``timer()`` after minus ``timer()`` before; this clock makes that difference
    the CUDA-event time of the one call inside the round (seconds), independent of host overhead and queueing.
    """

    __name__ = "cuda_event_device_time"

    def __init__(self, device, flush_l2: bool = True):
        self.device = torch.device(device)
        self.now = 0.0
        self.last_ms: Optional[float] = None
        self._flush = None
        if flush_l2 and self.device.type == "cuda":
            self._flush = torch.empty(max(l2_bytes(self.device), 2 ** 20) * 2 // 4, dtype=torch.int32,
                                      device=self.device)

    def __call__(self) -> float:
        return self.now

    def wrap(self, fn: Callable[[], object], grad_to_none: Optional[Sequence[torch.Tensor]] = None):
        """``fn`` as a benchmark target: one CUDA-event-timed call per invocation, added to the clock."""
        def timed():
            for t in grad_to_none or ():
                t.grad = None
            if self._flush is not None:
                self._flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            self.last_ms = start.elapsed_time(end)
            self.now += self.last_ms / 1e3
        return timed


def peak_extra_mib(fn: Callable[[], object], device) -> Optional[float]:
    """Peak memory above the pre-call allocation during one ``fn()`` (CUDA); None where unmeasured (CPU)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    out = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    del out
    return (peak - base) / 2 ** 20


def l2_bytes(device) -> int:
    device = torch.device(device)
    if device.type != "cuda":
        return 0
    return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 * 2 ** 20))


class rotating:
    """Cycle through ``n`` input sets so repeated calls don't re-read an L2-resident buffer.

    ``make()`` returns one input set (tuple); ``n`` copies are kept when one set is smaller than 2x L2 (else 1).
    Calling the object returns the next set.
    """

    def __init__(self, make: Callable[[], tuple], device, max_sets: int = 4):
        first = make()
        nbytes = sum(t.numel() * t.element_size() for t in first if isinstance(t, torch.Tensor))
        n = 1 if nbytes >= 2 * max(l2_bytes(device), 1) or torch.device(device).type != "cuda" else max_sets
        self.sets = [first] + [make() for _ in range(n - 1)]
        self.i = 0

    def __call__(self) -> tuple:
        s = self.sets[self.i % len(self.sets)]
        self.i += 1
        return s

    def __len__(self) -> int:
        return len(self.sets)


def device_name(device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} threads)"


def card_slug(device) -> str:
    """File-name-safe card name: 'NVIDIA H100 80GB HBM3' -> 'h100-80gb-hbm3', CPU -> 'cpu'."""
    device = torch.device(device)
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device).lower().replace("nvidia", "").strip()
    return "".join(c if c.isalnum() else "-" for c in name).strip("-").replace("--", "-")


def environment(device) -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except Exception:  # pragma: no cover
        triton_version = None
    device = torch.device(device)
    env = {
        "device": str(device),
        "gpu": device_name(device) if device.type == "cuda" else None,
        "device_name": device_name(device),
        "card": card_slug(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0"),
        "date": _dt.datetime.now().strftime("%Y-%m-%dT%H:%M:%S"),
    }
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env["sm_count"] = p.multi_processor_count
        env["capability"] = f"{p.major}.{p.minor}"
    return env

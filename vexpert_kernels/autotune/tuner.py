"""The machinery behind ``select()``: memory dict -> disk cache -> measure-and-verify on the first call of a key.

Everything machine-dependent is injectable so CPU tests drive the full logic: ``timer(fn) -> ms`` (default: CUDA
events), ``clock() -> s`` (the budget's wall clock), ``can_tune(output) -> reason or None`` (default: the reference
output lives on a CUDA device), ``device_available()`` (default: ``torch.cuda.is_available``) and
``fingerprint(device)`` (default: GPU name, compute capability, torch and triton versions). No tuning while
``torch.compile`` traces or a CUDA graph captures (:func:`tracing_reason`).
"""
from __future__ import annotations

import json
import logging
import os
import statistics
import time
from typing import Any, Callable, Mapping, Optional

import torch

from .cache import DiskCache, default_cache_dir
from .verify import mismatch

log = logging.getLogger("vexpert_kernels.autotune")

DEFAULT_BUDGET_S = 2.0
DEFAULT_REPS = 5


# ================================================================================================ environment probes
def tuning_enabled() -> bool:
    """``VEXPERT_AUTOTUNE=0`` (or false/off/no) turns tuning off: select() then always returns the static choice."""
    return os.environ.get("VEXPERT_AUTOTUNE", "1").strip().lower() not in ("0", "false", "off", "no")


def budget_s() -> float:
    v = os.environ.get("VEXPERT_AUTOTUNE_BUDGET_S")
    if v is None or v.strip() == "":
        return DEFAULT_BUDGET_S
    try:
        b = float(v)
    except ValueError:
        raise ValueError(f"VEXPERT_AUTOTUNE_BUDGET_S must be a number of seconds, got {v!r}") from None
    if not b > 0:
        raise ValueError(f"VEXPERT_AUTOTUNE_BUDGET_S must be > 0, got {v!r}")
    return b


def tracing_reason() -> Optional[str]:
    """Why tuning must not run right now (torch.compile tracing, CUDA graph capture), or None."""
    compiler = getattr(torch, "compiler", None)
    is_compiling = getattr(compiler, "is_compiling", None)
    if is_compiling is None:  # torch < 2.3
        try:
            from torch._dynamo import is_compiling
        except Exception:  # pragma: no cover
            is_compiling = None
    if is_compiling is not None and is_compiling():
        return "torch.compile is tracing"
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return "a CUDA graph is being captured"
    return None


def _first_tensor(x: Any) -> Optional[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, (tuple, list)):
        for v in x:
            t = _first_tensor(v)
            if t is not None:
                return t
    return None


def default_can_tune(output: Any) -> Optional[str]:
    t = _first_tensor(output)
    if t is None or t.device.type != "cuda":
        return f"tensors are on {t.device if t is not None else 'no device'} (tuning times CUDA kernels only)"
    return None


def _triton_version() -> Optional[str]:
    import sys
    mod = sys.modules.get("triton")
    if mod is not None and getattr(mod, "__version__", None):
        return mod.__version__
    try:
        from importlib.metadata import version
        return version("triton")
    except Exception:
        return None


def default_fingerprint(device: Optional[torch.device]) -> dict:
    """GPU name, compute capability, SM count, torch/triton/CUDA versions of ``device`` (None: the current GPU)."""
    if device is None and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    dev = device if device is not None and torch.device(device).type == "cuda" else None
    fp = {"torch": torch.__version__, "triton": _triton_version(), "cuda": torch.version.cuda}
    if dev is not None:
        p = torch.cuda.get_device_properties(dev)
        fp.update(gpu=p.name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count)
    else:
        fp.update(gpu=None, capability=None)
    return fp


def cuda_event_timer(fn: Callable[[], Any], reps: int = DEFAULT_REPS) -> float:
    """Median of ``reps`` CUDA-event-timed calls of ``fn`` (ms) on the current stream (already warmed up)."""
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return float(statistics.median(times))


def _key_list(key) -> list:
    return list(key) if isinstance(key, (tuple, list)) else [key]


def entry_key(op: str, key: tuple) -> str:
    """Stable string for (op, key), used in memory and on disk (non-JSON values such as dtypes via str())."""
    return json.dumps([op, _key_list(key)], default=str, separators=(",", ":"))


# ================================================================================================ the tuner
class Tuner:
    """One process's tuner. ``select`` in ``vexpert_kernels.autotune`` forwards to the active instance."""

    def __init__(self, *, cache_dir: Optional[str] = None, timer: Optional[Callable] = None,
                 clock: Callable[[], float] = time.perf_counter, can_tune: Optional[Callable] = None,
                 fingerprint: Optional[Callable] = None, device_available: Optional[Callable[[], bool]] = None,
                 budget_s: Optional[float] = None, persist: bool = True):
        self._cache_dir = cache_dir
        self.timer = timer or cuda_event_timer
        self.clock = clock
        self.can_tune = can_tune or default_can_tune
        self.fingerprint = fingerprint or default_fingerprint
        self.device_available = device_available or torch.cuda.is_available
        self._budget_s = budget_s
        self.persist = persist
        self.memory: dict = {}      # entry key -> record (verified on this machine: tuned here or read from disk)
        self.untunable: dict = {}   # entry key -> record of why this process last returned the static choice
        self._no_tune: set = set()  # entry keys whose tensors cannot be tuned (e.g. CPU tensors on a CUDA machine)
        self._logged: set = set()
        self.force = False          # retune keys cached on disk, once per process (python -m vexpert_kernels.tune --force)

    @property
    def cache_dir(self) -> str:
        return self._cache_dir or default_cache_dir()

    @property
    def budget_s(self) -> float:
        return self._budget_s if self._budget_s is not None else budget_s()

    def _log_once(self, level, msg, *args):
        tag = (msg,) + tuple(str(a) for a in args)
        if tag not in self._logged:
            self._logged.add(tag)
            log.log(level, msg, *args)

    def _static(self, ek, op, key, static, reason, remember=False):
        self.untunable[ek] = dict(op=op, key=_key_list(key), chosen=static, status="static", reason=reason)
        if remember:
            self._no_tune.add(ek)
        self._log_once(logging.INFO, "autotune %s %s: static choice %r (%s)", op, key, static, reason)
        return static

    # ------------------------------------------------------------------------------------------- select
    def select(self, op: str, key: tuple, candidates: Mapping[str, Callable[[], Any]],
               reference: Callable[[], Any], *, static: str, dtype: torch.dtype) -> str:
        if static not in candidates:
            raise ValueError(f"static choice {static!r} is not one of the candidates {sorted(candidates)}")
        ek = entry_key(op, key)
        if not tuning_enabled():
            return self._static(ek, op, key, static, "VEXPERT_AUTOTUNE=0")
        rec = self.memory.get(ek)  # decided in this process (tuned here, or read from disk unless forcing)
        if rec is not None and rec["chosen"] in candidates and (not self.force or rec.get("status") == "tuned"):
            return rec["chosen"]
        if ek in self._no_tune:
            return static
        if not self.device_available():
            return self._static(ek, op, key, static, "no CUDA device")
        tracing = tracing_reason()
        if tracing is not None:
            # no reference call: it would be traced/captured. Reuse a decision from disk (the current CUDA device's
            # fingerprint), else static; nothing is remembered, so the first eager call still tunes.
            rec = None if self.force else self._disk_lookup(ek, self.fingerprint(None), candidates)
            self._log_once(logging.INFO, "autotune %s %s: no tuning while %s (%s)", op, key, tracing,
                           "cached decision" if rec else f"static {static!r}")
            return rec["chosen"] if rec is not None else static
        try:
            ref = reference()
            why = self.can_tune(ref)
            if why is not None:
                return self._static(ek, op, key, static, why, remember=True)
            fp = self.fingerprint(_first_tensor(ref).device)
            if not self.force:
                rec = self._disk_lookup(ek, fp, candidates)
                if rec is not None:
                    self.memory[ek] = dict(rec, status="cached", fingerprint=fp)
                    return rec["chosen"]
            rec = self._tune(op, key, candidates, ref, static, dtype)
        except Exception as exc:  # a tuner failure must never break the caller: static path, logged
            log.warning("autotune %s %s failed (%s: %s); using the static choice %r", op, key,
                        type(exc).__name__, exc, static)
            return static
        self.memory[ek] = dict(rec, fingerprint=fp)
        if self.persist:
            try:
                DiskCache(self.cache_dir, fp).put({ek: {k: v for k, v in rec.items() if k != "status"}})
            except OSError as exc:
                self._log_once(logging.WARNING, "autotune: could not write the cache in %s (%s)", self.cache_dir, exc)
        return rec["chosen"]

    def choice_without_tuning(self, op: str, key: tuple, names, static: str) -> str:
        """What select() returns where it must not run anything (torch.compile tracing): memory, disk, else static."""
        if static not in names:
            raise ValueError(f"static choice {static!r} is not one of the candidates {sorted(names)}")
        if not tuning_enabled():
            return static
        ek = entry_key(op, key)
        rec = self.memory.get(ek)
        if rec is not None and rec["chosen"] in names:
            return rec["chosen"]
        if ek in self._no_tune or not self.device_available():
            return static
        rec = self._disk_lookup(ek, self.fingerprint(None), names)
        if rec is not None:
            self.memory[ek] = dict(rec, status="cached", fingerprint=self.fingerprint(None))
        self._log_once(logging.INFO, "autotune %s %s: no tuning while tracing (%s)", op, key,
                       "cached decision" if rec else f"static {static!r}")
        return rec["chosen"] if rec is not None else static

    def _disk_lookup(self, ek, fp, candidates) -> Optional[dict]:
        try:
            rec = DiskCache(self.cache_dir, fp).get(ek)
        except Exception as exc:
            self._log_once(logging.WARNING, "autotune: cache lookup failed (%s)", exc)
            return None
        if rec is None or rec.get("chosen") not in candidates:
            return None  # unknown key, or a candidate set that changed since: tune again
        return rec

    # ------------------------------------------------------------------------------------------- measuring
    def _tune(self, op, key, candidates, ref, static, dtype) -> dict:
        t0 = self.clock()
        budget = self.budget_s
        table: dict = {name: {"ms": None, "verdict": "unmeasured (time budget)"} for name in candidates}
        # the static (plain PyTorch) path first: it is the fallback and must be in the comparison
        order = [static] + [n for n in candidates if n != static]
        budget_hit = False
        for name in order:
            if self.clock() - t0 > budget and any(v["ms"] is not None for v in table.values()):
                budget_hit = True
                break
            fn = candidates[name]
            try:
                out = fn()  # warm-up / compile, and the output we verify
            except Exception as exc:
                table[name] = {"ms": None, "verdict": f"error: {type(exc).__name__}: {str(exc)[:200]}"}
                self._log_once(logging.WARNING, "autotune %s %s: dropped %r: raised %s: %s", op, key, name,
                               type(exc).__name__, str(exc)[:200])
                continue
            bad = mismatch(out, ref, dtype)
            del out
            if bad is not None:
                table[name] = {"ms": None, "verdict": f"wrong: {bad}"}
                self._log_once(logging.WARNING, "autotune %s %s: dropped %r: disagrees with the PyTorch reference: %s",
                               op, key, name, bad)
                continue
            try:
                ms = float(self.timer(fn))
            except Exception as exc:
                table[name] = {"ms": None, "verdict": f"error while timing: {type(exc).__name__}: {str(exc)[:200]}"}
                self._log_once(logging.WARNING, "autotune %s %s: dropped %r: raised while timing: %s", op, key, name,
                               exc)
                continue
            table[name] = {"ms": ms, "verdict": "ok"}
        if budget_hit:
            measured = sum(v["ms"] is not None for v in table.values())
            self._log_once(logging.WARNING, "autotune %s %s: time budget %.3g s hit after %d of %d candidates "
                           "(VEXPERT_AUTOTUNE_BUDGET_S); choosing among those measured", op, key, budget,
                           measured, len(table))
        ok = {n: v["ms"] for n, v in table.items() if v["verdict"] == "ok"}
        if ok:
            chosen = min(ok, key=lambda n: (ok[n], n != static))
            reason = "fastest candidate that agreed with the reference"
        else:
            chosen = static
            reason = "no candidate verified: static choice"
            self._log_once(logging.WARNING, "autotune %s %s: no candidate agreed with the reference; static %r",
                           op, key, static)
        rec = dict(op=op, key=_key_list(key), chosen=chosen, static=static, status="tuned", reason=reason,
                   budget_s=budget, budget_hit=budget_hit, tune_s=round(self.clock() - t0, 4),
                   dtype=str(dtype).replace("torch.", ""), candidates=table)
        log.info("autotune %s %s -> %r (%s)", op, key, chosen,
                 ", ".join(f"{n}={v['ms']:.4g}ms" if v["ms"] is not None else f"{n}={v['verdict'][:40]}"
                           for n, v in table.items()))
        return rec

    # ------------------------------------------------------------------------------------------- tables
    def decisions(self) -> list:
        rows = [dict(rec) for rec in self.memory.values()]
        rows += [dict(rec) for ek, rec in self.untunable.items() if ek not in self.memory]
        return rows

    def clear(self) -> None:
        self.memory.clear()
        self.untunable.clear()
        self._no_tune.clear()
        self._logged.clear()

"""pytest-benchmark suite: ``pytest benchmarks/ --benchmark-only``.

Device: CUDA when available (real CogVLM shapes, bf16), else CPU at tiny shapes in fp32 (real measurements that
prove every provider runs; not performance figures). Override with VEXPERT_BENCH_SHAPES=real|tiny.
Every measurement is a record in one JSON file per run (vexpert_kernels.bench.results), written to
VEXPERT_BENCH_RESULTS, else benchmarks/results/ on a GPU, else .benchmarks/vexpert/ (CPU runs stay out of git).
Other knobs: VEXPERT_BENCH_COMPILE=0 (skip torch.compile), VEXPERT_BENCH_REP_MS (do_bench rep, default 100),
VEXPERT_BENCH_SUITES=layer,sweep,decode,op (subset).

What the pytest-benchmark columns mean: on CUDA, GPU device time per call (CUDA events around one call per round,
L2 flushed before it; see ``vexpert_kernels.bench.timing.DeviceClock``) -- the same quantity as the record's
``median_ms`` (do_bench median). On CPU, host wall time of one call (tiny shapes; not performance figures).
"""
import os

import pytest
import torch

from vexpert_kernels.bench.results import ResultsWriter
from vexpert_kernels.bench.timing import DeviceClock, environment

HERE = os.path.dirname(os.path.abspath(__file__))
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
REAL = os.environ.get("VEXPERT_BENCH_SHAPES", "real" if DEVICE.type == "cuda" else "tiny") == "real"
DTYPE = torch.bfloat16 if REAL else torch.float32
REP_MS = float(os.environ.get("VEXPERT_BENCH_REP_MS", "100" if DEVICE.type == "cuda" else "20"))
SUITES = set(os.environ.get("VEXPERT_BENCH_SUITES", "layer,sweep,decode,op").split(","))


def results_dir() -> str:
    if os.environ.get("VEXPERT_BENCH_RESULTS"):
        return os.environ["VEXPERT_BENCH_RESULTS"]
    if DEVICE.type == "cuda":
        return os.path.join(HERE, "results")
    return os.path.join(os.path.dirname(HERE), ".benchmarks", "vexpert")


_WRITER = None


def writer() -> ResultsWriter:
    global _WRITER
    if _WRITER is None:
        meta = environment(DEVICE)
        meta.update(shapes="real" if REAL else "tiny", dtype=str(DTYPE).replace("torch.", ""), rep_ms=REP_MS,
                    note=None if DEVICE.type == "cuda" else
                    "CPU run at tiny shapes (fp32): proves the suite runs; not performance figures")
        _WRITER = ResultsWriter(results_dir(), meta)
    return _WRITER


def pytest_report_header(config):
    if DEVICE.type == "cuda":
        return f"vexpert benchmarks: {torch.cuda.get_device_name(0)}, {'real' if REAL else 'tiny'} shapes, {DTYPE}"
    return ("vexpert benchmarks: NO GPU -> running real measurements at TINY shapes on the CPU (fp32); "
            "these prove the suite runs, they are not performance figures")


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if _WRITER is None:
        return
    recs = _WRITER.records
    ok = [r for r in recs if r["status"] == "ok"]
    tr = terminalreporter
    tr.section("vexpert benchmark records")
    where = "CPU, tiny shapes (not performance figures)" if DEVICE.type != "cuda" else DEVICE
    tr.write_line(f"{len(ok)} measured, {sum(r['status'] == 'skipped' for r in recs)} skipped, "
                  f"{sum(r['status'] == 'error' for r in recs)} errors on {where}; results: {_WRITER.path}")
    for r in recs:
        if r["status"] != "ok":
            tr.write_line(f"  {r['status']}: {r['case']} {r.get('op', '')} {r['mode']} {r['provider']}: "
                          f"{(r.get('reason') or '')[:160]}")


def pytest_sessionfinish(session, exitstatus):
    # --benchmark-only must never silently run nothing: a session that selected benchmark tests but measured
    # nothing fails.
    if _WRITER is not None and not any(r["status"] == "ok" for r in _WRITER.records):
        session.exitstatus = 1


def pytest_collection_modifyitems(session, config, items):
    # Per-op benchmarks first: under TRITON_INTERPRET=1, mixed_attention(backend="triton") raised
    # KeyError('_attn_fwd_kernel') when run after torch.compile in the same process (reported to the attention
    # owner); the ops are also the cheaper, most diagnostic measurements when a GPU run hits its time budget.
    items.sort(key=lambda it: 0 if it.nodeid.startswith("benchmarks/test_ops.py") else 1)


@pytest.fixture(scope="session")
def bench_env():
    return dict(device=DEVICE, dtype=DTYPE, real=REAL, rep_ms=REP_MS, writer=writer())


def record_and_report(benchmark, rec: dict, fn=None, grads=None):
    """Write the record, hand its numbers to pytest-benchmark, and turn skips/errors into pytest outcomes.

    ``grads``: tensors whose ``.grad`` is reset before each timed round (fwd+bwd providers: ``prov.grads``)."""
    writer().add(rec)
    if rec["status"] == "skipped":
        pytest.skip(rec.get("reason") or "skipped")
    if rec["status"] == "error":
        pytest.fail(f"{rec['provider']} failed: {rec.get('reason')}")
    benchmark.extra_info.update({k: v for k, v in rec.items() if isinstance(v, (int, float, str, bool))})
    if fn is None:
        benchmark.pedantic(lambda: None, rounds=1, iterations=1)
        return

    if DEVICE.type == "cuda" and hasattr(benchmark, "_timer"):
        # GPU-synchronised device time: each round = one call between CUDA events (L2 flushed first); the clock
        # advances by that GPU time only, so pytest-benchmark's median is the per-call device time (as do_bench's)
        clock = DeviceClock(DEVICE)
        benchmark._timer = clock  # pytest-benchmark >= 3 keeps its timer here (read at each round)
        est = rec.get("median_ms") or 1.0
        rounds = int(min(50, max(5, REP_MS / max(est, 1e-3))))
        benchmark.extra_info["timer"] = "cuda_events_device_time"
        benchmark.pedantic(clock.wrap(fn, grads), rounds=rounds,
                           iterations=1, warmup_rounds=1)
        return

    def synced():
        fn()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
    # CPU: host clock (the work is synchronous); one round, the record's median_ms is the measurement
    benchmark.extra_info["timer"] = "host_clock"
    rounds = 1 if DEVICE.type != "cuda" or (rec.get("median_ms") or 0) > 200 else 3
    benchmark.pedantic(synced, rounds=rounds, iterations=1)

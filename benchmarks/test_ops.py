"""Per-op benchmarks (routed GEMMs, SwiGLU, attention, RMSNorm, permute) against their plain baselines."""
import pytest

from conftest import DEVICE, DTYPE, REAL, REP_MS, record_and_report, writer
from vexpert_kernels.bench.opbench import op_records
from vexpert_kernels.bench.shapes import cases

OP_CASES = [c for c in cases("layer", REAL) if c.batch * c.seq_len == 8192 and c.batch == 4] if REAL \
    else cases("layer", REAL)[:1]


@pytest.mark.parametrize("case", OP_CASES, ids=[c.id for c in OP_CASES])
def test_ops(benchmark, case):
    import conftest
    if "op" not in conftest.SUITES:
        pytest.skip("suite op not selected (VEXPERT_BENCH_SUITES)")
    recs = op_records(case, DEVICE, DTYPE, rep_ms=REP_MS)
    w = writer()
    for r in recs[:-1]:
        w.add(r)
    errors = [f"{r['op']} {r['mode']} {r['provider']}: {r.get('reason')}" for r in recs if r["status"] == "error"]
    summary = dict(recs[-1], ops_measured=sum(r["status"] == "ok" for r in recs), ops_errors=len(errors))
    if errors:
        w.add(recs[-1])
        pytest.fail("op benchmarks failed:\n" + "\n".join(errors))
    record_and_report(benchmark, summary, None)

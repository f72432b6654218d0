"""One decoder layer, every provider, at each case: forward, forward+backward, token sweep (fwd) and decode.

Records land in one JSON per run (see conftest); ``python -m vexpert_kernels.bench report`` turns them into tables.
"""
import pytest
import torch

from conftest import DEVICE, DTYPE, REAL, REP_MS, record_and_report
from vexpert_kernels.bench.flops import layer_flops
from vexpert_kernels.bench.providers import LayerSetup, case_fields, compile_enabled, measure, vexpert_backends
from vexpert_kernels.bench.shapes import cases

CPU = DEVICE.type != "cuda"
LAYER_PROVIDERS = [f"vexpert[{b}]" for b in vexpert_backends(DEVICE)] + \
    ["hf_eager", "slices_eager", "slices_compiled", "dense"] + (["hf_reference"] if CPU else [])
DECODE_PROVIDERS = [f"vexpert[{b}]" for b in vexpert_backends(DEVICE)] + ["hf_eager", "dense"]


def _params():
    out = []
    layer = cases("layer", REAL)
    for i, c in enumerate(layer):
        for mode in ("fwd", "fwd+bwd"):
            for p in LAYER_PROVIDERS:
                if p == "hf_reference" and mode != "fwd":
                    continue
                out.append(pytest.param(c, mode, p, i == 0, id=f"{c.id}-{mode}-{p}"))
    for c in cases("sweep", REAL):
        for p in LAYER_PROVIDERS:
            if p != "hf_reference":
                out.append(pytest.param(c, "fwd", p, False, id=f"sweep-{c.id}-{p}"))
    for c in cases("decode", REAL):
        for p in DECODE_PROVIDERS:
            out.append(pytest.param(c, "decode", p, False, id=f"{c.id}-{p}"))
    return out


_CACHE = {}


def _setup(case, first=False):
    """One case's weights/inputs/reference output at a time (GPU memory), shared by all its providers."""
    if case.id not in _CACHE:
        _CACHE.clear()
        if DEVICE.type == "cuda":
            torch.cuda.empty_cache()
        s = LayerSetup(case, DEVICE, DTYPE)
        _CACHE[case.id] = (s, s.forwards(compile_ok=compile_enabled(DEVICE, first)), s.reference_output())
    return _CACHE[case.id]


@pytest.mark.parametrize("case,mode,provider,first", _params())
def test_layer(benchmark, case, mode, provider, first):
    suite = {"layer": "layer", "sweep": "sweep", "decode": "decode"}[case.kind]
    import conftest
    if suite not in conftest.SUITES:
        pytest.skip(f"suite {suite} not selected (VEXPERT_BENCH_SUITES)")
    setup, fwds, ref_out = _setup(case, first)
    fwd, skip, be = fwds.get(provider, (None, f"skipped: {provider} not built for this case", None))
    if CPU and skip is None:
        # CPU budget: the interpreter (~4 s per tiny forward) and torch.compile (~1 min per graph) run once only
        if provider == "vexpert[triton]" and not (first and mode == "fwd"):
            skip = "skipped: Triton interpreter measured on the first tiny case's forward only (CPU budget)"
        if provider == "slices_compiled" and not (first and mode == "fwd"):
            skip = "skipped: torch.compile on CPU measured on the first tiny case's forward only (CPU budget)"
    if provider == "slices_compiled" and fwd is not None and skip is None:
        fwd = (lambda f, m: (lambda x: f(x, m)))(fwd, mode)
    prov = setup.provider(provider, None if skip else fwd, mode, skip, be)
    flops = layer_flops(setup.cfg, case.batch, case.seq_len, mode, past=case.past)
    rec = measure(prov, device=DEVICE, flops=flops, base=dict(case_fields(case, setup), mode=mode, suite=suite),
                  ref_out=ref_out if mode in ("fwd", "decode") else None, rep_ms=REP_MS)
    record_and_report(benchmark, rec, prov.fn, prov.grads)  # grads reset before each timed round

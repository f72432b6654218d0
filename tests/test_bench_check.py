"""Benchmarks check results: a provider whose output is wrong is an error record (never timed), in every mode."""
import torch

from vexpert_kernels.bench.providers import LayerSetup, Provider, check_tolerance, measure
from vexpert_kernels.bench.shapes import cases


def _setup():
    return LayerSetup(cases("layer", False)[0], "cpu", torch.float32)


def _measure(setup, name, forward, mode):
    return measure(setup.provider(name, forward, mode), device="cpu", flops=None, base={}, rep_ms=1, warmup_ms=0)


def test_wrong_output_fails_before_timing():
    setup = _setup()
    forwards = setup.forwards(compile_ok=False)
    right = forwards["hf_eager"][0]

    def wrong(x):  # a small, plausible bug: 3% off (about what a dropped vision bias does to a layer)
        return right(x) * 1.03
    for mode in ("fwd", "fwd+bwd"):
        ok = _measure(setup, "hf_eager", right, mode)
        assert ok["status"] == "ok" and ok["rel_err"] < 1e-6, ok
        bad = _measure(setup, "hf_eager", wrong, mode)
        assert bad["status"] == "error" and "wrong result" in bad["reason"], bad
        assert bad["rel_err"] > 1e-2 and "median_ms" not in bad
    # a ceiling that computes another function by design (one weight set) is recorded, not failed
    dense = _measure(setup, "dense", forwards["dense"][0], "fwd")
    assert dense["status"] == "ok" and dense["rel_err"] > check_tolerance(torch.float32, "cpu")


def test_explicit_reference_and_shape_mismatch():
    ref = torch.ones(4, 3)
    prov = Provider("op", lambda: torch.ones(4, 3) * 2)
    rec = measure(prov, device="cpu", flops=None, base={}, ref_out=ref, rep_ms=1, warmup_ms=0)
    assert rec["status"] == "error" and rec["rel_err"] == 1.0
    prov = Provider("op", lambda: torch.ones(3, 4))
    rec = measure(prov, device="cpu", flops=None, base={}, ref_out=ref, rep_ms=1, warmup_ms=0)
    assert rec["status"] == "error" and "shape" in rec["reason"]
    rec = measure(Provider("copy", lambda: torch.zeros(4, 3)), device="cpu", flops=None, base={}, ref_out=ref,
                  rep_ms=1, warmup_ms=0)
    assert rec["status"] == "ok"  # op-suite ceiling
    assert check_tolerance(torch.bfloat16, "cpu") < 0.05 and check_tolerance(torch.float32, "cuda") > 1e-4


# ---------------------------------------------------------------------------------------------- op suite
def _op_records(only):
    from vexpert_kernels.bench.opbench import op_records
    return {(r["mode"], r["provider"]): r for r in op_records(cases("layer", False)[0], "cpu", torch.float32,
                                                              rep_ms=1, warmup_ms=0, only=only)}


def test_op_benchmark_checks_every_provider():
    recs = _op_records(("swiglu", "rmsnorm", "permute"))
    for (mode, name), r in recs.items():
        assert r["status"] == "ok", r
        if name in ("dense_gemm", "copy"):  # ceilings: error recorded, not checked, and the record says so
            assert r["checked"] is False and "not checked" in r["check"] and r["rel_err"] > 1e-2, r
        else:
            assert r["checked"] is True and r["rel_err"] < 1e-5, r


def test_wrong_op_provider_fails_op_benchmark(monkeypatch):
    from vexpert_kernels import ops
    from vexpert_kernels.bench import baselines, opbench
    routed_swiglu, mixed_attention = ops.routed_swiglu, ops.mixed_attention

    def swiglu_sign_flip(x, gv, uv, gl, ul, plan, backend="auto"):  # planted bug: silu(-g) instead of silu(g)
        return routed_swiglu(x, -gv, uv, -gl, ul, plan, backend=backend)

    def attention_no_causal(q, k, v, plan=None, backend="auto", **kw):  # planted bug: keys after the query seen
        if backend == "math":  # the reference stays right
            return mixed_attention(q, k, v, plan, backend=backend, **kw)
        return baselines.sdpa_causal(q, k, v, causal=False)
    monkeypatch.setattr(ops, "routed_swiglu", swiglu_sign_flip)
    monkeypatch.setattr(ops, "mixed_attention", attention_no_causal)
    monkeypatch.setattr(opbench, "_attn_backends", lambda device: ["sdpa"])  # no interpreter: keep it fast
    recs = _op_records(("swiglu", "attention"))
    for key in (("fwd", "vexpert[torch]"), ("fwd", "vexpert[sdpa]"), ("fwd+bwd", "vexpert[sdpa]")):
        bad = recs[key]
        assert bad["status"] == "error" and "wrong result" in bad["reason"], bad
        assert bad["rel_err"] > 1e-2 and "median_ms" not in bad
    for key in (("fwd", "slices"), ("fwd", "sdpa"), ("fwd+bwd", "sdpa")):  # the right providers still pass
        assert recs[key]["status"] == "ok" and recs[key]["checked"], recs[key]

"""Per-op benchmarks: each fused op against its plain baselines on the same inputs.

Ops (names in records: ``op:<name>``), all at one case's token mix (routed order, ``T = B*L`` rows):
  linear_qkv / linear_o / linear_down  ``ops.routed_linear`` per GEMM backend | ``slices_cat`` (2 GEMMs + cat) |
                                       ``slices_into`` (2 GEMMs into views of one output) | ``dense_gemm`` (one GEMM of
                                       the same total M: the ceiling)
  swiglu                               ``ops.routed_swiglu`` | ``slices`` | ``dense_gemm`` (one [2I, K] GEMM + silu*mul)
  attention (fwd, fwd+bwd)             ``ops.mixed_attention`` per attention backend | ``sdpa`` (causal, flash on GPU)
  rmsnorm                              ``ops.rmsnorm`` per backend | ``torch`` (eager HF RMSNorm) | ``copy`` (same bytes)
  permute                              ``plan.permute`` | ``copy`` (a clone of the same bytes)
FLOPs: 2*T*N*K for GEMMs (gate+up: 2*T*2I*K), causal attention as in ``flops``; elementwise ops count bytes instead
(``gbps`` = bytes read + written once / time).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import baselines as bl
from .flops import attention_flops, linear_flops
from .providers import Provider, measure
from .shapes import Case, token_type_ids
from .timing import rotating

GEMM_BACKENDS_GPU = ("triton", "torch", "grouped_mm")


def _gemm_backends(device, op: str = "") -> list:
    from .._triton_compat import HAS_TRITON, interpret_mode
    if torch.device(device).type == "cuda":
        return list(GEMM_BACKENDS_GPU)
    # CPU budget: the interpreter (~0.5 s per tiny GEMM) runs for one projection only
    return (["triton"] if HAS_TRITON and interpret_mode() and op == "linear_o" else []) + ["torch"]


def _attn_backends(device) -> list:
    try:
        from ..ops import available_attention_backends
    except Exception:
        return []
    ok = [b for b, why in available_attention_backends().items() if why is None]
    if torch.device(device).type == "cpu":
        ok = [b for b in ok if b in ("triton", "sdpa")]
    return ok


def op_records(case: Case, device, dtype, *, rep_ms=100, warmup_ms=25) -> list:
    """Measure every op provider of a case -> records."""
    from ..routing import RoutingPlan
    device = torch.device(device)
    cfg = case.config
    g = torch.Generator().manual_seed(3)
    T, D, I = case.tokens, cfg.hidden_size, cfg.intermediate_size
    H, KV, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    plan = RoutingPlan.build(token_type_ids(case, device))
    nv = plan.num_vision

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    base = dict(case=case.id, label=case.label, model=case.model, batch=case.batch, seq_len=case.seq_len,
                image_tokens=case.image_tokens, tokens=T, n_vision_rows=nv, suite="op", mode="fwd")
    recs = []
    try:
        from .. import ops
    except Exception as exc:  # pragma: no cover - ops package broken
        ops = None
        ops_err = f"skipped: vexpert_kernels.ops not available ({exc!r})"

    def run(op, provs, flops=None, nbytes=None, mode="fwd", ref=None):
        for prov in provs:
            rec = measure(prov, device=device, flops=flops, base=dict(base, op=op, case_op=f"{case.id}:{op}",
                                                                       mode=mode), ref_out=ref,
                          rep_ms=rep_ms, warmup_ms=warmup_ms)
            if nbytes and rec.get("median_ms"):
                rec["gbps"] = nbytes / (rec["median_ms"] * 1e-3) / 1e9
            recs.append(rec)

    def op_prov(name, make, backend=None):
        if ops is None:
            return Provider(name, skip=ops_err, backend=backend)
        return Provider(name, make, backend=backend)

    # ---------------------------------------------------------------- routed linears
    for op, N, K in (("linear_qkv", cfg.qkv_size, D), ("linear_o", D, D), ("linear_down", D, I)):
        xs = rotating(lambda: (rnd(T, K),), device)
        wv, wl = rnd(N, K, scale=K ** -0.5), rnd(N, K, scale=K ** -0.5)
        out = torch.empty(T, N, device=device, dtype=dtype)
        x0 = xs.sets[0][0]
        ref = torch.cat([x0[:nv].double() @ wv.double().t(), x0[nv:].double() @ wl.double().t()])
        provs = [op_prov(f"vexpert[{be}]", (lambda be=be: (lambda: ops.routed_linear(xs()[0], wv, wl, plan,
                                                                                       backend=be)))(), be)
                 for be in _gemm_backends(device, op)]
        provs += [Provider("slices_cat", lambda: bl.slices_gemm(xs()[0], wv, wl, nv)),
                  Provider("slices_into", lambda: bl.slices_gemm_into(xs()[0], wv, wl, nv, out)),
                  Provider("dense_gemm", lambda: bl.dense_gemm(xs()[0], wl))]
        # rotation: the first call of each provider sees set 0, which ``ref`` was computed on
        for p in provs:
            if p.fn is not None:
                p.fn = _first_on_set0(p.fn, xs)
        run(op, provs, flops=linear_flops(T, N, K), ref=ref if device.type == "cpu" or T * N < 2 ** 27 else None)
        del xs, wv, wl, out

    # ---------------------------------------------------------------- SwiGLU (gate+up)
    xs = rotating(lambda: (rnd(T, D),), device)
    gv, uv, gl, ul = (rnd(I, D, scale=D ** -0.5) for _ in range(4))
    w_gu = torch.cat([gl, ul], 0)
    provs = [op_prov(f"vexpert[{be}]", (lambda be=be: (lambda: ops.routed_swiglu(xs()[0], gv, uv, gl, ul, plan,
                                                                               backend=be)))(), be)
             for be in _gemm_backends(device)]
    provs += [Provider("slices", lambda: bl.slices_swiglu(xs()[0], gv, uv, gl, ul, nv)),
              Provider("dense_gemm", lambda: _dense_swiglu(xs()[0], w_gu, I))]
    run("swiglu", provs, flops=linear_flops(T, 2 * I, D))
    del xs, gv, uv, gl, ul, w_gu

    # ---------------------------------------------------------------- attention
    B, L = case.batch, case.seq_len
    q, k, v = rnd(B, H, L, hd), rnd(B, KV, L, hd), rnd(B, KV, L, hd)
    for mode in ("fwd", "fwd+bwd"):
        qg, kg, vg = (t.detach().clone().requires_grad_(mode == "fwd+bwd") for t in (q, k, v))
        do = rnd(B, H, L, hd)
        provs = []
        for be in _attn_backends(device):
            if device.type == "cpu" and be == "triton" and mode == "fwd+bwd":
                continue
            f = (lambda be=be: (lambda: ops.mixed_attention(qg, kg, vg, plan, backend=be)))()
            provs.append(_attn_provider(f"vexpert[{be}]", f, mode, (qg, kg, vg), do, be))
        provs.append(_attn_provider("sdpa", lambda: bl.sdpa_causal(qg, kg, vg), mode, (qg, kg, vg), do))
        fl = attention_flops(B, H, L, L, hd) * (3 if mode == "fwd+bwd" else 1)
        run("attention", provs, flops=fl, mode=mode)
    del q, k, v

    # ---------------------------------------------------------------- rmsnorm, permute (memory bound)
    xs = rotating(lambda: (rnd(case.batch, case.seq_len, D),), device)
    w = 1 + rnd(D, scale=0.1)
    nbytes = 2 * T * D * torch.empty((), dtype=dtype).element_size()
    provs = []
    for be in (["triton", "cuda", "torch"] if device.type == "cuda" else ["torch"]):
        provs.append(op_prov(f"vexpert[{be}]", (lambda be=be: (lambda: ops.rmsnorm(xs()[0], w, cfg.rms_norm_eps,
                                                                                  backend=be)))(), be))
    provs += [Provider("torch_eager", lambda: bl.rmsnorm(xs()[0], w, cfg.rms_norm_eps)),
              Provider("copy", lambda: bl.copy(xs()[0]))]
    run("rmsnorm", provs, nbytes=nbytes)
    run("permute", [Provider("vexpert[plan.permute]", lambda: plan.permute(xs()[0])),
                    Provider("copy", lambda: bl.copy(xs()[0]))], nbytes=nbytes)
    return recs


def _first_on_set0(fn, xs):
    state = {"first": True}

    def wrapped():
        if state["first"]:
            state["first"] = False
            xs.i = 0
        return fn()
    return wrapped


def _dense_swiglu(x, w_gu, I):
    gu = F.linear(x, w_gu)
    return F.silu(gu[:, :I]) * gu[:, I:]


def _attn_provider(name, f, mode, inputs, do, backend=None):
    if mode == "fwd":
        def fn():
            with torch.no_grad():
                return f()
        return Provider(name, fn, backend=backend)

    def fn():
        out = f()
        out = out[0] if isinstance(out, tuple) else out
        out.backward(do)
    return Provider(name, fn, grads=list(inputs), backend=backend)

"""Per-op benchmarks: each fused op against its plain baselines on the same inputs.

Ops (names in records: ``op:<name>``), all at one case's token mix (routed order, ``T = B*L`` rows):
  linear_qkv / linear_o / linear_down  ``ops.routed_linear`` per GEMM backend | ``slices_cat`` (2 GEMMs + cat) |
                                       ``slices_into`` (2 GEMMs into views of one output) | ``dense_gemm`` (one GEMM of
                                       the same total M: the ceiling)
  swiglu                               ``ops.routed_swiglu`` | ``slices`` | ``dense_gemm`` (one [2I, K] GEMM + silu*mul)
  mlp (fwd+bwd)                        ``ops.routed_swiglu_mlp`` (SwiGLU backward fused into the down dX epilogue) |
                                       ``two_ops`` (routed_swiglu + routed_linear, dh through memory) | ``slices``
  attention (fwd, fwd+bwd)             ``ops.mixed_attention`` per attention backend | ``sdpa`` (causal, flash on GPU)
  rmsnorm                              ``ops.rmsnorm`` per backend | ``torch`` (eager HF RMSNorm) | ``copy`` (same bytes)
  permute                              ``plan.permute`` | ``copy`` (a clone of the same bytes)
FLOPs: 2*T*N*K for GEMMs (gate+up: 2*T*2I*K), causal attention as in ``flops``; elementwise ops count bytes instead
(``gbps`` = bytes read + written once / time).

Every provider's first output is compared with a float64 reference of the op on the same inputs BEFORE it is timed
(``providers.measure``); above ``check_tolerance`` the record is an error and the benchmark fails:
  linear_*   per expert ``x[:nv] Wvᵀ``, ``x[nv:] Wlᵀ``;  swiglu  per expert ``silu(x Wgᵀ) * (x Wuᵀ)``;
  attention  ``ops.mixed_attention(..., backend="math")`` on fp64 copies (fwd+bwd: the forward, run once without
             grad);  rmsnorm  ``ops.rmsnorm.rmsnorm_reference`` in fp64;  permute  ``x.reshape(T, D)[plan.perm]``.
Ceilings that compute a different function by design (``dense_gemm``, ``copy``; ``sdpa`` when the plan pads) have
their error recorded, not checked: their record says ``checked: False`` and ``check`` why.
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.nn.functional as F

from . import baselines as bl
from .flops import attention_flops, linear_flops
from .providers import CEILING_PROVIDERS, Provider, measure
from .shapes import Case, token_type_ids
from .timing import rotating

GEMM_BACKENDS_GPU = ("triton", "torch", "grouped_mm")
OPS = ("linear_qkv", "linear_o", "linear_down", "swiglu", "mlp", "attention", "rmsnorm", "permute")
_NOT_CHECKED = "recorded, not checked: computes a different function by design (a ceiling)"
_ATTN_REF_BYTES = 2 ** 29  # fp64 score matrix per chunk of the attention reference (the math path keeps ~4)


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


# ------------------------------------------------------------------------------------------- float64 references
def swiglu_reference(x, gv, uv, gl, ul, nv: int) -> torch.Tensor:
    """Routed SwiGLU in float64: rows ``[:nv]`` use the vision expert (gv, uv), the rest the language one."""
    x = x.double()

    def mlp(rows, g, u):
        return F.silu(rows @ g.double().t()) * (rows @ u.double().t())
    return torch.cat([mlp(x[:nv], gv, uv), mlp(x[nv:], gl, ul)])


def linear_reference(x, wv, wl, nv: int) -> torch.Tensor:
    """Routed linear in float64: rows ``[:nv]`` times ``wvᵀ``, the rest times ``wlᵀ``."""
    x = x.double()
    return torch.cat([x[:nv] @ wv.double().t(), x[nv:] @ wl.double().t()])


def attention_reference(q, k, v, plan) -> torch.Tensor:
    """``mixed_attention(backend="math")`` on float64 copies, in chunks of whole KV-head groups (bounded memory)."""
    from ..ops import mixed_attention
    B, H, Lq, _ = q.shape
    KV, Lk = k.shape[1], k.shape[2]
    G = H // KV
    per_kv = max(B * G * Lq * Lk * 8, 1)
    step = max(1, min(KV, _ATTN_REF_BYTES // per_kv))
    outs = []
    with torch.no_grad():
        for j in range(0, KV, step):
            j1 = min(KV, j + step)
            outs.append(mixed_attention(q[:, j * G:j1 * G].double(), k[:, j:j1].double(), v[:, j:j1].double(), plan,
                                        backend="math"))
    return torch.cat(outs, 1)


def rmsnorm_reference64(x, w, eps: float) -> torch.Tensor:
    from ..ops.rmsnorm import rmsnorm_reference
    return rmsnorm_reference(x.double(), w.double(), eps)


def permute_reference(x, plan) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])[plan.perm].double()


# ------------------------------------------------------------------------------------------- the suite
def op_records(case: Case, device, dtype, *, rep_ms=100, warmup_ms=25, only: Optional[Iterable[str]] = None) -> list:
    """Measure every op provider of a case (or the ops named in ``only``) -> records, each checked first."""
    from ..routing import RoutingPlan
    device = torch.device(device)
    only = set(OPS if only is None else only)
    unknown = only - set(OPS)
    if unknown:
        raise ValueError(f"only must name ops among {OPS}, got {sorted(unknown)}")
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

    def run(op, provs, ref, flops=None, nbytes=None, mode="fwd"):
        for prov in provs:
            rec = measure(prov, device=device, flops=flops, base=dict(base, op=op, case_op=f"{case.id}:{op}",
                                                                       mode=mode), ref_out=ref,
                          rep_ms=rep_ms, warmup_ms=warmup_ms)
            ceiling = prov.ceiling or prov.name in CEILING_PROVIDERS
            rec["checked"] = not ceiling and rec.get("rel_err") is not None
            if ceiling:
                rec["check"] = _NOT_CHECKED
            if nbytes and rec.get("median_ms"):
                rec["gbps"] = nbytes / (rec["median_ms"] * 1e-3) / 1e9
            recs.append(rec)

    def op_prov(name, make, backend=None):
        if ops is None:
            return Provider(name, skip=ops_err, backend=backend)
        return Provider(name, make, backend=backend)

    def on_set0(provs, xs):
        # rotation: the first call of each provider (the checked one) sees set 0, which the reference was computed on
        for p in provs:
            if p.fn is not None:
                p.fn = _first_on_set0(p.fn, xs)
        return provs

    # ---------------------------------------------------------------- routed linears
    for op, N, K in (("linear_qkv", cfg.qkv_size, D), ("linear_o", D, D), ("linear_down", D, I)):
        if op not in only:
            continue
        xs = rotating(lambda: (rnd(T, K),), device)
        wv, wl = rnd(N, K, scale=K ** -0.5), rnd(N, K, scale=K ** -0.5)
        out = torch.empty(T, N, device=device, dtype=dtype)
        ref = linear_reference(xs.sets[0][0], wv, wl, nv)
        provs = [op_prov(f"vexpert[{be}]", (lambda be=be: (lambda: ops.routed_linear(xs()[0], wv, wl, plan,
                                                                                       backend=be)))(), be)
                 for be in _gemm_backends(device, op)]
        provs += [Provider("slices_cat", lambda: bl.slices_gemm(xs()[0], wv, wl, nv)),
                  Provider("slices_into", lambda: bl.slices_gemm_into(xs()[0], wv, wl, nv, out)),
                  Provider("dense_gemm", lambda: bl.dense_gemm(xs()[0], wl))]
        run(op, on_set0(provs, xs), ref, flops=linear_flops(T, N, K))
        del xs, wv, wl, out, ref

    # ---------------------------------------------------------------- SwiGLU (gate+up)
    if "swiglu" in only:
        xs = rotating(lambda: (rnd(T, D),), device)
        gv, uv, gl, ul = (rnd(I, D, scale=D ** -0.5) for _ in range(4))
        w_gu = torch.cat([gl, ul], 0)
        ref = swiglu_reference(xs.sets[0][0], gv, uv, gl, ul, nv)
        provs = [op_prov(f"vexpert[{be}]", (lambda be=be: (lambda: ops.routed_swiglu(xs()[0], gv, uv, gl, ul, plan,
                                                                                   backend=be)))(), be)
                 for be in _gemm_backends(device)]
        provs += [Provider("slices", lambda: bl.slices_swiglu(xs()[0], gv, uv, gl, ul, nv)),
                  Provider("dense_gemm", lambda: _dense_swiglu(xs()[0], w_gu, I))]
        run("swiglu", on_set0(provs, xs), ref, flops=linear_flops(T, 2 * I, D))
        del xs, gv, uv, gl, ul, w_gu, ref

    # ---------------------------------------------------------------- SwiGLU MLP, forward + backward
    if "mlp" in only:
        x = rnd(T, D).requires_grad_()
        ws = [rnd(*s, scale=s[1] ** -0.5).requires_grad_() for s in ((I, D), (I, D), (D, I)) * 2]
        res = rnd(T, D).requires_grad_()
        do = rnd(T, D)
        ref = None
        if ops is not None:
            from ..ops.routed_linear import routed_swiglu_mlp_reference
            ref = routed_swiglu_mlp_reference(x.detach().double(), *(w.detach().double() for w in ws), plan,
                                              residual=res.detach().double())
        gv, uv, dv, gl, ul, dl = ws

        def mlp_prov(name, f, be=None):
            if ops is None and be is not None:
                return op_prov(name, None, be)
            return _attn_provider(name, f, "fwd+bwd", [x, res] + ws, do, be)
        provs = []
        for be in [b for b in _gemm_backends(device) if b != "grouped_mm"] + (["auto"] if device.type == "cuda"
                                                                              else []):
            provs.append(mlp_prov(f"vexpert[{be}]", (lambda be=be: (
                lambda: ops.routed_swiglu_mlp(x, *ws, plan, residual=res, backend=be)))(), be))
            provs.append(mlp_prov(f"two_ops[{be}]", (lambda be=be: (
                lambda: ops.routed_linear(ops.routed_swiglu(x, gv, uv, gl, ul, plan, backend=be), dv, dl, plan,
                                          residual=res, backend=be)))(), be))
        provs.append(mlp_prov("slices", lambda: res + bl.slices_gemm(bl.slices_swiglu(x, gv, uv, gl, ul, nv), dv,
                                                                     dl, nv)))
        # forward + backward: 3x the forward GEMM FLOPs (gate+up and down)
        run("mlp", provs, ref, flops=3 * (linear_flops(T, 2 * I, D) + linear_flops(T, D, I)), mode="fwd+bwd")
        del x, ws, res, do, ref, provs

    # ---------------------------------------------------------------- attention
    if "attention" in only:
        B, L = case.batch, case.seq_len
        q, k, v = rnd(B, H, L, hd), rnd(B, KV, L, hd), rnd(B, KV, L, hd)
        ref = attention_reference(q, k, v, plan) if ops is not None else None
        # plain causal SDPA is the same function only without padding (the plan's key mask)
        sdpa_ceiling = plan.attention_mask is not None and not bool(plan.attention_mask.all())
        for mode in ("fwd", "fwd+bwd"):
            qg, kg, vg = (t.detach().clone().requires_grad_(mode == "fwd+bwd") for t in (q, k, v))
            do = rnd(B, H, L, hd)
            provs = []
            for be in _attn_backends(device):
                if device.type == "cpu" and be == "triton" and mode == "fwd+bwd":
                    continue
                f = (lambda be=be: (lambda: ops.mixed_attention(qg, kg, vg, plan, backend=be)))()
                provs.append(_attn_provider(f"vexpert[{be}]", f, mode, (qg, kg, vg), do, be))
            provs.append(_attn_provider("sdpa", lambda: bl.sdpa_causal(qg, kg, vg), mode, (qg, kg, vg), do,
                                        ceiling=sdpa_ceiling))
            fl = attention_flops(B, H, L, L, hd) * (3 if mode == "fwd+bwd" else 1)
            run("attention", provs, ref, flops=fl, mode=mode)
        del q, k, v, ref

    # ---------------------------------------------------------------- rmsnorm, permute (memory bound)
    if only & {"rmsnorm", "permute"}:
        xs = rotating(lambda: (rnd(case.batch, case.seq_len, D),), device)
        w = 1 + rnd(D, scale=0.1)
        nbytes = 2 * T * D * torch.empty((), dtype=dtype).element_size()
    if "rmsnorm" in only:
        provs = []
        for be in (["triton", "cuda", "torch"] if device.type == "cuda" else ["torch"]):
            provs.append(op_prov(f"vexpert[{be}]", (lambda be=be: (lambda: ops.rmsnorm(xs()[0], w, cfg.rms_norm_eps,
                                                                                      backend=be)))(), be))
        provs += [Provider("torch_eager", lambda: bl.rmsnorm(xs()[0], w, cfg.rms_norm_eps)),
                  Provider("copy", lambda: bl.copy(xs()[0]))]
        run("rmsnorm", on_set0(provs, xs), rmsnorm_reference64(xs.sets[0][0], w, cfg.rms_norm_eps), nbytes=nbytes)
    if "permute" in only:
        provs = [Provider("vexpert[plan.permute]", lambda: plan.permute(xs()[0])),
                 Provider("copy", lambda: bl.copy(xs()[0].reshape(T, D)))]  # a view: same bytes, reference's shape
        run("permute", on_set0(provs, xs), permute_reference(xs.sets[0][0], plan), nbytes=nbytes)
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


def _attn_provider(name, f, mode, inputs, do, backend=None, ceiling=False):
    def fwd_only():
        with torch.no_grad():
            out = f()
        return out[0] if isinstance(out, tuple) else out
    if mode == "fwd":
        return Provider(name, fwd_only, backend=backend, ceiling=ceiling)

    def fn():
        out = f()
        out = out[0] if isinstance(out, tuple) else out
        out.backward(do)
    # fwd+bwd returns nothing: its forward is checked once, without grad, before the timing
    return Provider(name, fn, grads=list(inputs), backend=backend, check_fn=fwd_only, ceiling=ceiling)

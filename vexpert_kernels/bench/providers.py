"""Providers of one decoder layer, all in one process on the same weights and inputs, and the measuring loop.

Providers (layer / sweep cases):
  vexpert[triton], vexpert[torch]  ``vexpert_kernels.VisualExpertBlock`` per backend, sharing the reference layer's
                                   modules, with the RoutingPlan built once outside the timed region (``plan=``), as a
                                   model does once per forward for all layers;
  hf_eager                         HF-style boolean-mask routing + SDPA causal (``baselines.hf_layer``);
  hf_reference                     ``vexpert_kernels.reference.VisualExpertBlock`` (the oracle; fp32 math attention),
                                   timed on CPU cases only, and used on GPU for the correctness check;
  slices_eager / slices_compiled   permuted slices (``baselines.slices_layer``) eager / ``torch.compile(dynamic=True)``;
  dense                            a Llama layer with one weight set (``baselines.dense_layer``).
Every provider's forward output is checked against the reference output BEFORE it is timed (``measure``): the
float64 relative error goes in the record, and above ``check_tolerance(dtype, device)`` the record is an error
("wrong result ... not timed"), which fails the benchmark -- a fast wrong kernel is never reported as a result.
In fwd+bwd mode the provider's forward is run once more without grad for the check. Ceilings that compute a
different function by design (``dense`` on image cases: one weight set; ``dense_gemm``, ``copy`` in the op suite)
get their error recorded, not checked.
Decode cases: hf_eager, vexpert[...], dense (slices == dense when every token is language; dense is checked there).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from . import baselines as bl
from .flops import layer_flops, tflops
from .shapes import Case, token_type_ids
from .timing import median_ms, peak_extra_mib


@dataclass
class Provider:
    name: str
    fn: Optional[Callable] = None          # () -> output (fwd) or None (fwd+bwd)
    grads: list = field(default_factory=list)
    skip: Optional[str] = None
    backend: Optional[str] = None
    ref_out: Optional[torch.Tensor] = None  # the reference output to check against (else measure's ref_out)
    check_fn: Optional[Callable] = None     # () -> output, for providers whose fn returns None (fwd+bwd)
    ceiling: bool = False                   # computes a different function by design: error recorded, not checked


# op-suite ceilings (vexpert_kernels.bench.opbench): one dense GEMM / a plain copy, not the routed op
CEILING_PROVIDERS = frozenset({"dense_gemm", "copy"})
# output vs reference, relative (float64 norm). Low precision: both sides round at every op (bf16 unit roundoff
# 2^-8); observed layer errors are ~5e-3 in bf16, ~1e-7 in fp32 on CPU, ~1e-3 in fp32 on CUDA (TF32 tensor cores).
# A flipped RoPE sign gives ~0.2, a dropped vision bias ~3e-2 (tiny shapes).
_CHECK_TOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 1e-2}


def check_tolerance(dtype: torch.dtype, device) -> float:
    """Largest accepted relative error of a provider's output (env VEXPERT_BENCH_CHECK_TOL overrides)."""
    env = os.environ.get("VEXPERT_BENCH_CHECK_TOL")
    if env:
        return float(env)
    tol = _CHECK_TOL.get(dtype, 2e-2)
    if dtype == torch.float32 and torch.device(device).type == "cuda":
        tol = 5e-3  # fp32 GEMMs / tl.dot may use TF32 (10-bit mantissa) on the GPU
    return tol


def vexpert_backends(device) -> list:
    """Backends of the fused block worth timing here: triton where it can run (CUDA, or the CPU interpreter)."""
    from .._triton_compat import HAS_TRITON, interpret_mode
    out = ["torch"]
    if HAS_TRITON and (torch.device(device).type == "cuda" or interpret_mode()):
        out.insert(0, "triton")
    return out


def _fused_block_class():
    try:
        from .. import VisualExpertBlock  # noqa: F401
        from ..block import VisualExpertBlock as Block
        return Block, None
    except Exception as exc:  # the fused block may not exist (yet) or fail to import
        return None, f"skipped: vexpert_kernels.VisualExpertBlock not available ({exc!r})"


_COMPILED = {}
_PARAMS = {}


def compiled_slices(mode: str):
    if mode not in _COMPILED:
        _COMPILED[mode] = torch.compile(bl.slices_layer, dynamic=True)
    return _COMPILED[mode]


class LayerSetup:
    """Weights, inputs and plan of one case, shared by all providers."""

    def __init__(self, case: Case, device, dtype, seed: int = 0):
        from ..routing import RoutingPlan
        self.case, self.device, self.dtype = case, torch.device(device), dtype
        self._ref_out = None  # reference output, computed once (reference_output)
        self.cfg = case.config
        key = (case.model, str(dtype), str(self.device), seed)
        if key not in _PARAMS:  # one weight set at a time, reused across the cases of a model
            _PARAMS.clear()
            _PARAMS[key] = bl.make_params(self.cfg, dtype, device, seed)
        self.ref, self.params = _PARAMS[key]
        g = torch.Generator(device="cpu").manual_seed(seed + 1)
        B, L, D = case.batch, case.seq_len, self.cfg.hidden_size
        self.x = torch.randn(B, L, D, generator=g).to(device=device, dtype=dtype)
        self.dy = torch.randn(B, L, D, generator=g).to(device=device, dtype=dtype)
        if case.kind == "decode":
            KV, hd = self.cfg.num_key_value_heads, self.cfg.head_dim
            self.tt = torch.zeros(B, L, dtype=torch.long, device=device)
            self.past = tuple(torch.randn(B, KV, case.past, hd, generator=g).to(device=device, dtype=dtype)
                              for _ in range(2))
            self.pos = torch.full((B, L), case.past + 3, dtype=torch.long, device=device)
            self.plan = None
        else:
            self.tt = token_type_ids(case, device)
            self.plan = RoutingPlan.build(self.tt)
            self.pos = self.plan.position_ids
            self.nv = self.plan.num_vision  # the plan's one host sync, outside any timing
            self.past = None

    # ------------------------------------------------------------------ forward functions (x -> out [B, L, D])
    def forwards(self, compile_ok: bool = True) -> dict:
        """provider name -> (forward(x) callable | None, skip reason | None, backend)."""
        p, cfg, tt, pos = self.params, self.cfg, self.tt, self.pos
        out = {}
        Block, why = _fused_block_class()
        for be in vexpert_backends(self.device):
            name = f"vexpert[{be}]"
            if Block is None:
                out[name] = (None, why, be)
                continue
            block = Block.from_hf_layer(self.ref, cfg, backend=be)
            if self.case.kind == "decode":
                out[name] = (lambda x, b=block: b(x, tt, pos, past_key_value=self.past, use_cache=True)[0], None, be)
            else:
                out[name] = (lambda x, b=block: b(x, tt, pos, plan=self.plan)[0], None, be)
        if self.case.kind == "decode":
            out["hf_eager"] = (lambda x: bl.hf_layer(p, cfg, x, tt, pos, past=self.past), None, None)
            out["dense"] = (lambda x: bl.dense_layer(p, cfg, x, pos, past=self.past), None, None)
            return out
        out["hf_eager"] = (lambda x: bl.hf_layer(p, cfg, x, tt, pos), None, None)
        plan = self.plan
        out["slices_eager"] = (lambda x: bl.slices_layer(p, cfg, x, plan.perm, plan.inv_perm, self.nv, pos), None, None)
        if compile_ok:
            out["slices_compiled"] = (lambda x, m=None: compiled_slices(m or "any")(p, cfg, x, plan.perm, plan.inv_perm,
                                                                                     self.nv, pos), None, None)
        else:
            out["slices_compiled"] = (None, "skipped: torch.compile disabled (VEXPERT_BENCH_COMPILE=0)", None)
        out["dense"] = (lambda x: bl.dense_layer(p, cfg, x, pos), None, None)
        if self.device.type == "cpu":  # the oracle's fp32 math attention is no speed baseline on a GPU
            out["hf_reference"] = (lambda x: self.ref(x, tt, pos)[0], None, None)
        return out

    def reference_output(self):
        if self._ref_out is not None:
            return self._ref_out
        with torch.no_grad():
            if self.case.kind == "decode":
                self._ref_out = self.ref(self.x, self.tt, self.pos, past_key_value=self.past)[0]
                return self._ref_out
            self._ref_out = self.ref(self.x, self.tt, self.pos)[0]
            return self._ref_out

    def provider(self, name: str, forward, mode: str, skip=None, backend=None) -> Provider:
        """A timed closure over this case's inputs, carrying the reference output it is checked against first."""
        if skip is not None or forward is None:
            return Provider(name, skip=skip or "skipped", backend=backend)
        if self._ref_out is None:
            self._ref_out = self.reference_output()
        ceiling = name == "dense" and self.case.kind != "decode"  # one weight set: not the routed layer

        def fwd_only():
            with torch.no_grad():
                return forward(self.x)
        if mode in ("fwd", "decode"):
            return Provider(name, fwd_only, backend=backend, ref_out=self._ref_out, ceiling=ceiling)
        xg = self.x.detach().clone().requires_grad_(True)
        params = [t for t in self.params.values() if t.requires_grad]

        def fn():
            forward(xg).backward(self.dy)
        return Provider(name, fn, grads=[xg] + params, backend=backend, ref_out=self._ref_out, check_fn=fwd_only,
                        ceiling=ceiling)


def rel_err(out, ref) -> float:
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    if not torch.isfinite(out).all():
        return float("inf")
    return float((out - ref).norm() / ref.norm().clamp_min(1e-300))


def check_output(provider: Provider, out, ref_out, device) -> tuple:
    """Compare a provider's output with the reference -> (rel_err or None if unchecked, None if right else why)."""
    if ref_out is None:
        return None, None
    if not isinstance(out, torch.Tensor):
        out = provider.check_fn() if provider.check_fn is not None else None
    if not isinstance(out, torch.Tensor):
        return None, None
    if tuple(out.shape) != tuple(ref_out.shape):
        return None, f"wrong result: output shape {tuple(out.shape)} != reference {tuple(ref_out.shape)} (not timed)"
    err = rel_err(out, ref_out)
    tol = check_tolerance(out.dtype, device)
    if provider.ceiling or provider.name in CEILING_PROVIDERS or err <= tol:
        return err, None
    return err, f"wrong result: rel_err {err:.3g} > {tol:.3g} vs the reference (not timed)"


def measure(provider: Provider, *, device, flops: Optional[int], base: dict, ref_out=None,
            rep_ms: float = 100, warmup_ms: float = 25) -> dict:
    """Check one provider's output against the reference, then time it -> record (status ok / skipped / error;
    never raises). ``ref_out`` defaults to ``provider.ref_out``; a wrong output is an error record, never timed."""
    rec = dict(base, provider=provider.name, backend=provider.backend, flops=flops)
    if provider.skip:
        rec.update(status="skipped", reason=provider.skip)
        return rec
    ref_out = ref_out if ref_out is not None else provider.ref_out
    try:
        out = provider.fn()  # first call: compile / autotune / warm caches, outside the timing
        err, wrong = check_output(provider, out, ref_out, device)
        del out
        if err is not None:
            rec["rel_err"] = err
        if wrong is not None:
            rec.update(status="error", reason=wrong)
            return rec
        ms = median_ms(provider.fn, device, warmup_ms=warmup_ms, rep_ms=rep_ms, grad_to_none=provider.grads or None)
        for t in provider.grads:
            t.grad = None
        peak = peak_extra_mib(provider.fn, device)
        for t in provider.grads:
            t.grad = None
    except Exception as exc:
        rec.update(status="error", reason=f"{type(exc).__name__}: {exc}"[:800])
        return rec
    rec.update(status="ok", median_ms=ms, tflops=tflops(flops, ms) if flops else None, peak_extra_mib=peak)
    return rec


def case_fields(case: Case, setup: Optional[LayerSetup] = None) -> dict:
    d = dict(case=case.id, label=case.label, model=case.model, batch=case.batch, seq_len=case.seq_len,
             image_tokens=case.image_tokens, tokens=case.tokens, past=case.past)
    if setup is not None and getattr(setup, "plan", None) is not None:
        d["n_vision_rows"] = setup.nv
    return d


def compile_enabled(device, first_case: bool = True) -> bool:
    """VEXPERT_BENCH_COMPILE: 1 (default) every layer case, 'first' only the first layer case, 0 never."""
    v = os.environ.get("VEXPERT_BENCH_COMPILE", "1").strip().lower()
    if v == "first":
        return first_case
    return v not in ("0", "", "false", "no")


def layer_records(case: Case, modes, device, dtype, *, providers=None, rep_ms=100, warmup_ms=25,
                  check: bool = True) -> list:
    """Measure every provider of a case in every mode -> records (all providers in this one process)."""
    setup = LayerSetup(case, device, dtype)
    fwds = setup.forwards(compile_ok=compile_enabled(device))
    ref_out = setup.reference_output() if check else None
    recs = []
    for mode in modes:
        flops = layer_flops(setup.cfg, case.batch, case.seq_len, mode, past=case.past)
        for name, (fwd, skip, be) in fwds.items():
            if providers is not None and name not in providers:
                continue
            if name == "hf_reference" and mode != "fwd":
                continue  # the oracle is timed forward only
            if name == "slices_compiled" and fwd is not None:
                fwd = (lambda f, m: (lambda x: f(x, m)))(fwd, mode)  # one compiled graph per mode
            if name == "vexpert[triton]" and mode == "fwd+bwd" and torch.device(device).type == "cpu":
                skip, fwd = "skipped: interpreter fwd+bwd too slow for the CPU budget (fwd is measured)", None
            prov = setup.provider(name, fwd, mode, skip, be)
            recs.append(measure(prov, device=device, flops=flops, base=dict(case_fields(case, setup), mode=mode,
                                                                             suite=case.kind),
                                ref_out=ref_out if mode in ("fwd", "decode") else None,
                                rep_ms=rep_ms, warmup_ms=warmup_ms))
    del setup
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    return recs

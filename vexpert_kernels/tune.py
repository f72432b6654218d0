"""Pre-tune one model's layer shapes and print the autotune decision table.

    python -m vexpert_kernels.tune --preset cogvlm_chat_17b --tokens 8192 [--seq-len 2048] [--image-tokens 1227]
                                   [--dtype bf16] [--budget-s 30] [--force] [--json out.json] [--dry-run]

On CUDA it builds the layer's op shapes (QKV + RoPE, attention, o-projection with residual, gate/up SwiGLU, down
projection with residual; each forward and backward, so dX and dW ops tune too) with random weights, calls the public
ops with ``backend="auto"`` so every op runs :func:`vexpert_kernels.autotune.select` on its real tensors, and prints
every decision: op, key, chosen candidate, each candidate's time and verdict. Decisions land in the on-disk cache
(``autotune.default_cache_dir()``) for later processes on this GPU/software. The per-key budget defaults to 30 s here (pre-tuning
can afford every candidate; a runtime first call uses ``VEXPERT_AUTOTUNE_BUDGET_S``, default 2 s).

``--device cpu`` runs the same ops on CPU tensors (a smoke test of this tool; nothing tunes there). Without CUDA
(or with ``--dry-run``) it prints the op shapes it would tune and the static choice ``auto`` uses there
(plain PyTorch / SDPA on CUDA when untuned; our Triton kernels through the interpreter on CPU), and exits 0.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from typing import Optional

import torch

from . import autotune
from .config import VisualExpertConfig

PRESETS = {"cogvlm_chat_17b": VisualExpertConfig.cogvlm_chat_17b, "cogvlm2_19b": VisualExpertConfig.cogvlm2_19b,
           "tiny": VisualExpertConfig.tiny}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def layer_shapes(cfg: VisualExpertConfig, batch: int, seq_len: int) -> list:
    """The GEMM / attention problems of one layer: (name, description) pairs (T = batch * seq_len routed rows)."""
    T, D, I = batch * seq_len, cfg.hidden_size, cfg.intermediate_size
    H, KV, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    gemm = lambda n, k: f"T={T} N={n} K={k}; fwd [T,K]x[K,N], dX [T,N]x[N,K], dW [N,T]x[T,K] per expert"  # noqa: E731
    return [
        ("qkv (routed_qkv_rope)", gemm(cfg.qkv_size, D) + f"; RoPE, H={H} KV={KV} hd={hd}"),
        ("attention (mixed_attention)", f"B={batch} H={H} KV={KV} L={seq_len} hd={hd}, causal, fwd + bwd"),
        ("o (routed_linear + residual)", gemm(D, H * hd)),
        ("mlp: gate/up (routed_swiglu_mlp)", gemm(I, D) + " x2 (gate and up)"),
        ("mlp: down + residual (routed_swiglu_mlp)", gemm(D, I) + "; dX with the SwiGLU backward in its epilogue"),
    ]


def _run_layer_ops(cfg, batch, seq_len, image_tokens, dtype, device, after_each=None) -> list:
    """Every public op of the layer with backend="auto", forward + backward. Returns [(op, error or None)].
    ``after_each(results_so_far)`` runs after every op (the CLI rewrites its JSON there: a timeout keeps results)."""
    from .bench.shapes import Case, token_type_ids
    from .ops import mixed_attention, routed_linear, routed_qkv_rope, routed_swiglu_mlp
    from .routing import RoutingPlan

    g = torch.Generator(device="cpu").manual_seed(0)
    T, D, I = batch * seq_len, cfg.hidden_size, cfg.intermediate_size
    H, KV, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    plan = RoutingPlan.build(token_type_ids(Case("tune", batch, seq_len, image_tokens), device))

    def w(n, k):
        return (torch.randn(n, k, generator=g) / k ** 0.5).to(device=device, dtype=dtype).requires_grad_(True)

    def x(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype).requires_grad_(True)

    res = []

    def step(name, fn):
        try:
            outs = fn()
            outs = outs if isinstance(outs, tuple) else (outs,)
            torch.autograd.backward(outs, [torch.randn_like(o) for o in outs])
            torch.cuda.synchronize() if device.type == "cuda" else None
            r = (name, None)
        except Exception as exc:  # report and go on: one op's failure must not hide the others' tables
            r = (name, f"{type(exc).__name__}: {exc}"[:400])
        if after_each is not None:
            after_each(res + [r])
        return r

    bias = x(cfg.qkv_size) if cfg.vision_qkv_bias else None
    res.append(step("qkv", lambda: routed_qkv_rope(x(T, D), w(cfg.qkv_size, D), w(cfg.qkv_size, D), plan,
                                                   num_heads=H, num_kv_heads=KV, rope_theta=cfg.rope_theta,
                                                   bias_vision=bias, backend="auto")))
    res.append(step("attention", lambda: mixed_attention(x(batch, H, seq_len, hd), x(batch, KV, seq_len, hd),
                                                         x(batch, KV, seq_len, hd), plan, backend="auto")))
    res.append(step("o", lambda: routed_linear(x(T, H * hd), w(D, H * hd), w(D, H * hd), plan, residual=x(T, D),
                                               backend="auto")))
    # the MLP as the block runs it: one fused op (SwiGLU GEMM, down GEMM + residual; backward: the down projection's
    # dX with the SwiGLU backward in its epilogue, dW of down, one dX GEMM over K = 2I, dW of gate / up)
    res.append(step("mlp", lambda: routed_swiglu_mlp(x(T, D), w(I, D), w(I, D), w(D, I), w(I, D), w(I, D), w(D, I),
                                                     plan, residual=x(T, D), backend="auto")))
    return res


def format_table(rows: list) -> str:
    """One line per decision, then one indented line per candidate (time, verdict)."""
    lines = []
    for r in sorted(rows, key=lambda r: (r["op"], json.dumps(r.get("key"), default=str))):
        extra = f" ({r['reason']})" if r.get("status") != "tuned" and r.get("reason") else ""
        hit = " [budget hit]" if r.get("budget_hit") else ""
        lines.append(f"{r['op']:<22s} {json.dumps(r.get('key'), default=str):<44s} -> {r['chosen']:<28s} "
                     f"{r.get('status', '')}{hit}{extra}")
        cands = r.get("candidates") or {}
        best = min((v["ms"] for v in cands.values() if v.get("ms") is not None), default=None)
        for name, v in sorted(cands.items(), key=lambda kv: (kv[1].get("ms") is None, kv[1].get("ms") or 0)):
            ms = f"{v['ms']:9.4f} ms  x{v['ms'] / best:5.2f}" if v.get("ms") is not None else f"{'-':>9s}   " + " " * 7
            lines.append(f"    {name:<36s} {ms}  {v.get('verdict', '')}")
    return "\n".join(lines) if lines else "(no op consulted the tuner)"


def main(argv: Optional[list] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vexpert_kernels.tune", description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cogvlm_chat_17b")
    ap.add_argument("--tokens", type=int, default=8192, help="routed rows per layer call (batch * seq_len)")
    ap.add_argument("--seq-len", type=int, default=None, help="sequence length (default min(2048, tokens))")
    ap.add_argument("--image-tokens", type=int, default=None, help="image tokens per sample (default 1227, "
                    "clamped to seq_len - 1)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--budget-s", type=float, default=30.0, help="time budget per key (s)")
    ap.add_argument("--force", action="store_true", help="re-tune keys already in the cache")
    ap.add_argument("--json", default=None, help="also write the decisions as JSON here")
    ap.add_argument("--dry-run", action="store_true", help="only list the shapes and static choices")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                    help="cpu: run the ops on CPU tensors anyway (a smoke test of this tool at tiny shapes; "
                         "records the static choices, tunes nothing)")
    args = ap.parse_args(argv)
    if args.tokens <= 0:
        ap.error("--tokens must be > 0")
    cfg = PRESETS[args.preset]()
    L = args.seq_len or min(2048, args.tokens)
    if L <= 0 or args.tokens % L:
        ap.error(f"--tokens ({args.tokens}) must be a positive multiple of --seq-len ({L})")
    B = args.tokens // L
    n_img = min(args.image_tokens if args.image_tokens is not None else 1227, L - 1)
    dtype = DTYPES[args.dtype]

    print(f"vexpert_kernels.tune: {args.preset}, {B}x{L} tokens ({n_img} image tokens per sample), {args.dtype}")
    for name, desc in layer_shapes(cfg, B, L):
        print(f"  {name:<32s} {desc}")
    cuda = torch.cuda.is_available()
    report = dict(preset=args.preset, batch=B, seq_len=L, image_tokens=n_img, dtype=args.dtype,
                  shapes=[dict(op=n, shape=d) for n, d in layer_shapes(cfg, B, L)], cuda=cuda)
    if (not cuda and args.device == "cuda") or args.dry_run:
        why = "no CUDA device here" if not cuda else "--dry-run"
        print(f"\n{why}: nothing is tuned (tuning times CUDA kernels on the real tensors). backend='auto' uses the "
              "static choice: on CUDA, until tuned (or with VEXPERT_AUTOTUNE=0), the plain PyTorch / SDPA path; "
              "on CPU, our Triton kernels when TRITON_INTERPRET=1, else plain PyTorch.")
        if not cuda:
            print("Run this on the GPU machine to fill the cache; no CUDA found, exiting 0.")
        report.update(decisions=[], note=why)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(report, f, indent=1, default=str)
        return 0

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    tuner = autotune.get_tuner()
    tuner._budget_s, tuner.force = args.budget_s, args.force
    t0 = time.perf_counter()
    report["fingerprint"] = autotune.tuner.default_fingerprint(None) if cuda else None

    def save(results):
        report.update(decisions=autotune.decisions(), errors={op: err for op, err in results if err},
                      ops_done=[op for op, _ in results], seconds=round(time.perf_counter() - t0, 2))
        if args.json:
            tmp = args.json + ".tmp"
            with open(tmp, "w") as f:
                json.dump(report, f, indent=1, default=str)
            os.replace(tmp, args.json)
        print(f"  {results[-1][0]}: {'ok' if results[-1][1] is None else 'ERROR'} "
              f"({time.perf_counter() - t0:.1f} s)", flush=True)

    errors = _run_layer_ops(cfg, B, L, n_img, dtype, torch.device(args.device if cuda else "cpu"), after_each=save)
    print(f"\nautotune decisions ({time.perf_counter() - t0:.1f} s; cache: {tuner.cache_dir}):")
    print(format_table(autotune.decisions()))
    for op, err in errors:
        if err:
            print(f"ERROR {op}: {err}")
    return 1 if any(err for _, err in errors) else 0


if __name__ == "__main__":
    sys.exit(main())

"""``python benchmarks/attention_selfcheck.py``: our Triton attention vs the fp32 math oracle on CUDA (fwd + grads,
causal, padding, GQA, KV offset, bidirectional spans), then causal timings vs SDPA at 4x2048 and 1x4096, 32x128.
Prints one JSON object per line; exit status 1 if a correctness check fails. (Moved out of the op module: library
code never imports test helpers.)"""
from __future__ import annotations

import torch

from vexpert_kernels.ops import mixed_attention


def _gpu_selfcheck() -> int:  # pragma: no cover - needs a CUDA device
    """``python benchmarks/attention_selfcheck.py``: triton vs the fp32 math oracle on CUDA (fwd + grads, causal,
    padding, GQA, KV offset, bidirectional spans, varlen), then causal timings vs SDPA at 4x2048 and 1x4096, 32x128.
    Prints one JSON object per line; exit status 1 if a correctness check fails."""
    import json
    import time

    from vexpert_kernels.testing import rel_err

    if not torch.cuda.is_available():
        print(json.dumps({"skipped": "no CUDA device"}))
        return 0
    dev, failed = "cuda", 0
    torch.manual_seed(0)
    for hd in (64, 80, 128):
        for dtype in (torch.bfloat16, torch.float16):
            B, H, KV, Lq, Lk = 2, 8, 2, 700, 777
            q = torch.randn(B, H, Lq, hd, device=dev, dtype=dtype, requires_grad=True)
            k = torch.randn(B, KV, Lk, hd, device=dev, dtype=dtype, requires_grad=True)
            v = torch.randn(B, KV, Lk, hd, device=dev, dtype=dtype, requires_grad=True)
            kpm = torch.ones(B, Lk, dtype=torch.bool, device=dev)
            kpm[0, :100] = False
            kpm[1, -50:] = False
            span = torch.zeros(B, Lq, dtype=torch.int32, device=dev)
            span[0, 10:300] = 1
            span[1, 400:700] = 1
            for mode in ("causal", "bidirectional"):
                kw = dict(key_padding_mask=kpm, image_span_ids=span, image_attention=mode, return_lse=True)
                out, lse = mixed_attention(q, k, v, backend="triton", **kw)
                g = torch.autograd.grad(out.float().square().sum(), (q, k, v))
                qf, kf, vf = (t.detach().float().requires_grad_() for t in (q, k, v))
                ref, rlse = mixed_attention(qf, kf, vf, backend="math", **kw)
                rg = torch.autograd.grad(ref.square().sum(), (qf, kf, vf))
                fin = torch.isfinite(rlse)
                errs = {"out": rel_err(out, ref), "lse": rel_err(lse[fin], rlse[fin]),
                        **{f"d{n}": rel_err(a, b) for n, a, b in zip("qkv", g, rg)}}
                ok = all(e < (3e-2 if dtype == torch.bfloat16 else 1e-2) for e in errs.values())
                failed += not ok
                print(json.dumps({"check": f"hd{hd},{str(dtype)[6:]},{mode}", "ok": ok, **errs}), flush=True)

    def bench(fn, iters=20):
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
        return (time.perf_counter() - t0) / iters * 1e3

    for B, L in ((4, 2048), (1, 4096)):
        q, k, v = (torch.randn(B, 32, L, 128, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        do = torch.randn_like(q)
        row = {"shape": f"{B}x{L},32x128,bf16"}
        for be in ("triton", "sdpa"):
            row[f"{be}_fwd_ms"] = bench(lambda: mixed_attention(q, k, v, backend=be))
            out = mixed_attention(q, k, v, backend=be)
            row[f"{be}_bwd_ms"] = bench(lambda: torch.autograd.grad(out, (q, k, v), do, retain_graph=True))
        span = torch.zeros(B, L, dtype=torch.int32, device=dev)
        span[:, 1:1 + 1225] = 1  # one 35x35-patch image per row
        row["triton_bidir_fwd_ms"] = bench(lambda: mixed_attention(q, k, v, backend="triton", image_span_ids=span,
                                                                   image_attention="bidirectional"))
        print(json.dumps(row), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(_gpu_selfcheck())


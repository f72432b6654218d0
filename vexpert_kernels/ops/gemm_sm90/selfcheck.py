"""GPU self-check of the sm_90 grouped GEMMs: correctness against cuBLAS on expert slices, then speed against one
dense cuBLAS GEMM over the same total rows (the issue-14 target ratio), for every config.

    python -m vexpert_kernels.ops.gemm_sm90.selfcheck [--quick] [--json PATH]

CogVLM-17B / CogVLM2-19B projections at T = 8192 routed rows, 4908 of them vision (4 x 1227 image tokens). Prints
one line per (op, shape, config): relative error vs the fp32-accumulated torch result, median ms, TFLOP/s and the
ratio to dense cuBLAS. Needs CUDA on a compute-capability 9.x device. Nothing here runs in the test-suite.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from .configs import SM90_CONFIGS, SM90_SWIGLU_CONFIGS, SM90_WGRAD_CONFIGS, sm90_unsupported_reason
from .launch import grouped_gemm_dx_sm90, grouped_gemm_sm90, grouped_swiglu_sm90, grouped_wgrad_sm90

# (name, N, K): o-proj, down (17B / 19B); SwiGLU gate-up gives I, K
LINEAR_SHAPES = [("o", 4096, 4096), ("down-17b", 4096, 11008), ("down-19b", 4096, 14336)]
SWIGLU_SHAPES = [("gateup-17b", 11008, 4096), ("gateup-19b", 14336, 4096)]


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _bench(fn):
    import triton.testing
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def run(T=8192, n_v=4908, quick=False, dt=torch.bfloat16):
    dev = torch.device("cuda")
    off = torch.tensor([0, n_v, T], dtype=torch.int32, device=dev)
    rows = []

    def emit(op, shape, cfg, err, ms, flops, ms_dense):
        r = dict(op=op, shape=shape, config=cfg, rel_err=err, ms=ms, tflops=flops / ms / 1e9,
                 vs_dense_cublas=ms_dense / ms)
        rows.append(r)
        print(f"{op:7s} {shape:11s} {cfg:30s} err {err:.1e}  {ms:7.3f} ms  {r['tflops']:6.1f} TFLOP/s  "
              f"{r['vs_dense_cublas']:.3f}x dense cuBLAS", flush=True)

    gemm_cfgs = SM90_CONFIGS[:2] if quick else SM90_CONFIGS
    for shape, N, K in LINEAR_SHAPES[:1] if quick else LINEAR_SHAPES:
        x = torch.randn(T, K, device=dev, dtype=dt)
        wv, wl = (torch.randn(N, K, device=dev, dtype=dt) / K ** 0.5 for _ in range(2))
        dy = torch.randn(T, N, device=dev, dtype=dt)
        reason = sm90_unsupported_reason(x, wv)
        if reason:
            raise SystemExit(f"sm_90 kernels unsupported here: {reason}")
        ref = torch.cat([x[:n_v] @ wv.T, x[n_v:] @ wl.T])
        ref_dx = torch.cat([dy[:n_v] @ wv, dy[n_v:] @ wl])
        ref_dw = (dy[:n_v].T @ x[:n_v], dy[n_v:].T @ x[n_v:])
        flops = 2.0 * T * N * K
        dense_f = _bench(lambda: x @ wv.T)
        dense_dx = _bench(lambda: dy @ wv)
        dense_dw = _bench(lambda: dy.T @ x)
        for cfg in gemm_cfgs:
            y = grouped_gemm_sm90(x, wv, wl, off, config=cfg, out=torch.full_like(ref, float("nan")))
            emit("fwd", shape, cfg.name, _rel(y, ref), _bench(lambda: grouped_gemm_sm90(x, wv, wl, off, config=cfg)),
                 flops, dense_f)
            dx = grouped_gemm_dx_sm90(dy, wv, wl, off, config=cfg)
            emit("dx", shape, cfg.name, _rel(dx, ref_dx),
                 _bench(lambda: grouped_gemm_dx_sm90(dy, wv, wl, off, config=cfg)), flops, dense_dx)
        for cfg in (SM90_WGRAD_CONFIGS[:1] if quick else SM90_WGRAD_CONFIGS):
            dwv, dwl = grouped_wgrad_sm90(dy, x, off, config=cfg)
            emit("dw", shape, cfg.name, max(_rel(dwv, ref_dw[0]), _rel(dwl, ref_dw[1])),
                 _bench(lambda: grouped_wgrad_sm90(dy, x, off, config=cfg)), flops, dense_dw)
    for shape, I, K in SWIGLU_SHAPES[:1] if quick else SWIGLU_SHAPES:
        x = torch.randn(T, K, device=dev, dtype=dt)
        ws = [torch.randn(I, K, device=dev, dtype=dt) / K ** 0.5 for _ in range(4)]
        g = torch.cat([x[:n_v] @ ws[0].T, x[n_v:] @ ws[2].T]).float()
        u = torch.cat([x[:n_v] @ ws[1].T, x[n_v:] @ ws[3].T]).float()
        h_ref = torch.nn.functional.silu(g) * u
        wcat = torch.cat([ws[0], ws[1]])
        dense = _bench(lambda: x @ wcat.T)
        for cfg in (SM90_SWIGLU_CONFIGS[:1] if quick else SM90_SWIGLU_CONFIGS):
            h, gu = grouped_swiglu_sm90(x, *ws, off, config=cfg)
            err = max(_rel(h, h_ref), _rel(gu[:, :I], g), _rel(gu[:, I:], u))
            emit("swiglu", shape, cfg.name, err, _bench(lambda: grouped_swiglu_sm90(x, *ws, off, config=cfg)),
                 4.0 * T * I * K, dense)
    return rows


def cli(run_rows, description: str, quick_help: str, argv=None) -> int:
    """The self-check CLIs' shared main: ``--quick`` / ``--json``, rows from ``run_rows(quick=)``; exit 1 when a
    row's rel_err is >= 2e-2 or NaN, 2 without CUDA."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--quick", action="store_true", help=quick_help)
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs CUDA", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    rows = run_rows(quick=args.quick)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)
    bad = [r for r in rows if not r["rel_err"] < 2e-2]
    print(f"{len(rows)} rows, {len(bad)} with rel_err >= 2e-2 (or NaN)")
    return 1 if bad else 0


def main(argv=None) -> int:
    return cli(run, __doc__.splitlines()[0], "two configs, one shape per op", argv)


if __name__ == "__main__":
    sys.exit(main())

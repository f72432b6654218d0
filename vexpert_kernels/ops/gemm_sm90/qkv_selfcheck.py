"""GPU self-check of the sm_90 QKV + RoPE kernel: correctness against the plain PyTorch path, then speed against our
plain sm_90 grouped GEMM at the same N x K (issue 14 target: QKV + RoPE >= 0.97x of it), for every QKV config.
Also the dW kernel with fused dbias against the one without (the cost of the column sums).

    python -m vexpert_kernels.ops.gemm_sm90.qkv_selfcheck [--quick] [--json PATH]

CogVLM-17B (H = KV = 32) and CogVLM2-19B (H = 32, KV = 8, vision-only bias) QKV at head_dim 128, K = 4096,
T = 8192 routed rows (4 x 2048 tokens), 4908 of them vision. Needs CUDA on a compute-capability 9.x device; nothing
here runs in the test-suite.
"""
from __future__ import annotations

import sys

import torch

from .configs import INTERP_CONFIGS, INTERP_WGRAD_CONFIGS, SM90_CONFIGS, SM90_WGRAD_CONFIGS, qkv_config_reason
from .launch import grouped_gemm_sm90, grouped_wgrad_sm90
from .qkv import grouped_qkv_rope_sm90, qkv_sm90_configs
from .selfcheck import _bench, _rel, cli

# (name, H, KV, vision bias, language bias)
QKV_SHAPES = [("cogvlm-17b", 32, 32, True, True), ("cogvlm2-19b", 32, 8, True, False)]


def run(T=8192, n_v=4908, B=4, K=4096, hd=128, quick=False, dt=torch.bfloat16, device="cuda"):
    """The rows (also printed). ``device="cpu"`` (tiny shapes, the interpreter's configs) is a smoke test only."""
    from ..routed_linear.rope import _qkv_routed_to_heads, _rope_rows
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    L = T // B
    off = torch.tensor([0, n_v, T], dtype=torch.int32, device=dev)
    perm = torch.randperm(T, device=dev)
    pos = torch.randint(0, L, (T,), device=dev).float()
    inv = 1.0 / (1e4 ** (torch.arange(0, hd, 2, device=dev).float() / hd))
    ang = pos[:, None] * inv[None, :]
    cos, sin = ang.cos().contiguous(), ang.sin().contiguous()
    rows = []
    for shape, H, KV, hbv, hbl in QKV_SHAPES[:1] if quick else QKV_SHAPES:
        N = (H + 2 * KV) * hd
        x = torch.randn(T, K, device=dev, dtype=dt)
        wv, wl = (torch.randn(N, K, device=dev, dtype=dt) / K ** 0.5 for _ in range(2))
        bv = torch.randn(N, device=dev, dtype=dt) if hbv else None
        bl = torch.randn(N, device=dev, dtype=dt) if hbl else None
        y = torch.cat([x[:n_v] @ wv.T + (bv if bv is not None else 0), x[n_v:] @ wl.T + (bl if bl is not None else 0)])
        ref = _qkv_routed_to_heads(_rope_rows(y, cos, sin, H + KV, hd), perm, B, L, H, KV, hd)
        plain = {c.name: _bench(lambda c=c: grouped_gemm_sm90(x, wv, wl, off, bias_v=bv, bias_l=bl, config=c))
                 for c in (SM90_CONFIGS if cuda else INTERP_CONFIGS)}
        best_plain = min(plain.values())
        for cfg in qkv_sm90_configs(dev):
            if qkv_config_reason(cfg, hd, H, KV) is not None:
                continue

            def go(cfg=cfg):
                return grouped_qkv_rope_sm90(x, wv, wl, off, perm, cos, sin, batch_size=B, seq_len=L, num_heads=H,
                                             num_kv_heads=KV, bias_v=bv, bias_l=bl, config=cfg)
            out = go()
            err = max(_rel(o, r) for o, r in zip(out, ref))
            ms = _bench(go)
            r = dict(op="qkv_rope", shape=shape, config=cfg.name, rel_err=err, ms=ms,
                     tflops=2.0 * T * N * K / ms / 1e9, vs_best_plain_sm90=best_plain / ms)
            rows.append(r)
            print(f"qkv     {shape:12s} {cfg.name:28s} err {err:.1e}  {ms:7.3f} ms  {r['tflops']:6.1f} TFLOP/s  "
                  f"{r['vs_best_plain_sm90']:.3f}x best plain sm90 GEMM (target >= 0.97)", flush=True)
        dy = torch.randn(T, N, device=dev, dtype=dt)
        wcfgs = SM90_WGRAD_CONFIGS if cuda else INTERP_WGRAD_CONFIGS
        for cfg in wcfgs[:1] if quick else wcfgs:
            dbv = torch.empty(N, device=dev)
            dbl = torch.empty(N, device=dev)
            base = _bench(lambda cfg=cfg: grouped_wgrad_sm90(dy, x, off, config=cfg))
            fused = _bench(lambda cfg=cfg: grouped_wgrad_sm90(dy, x, off, config=cfg, dbias=(dbv, dbl)))
            err = max(_rel(dbv, dy[:n_v].float().sum(0)), _rel(dbl, dy[n_v:].float().sum(0)))
            r = dict(op="dw_dbias", shape=shape, config=cfg.name, rel_err=err, ms=fused, ms_without_dbias=base,
                     overhead=fused / base - 1.0)
            rows.append(r)
            print(f"dw+db   {shape:12s} {cfg.name:28s} err {err:.1e}  {fused:7.3f} ms  vs {base:7.3f} ms without "
                  f"dbias ({100 * r['overhead']:+.1f}%)", flush=True)
    return rows


def main(argv=None) -> int:
    return cli(run, __doc__.splitlines()[0], "one shape", argv)


if __name__ == "__main__":
    sys.exit(main())

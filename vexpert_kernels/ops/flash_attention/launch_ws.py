"""Launcher of the warp-specialised sm_90 forward (``kernels_ws._attn_fwd_ws_kernel``), called by
``launch._fwd_impl`` for a forward config whose 5th entry is ``configs_ws.WS_FWD``."""
from __future__ import annotations

import torch

from vexpert_kernels._triton_compat import HAS_TRITON, triton

if HAS_TRITON:  # the package imports (and uses the PyTorch backends) without Triton
    from .kernels_ws import _attn_fwd_ws_kernel


def _kpm_16b_rows(kpm: torch.Tensor) -> torch.Tensor:
    """int8 keep flags [B, Lk] whose rows start 16-byte aligned (a TMA descriptor's stride rule): a view of a
    zero-padded [B, ceil16(Lk)] buffer (the kernel never reads the padding columns)."""
    B, Lk = kpm.shape
    buf = torch.zeros(B, (Lk + 15) // 16 * 16, dtype=torch.int8, device=kpm.device)
    buf[:, :Lk] = kpm
    return buf[:, :Lk]


MAX_SPAN_POS = 1 << 16  # span ends travel as two bytes (kernels_ws): sequences up to 65535 queries


def _span_rows(pr, block_m: int):
    """Image span ends for the ws kernel (local query coords): ``rows`` [B * n_tiles * block_m, 16] fp16 with
    (end % 256, end // 256, 0, ...) for query m * block_m + i of sequence b in row (b * n_tiles + m) * block_m + i
    (zeros past a sequence's end), and ``tile_end`` [B * n_tiles] int32, the largest span end of each query tile."""
    end = pr.span_end.reshape(-1)  # varlen: packed [total_q]; else [B * LQ]
    dev = end.device
    n_tiles = triton.cdiv(pr.LQ, block_m)
    pos = torch.arange(n_tiles * block_m, device=dev, dtype=torch.int64)[None, :]
    if pr.varlen:
        q0 = pr.cu_q[:-1].to(torch.int64)[:, None]
        valid = pos < (pr.cu_q[1:].to(torch.int64)[:, None] - q0).clamp(max=pr.LQ)
    else:
        q0 = torch.arange(pr.B, device=dev, dtype=torch.int64)[:, None] * pr.LQ
        valid = pos < pr.LQ
    idx = (q0 + pos).clamp(0, max(end.numel() - 1, 0))
    hi = torch.where(valid, end[idx], torch.zeros((), dtype=end.dtype, device=dev))  # [B, n_tiles * block_m]
    rows = torch.zeros(pr.B, n_tiles * block_m, 16, dtype=torch.float16, device=dev)
    rows[..., 0] = hi % 256
    rows[..., 1] = hi // 256
    tile_end = hi.view(pr.B, n_tiles, block_m).amax(-1).to(torch.int32)
    return rows.reshape(-1, 16), tile_end.reshape(-1).contiguous()


def ws_fwd_launch(pr, grid, q, k, v, out, lse, qk_scale, block_m, block_n, num_warps, num_stages, constexprs):
    """Launch the ws forward with ``launch._Prepared`` metadata ``pr`` (same outputs as the pointer/TMA kernel).
    It takes per-query-tile span buffers instead of span ids and keep flags with 16-byte aligned rows (both
    TMA-readable; see kernels_ws)."""
    span, span_end = pr.span, pr.span_end
    if pr.bidir:
        if pr.LQ >= MAX_SPAN_POS:
            raise ValueError(f"the warp-specialised forward takes image spans on sequences of up to {MAX_SPAN_POS - 1} "
                             f"queries, got {pr.LQ}; use a non-ws forward config")
        span, span_end = _span_rows(pr, block_m)
    kpm, stride_mb = pr.kpm, pr.stride_mb
    if pr.has_kpm:
        kpm = _kpm_16b_rows(pr.kpm)
        stride_mb = kpm.stride(0)
    _attn_fwd_ws_kernel[grid](
        q, k, v, out, lse, pr.cu_q, pr.cu_k, pr.kv_lo, pr.kv_hi, kpm, span, span_end, pr.oidx,
        *pr.qstrides(q), *pr.qstrides(k), *pr.qstrides(v), *pr.ostrides(out), *pr.lstrides(lse),
        stride_mb, pr.stride_sb, pr.stride_ib, pr.H, pr.LQ, pr.LK, pr.t_out, qk_scale,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps, num_stages=num_stages, USE_TMA=True, WARP_SPEC=True,
        **constexprs)
    return out, lse

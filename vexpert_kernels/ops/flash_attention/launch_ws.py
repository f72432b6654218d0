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


def _span_tiles(pr, block_m: int) -> torch.Tensor:
    """Per-row image span bounds (local query coords) as [B * n_tiles * block_m, 4] int32 rows (start, end, the
    query tile's largest end, 0):
    row (b * n_tiles + m) * block_m + i holds query m * block_m + i of sequence b (the kernel reads a query tile's
    rows with one TMA box); rows past a sequence's end are 0."""
    width = triton.cdiv(pr.LQ, block_m) * block_m
    out = torch.zeros(pr.B, width, 4, dtype=torch.int32, device=pr.span_start.device)
    for j, bound in enumerate((pr.span_start, pr.span_end)):
        if pr.varlen:  # packed [total_q] -> [B, width]
            pos = torch.arange(width, device=bound.device, dtype=torch.int64)
            start = pr.cu_q[:-1].to(torch.int64)
            idx = (start[:, None] + pos[None, :]).clamp(max=max(bound.numel() - 1, 0))
            valid = pos[None, :] < (pr.cu_q[1:].to(torch.int64) - start)[:, None]
            out[..., j] = torch.where(valid, bound[idx], torch.zeros((), dtype=bound.dtype, device=bound.device))
        else:
            out[:, :bound.shape[-1], j] = bound
    out[..., 2] = out[..., 1].view(pr.B, -1, block_m).amax(-1, keepdim=True).expand(-1, -1, block_m).reshape(pr.B, -1)
    return out.reshape(-1, 4)


def ws_fwd_launch(pr, grid, q, k, v, out, lse, qk_scale, block_m, block_n, num_warps, num_stages, constexprs):
    """Launch the ws forward with ``launch._Prepared`` metadata ``pr`` (same outputs as the pointer/TMA kernel).
    It takes each row's image span bounds per query tile instead of span ids, and keep flags with 16-byte aligned
    rows (TMA-readable; see kernels_ws)."""
    kpm, stride_mb = pr.kpm, pr.stride_mb
    if pr.has_kpm:
        kpm = _kpm_16b_rows(pr.kpm)
        stride_mb = kpm.stride(0)
    span_start = _span_tiles(pr, block_m) if pr.bidir else pr.span_start
    _attn_fwd_ws_kernel[grid](
        q, k, v, out, lse, pr.cu_q, pr.cu_k, pr.kv_lo, pr.kv_hi, kpm, span_start, pr.span_end, pr.oidx,
        *pr.qstrides(q), *pr.qstrides(k), *pr.qstrides(v), *pr.ostrides(out), *pr.lstrides(lse),
        stride_mb, pr.stride_sb, pr.stride_ib, pr.H, pr.LQ, pr.LK, pr.t_out, qk_scale,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps, num_stages=num_stages, USE_TMA=True, WARP_SPEC=True,
        **constexprs)
    return out, lse

"""Launcher of the warp-specialised sm_90 forward (``kernels_ws._attn_fwd_ws_kernel``), called by
``launch._fwd_impl`` for a forward config whose 5th entry is ``configs_ws.WS_FWD``."""
from __future__ import annotations

import torch

from vexpert_kernels._triton_compat import HAS_TRITON

if HAS_TRITON:  # the package imports (and uses the PyTorch backends) without Triton
    from .kernels_ws import _attn_fwd_ws_kernel


def _kpm_16b_rows(kpm: torch.Tensor) -> torch.Tensor:
    """int8 keep flags [B, Lk] whose rows start 16-byte aligned (a TMA descriptor's stride rule): a view of a
    zero-padded [B, ceil16(Lk)] buffer (the kernel never reads the padding columns)."""
    B, Lk = kpm.shape
    buf = torch.zeros(B, (Lk + 15) // 16 * 16, dtype=torch.int8, device=kpm.device)
    buf[:, :Lk] = kpm
    return buf[:, :Lk]


def ws_fwd_launch(pr, grid, q, k, v, out, lse, qk_scale, block_m, block_n, num_warps, num_stages, constexprs):
    """Launch the ws forward with ``launch._Prepared`` metadata ``pr`` (same outputs as the pointer/TMA kernel).
    It takes the keep flags with 16-byte aligned rows (TMA-readable; see kernels_ws); no image spans."""
    if pr.bidir:
        raise ValueError("the warp-specialised forward does not take bidirectional image spans (configs_ws."
                         "ws_fwd_supported); use a non-ws forward config")
    kpm, stride_mb = pr.kpm, pr.stride_mb
    if pr.has_kpm:
        kpm = _kpm_16b_rows(pr.kpm)
        stride_mb = kpm.stride(0)
    _attn_fwd_ws_kernel[grid](
        q, k, v, out, lse, pr.cu_q, pr.cu_k, pr.kv_lo, pr.kv_hi, kpm, pr.span, pr.span_end, pr.oidx,
        *pr.qstrides(q), *pr.qstrides(k), *pr.qstrides(v), *pr.ostrides(out), *pr.lstrides(lse),
        stride_mb, pr.stride_sb, pr.stride_ib, pr.H, pr.LQ, pr.LK, pr.t_out, qk_scale,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps, num_stages=num_stages, USE_TMA=True, WARP_SPEC=True,
        **constexprs)
    return out, lse

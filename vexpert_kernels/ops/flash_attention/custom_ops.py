"""torch.library registration: ``vexpert::flash_attn_fwd`` / ``vexpert::flash_attn_bwd``, fakes, autograd."""
from __future__ import annotations

from typing import List, Optional

import torch

from .launch import _bwd_impl, _fwd_impl, _lse_shape

# ------------------------------------------------------------------------------------------ torch.library registration
@torch.library.custom_op("vexpert::flash_attn_fwd", mutates_args=())
def _flash_attn_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kpm: Optional[torch.Tensor],
                       span: Optional[torch.Tensor], cu_q: Optional[torch.Tensor], cu_k: Optional[torch.Tensor],
                       max_q: int, max_k: int, softmax_scale: float, bidir: bool,
                       fwd_cfg: Optional[List[int]] = None,
                       oidx: Optional[torch.Tensor] = None,
                       deterministic: bool = False,
                       bwd_cfg: Optional[List[int]] = None) -> tuple[torch.Tensor, torch.Tensor]:
    return _fwd_impl(q, k, v, kpm, span, cu_q, cu_k, max_q, max_k, softmax_scale, bidir, fwd_cfg, oidx)


@_flash_attn_fwd_op.register_fake
def _(q, k, v, kpm, span, cu_q, cu_k, max_q, max_k, softmax_scale, bidir, fwd_cfg=None, oidx=None,
      deterministic=False, bwd_cfg=None):
    out = torch.empty_like(q) if oidx is None else q.new_empty((oidx.numel(), q.shape[1] * q.shape[-1]))
    return out, q.new_empty(_lse_shape(q, cu_q is not None), dtype=torch.float32)


@torch.library.custom_op("vexpert::flash_attn_bwd", mutates_args=())
def _flash_attn_bwd_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                       lse: torch.Tensor, dlse: Optional[torch.Tensor], kpm: Optional[torch.Tensor],
                       span: Optional[torch.Tensor], cu_q: Optional[torch.Tensor], cu_k: Optional[torch.Tensor],
                       max_q: int, max_k: int, softmax_scale: float,
                       bidir: bool, oidx: Optional[torch.Tensor] = None,
                       deterministic: bool = False,
                       bwd_cfg: Optional[List[int]] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _bwd_impl(do, q, k, v, out, lse, dlse, kpm, span, cu_q, cu_k, max_q, max_k, softmax_scale, bidir, oidx,
                     deterministic, bwd_cfg)


@_flash_attn_bwd_op.register_fake
def _(do, q, k, v, out, lse, dlse, kpm, span, cu_q, cu_k, max_q, max_k, softmax_scale, bidir, oidx=None,
      deterministic=False, bwd_cfg=None):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, kpm, span, cu_q, cu_k, max_q, max_k, softmax_scale, bidir, _fwd_cfg, oidx, deterministic, bwd_cfg = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, kpm, span, cu_q, cu_k, oidx)
    ctx.args = (max_q, max_k, softmax_scale, bidir)
    ctx.deterministic = deterministic
    ctx.bwd_cfg = bwd_cfg


def _backward(ctx, d_out, d_lse):
    q, k, v, out, lse, kpm, span, cu_q, cu_k, oidx = ctx.saved_tensors
    if d_out is None:
        d_out = torch.zeros_like(out)
    dq, dk, dv = _flash_attn_bwd_op(d_out, q, k, v, out, lse, d_lse, kpm, span, cu_q, cu_k, *ctx.args, oidx,
                                    ctx.deterministic, ctx.bwd_cfg)
    return dq, dk, dv, None, None, None, None, None, None, None, None, None, None, None, None


_flash_attn_fwd_op.register_autograd(_backward, setup_context=_setup_context)


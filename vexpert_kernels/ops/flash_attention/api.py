"""Public entry point of our Triton attention: ``flash_attention`` (inputs validated by the caller)."""
from __future__ import annotations

import math

import torch

from .custom_ops import _flash_attn_fwd_op
from .launch import BWD_AUTO

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 128  # 256 spills registers even at 32x32 tiles (sm_90/sm_80): use sdpa/flex there


# ----------------------------------------------------------------------------------------------------------- public
def _check_kernel_inputs(q, k, v, varlen):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"triton attention: {name} must be fp16/bf16/fp32, got {t.dtype}")
        if t.dtype != q.dtype:
            raise TypeError(f"triton attention: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
        if t.device != q.device:
            raise ValueError(f"triton attention: {name} is on {t.device} but q is on {q.device}")
    hd = q.shape[-1]
    if hd > MAX_HEAD_DIM or hd < 1:
        raise ValueError(f"triton attention: head dim must be in [1, {MAX_HEAD_DIM}], got {hd}")


def _dense_layout(t) -> bool:
    return t.is_contiguous() or (t.dim() == 4 and t.transpose(1, 2).is_contiguous())


def _bwd_cfg_arg(bwd_config):
    if bwd_config is None:
        return None
    if isinstance(bwd_config, str):
        if bwd_config != "auto":
            raise ValueError(f"bwd_config must be None, 'auto' or a (BLOCK_M, BLOCK_N, num_warps, num_stages[, tma]) "
                             f"tuple, got {bwd_config!r}")
        return list(BWD_AUTO)
    cfg = [int(x) for x in bwd_config]
    if len(cfg) not in (4, 5) or min(cfg[:4]) < 1:
        raise ValueError(f"bwd_config must be (BLOCK_M, BLOCK_N, num_warps, num_stages[, tma]) with positive "
                         f"entries, got {tuple(bwd_config)}")
    return cfg


def flash_attention(q, k, v, *, key_padding_mask=None, image_span_ids=None, bidirectional=False,
                    softmax_scale=None, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None,
                    fwd_config=None, out_index=None, deterministic=False, bwd_config=None):
    """Our Triton attention. Returns ``(out, lse)``; differentiable in q, k, v (and through lse).

    Padded: q [B,H,Lq,hd], k/v [B,KV,Lk,hd], key_padding_mask bool [B,Lk] (keep), image_span_ids int [B,Lq];
    out [B,H,Lq,hd], lse fp32 [B,H,Lq]. Varlen (cu_seqlens_q given): q [total_q,H,hd], k/v [total_k,KV,hd],
    image_span_ids int [total_q]; out [total_q,H,hd], lse fp32 [H,total_q]. ``fwd_config``: optional forward tile
    (BLOCK_M, BLOCK_N, num_warps, num_stages), e.g. one of ``fwd_tune_configs`` (the autotuner's candidates);
    default the table's choice. ``out_index``: optional int [B, Lq] (varlen: [total_q]) destination rows: out is
    then [T, H*hd] (T = out_index.numel()) with query row (b, i) of head h at ``out[out_index[b, i], h*hd:(h+1)*hd]``
    -- pass a RoutingPlan's ``inv_perm`` to get the attention output straight in routed order (the backward reads
    dO in it too); out_index must be a permutation of range(T) (rows outside it are skipped, never written).
    ``fwd_config`` may carry a 5th entry 1: load K/V through TMA tensor descriptors (sm_90; see ``tma_usable``), or 2:
    the warp-specialised sm_90 forward (``kernels_ws.py``; Q/K/V by TMA, 4 warps).
    ``deterministic``: backward without atomics (two kernels, bitwise repeatable); default the one-pass backward
    (one kernel per key tile computes dK, dV and dQ, dQ accumulated with fp32 atomics). ``bwd_config``: optional
    dK/dV kernel tile (BLOCK_M, BLOCK_N, num_warps, num_stages[, 1 = TMA]) for the backward (one-pass or, with
    ``deterministic``, the two-kernel split), e.g. one of ``bwd_tune_configs``; default the table's choice;
    ``"auto"``: on CUDA the backward is tuned by ``vexpert_kernels.autotune.select`` (op "attention_bwd": the
    plain-PyTorch gradient, also the static choice, against our backward with each tuning tile; see
    :mod:`.bwd_tuning`), on the interpreter the table's tile runs.
    Cu_seqlens are made bound-safe on the device. Inputs are validated by the caller
    (:func:`vexpert_kernels.ops.attention.mixed_attention`); this function checks dtypes/devices only.
    """
    varlen = cu_seqlens_q is not None
    _check_kernel_inputs(q, k, v, varlen)
    if not varlen:
        max_seqlen_q, max_seqlen_k = q.shape[2], k.shape[2]
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(q.shape[-1])
    # the kernels address the head dim with unit stride, and backward allocates dk/dv with empty_like(k/v), which
    # keeps strides only for dense tensors: keep contiguous and [B,L,H,hd]-transposed views, copy anything else
    q, k, v = (t if _dense_layout(t) else t.contiguous() for t in (q, k, v))
    span = image_span_ids if bidirectional else None
    return _flash_attn_fwd_op(q, k, v, key_padding_mask, span, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q),
                              int(max_seqlen_k), float(softmax_scale), bool(bidirectional and span is not None),
                              None if fwd_config is None else [int(x) for x in fwd_config], out_index,
                              bool(deterministic), _bwd_cfg_arg(bwd_config))


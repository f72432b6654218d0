"""Launchers: allocate nothing but the grid, pick a config, call the kernels."""
from __future__ import annotations

import torch

from ..._triton_compat import HAS_TRITON, interpret_mode, triton
from .configs import _INTERP_NUM_PROGRAMS, _gemm_config, _qkv_block_n, _wgrad_config
from .kernels import EPI_LINEAR, EPI_QKV_ROPE, EPI_SWIGLU

if HAS_TRITON:
    from .kernels import (_qkv_bwd_gather_kernel, _routed_gemm_kernel, _routed_wgrad_kernel,
                          _swiglu_bwd_elementwise_kernel)


def _num_programs(device) -> int:
    if device.type == "cpu":
        return _INTERP_NUM_PROGRAMS
    return torch.cuda.get_device_properties(device).multi_processor_count


def _precision(dtype) -> str:
    """``tl.dot`` input precision. fp32 inputs follow ``torch.get_float32_matmul_precision()`` like cuBLAS does:
    "highest" -> "ieee" (true fp32 products), "high"/"medium" -> "tf32" (tensor cores). The interpreter always
    computes in fp32 ("ieee"). 16-bit inputs ignore the flag (their products are exact in the fp32 accumulator)."""
    if interpret_mode():
        return "ieee"
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


# ============================================================================================== launchers
def _launch_gemm(x, wv, wl, offsets, out, *, epilogue=EPI_LINEAR, w2v=None, w2l=None, bv=None, bl=None,
                 residual=None, out2=None, dh=None, perm=None, cos=None, sin=None, k_out=None, v_out=None,
                 seq_len=1, num_heads=0, num_kv_heads=0, head_dim=0, n_cols=None, k_split=None, save_gu=False,
                 config=None):
    """Launch the grouped GEMM. ``wv``/``wl`` are [N, K]-shaped views (any strides, identical for both experts).

    k_split: x columns [k_split, K) multiply ``w2v``/``w2l`` ([N, K - k_split] views) instead (SwiGLU dX with
    K = 2I). save_gu (EPI_SWIGLU): ``out2`` [T, 2N] receives the gate | up pre-activations. config: a
    (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages) tuple overriding the table (autotune candidates).
    """
    T, K = x.shape
    N = wv.shape[0] if n_cols is None else n_cols
    if T == 0 or N == 0:
        return
    # the kernel addresses both experts' weights with one set of strides
    ws = [w for w in (wv, wl, w2v, w2l) if w is not None]
    if any(w.stride() != wv.stride() for w in ws) or any(w.stride(-1) != 1 and w.stride(0) != 1 for w in ws):
        wv, wl = wv.contiguous(), wl.contiguous()
        w2v = w2v.contiguous() if w2v is not None else None
        w2l = w2l.contiguous() if w2l is not None else None
    BM, BN, BK, GM, nw, ns = config or _gemm_config(x.device, x.dtype, T, N, K, epilogue,
                                                    plain=residual is None and wv.stride(-1) == 1)
    if epilogue == EPI_QKV_ROPE:  # tiles = heads x half-head chunks of BLOCK_N columns (see the kernel)
        BN = _qkv_block_n(head_dim, BN)
        num_n = (N // head_dim) * triton.cdiv(head_dim // 2, BN)
    else:
        num_n = triton.cdiv(N, BN)
    max_tiles = (triton.cdiv(T, BM) + 1) * num_n  # the expert split adds at most one partial M tile
    grid = (max(1, min(_num_programs(x.device), max_tiles)),)
    dummy = out
    _routed_gemm_kernel[grid](
        x, wv, wl, w2v if w2v is not None else wv, w2l if w2l is not None else wl,
        bv if bv is not None else dummy, bl if bl is not None else dummy,
        residual if residual is not None else dummy, out, out2 if out2 is not None else dummy,
        dh if dh is not None else dummy,
        offsets, perm if perm is not None else offsets, cos if cos is not None else dummy,
        sin if sin is not None else dummy, k_out if k_out is not None else dummy,
        v_out if v_out is not None else dummy,
        N, K, K if k_split is None else k_split,
        x.stride(0), x.stride(1), wv.stride(0), wv.stride(1),
        out.stride(0) if epilogue != EPI_QKV_ROPE else 0,
        residual.stride(0) if residual is not None else 0,
        dh.stride(0) if dh is not None else (out2.stride(0) if save_gu else 0),
        seq_len, num_heads, num_kv_heads, num_n, max_tiles,
        EPILOGUE=epilogue, HAS_BIAS_V=bv is not None, HAS_BIAS_L=bl is not None,
        HAS_RESIDUAL=residual is not None, HEAD_DIM=head_dim if epilogue == EPI_QKV_ROPE else 0,
        BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, GROUP_M=GM,
        UPCAST_DOT=interpret_mode(), INPUT_PRECISION=_precision(x.dtype),
        SAVE_GU=bool(save_gu and epilogue == EPI_SWIGLU), SPLIT_K=k_split is not None,
        num_warps=nw, num_stages=ns,
    )


_ELEMENTWISE_BLOCK = (32, 128, 4)  # (BLOCK_M, BLOCK_N, num_warps): a memory-bound pass, 16-byte vector loads
_INTERP_ELEMENTWISE_BLOCK = (16, 16, 1)


def _launch_swiglu_bwd_elementwise(gu, dh, dgu):
    """dgu [T, 2I] = SwiGLU gradients from the saved gu [T, 2I] and dh [T, I] (unit column strides)."""
    T, I = dh.shape
    if T == 0 or I == 0:
        return
    BM, BN, nw = _INTERP_ELEMENTWISE_BLOCK if dh.device.type == "cpu" else _ELEMENTWISE_BLOCK
    grid = (triton.cdiv(T, BM), triton.cdiv(I, BN))
    _swiglu_bwd_elementwise_kernel[grid](gu, dh, dgu, T, I, gu.stride(0), dh.stride(0), dgu.stride(0),
                                         BLOCK_M=BM, BLOCK_N=BN, num_warps=nw)


_QKV_GATHER_BLOCK_M = 64  # rows per program (x one head): a memory-bound pass
_INTERP_QKV_GATHER_BLOCK_M = 16


def _launch_qkv_bwd_gather(dq, dk, dv, perm, cos, sin, out):
    """out [T, (H+2KV)hd] (routed rows) <- inverse-rotated dq, dk and dv [B, heads, L, hd] (see the kernel)."""
    T = out.shape[0]
    B, H, L, hd = dq.shape
    KV = dk.shape[1]
    if T == 0:
        return
    BM = _INTERP_QKV_GATHER_BLOCK_M if out.device.type == "cpu" else _QKV_GATHER_BLOCK_M
    dq, dk, dv = (t.to(out.dtype).contiguous() for t in (dq, dk, dv))
    grid = (triton.cdiv(T, BM), H + 2 * KV)
    _qkv_bwd_gather_kernel[grid](dq, dk, dv, perm, cos, sin, out, T, L, H, KV, out.stride(0),
                                 HEAD_DIM=hd, BLOCK_M=BM, BLOCK_H=triton.next_power_of_2(hd // 2), num_warps=4)


def _launch_wgrad(dy, x, offsets, dwv, dwl, dbv, dbl, config=None):
    """dW_e = dY_e^T X_e into dwv/dwl ([N, K] contiguous, or None), db_e into dbv/dbl ([N] or None)."""
    T, N = dy.shape
    K = x.shape[1]
    has_dw = dwv is not None
    if not has_dw and dbv is None and dbl is None:
        return
    if T == 0:
        for t in (dwv, dwl, dbv, dbl):
            if t is not None:
                t.zero_()
        return
    BM, BN, BK, nw, ns = config or _wgrad_config(dy.device, N, K)
    nk = triton.cdiv(K, BK) if has_dw else 1  # dbias only: one program per (expert, N tile)
    grid = (2 * triton.cdiv(N, BN) * nk,)
    any_ = next(t for t in (dwv, dbv, dbl) if t is not None)
    _routed_wgrad_kernel[grid](
        dy, x, dwv if has_dw else any_, dwl if has_dw else any_,
        dbv if dbv is not None else any_, dbl if dbl is not None else any_, offsets,
        N, K if has_dw else BK, dy.stride(0), x.stride(0),
        HAS_DW=has_dw, HAS_DB_V=dbv is not None, HAS_DB_L=dbl is not None,
        BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK,
        UPCAST_DOT=interpret_mode(), INPUT_PRECISION=_precision(dy.dtype),
        num_warps=nw, num_stages=ns,
    )


# Tests set this to fill every output buffer with NaN before the kernels run, so unwritten elements show.
_POISON_OUTPUTS = False


def _out(like, *shape, dtype=None):
    if len(shape) == 1 and isinstance(shape[0], (tuple, torch.Size)):
        shape = tuple(shape[0])
    t = torch.empty(shape, dtype=dtype or like.dtype, device=like.device)
    return t.fill_(float("nan")) if _POISON_OUTPUTS else t

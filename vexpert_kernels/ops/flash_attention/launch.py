"""Launchers: device metadata (``_Prepared``), output allocation, grids, forward and backward launches."""
from __future__ import annotations

import torch

from vexpert_kernels._triton_compat import HAS_TRITON, interpret_mode, require_triton, tl, triton

from .configs import _PREPROCESS_CONFIG, _block_d, _configs_for
from .configs_ws import WS_FWD
from .launch_ws import ws_fwd_launch
if HAS_TRITON:  # the package imports (and uses the PyTorch backends) without Triton
    from .kernels import _attn_bwd_dkdv_kernel, _attn_bwd_dq_kernel, _attn_bwd_preprocess_kernel, _attn_fwd_kernel
from .masks import _kv_range, _varlen_span_bounds, canonical_span_ids, span_bounds

LOG2E = 1.4426950408889634
BWD_AUTO = [0]  # bwd_cfg sentinel of flash_attention(..., bwd_config="auto"): tune the backward (see bwd_tuning)
# Tests set this to fill every output with NaN before launch, so elements a kernel fails to write show up.
_POISON_OUTPUTS = False
# Tests set this (with a stand-in for the descriptor reduction the Triton interpreter lacks) to run the TMA
# backward's dQ-by-TMA-reduction path through the interpreter; off a GPU it is off by default.
_DQ_REDUCE_OFF_GPU = False


def _new_like(t, shape=None, dtype=None):
    if shape is None:
        out = torch.empty_like(t) if dtype is None else torch.empty_like(t, dtype=dtype)
    else:
        out = torch.empty(shape, dtype=dtype or t.dtype, device=t.device)
    return out.fill_(float("nan")) if _POISON_OUTPUTS else out


def _safe_cu(cu: torch.Tensor, rows: int) -> torch.Tensor:
    """int32 cu_seqlens clamped to [0, rows] and made non-decreasing, on the device (no host sync): whatever the
    caller passed, every sequence then lies inside the rows. Valid input is returned unchanged (values)."""
    cu = cu.to(torch.int32).clamp(0, rows)
    return torch.cummax(cu, 0).values.contiguous()


class _Prepared:
    """Device-side metadata shared by forward and backward launches (no host synchronisation)."""

    def __init__(self, q, k, kpm, span, cu_q, cu_k, max_q, max_k, bidir, oidx=None):
        self.varlen = cu_q is not None
        dev = q.device
        dummy_i32 = torch.zeros(1, dtype=torch.int32, device=dev)
        if self.varlen:
            self.B = cu_q.numel() - 1
            self.H, self.KV = q.shape[1], k.shape[1]
            self.LQ, self.LK = max_q, max_k
            self.cu_q, self.cu_k = _safe_cu(cu_q, q.shape[0]), _safe_cu(cu_k, k.shape[0])
        else:
            self.B, self.H, self.LQ = q.shape[0], q.shape[1], q.shape[2]
            self.KV, self.LK = k.shape[1], k.shape[2]
            self.cu_q = self.cu_k = dummy_i32
        self.has_kpm = kpm is not None
        if self.has_kpm:
            self.kpm = kpm.to(torch.int8).contiguous()
            self.kv_lo, self.kv_hi = _kv_range(kpm)
            self.stride_mb = self.kpm.stride(0)
        else:
            self.kpm, self.kv_lo, self.kv_hi, self.stride_mb = dummy_i32, dummy_i32, dummy_i32, 0
        self.bidir = bool(bidir) and span is not None
        if self.bidir:
            if self.varlen:
                self.span, self.span_start, self.span_end = _varlen_span_bounds(span.reshape(-1), self.cu_q)
                self.stride_sb = 0
            else:
                self.span = canonical_span_ids(span).contiguous()
                self.span_start, self.span_end = span_bounds(self.span)
                self.stride_sb = self.span.stride(0)
        else:
            self.span = self.span_start = self.span_end = dummy_i32
            self.stride_sb = 0

        # routed order: O/dO are [T, H*hd] and sequence row (b, i) lives at row oidx[b, i] (varlen: oidx[i])
        self.has_oidx = oidx is not None
        if self.has_oidx:
            self.oidx = oidx.to(torch.int32).contiguous()
            self.stride_ib = 0 if self.varlen else self.oidx.stride(0)
            self.t_out = self.oidx.numel()
        else:
            self.oidx, self.stride_ib, self.t_out = dummy_i32, 0, 0

    def ostrides(self, t):  # (batch, head, row) strides of an O/dO-like tensor
        if self.has_oidx:
            return (0, t.shape[1] // self.H, t.stride(0))
        return self.qstrides(t)

    def out_shape(self, q):
        return (self.t_out, self.H * q.shape[-1]) if self.has_oidx else tuple(q.shape)

    def qstrides(self, t):  # (batch, head, seq) strides of a q/o-like tensor
        return (0, t.stride(1), t.stride(0)) if self.varlen else (t.stride(0), t.stride(1), t.stride(2))

    def lstrides(self, t):
        return (0, t.stride(0), t.stride(1)) if self.varlen else (t.stride(0), t.stride(1), t.stride(2))

    def common_constexprs(self, hd, dtype, device):
        return dict(GROUP=self.H // self.KV, HEAD_DIM=hd, BLOCK_D=_block_d(hd), IS_VARLEN=self.varlen,
                    HAS_KPM=self.has_kpm, BIDIR=self.bidir, UPCAST=interpret_mode() or device.type != "cuda",
                    PREC="ieee" if dtype == torch.float32 else "tf32", HAS_OIDX=self.has_oidx)


def _lse_shape(q, varlen):
    return (q.shape[1], q.shape[0]) if varlen else (q.shape[0], q.shape[1], q.shape[2])


def tma_usable(q, k, v) -> bool:
    """Whether the TMA forward can address these tensors: the tensor-descriptor API, 16-byte aligned bases and row
    strides (the descriptor's requirements), unit-stride head dim, a head dim that is its own tile (no padding
    columns)."""
    if not hasattr(tl, "make_tensor_descriptor") or not hasattr(triton, "set_allocator"):
        return False
    hd = q.shape[-1]
    if _block_d(hd) != hd:
        return False
    for t in (k, v):
        if t.stride(-1) != 1 or (t.stride(-2) * t.element_size()) % 16 or t.data_ptr() % 16:
            return False
    return True


def bwd_tma_usable(q, k, v, do=None) -> bool:
    """Whether the TMA backward can address these tensors: as :func:`tma_usable` for q, k, v and dO (dO is read
    through a descriptor unless it is in routed order)."""
    return tma_usable(q, k, v) and all(t.stride(-1) == 1 and (t.stride(-2) * t.element_size()) % 16 == 0
                                       and t.data_ptr() % 16 == 0 for t in ((q,) if do is None else (q, do)))


def _set_tma_allocator(device) -> None:
    """Device-side tensor descriptors need Triton's global scratch allocator (a small buffer per launch). Set only
    when a TMA launch happens (never on the default path): a process-wide Triton setting."""
    def alloc(size: int, alignment: int, stream):
        return torch.empty(size, dtype=torch.int8, device=device)

    triton.set_allocator(alloc)


def _fwd_impl(q, k, v, kpm, span, cu_q, cu_k, max_q, max_k, softmax_scale, bidir, fwd_cfg=None, oidx=None):
    require_triton("the triton attention backend")
    pr = _Prepared(q, k, kpm, span, cu_q, cu_k, max_q, max_k, bidir, oidx)
    hd = q.shape[-1]
    out = _new_like(q, pr.out_shape(q))
    lse = _new_like(q, _lse_shape(q, pr.varlen), torch.float32)
    if out.numel() == 0:
        return out, lse.fill_(float("-inf"))
    ce = pr.common_constexprs(hd, q.dtype, q.device)
    bm, bn, nw, ns, *tma = fwd_cfg or _configs_for(q.device, ce["BLOCK_D"], pr.has_kpm or pr.bidir, pr.varlen,
                                                   pr.LQ)["fwd"]
    use_tma = bool(tma and tma[0])
    if use_tma:
        if not tma_usable(q, k, v) or (tma[0] == WS_FWD and not tma_usable(q, q, q)):  # ws: Q by TMA too
            raise ValueError("the TMA forward needs 16-byte aligned K/V rows and a power-of-two head dim >= 16")
        _set_tma_allocator(q.device)
    grid = (triton.cdiv(pr.LQ, bm), pr.B * pr.H)
    if use_tma and tma[0] == WS_FWD:  # the warp-specialised sm_90 kernel (kernels_ws.py)
        return ws_fwd_launch(pr, grid, q, k, v, out, lse, softmax_scale * LOG2E, bm, bn, nw, ns, ce)
    _attn_fwd_kernel[grid](
        q, k, v, out, lse, pr.cu_q, pr.cu_k, pr.kv_lo, pr.kv_hi, pr.kpm, pr.span, pr.span_end, pr.oidx,
        *pr.qstrides(q), *pr.qstrides(k), *pr.qstrides(v), *pr.ostrides(out), *pr.lstrides(lse),
        pr.stride_mb, pr.stride_sb, pr.stride_ib, pr.H, pr.LQ, pr.LK, pr.t_out, softmax_scale * LOG2E,
        BLOCK_M=bm, BLOCK_N=bn, num_warps=nw, num_stages=ns, USE_TMA=use_tma, **ce)
    return out, lse


def _bwd_impl(do, q, k, v, out, lse, dlse, kpm, span, cu_q, cu_k, max_q, max_k, softmax_scale, bidir, oidx=None,
              deterministic=False, bwd_cfg=None):
    """dq, dk, dv. Default: ONE kernel per key tile computes dK, dV and dQ (5 matmuls, dQ by fp32 atomics into a
    zeroed buffer, scaled and cast here). ``deterministic``: the dq kernel recomputes the scores per query tile
    instead (7 matmuls over two kernels, no atomics: bitwise repeatable). ``bwd_cfg``: optional dK/dV kernel tile
    (BLOCK_M, BLOCK_N, num_warps, num_stages[, USE_TMA]) instead of the table's, e.g. one of
    ``configs.bwd_tune_configs``; USE_TMA=1 reads K/V, Q and dO through tensor descriptors (sm_90, and the Triton
    >= 3.9 interpreter) and, on a GPU, adds the one-pass dQ by TMA reductions."""
    require_triton("the triton attention backend")
    if bwd_cfg is not None and list(bwd_cfg) == BWD_AUTO:
        if q.is_cuda and not interpret_mode() and q.numel() and k.numel():  # tune (or reuse the decision)
            from .bwd_tuning import select_bwd

            return select_bwd(do, q, k, v, out, lse, dlse, kpm, span, cu_q, cu_k, max_q, max_k, softmax_scale,
                              bidir, oidx, deterministic,
                              lambda cfg: _bwd_impl(do, q, k, v, out, lse, dlse, kpm, span, cu_q, cu_k, max_q, max_k,
                                                    softmax_scale, bidir, oidx, deterministic, cfg))
        bwd_cfg = None  # the interpreter: the table's tile
    pr = _Prepared(q, k, kpm, span, cu_q, cu_k, max_q, max_k, bidir, oidx)
    hd = q.shape[-1]
    do = do.contiguous()
    # preprocess: D = rowsum(dO * O) (fp32), minus dlse so that lse is differentiable too (dS = P (dP - D + dlse))
    delta = torch.empty_like(lse)
    if dlse is not None:
        dlse = dlse.float().contiguous()
    if q.numel() > 0:
        bm, nw = _PREPROCESS_CONFIG if q.is_cuda else (16, 4)
        _attn_bwd_preprocess_kernel[(triton.cdiv(pr.LQ, bm), pr.B * pr.H)](
            out, do, dlse if dlse is not None else delta, delta, pr.cu_q, pr.oidx,
            *pr.ostrides(out), *pr.ostrides(do), *pr.lstrides(lse), pr.stride_ib, pr.H, pr.LQ, pr.t_out,
            HEAD_DIM=hd, BLOCK_D=_block_d(hd), BLOCK_M=bm, IS_VARLEN=pr.varlen, HAS_DLSE=dlse is not None,
            HAS_OIDX=pr.has_oidx, num_warps=nw)
    fused = not deterministic
    # q is dense (see flash_attention): empty_like keeps its strides; DQ is written with Q's
    dq = torch.zeros_like(q, dtype=torch.float32) if fused and q.numel() > 0 else _new_like(q)
    dk = _new_like(k)  # k/v are dense (see flash_attention): empty_like keeps their strides
    dv = _new_like(v)
    if q.numel() == 0 or k.numel() == 0:
        return torch.zeros_like(q), dk.zero_(), dv.zero_()
    if dk.stride() != k.stride() or dv.stride() != v.stride() or lse.stride() != delta.stride():
        raise AssertionError("internal: dk/dv must share k/v strides and delta lse's")
    ce = pr.common_constexprs(hd, q.dtype, q.device)
    cfg = _configs_for(q.device, ce["BLOCK_D"], pr.has_kpm or pr.bidir, pr.varlen)
    if dq.stride() != q.stride():
        raise AssertionError("internal: dq must share q's strides")
    common = (*pr.qstrides(q), *pr.qstrides(k), *pr.qstrides(v), *pr.ostrides(do), *pr.lstrides(lse), pr.stride_mb,
              pr.stride_sb, pr.stride_ib)
    bm, bn, nw, ns, *tma = bwd_cfg or cfg["dkdv_fused" if fused else "dkdv"]
    use_tma = bool(tma and tma[0])
    if use_tma:
        if not bwd_tma_usable(q, k, v, None if pr.has_oidx else do):
            raise ValueError("the TMA backward needs 16-byte aligned q/k/v/dO rows and a power-of-two head dim >= 16")
        _set_tma_allocator(q.device)
    _attn_bwd_dkdv_kernel[(triton.cdiv(pr.LK, bn), pr.B * pr.KV)](
        q, k, v, do, dk, dv, dq, lse, delta, pr.cu_q, pr.cu_k, pr.kv_lo, pr.kv_hi, pr.kpm, pr.span, pr.span_start,
        pr.oidx, *common, pr.KV, pr.LQ, pr.LK, pr.t_out, softmax_scale * LOG2E, softmax_scale,
        BLOCK_M=bm, BLOCK_N=bn, num_warps=nw, num_stages=ns, FUSED_DQ=fused, USE_TMA=use_tma,
        DQ_REDUCE=use_tma and fused and (not ce["UPCAST"] or _DQ_REDUCE_OFF_GPU), **ce)
    if fused:
        return (dq * softmax_scale).to(q.dtype), dk, dv
    bm, bn, nw, ns = cfg["dq"]
    _attn_bwd_dq_kernel[(triton.cdiv(pr.LQ, bm), pr.B * pr.H)](
        q, k, v, do, dq, lse, delta, pr.cu_q, pr.cu_k, pr.kv_lo, pr.kv_hi, pr.kpm, pr.span, pr.span_end, pr.oidx,
        *common, pr.H, pr.LQ, pr.LK, pr.t_out, softmax_scale * LOG2E, softmax_scale,
        BLOCK_M=bm, BLOCK_N=bn, num_warps=nw, num_stages=ns, **ce)
    return dq, dk, dv


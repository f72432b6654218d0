"""Our FlashAttention-2-style Triton attention (forward + backward) for mixed image/text sequences.

Masking model (shared with every backend in :mod:`vexpert_kernels.ops.attention`): query ``i`` of a sequence with
``Lq`` queries and ``Lk >= Lq`` keys sits at key position ``Lk - Lq + i`` (bottom-right aligned causal, KV-cache
prefill/decode). Query ``i`` may see key ``j`` iff

    (j <= Lk - Lq + i  or  (bidirectional and span[i] != 0 and span[i] == span[j - (Lk - Lq)]))  and  keep[j]

where ``span`` are *canonical* image span ids of the last ``Lq`` key positions (see :func:`canonical_span_ids`) and
``keep`` is the key padding keep mask. Rows with no visible key produce 0 and lse = -inf (never NaN, also in grads).

Layouts: padded ``q [B,H,Lq,hd]``, ``k/v [B,KV,Lk,hd]`` (GQA: head h reads kv head ``h // (H // KV)``, K/V are never
repeated in memory) or packed varlen ``q [total_q,H,hd]``, ``k/v [total_k,KV,hd]`` with ``cu_seqlens``. lse is
``[B,H,Lq]`` (padded) or ``[H,total_q]`` (varlen, as flash-attn) in fp32, natural log.

Kernels: ``_attn_fwd_kernel`` (online softmax with exp2, fp32 statistics; skips KV tiles outside the per-tile key
range -- the causal bound extended to the end of the tile's image spans, and the per-row padding range [first kept
key, last kept key] -- and runs the tiles every row sees causally without the causal/span mask),
``_attn_bwd_preprocess_kernel`` (D = rowsum(dO*O) - dlse; folding dlse into D makes lse differentiable),
``_attn_bwd_dkdv_kernel`` (one program per (key tile, kv head) on transposed scores: loops over the H/KV query heads
of its group and the query tiles that can see it, so dK/dV need no atomics: deterministic) and
``_attn_bwd_dq_kernel`` (one program per query tile, same key range and interior/edge split as the forward).

GPU tiles come from ``_GPU_CONFIGS`` (sm_90 / sm_80, fp16/bf16, head dim <= 128): the largest candidates that compile
without register spills; ``aot_compile_specs()`` lists every kernel x config x dtype x head dim x mask variant.
Known gap: K/V tiles are addressed with pointer tensors; Hopper TMA descriptors would free those registers and
allow larger dK/dV tiles (today 16 queries x 128 keys on sm_90, 32 x 64 on sm_80 for hd 128).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from vexpert_kernels._aot import CompileSpec
from vexpert_kernels._triton_compat import HAS_TRITON, interpret_mode, require_triton, tl, triton

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 128  # 256 spills registers even at 32x32 tiles (sm_90/sm_80): use sdpa/flex there
# Tests set this to fill every output with NaN before launch, so elements a kernel fails to write show up.
_POISON_OUTPUTS = False


def _new_like(t, shape=None, dtype=None):
    if shape is None:
        out = torch.empty_like(t) if dtype is None else torch.empty_like(t, dtype=dtype)
    else:
        out = torch.empty(shape, dtype=dtype or t.dtype, device=t.device)
    return out.fill_(float("nan")) if _POISON_OUTPUTS else out


# ----------------------------------------------------------------------------------------------------------- kernels
if HAS_TRITON:

    @triton.jit
    def _dot(a, b, UPCAST: tl.constexpr, PREC: tl.constexpr):
        # The interpreter multiplies raw bf16/fp16 bit patterns in tl.dot: upcast there. On GPU fp32 inputs use
        # PREC="ieee" (exact fp32, no tf32), half inputs run the tensor-core path with fp32 accumulation.
        if UPCAST:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=PREC)
        else:
            return tl.dot(a, b, input_precision=PREC)

    @triton.jit
    def _seq_bounds(CU_Q, CU_K, b, LQ, LK, IS_VARLEN: tl.constexpr):
        if IS_VARLEN:
            q_start = tl.load(CU_Q + b)
            len_q = tl.load(CU_Q + b + 1) - q_start
            k_start = tl.load(CU_K + b)
            len_k = tl.load(CU_K + b + 1) - k_start
        else:
            q_start = 0
            len_q = LQ
            k_start = 0
            len_k = LK
        return q_start, len_q, k_start, len_k

    @triton.jit
    def _visible(offs_m, offs_n, m_valid, n_valid, qpos, qs, b, offset, KPM, stride_mb, SPAN_B,
                 HAS_KPM: tl.constexpr, BIDIR: tl.constexpr):
        """[BLOCK_M, BLOCK_N] bool: may query row offs_m see key offs_n (both local to the sequence)."""
        ok = (offs_n[None, :] <= qpos[:, None]) & n_valid[None, :] & m_valid[:, None]
        if BIDIR:
            kidx = offs_n - offset
            ks = tl.load(SPAN_B + kidx, mask=n_valid & (kidx >= 0), other=0)
            same = (ks[None, :] == qs[:, None]) & (qs[:, None] != 0) & n_valid[None, :] & m_valid[:, None]
            ok = ok | same
        if HAS_KPM:
            kp = tl.load(KPM + b.to(tl.int64) * stride_mb + offs_n, mask=n_valid, other=0)
            ok = ok & (kp != 0)[None, :]
        return ok

    @triton.jit
    def _key_range(b, start_m, len_q, len_k, offs_m, m_valid, KV_LO, KV_HI, SPAN_END_B,
                   HAS_KPM: tl.constexpr, BIDIR: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """[lo, hi): the keys any row of this query tile may see. Tiles outside it are skipped entirely."""
        offset = len_k - len_q
        if BIDIR:
            # span_end = exclusive end (query coords) of each row's image span (i + 1 outside images)
            q_end = tl.max(tl.load(SPAN_END_B + offs_m, mask=m_valid, other=0), 0)
        else:
            q_end = tl.minimum(start_m + BLOCK_M, len_q)
        hi = tl.minimum(offset + q_end, len_k)
        lo = 0
        if HAS_KPM:  # rows of padded batches: keys before the first / after the last kept key are all masked
            lo = tl.load(KV_LO + b)
            hi = tl.minimum(hi, tl.load(KV_HI + b))
        lo = (lo // BLOCK_N) * BLOCK_N
        return lo, hi

    @triton.jit
    def _full_end(lo, hi, first_row_pos_plus1, BLOCK_N: tl.constexpr):
        """End of the tile-aligned key range [lo, .) that the tile's FIRST row already sees causally (so all rows do)."""
        n_full = tl.maximum(tl.minimum(hi, first_row_pos_plus1) - lo, 0) // BLOCK_N
        return lo + n_full * BLOCK_N

    @triton.jit
    def _tile_mask(offs_m, offs_n, m_valid, n_valid, qpos, qs, b, offset, KPM, stride_mb, SPAN_B,
                   MASKED: tl.constexpr, HAS_KPM: tl.constexpr, BIDIR: tl.constexpr):
        if MASKED:
            ok = _visible(offs_m, offs_n, m_valid, n_valid, qpos, qs, b, offset, KPM, stride_mb, SPAN_B,
                          HAS_KPM, BIDIR)
        else:  # interior tile: only key padding can hide a key (a [BLOCK_N] vector, cheap)
            ok = (offs_n >= 0)[None, :] & m_valid[:, None]
            if HAS_KPM:
                kp = tl.load(KPM + b.to(tl.int64) * stride_mb + offs_n, mask=n_valid, other=0)
                ok = ok & (kp != 0)[None, :]
        return ok

    @triton.jit
    def _load_rows(ptrs, n_valid, d_valid, MASK_N: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
        """Load a [rows, BLOCK_D] tile. Interior tiles of a full head dim load unmasked: the [rows, BLOCK_D] predicate
        tensor otherwise costs registers that spill on the big GPU tiles."""
        if MASK_N:
            x = tl.load(ptrs, mask=n_valid[:, None] & d_valid[None, :], other=0.0)
        elif HEAD_DIM == BLOCK_D:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=d_valid[None, :], other=0.0)
        return x

    @triton.jit
    def _fwd_tile(q, m_i, l_i, acc, start_n, hi, offs_n0, offs_d, d_valid, offs_m, m_valid, qpos, qs, b, offset,
                  k_ptr, v_ptr, stride_kl, stride_vl, KPM, stride_mb, span_b, qk_scale,
                  MASKED: tl.constexpr, HAS_KPM: tl.constexpr, BIDIR: tl.constexpr, UPCAST: tl.constexpr,
                  PREC: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
        offs_n = start_n + offs_n0
        n_valid = offs_n < hi
        k = _load_rows(k_ptr + offs_n[:, None] * stride_kl + offs_d[None, :], n_valid, d_valid, MASKED, HEAD_DIM, BLOCK_D)
        s = _dot(q, tl.trans(k), UPCAST, PREC) * qk_scale  # log2 domain: qk_scale = softmax_scale * log2(e)
        if MASKED or HAS_KPM:
            ok = _tile_mask(offs_m, offs_n, m_valid, n_valid, qpos, qs, b, offset, KPM, stride_mb, span_b,
                            MASKED, HAS_KPM, BIDIR)
            s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet: no NaN
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_rows(v_ptr + offs_n[:, None] * stride_vl + offs_d[None, :], n_valid, d_valid, MASKED, HEAD_DIM, BLOCK_D)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, UPCAST, PREC)
        return m_new, l_i, acc

    @triton.jit
    def _dq_tile(dq, q, do, lse2, delta, start_n, hi, offs_n0, offs_d, d_valid, offs_m, m_valid, qpos, qs, b, offset,
                 k_ptr, v_ptr, stride_kl, stride_vl, KPM, stride_mb, span_b, qk_scale,
                 MASKED: tl.constexpr, HAS_KPM: tl.constexpr, BIDIR: tl.constexpr, UPCAST: tl.constexpr,
                 PREC: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
        offs_n = start_n + offs_n0
        n_valid = offs_n < hi
        k = _load_rows(k_ptr + offs_n[:, None] * stride_kl + offs_d[None, :], n_valid, d_valid, MASKED, HEAD_DIM, BLOCK_D)
        v = _load_rows(v_ptr + offs_n[:, None] * stride_vl + offs_d[None, :], n_valid, d_valid, MASKED, HEAD_DIM, BLOCK_D)
        s = _dot(q, tl.trans(k), UPCAST, PREC) * qk_scale
        ok = _tile_mask(offs_m, offs_n, m_valid, n_valid, qpos, qs, b, offset, KPM, stride_mb, span_b,
                        MASKED, HAS_KPM, BIDIR)
        # where() after exp2: rows with lse=-inf give inf there, but such rows have no visible key
        p = tl.where(ok, tl.exp2(s - lse2[:, None]), 0.0)
        dp = _dot(do, tl.trans(v), UPCAST, PREC)
        ds = p * (dp - delta[:, None])
        return dq + _dot(ds.to(k.dtype), k, UPCAST, PREC)

    @triton.jit
    def _dkdv_tile(dk, dv, k, v, kkeep, ks, start_m, offs_m0, offs_n, n_valid, offs_d, d_valid, len_q, offset, q_ptr,
                   do_ptr, l_off, LSE, DELTA, stride_ql, stride_ol, stride_ll, span_b, qk_scale,
                   MASKED: tl.constexpr, HAS_KPM: tl.constexpr, BIDIR: tl.constexpr, UPCAST: tl.constexpr,
                   PREC: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
        # Works on the transposed scores [BLOCK_N, BLOCK_M] (as FA2): P^T and dS^T come out of the dots already in
        # the orientation dV += P^T dO and dK += dS^T Q need, so no register tensor is transposed (no layout shuffle
        # through shared memory, fewer live registers). kkeep/ks: the key tile's padding keep flags and span ids.
        offs_m = start_m + offs_m0
        m_valid = offs_m < len_q
        qt_ptrs = q_ptr + offs_m[None, :] * stride_ql + offs_d[:, None]
        if MASKED:
            qT = tl.load(qt_ptrs, mask=m_valid[None, :] & d_valid[:, None], other=0.0)
        elif HEAD_DIM == BLOCK_D:
            qT = tl.load(qt_ptrs)
        else:
            qT = tl.load(qt_ptrs, mask=d_valid[:, None], other=0.0)
        do = _load_rows(do_ptr + offs_m[:, None] * stride_ol + offs_d[None, :], m_valid, d_valid, MASKED, HEAD_DIM,
                        BLOCK_D)
        if MASKED:
            lse2 = tl.load(LSE + l_off + offs_m * stride_ll, mask=m_valid, other=0.0) * 1.4426950408889634
            delta = tl.load(DELTA + l_off + offs_m * stride_ll, mask=m_valid, other=0.0)
        else:
            lse2 = tl.load(LSE + l_off + offs_m * stride_ll) * 1.4426950408889634
            delta = tl.load(DELTA + l_off + offs_m * stride_ll)
        sT = _dot(k, qT, UPCAST, PREC) * qk_scale
        pT = tl.exp2(sT - lse2[None, :])
        # where() after exp2: rows with lse=-inf give inf there, but such rows have no visible key
        if MASKED:
            ok = (offs_n[:, None] <= (offset + offs_m)[None, :]) & n_valid[:, None] & m_valid[None, :]
            if BIDIR:
                qs = tl.load(span_b + offs_m, mask=m_valid, other=0)
                ok = ok | ((ks[:, None] == qs[None, :]) & (qs[None, :] != 0) & n_valid[:, None] & m_valid[None, :])
            if HAS_KPM:
                ok = ok & kkeep[:, None]
            pT = tl.where(ok, pT, 0.0)
        elif HAS_KPM:
            pT = tl.where(kkeep[:, None], pT, 0.0)
        dv += _dot(pT.to(do.dtype), do, UPCAST, PREC)
        dpT = _dot(v, tl.trans(do), UPCAST, PREC)
        dsT = pT * (dpT - delta[None, :])
        dk += _dot(dsT.to(qT.dtype), tl.trans(qT), UPCAST, PREC)
        return dk, dv

    @triton.jit
    def _attn_fwd_kernel(
        Q, K, V, O, LSE, CU_Q, CU_K, KV_LO, KV_HI, KPM, SPAN, SPAN_END,
        stride_qb, stride_qh, stride_ql, stride_kb, stride_kh, stride_kl, stride_vb, stride_vh, stride_vl,
        stride_ob, stride_oh, stride_ol, stride_lb, stride_lh, stride_ll, stride_mb, stride_sb,
        H, LQ, LK, qk_scale,
        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr, IS_VARLEN: tl.constexpr, HAS_KPM: tl.constexpr, BIDIR: tl.constexpr,
        UPCAST: tl.constexpr, PREC: tl.constexpr,
    ):
        # heavy (late, long-causal-range) query tiles first: better tail balance on the causal triangle
        pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // H
        h = pid_bh % H
        kvh = h // GROUP
        q_start, len_q, k_start, len_k = _seq_bounds(CU_Q, CU_K, b, LQ, LK, IS_VARLEN)
        start_m = pid_m * BLOCK_M
        if start_m >= len_q:  # varlen: this sequence is shorter than max_seqlen_q
            return
        offset = len_k - len_q
        offs_m = start_m + tl.arange(0, BLOCK_M)
        offs_n0 = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        m_valid = offs_m < len_q
        d_valid = offs_d < HEAD_DIM
        b64 = b.to(tl.int64)
        q_ptr = Q + b64 * stride_qb + h.to(tl.int64) * stride_qh + q_start.to(tl.int64) * stride_ql
        k_ptr = K + b64 * stride_kb + kvh.to(tl.int64) * stride_kh + k_start.to(tl.int64) * stride_kl
        v_ptr = V + b64 * stride_vb + kvh.to(tl.int64) * stride_vh + k_start.to(tl.int64) * stride_vl
        span_b = SPAN + b64 * stride_sb + q_start
        q = tl.load(q_ptr + offs_m[:, None] * stride_ql + offs_d[None, :],
                    mask=m_valid[:, None] & d_valid[None, :], other=0.0)
        qpos = offset + offs_m
        qs = offs_m * 0
        if BIDIR:
            qs = tl.load(span_b + offs_m, mask=m_valid, other=0)
        lo, hi = _key_range(b, start_m, len_q, len_k, offs_m, m_valid, KV_LO, KV_HI, SPAN_END + b64 * stride_sb + q_start,
                            HAS_KPM, BIDIR, BLOCK_M, BLOCK_N)

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        # keys in [lo, full_end) are causally visible to every row of the tile: no causal/span mask there
        full_end = _full_end(lo, hi, offset + start_m + 1, BLOCK_N)
        for start_n in range(lo, full_end, BLOCK_N):
            m_i, l_i, acc = _fwd_tile(q, m_i, l_i, acc, start_n, hi, offs_n0, offs_d, d_valid, offs_m, m_valid, qpos,
                                      qs, b, offset, k_ptr, v_ptr, stride_kl, stride_vl, KPM, stride_mb, span_b,
                                      qk_scale, False, HAS_KPM, BIDIR, UPCAST, PREC, HEAD_DIM, BLOCK_D)
        for start_n in range(full_end, hi, BLOCK_N):
            m_i, l_i, acc = _fwd_tile(q, m_i, l_i, acc, start_n, hi, offs_n0, offs_d, d_valid, offs_m, m_valid, qpos,
                                      qs, b, offset, k_ptr, v_ptr, stride_kl, stride_vl, KPM, stride_mb, span_b,
                                      qk_scale, True, HAS_KPM, BIDIR, UPCAST, PREC, HEAD_DIM, BLOCK_D)
        empty = l_i == 0.0
        l_safe = tl.where(empty, 1.0, l_i)
        out = acc / l_safe[:, None]
        lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)
        o_ptr = O + b64 * stride_ob + h.to(tl.int64) * stride_oh + q_start.to(tl.int64) * stride_ol
        tl.store(o_ptr + offs_m[:, None] * stride_ol + offs_d[None, :], out.to(O.dtype.element_ty),
                 mask=m_valid[:, None] & d_valid[None, :])
        l_ptr = LSE + b64 * stride_lb + h.to(tl.int64) * stride_lh + q_start.to(tl.int64) * stride_ll
        tl.store(l_ptr + offs_m * stride_ll, lse, mask=m_valid)

    @triton.jit
    def _attn_bwd_dq_kernel(
        Q, K, V, DO, DQ, LSE, DELTA, CU_Q, CU_K, KV_LO, KV_HI, KPM, SPAN, SPAN_END,
        stride_qb, stride_qh, stride_ql, stride_kb, stride_kh, stride_kl, stride_vb, stride_vh, stride_vl,
        stride_ob, stride_oh, stride_ol, stride_lb, stride_lh, stride_ll, stride_mb, stride_sb,
        H, LQ, LK, qk_scale, sm_scale,
        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr, IS_VARLEN: tl.constexpr, HAS_KPM: tl.constexpr, BIDIR: tl.constexpr,
        UPCAST: tl.constexpr, PREC: tl.constexpr,
    ):
        # DO and DQ share the strides stride_o*; LSE and DELTA share stride_l*.
        pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // H
        h = pid_bh % H
        kvh = h // GROUP
        q_start, len_q, k_start, len_k = _seq_bounds(CU_Q, CU_K, b, LQ, LK, IS_VARLEN)
        start_m = pid_m * BLOCK_M
        if start_m >= len_q:
            return
        offset = len_k - len_q
        offs_m = start_m + tl.arange(0, BLOCK_M)
        offs_n0 = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        m_valid = offs_m < len_q
        d_valid = offs_d < HEAD_DIM
        md_mask = m_valid[:, None] & d_valid[None, :]
        b64 = b.to(tl.int64)
        q_ptr = Q + b64 * stride_qb + h.to(tl.int64) * stride_qh + q_start.to(tl.int64) * stride_ql
        o_off = b64 * stride_ob + h.to(tl.int64) * stride_oh + q_start.to(tl.int64) * stride_ol
        k_ptr = K + b64 * stride_kb + kvh.to(tl.int64) * stride_kh + k_start.to(tl.int64) * stride_kl
        v_ptr = V + b64 * stride_vb + kvh.to(tl.int64) * stride_vh + k_start.to(tl.int64) * stride_vl
        l_off = b64 * stride_lb + h.to(tl.int64) * stride_lh + q_start.to(tl.int64) * stride_ll
        span_b = SPAN + b64 * stride_sb + q_start
        q = tl.load(q_ptr + offs_m[:, None] * stride_ql + offs_d[None, :], mask=md_mask, other=0.0)
        do = tl.load(DO + o_off + offs_m[:, None] * stride_ol + offs_d[None, :], mask=md_mask, other=0.0)
        lse2 = tl.load(LSE + l_off + offs_m * stride_ll, mask=m_valid, other=0.0) * 1.4426950408889634
        delta = tl.load(DELTA + l_off + offs_m * stride_ll, mask=m_valid, other=0.0)
        qpos = offset + offs_m
        qs = offs_m * 0
        if BIDIR:
            qs = tl.load(span_b + offs_m, mask=m_valid, other=0)
        lo, hi = _key_range(b, start_m, len_q, len_k, offs_m, m_valid, KV_LO, KV_HI, SPAN_END + b64 * stride_sb + q_start,
                            HAS_KPM, BIDIR, BLOCK_M, BLOCK_N)
        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        full_end = _full_end(lo, hi, offset + start_m + 1, BLOCK_N)
        for start_n in range(lo, full_end, BLOCK_N):
            dq = _dq_tile(dq, q, do, lse2, delta, start_n, hi, offs_n0, offs_d, d_valid, offs_m, m_valid, qpos, qs, b,
                          offset, k_ptr, v_ptr, stride_kl, stride_vl, KPM, stride_mb, span_b, qk_scale,
                          False, HAS_KPM, BIDIR, UPCAST, PREC, HEAD_DIM, BLOCK_D)
        for start_n in range(full_end, hi, BLOCK_N):
            dq = _dq_tile(dq, q, do, lse2, delta, start_n, hi, offs_n0, offs_d, d_valid, offs_m, m_valid, qpos, qs, b,
                          offset, k_ptr, v_ptr, stride_kl, stride_vl, KPM, stride_mb, span_b, qk_scale,
                          True, HAS_KPM, BIDIR, UPCAST, PREC, HEAD_DIM, BLOCK_D)
        dq = dq * sm_scale
        tl.store(DQ + o_off + offs_m[:, None] * stride_ol + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=md_mask)

    @triton.jit
    def _attn_bwd_dkdv_kernel(
        Q, K, V, DO, DK, DV, LSE, DELTA, CU_Q, CU_K, KV_LO, KV_HI, KPM, SPAN, SPAN_START,
        stride_qb, stride_qh, stride_ql, stride_kb, stride_kh, stride_kl, stride_vb, stride_vh, stride_vl,
        stride_ob, stride_oh, stride_ol, stride_lb, stride_lh, stride_ll, stride_mb, stride_sb,
        KVH, LQ, LK, qk_scale, sm_scale,
        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr, IS_VARLEN: tl.constexpr, HAS_KPM: tl.constexpr, BIDIR: tl.constexpr,
        UPCAST: tl.constexpr, PREC: tl.constexpr,
    ):
        # DK/DV are written with K/V's strides, DO is read with stride_o*.
        pid_n = tl.program_id(0)
        pid_bk = tl.program_id(1)
        b = pid_bk // KVH
        kvh = pid_bk % KVH
        q_start, len_q, k_start, len_k = _seq_bounds(CU_Q, CU_K, b, LQ, LK, IS_VARLEN)
        start_n = pid_n * BLOCK_N
        if start_n >= len_k:
            return
        offset = len_k - len_q
        offs_n = start_n + tl.arange(0, BLOCK_N)
        offs_m0 = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        n_valid = offs_n < len_k
        d_valid = offs_d < HEAD_DIM
        nd_mask = n_valid[:, None] & d_valid[None, :]
        b64 = b.to(tl.int64)
        k_off = b64 * stride_kb + kvh.to(tl.int64) * stride_kh + k_start.to(tl.int64) * stride_kl
        v_off = b64 * stride_vb + kvh.to(tl.int64) * stride_vh + k_start.to(tl.int64) * stride_vl
        k = tl.load(K + k_off + offs_n[:, None] * stride_kl + offs_d[None, :], mask=nd_mask, other=0.0)
        v = tl.load(V + v_off + offs_n[:, None] * stride_vl + offs_d[None, :], mask=nd_mask, other=0.0)
        span_b = SPAN + b64 * stride_sb + q_start
        # first query that can see a key of this tile: causal -> start_n - offset; bidirectional -> the start of
        # that query's image span (span_start is monotone, so the tile's first key gives the minimum)
        m_first = tl.maximum(start_n - offset, 0)
        if BIDIR:
            m_first = tl.load(SPAN_START + b64 * stride_sb + q_start + tl.minimum(m_first, len_q - 1))
        m_lo = (m_first // BLOCK_M) * BLOCK_M
        m_hi = len_q
        if HAS_KPM:  # the whole key tile is padding: nothing to accumulate
            kv_lo = tl.load(KV_LO + b)
            kv_hi = tl.load(KV_HI + b)
            if (start_n + BLOCK_N <= kv_lo) | (start_n >= kv_hi):
                m_hi = m_lo
        # first query tile start whose rows all sit at or after the tile's last key (causally see the whole tile)
        m_full = m_lo + ((tl.maximum(start_n + BLOCK_N - 1 - offset - m_lo, 0) + BLOCK_M - 1) // BLOCK_M) * BLOCK_M
        m_a = tl.minimum(m_full, m_hi)
        m_b = tl.maximum(m_a, m_lo + ((m_hi - m_lo) // BLOCK_M) * BLOCK_M)
        kkeep = n_valid
        if HAS_KPM:
            kkeep = tl.load(KPM + b64 * stride_mb + offs_n, mask=n_valid, other=0) != 0
        ks = offs_n * 0
        if BIDIR:
            ks = tl.load(span_b + offs_n - offset, mask=n_valid & (offs_n >= offset), other=0)
        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        for g in range(GROUP):  # the query heads sharing this kv head: summed here, no atomics
            h = (kvh * GROUP + g).to(tl.int64)
            q_ptr = Q + b64 * stride_qb + h * stride_qh + q_start.to(tl.int64) * stride_ql
            do_ptr = DO + b64 * stride_ob + h * stride_oh + q_start.to(tl.int64) * stride_ol
            l_off = b64 * stride_lb + h * stride_lh + q_start.to(tl.int64) * stride_ll
            # query tiles [m_a, m_b) are whole tiles whose every row sees every key of this tile causally: no
            # causal/span mask and no row masks there; the ragged ends run masked
            for start_m in range(m_lo, m_a, BLOCK_M):
                dk, dv = _dkdv_tile(dk, dv, k, v, kkeep, ks, start_m, offs_m0, offs_n, n_valid, offs_d, d_valid,
                                    len_q, offset, q_ptr, do_ptr, l_off, LSE, DELTA, stride_ql, stride_ol, stride_ll,
                                    span_b, qk_scale, True, HAS_KPM, BIDIR, UPCAST, PREC, HEAD_DIM, BLOCK_D)
            for start_m in range(m_a, m_b, BLOCK_M):
                dk, dv = _dkdv_tile(dk, dv, k, v, kkeep, ks, start_m, offs_m0, offs_n, n_valid, offs_d, d_valid,
                                    len_q, offset, q_ptr, do_ptr, l_off, LSE, DELTA, stride_ql, stride_ol, stride_ll,
                                    span_b, qk_scale, False, HAS_KPM, BIDIR, UPCAST, PREC, HEAD_DIM, BLOCK_D)
            for start_m in range(m_b, m_hi, BLOCK_M):
                dk, dv = _dkdv_tile(dk, dv, k, v, kkeep, ks, start_m, offs_m0, offs_n, n_valid, offs_d, d_valid,
                                    len_q, offset, q_ptr, do_ptr, l_off, LSE, DELTA, stride_ql, stride_ol, stride_ll,
                                    span_b, qk_scale, True, HAS_KPM, BIDIR, UPCAST, PREC, HEAD_DIM, BLOCK_D)
        dk = dk * sm_scale
        tl.store(DK + k_off + offs_n[:, None] * stride_kl + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=nd_mask)
        tl.store(DV + v_off + offs_n[:, None] * stride_vl + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=nd_mask)

    @triton.jit
    def _attn_bwd_preprocess_kernel(
        O, DO, DLSE, DELTA, CU_Q,
        stride_ob, stride_oh, stride_ol, stride_db, stride_dh, stride_dl, stride_lb, stride_lh, stride_ll,
        H, LQ,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, IS_VARLEN: tl.constexpr,
        HAS_DLSE: tl.constexpr,
    ):
        """DELTA = rowsum(dO * O) - dlse in fp32 (lse layout), reading O and dO once each in their own dtype."""
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // H
        h = pid_bh % H
        q_start, len_q, k_start, len_k = _seq_bounds(CU_Q, CU_Q, b, LQ, LQ, IS_VARLEN)
        start_m = pid_m * BLOCK_M
        if start_m >= len_q:
            return
        offs_m = start_m + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        m_valid = offs_m < len_q
        mask = m_valid[:, None] & (offs_d < HEAD_DIM)[None, :]
        b64 = b.to(tl.int64)
        h64 = h.to(tl.int64)
        rows = q_start.to(tl.int64) + offs_m
        o = tl.load(O + b64 * stride_ob + h64 * stride_oh + rows[:, None] * stride_ol + offs_d[None, :], mask=mask,
                    other=0.0)
        do = tl.load(DO + b64 * stride_db + h64 * stride_dh + rows[:, None] * stride_dl + offs_d[None, :], mask=mask,
                     other=0.0)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
        l_ptrs = b64 * stride_lb + h64 * stride_lh + rows * stride_ll
        if HAS_DLSE:
            delta -= tl.load(DLSE + l_ptrs, mask=m_valid, other=0.0)
        tl.store(DELTA + l_ptrs, delta, mask=m_valid)


# ----------------------------------------------------------------------------------------------------------- configs
# (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel, keyed by (compute capability major, head-dim bucket, masked),
# where masked = key padding and/or bidirectional image spans (more live registers: span ids, padding vectors).
# Hopper: 128-query tiles over 8 warps (two wgmma warpgroups) and 2-3 stages of K/V in the 228 KB SMEM; Ampere: the
# same tiles where they fit 164 KB and 255 registers. dK/dV keeps two [BLOCK_N, D] fp32 accumulators plus K and V of
# its key tile in registers, so it takes few queries per step. Every entry was chosen as the largest candidate that
# compiles WITHOUT register spills for sm_90 / sm_80 under BOTH Triton 3.6 (the GPU machines) and 3.9 (CI)
# (triton.compile + cuobjdump --dump-resource-usage, with the 16-divisible stride hints the JIT uses at run time);
# aot_compile_specs() lists them all for the compile report. Triton 3.6 allocates a few more registers than 3.9 for
# the same kernel, and entries that sat at 255 registers under 3.9 spilled 8..40 B there; those were retuned:
# sm_90 dK/dV at hd 80..128 went 32x128 -> 16x128 (keeps the 128-key tile and its Q/dO reuse; 3.6: 248/238/240 regs,
# 3.9: 222/232/234 for causal/padded/varlen), sm_80 dK/dV at hd 64 -> 16x64 w8s2, and packed (varlen) bidirectional
# forward at hd 64 got smaller tiles (sm_90 128x64 w8s3, sm_80 128x64 w8s2).
_GPU_CONFIGS = {
    # (cc_major, d_bucket, masked): {"fwd": ..., "dq": ..., "dkdv": ...}; "<kernel>_varlen" overrides for packed input
    (9, 64, False): {"fwd": (128, 128, 8, 3), "dq": (128, 64, 8, 2), "dkdv": (32, 128, 8, 2)},
    (9, 64, True): {"fwd": (128, 128, 8, 3), "dq": (128, 64, 8, 2), "dkdv": (32, 128, 8, 2),
                    "fwd_varlen": (128, 64, 8, 3)},  # 128x128 spills 8 B under Triton 3.6 with cu_seqlens
    (9, 128, False): {"fwd": (128, 64, 8, 3), "dq": (128, 64, 8, 2), "dkdv": (16, 128, 8, 3)},
    (9, 128, True): {"fwd": (128, 64, 8, 3), "dq": (128, 64, 8, 2), "dkdv": (16, 128, 8, 3)},
    (8, 64, False): {"fwd": (128, 128, 8, 3), "dq": (128, 64, 8, 2), "dkdv": (16, 64, 8, 2)},
    (8, 64, True): {"fwd": (128, 64, 8, 3), "dq": (128, 32, 8, 2), "dkdv": (16, 64, 8, 2),
                    "fwd_varlen": (128, 64, 8, 2)},  # 3 stages spill 8 B under Triton 3.6 with cu_seqlens
    (8, 128, False): {"fwd": (128, 64, 8, 3), "dq": (128, 32, 8, 2), "dkdv": (32, 64, 8, 2)},
    (8, 128, True): {"fwd": (128, 32, 8, 3), "dq": (64, 32, 4, 2), "dkdv": (32, 64, 8, 2)},
}
# rowsum(dO*O): memory bound, one pass; 64 rows x up to 128 dims per program keeps it spill-free on 4 warps.
_PREPROCESS_CONFIG = (64, 4)
# The interpreter runs every tile op in numpy: the smallest legal tl.dot tiles keep tests fast.
_INTERPRET_CONFIG = {"fwd": (16, 16, 4, 1), "dq": (16, 16, 4, 1), "dkdv": (16, 16, 4, 1)}


def _d_bucket(block_d: int) -> int:
    return 64 if block_d <= 64 else 128


def _pick(cfgs: dict, kernel: str, varlen: bool) -> tuple:
    return cfgs.get(kernel + "_varlen", cfgs[kernel]) if varlen else cfgs[kernel]


def _configs_for(device: torch.device, block_d: int, masked: bool, varlen: bool = False) -> dict:
    """{"fwd"|"dq"|"dkdv": (BLOCK_M, BLOCK_N, num_warps, num_stages)} for this device and problem."""
    if device.type != "cuda":
        return _INTERPRET_CONFIG
    major = torch.cuda.get_device_capability(device)[0]
    cfgs = _GPU_CONFIGS[(9 if major >= 9 else 8, _d_bucket(block_d), bool(masked or varlen))]
    return {k: _pick(cfgs, k, varlen) for k in ("fwd", "dq", "dkdv")}


# ----------------------------------------------------------------------------------------------------------- helpers
def canonical_span_ids(span_ids: torch.Tensor) -> torch.Tensor:
    """int32 ids that are equal iff two tokens lie in the same *contiguous* run of one nonzero id (0 stays 0).

    Works along the last dim. Equal ids in two separate runs become different spans, so every backend sees the
    same (contiguous) spans and the kernels' per-tile span bounds are exact.
    """
    s = span_ids.to(torch.int32)
    nz = s != 0
    start = nz.clone()
    start[..., 1:] &= s[..., 1:] != s[..., :-1]
    run = start.to(torch.int32).cumsum(-1, dtype=torch.int32)
    return torch.where(nz, run, torch.zeros_like(run))


def span_bounds(canon: torch.Tensor):
    """(span_start, span_end) int32 [..., L]: first index and exclusive end of each token's span (i, i+1 outside)."""
    L = canon.shape[-1]
    idx = torch.arange(L, device=canon.device, dtype=torch.int32).expand_as(canon)
    nz = canon != 0
    is_start = torch.ones_like(nz)
    is_start[..., 1:] = ~nz[..., 1:] | (canon[..., 1:] != canon[..., :-1])
    start = torch.where(is_start, idx, torch.zeros_like(idx)).cummax(-1).values
    is_end = torch.ones_like(nz)  # is the last token of its run
    is_end[..., :-1] = ~nz[..., :-1] | (canon[..., 1:] != canon[..., :-1])
    end_r = torch.where(is_end, idx, torch.full_like(idx, L)).flip(-1).cummin(-1).values.flip(-1)
    return start.contiguous(), (end_r + 1).contiguous()


def _varlen_span_bounds(canon_packed: torch.Tensor, cu_q: torch.Tensor):
    """Span bounds for packed spans, local to each sequence (spans never cross sequences: cut at boundaries)."""
    total = canon_packed.shape[0]
    pos = torch.arange(total, device=canon_packed.device, dtype=torch.int32)
    seq = torch.searchsorted(cu_q[1:].contiguous(), pos, right=True)
    # a sequence boundary ends every span: give the canonical ids a per-sequence offset, then re-canonicalise
    ids = torch.where(canon_packed != 0, canon_packed + seq.to(torch.int32) * (total + 1), torch.zeros_like(canon_packed))
    canon = canonical_span_ids(ids)
    start, end = span_bounds(canon)
    base = cu_q.to(torch.int32)[seq]
    return canon, (start - base).contiguous(), (end - base).contiguous()


def _kv_range(kpm: torch.Tensor):
    """Per batch row: [first kept key, last kept key + 1) (an empty range [Lk, 0) when nothing is kept)."""
    Lk = kpm.shape[-1]
    keep = kpm.to(torch.int32)
    anyk = keep.any(-1)
    lo = torch.where(anyk, keep.argmax(-1), torch.full_like(anyk, Lk, dtype=torch.long))
    hi = torch.where(anyk, Lk - keep.flip(-1).argmax(-1), torch.zeros_like(lo))
    return lo.to(torch.int32).contiguous(), hi.to(torch.int32).contiguous()


def _block_d(hd: int) -> int:
    return max(16, triton.next_power_of_2(hd)) if HAS_TRITON else max(16, 1 << (hd - 1).bit_length())


class _Prepared:
    """Device-side metadata shared by forward and backward launches (no host synchronisation)."""

    def __init__(self, q, k, kpm, span, cu_q, cu_k, max_q, max_k, bidir):
        self.varlen = cu_q is not None
        dev = q.device
        dummy_i32 = torch.zeros(1, dtype=torch.int32, device=dev)
        if self.varlen:
            self.B = cu_q.numel() - 1
            self.H, self.KV = q.shape[1], k.shape[1]
            self.LQ, self.LK = max_q, max_k
            self.cu_q, self.cu_k = cu_q.to(torch.int32).contiguous(), cu_k.to(torch.int32).contiguous()
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

    def qstrides(self, t):  # (batch, head, seq) strides of a q/o-like tensor
        return (0, t.stride(1), t.stride(0)) if self.varlen else (t.stride(0), t.stride(1), t.stride(2))

    def lstrides(self, t):
        return (0, t.stride(0), t.stride(1)) if self.varlen else (t.stride(0), t.stride(1), t.stride(2))

    def common_constexprs(self, hd, dtype, device):
        return dict(GROUP=self.H // self.KV, HEAD_DIM=hd, BLOCK_D=_block_d(hd), IS_VARLEN=self.varlen,
                    HAS_KPM=self.has_kpm, BIDIR=self.bidir, UPCAST=interpret_mode() or device.type != "cuda",
                    PREC="ieee" if dtype == torch.float32 else "tf32")


def _lse_shape(q, varlen):
    return (q.shape[1], q.shape[0]) if varlen else (q.shape[0], q.shape[1], q.shape[2])


def _fwd_impl(q, k, v, kpm, span, cu_q, cu_k, max_q, max_k, softmax_scale, bidir):
    require_triton("the triton attention backend")
    pr = _Prepared(q, k, kpm, span, cu_q, cu_k, max_q, max_k, bidir)
    hd = q.shape[-1]
    out = _new_like(q)
    lse = _new_like(q, _lse_shape(q, pr.varlen), torch.float32)
    if out.numel() == 0:
        return out, lse.fill_(float("-inf"))
    ce = pr.common_constexprs(hd, q.dtype, q.device)
    bm, bn, nw, ns = _configs_for(q.device, ce["BLOCK_D"], pr.has_kpm or pr.bidir, pr.varlen)["fwd"]
    grid = (triton.cdiv(pr.LQ, bm), pr.B * pr.H)
    _attn_fwd_kernel[grid](
        q, k, v, out, lse, pr.cu_q, pr.cu_k, pr.kv_lo, pr.kv_hi, pr.kpm, pr.span, pr.span_end,
        *pr.qstrides(q), *pr.qstrides(k), *pr.qstrides(v), *pr.qstrides(out), *pr.lstrides(lse),
        pr.stride_mb, pr.stride_sb, pr.H, pr.LQ, pr.LK, softmax_scale * LOG2E,
        BLOCK_M=bm, BLOCK_N=bn, num_warps=nw, num_stages=ns, **ce)
    return out, lse


def _bwd_impl(do, q, k, v, out, lse, dlse, kpm, span, cu_q, cu_k, max_q, max_k, softmax_scale, bidir):
    require_triton("the triton attention backend")
    pr = _Prepared(q, k, kpm, span, cu_q, cu_k, max_q, max_k, bidir)
    hd = q.shape[-1]
    do = do.contiguous()
    # preprocess: D = rowsum(dO * O) (fp32), minus dlse so that lse is differentiable too (dS = P (dP - D + dlse))
    delta = torch.empty_like(lse)
    if dlse is not None:
        dlse = dlse.float().contiguous()
    if q.numel() > 0:
        bm, nw = _PREPROCESS_CONFIG if q.is_cuda else (16, 4)
        _attn_bwd_preprocess_kernel[(triton.cdiv(pr.LQ, bm), pr.B * pr.H)](
            out, do, dlse if dlse is not None else delta, delta, pr.cu_q,
            *pr.qstrides(out), *pr.qstrides(do), *pr.lstrides(lse), pr.H, pr.LQ,
            HEAD_DIM=hd, BLOCK_D=_block_d(hd), BLOCK_M=bm, IS_VARLEN=pr.varlen, HAS_DLSE=dlse is not None,
            num_warps=nw)
    dq = _new_like(do)  # DQ is written with DO's strides (stride_o*)
    dk = _new_like(k)  # k/v are dense (see flash_attention): empty_like keeps their strides
    dv = _new_like(v)
    if q.numel() == 0 or k.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    if dk.stride() != k.stride() or dv.stride() != v.stride() or lse.stride() != delta.stride():
        raise AssertionError("internal: dk/dv must share k/v strides and delta lse's")
    ce = pr.common_constexprs(hd, q.dtype, q.device)
    cfg = _configs_for(q.device, ce["BLOCK_D"], pr.has_kpm or pr.bidir, pr.varlen)
    common = (*pr.qstrides(q), *pr.qstrides(k), *pr.qstrides(v), *pr.qstrides(do), *pr.lstrides(lse), pr.stride_mb,
              pr.stride_sb)
    bm, bn, nw, ns = cfg["dq"]
    _attn_bwd_dq_kernel[(triton.cdiv(pr.LQ, bm), pr.B * pr.H)](
        q, k, v, do, dq, lse, delta, pr.cu_q, pr.cu_k, pr.kv_lo, pr.kv_hi, pr.kpm, pr.span, pr.span_end,
        *common, pr.H, pr.LQ, pr.LK, softmax_scale * LOG2E, softmax_scale,
        BLOCK_M=bm, BLOCK_N=bn, num_warps=nw, num_stages=ns, **ce)
    bm, bn, nw, ns = cfg["dkdv"]
    _attn_bwd_dkdv_kernel[(triton.cdiv(pr.LK, bn), pr.B * pr.KV)](
        q, k, v, do, dk, dv, lse, delta, pr.cu_q, pr.cu_k, pr.kv_lo, pr.kv_hi, pr.kpm, pr.span, pr.span_start,
        *common, pr.KV, pr.LQ, pr.LK, softmax_scale * LOG2E, softmax_scale,
        BLOCK_M=bm, BLOCK_N=bn, num_warps=nw, num_stages=ns, **ce)
    return dq, dk, dv


# ------------------------------------------------------------------------------------------ torch.library registration
@torch.library.custom_op("vexpert::flash_attn_fwd", mutates_args=())
def _flash_attn_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kpm: Optional[torch.Tensor],
                       span: Optional[torch.Tensor], cu_q: Optional[torch.Tensor], cu_k: Optional[torch.Tensor],
                       max_q: int, max_k: int, softmax_scale: float, bidir: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return _fwd_impl(q, k, v, kpm, span, cu_q, cu_k, max_q, max_k, softmax_scale, bidir)


@_flash_attn_fwd_op.register_fake
def _(q, k, v, kpm, span, cu_q, cu_k, max_q, max_k, softmax_scale, bidir):
    return torch.empty_like(q), q.new_empty(_lse_shape(q, cu_q is not None), dtype=torch.float32)


@torch.library.custom_op("vexpert::flash_attn_bwd", mutates_args=())
def _flash_attn_bwd_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                       lse: torch.Tensor, dlse: Optional[torch.Tensor], kpm: Optional[torch.Tensor],
                       span: Optional[torch.Tensor], cu_q: Optional[torch.Tensor], cu_k: Optional[torch.Tensor],
                       max_q: int, max_k: int, softmax_scale: float,
                       bidir: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _bwd_impl(do, q, k, v, out, lse, dlse, kpm, span, cu_q, cu_k, max_q, max_k, softmax_scale, bidir)


@_flash_attn_bwd_op.register_fake
def _(do, q, k, v, out, lse, dlse, kpm, span, cu_q, cu_k, max_q, max_k, softmax_scale, bidir):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, kpm, span, cu_q, cu_k, max_q, max_k, softmax_scale, bidir = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, kpm, span, cu_q, cu_k)
    ctx.args = (max_q, max_k, softmax_scale, bidir)


def _backward(ctx, d_out, d_lse):
    q, k, v, out, lse, kpm, span, cu_q, cu_k = ctx.saved_tensors
    if d_out is None:
        d_out = torch.zeros_like(out)
    dq, dk, dv = _flash_attn_bwd_op(d_out, q, k, v, out, lse, d_lse, kpm, span, cu_q, cu_k, *ctx.args)
    return dq, dk, dv, None, None, None, None, None, None, None, None


_flash_attn_fwd_op.register_autograd(_backward, setup_context=_setup_context)


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


def flash_attention(q, k, v, *, key_padding_mask=None, image_span_ids=None, bidirectional=False,
                    softmax_scale=None, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None):
    """Our Triton attention. Returns ``(out, lse)``; differentiable in q, k, v (and through lse).

    Padded: q [B,H,Lq,hd], k/v [B,KV,Lk,hd], key_padding_mask bool [B,Lk] (keep), image_span_ids int [B,Lq];
    out [B,H,Lq,hd], lse fp32 [B,H,Lq]. Varlen (cu_seqlens_q given): q [total_q,H,hd], k/v [total_k,KV,hd],
    image_span_ids int [total_q]; out [total_q,H,hd], lse fp32 [H,total_q]. Inputs are validated by the caller
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
                              int(max_seqlen_k), float(softmax_scale), bool(bidirectional and span is not None))


# ----------------------------------------------------------------------------------------------------------- AOT specs
def aot_compile_specs() -> list:
    """Every (kernel x GPU config x dtype x head dim x mask variant) the dispatcher may launch, for the compile report."""
    if not HAS_TRITON:
        return []
    specs = []
    tdt = {torch.float16: "fp16", torch.bfloat16: "bf16"}
    strides = ["stride_qb", "stride_qh", "stride_ql", "stride_kb", "stride_kh", "stride_kl", "stride_vb", "stride_vh",
               "stride_vl", "stride_ob", "stride_oh", "stride_ol", "stride_lb", "stride_lh", "stride_ll", "stride_mb",
               "stride_sb"]
    variants = {False: (("causal", False, False, False),),
                True: (("padded_bidir", False, True, True), ("varlen_bidir", True, False, True))}
    for (cc, dbucket, masked), cfgs in sorted(_GPU_CONFIGS.items()):
        target_hds = {64: (64,), 128: (80, 96, 128)}[dbucket]
        for hd in target_hds:
            for dtype, dname in tdt.items():
                for variant, is_varlen, has_kpm, bidir in variants[masked]:
                    ce = dict(GROUP=1, HEAD_DIM=hd, BLOCK_D=_block_d(hd), IS_VARLEN=is_varlen, HAS_KPM=has_kpm,
                              BIDIR=bidir, UPCAST=False, PREC="tf32")
                    for kname, fn, ptrs, scalars in (
                        ("fwd", _attn_fwd_kernel, [("Q", dname), ("K", dname), ("V", dname), ("O", dname),
                                                    ("LSE", "fp32")], ["H", "LQ", "LK", "qk_scale"]),
                        ("dq", _attn_bwd_dq_kernel, [("Q", dname), ("K", dname), ("V", dname), ("DO", dname),
                                                     ("DQ", dname), ("LSE", "fp32"), ("DELTA", "fp32")],
                         ["H", "LQ", "LK", "qk_scale", "sm_scale"]),
                        ("dkdv", _attn_bwd_dkdv_kernel, [("Q", dname), ("K", dname), ("V", dname), ("DO", dname),
                                                         ("DK", dname), ("DV", dname), ("LSE", "fp32"),
                                                         ("DELTA", "fp32")],
                         ["KVH", "LQ", "LK", "qk_scale", "sm_scale"]),
                    ):
                        bm, bn, nw, ns = _pick(cfgs, kname, is_varlen)
                        last = "SPAN_START" if kname == "dkdv" else "SPAN_END"
                        sig = {n: "*" + t for n, t in ptrs}
                        for n in ("CU_Q", "CU_K", "KV_LO", "KV_HI"):
                            sig[n] = "*i32"
                        sig["KPM"] = "*i8"
                        sig["SPAN"] = "*i32"
                        sig[last] = "*i32"
                        for n in strides:
                            sig[n] = "i32"
                        for n in scalars:
                            sig[n] = "fp32" if n in ("qk_scale", "sm_scale") else "i32"
                        consts = dict(ce, BLOCK_M=bm, BLOCK_N=bn)
                        for n in consts:
                            sig[n] = "constexpr"
                        sig = {n: sig[n] for n in fn.arg_names}  # ASTSource wants the kernel's argument order
                        specs.append(CompileSpec(
                            name=f"flash_attn_{kname}[sm{cc}x,{variant},{dname},hd{hd},{bm}x{bn},w{nw}s{ns}]", fn=fn,
                            signature=sig, constexprs=consts, num_warps=nw, num_stages=ns, targets=(cc * 10,),
                            # row/head/batch strides of q/k/v/o are multiples of 16 elements for head dims 64..128:
                            # the JIT specialises on that at run time (vectorised 16-byte loads), so the AOT build must
                            extra={"divisible_by_16": list(strides[:12])}))
    for cc in (9, 8):
        for hd in (64, 80, 96, 128):
            for dtype, dname in tdt.items():
                for is_varlen, has_dlse in ((False, False), (True, True)):
                    bm, nw = _PREPROCESS_CONFIG
                    consts = dict(HEAD_DIM=hd, BLOCK_D=_block_d(hd), BLOCK_M=bm, IS_VARLEN=is_varlen, HAS_DLSE=has_dlse)
                    sig = {"O": "*" + dname, "DO": "*" + dname, "DLSE": "*fp32", "DELTA": "*fp32", "CU_Q": "*i32"}
                    for n in ("stride_ob", "stride_oh", "stride_ol", "stride_db", "stride_dh", "stride_dl",
                              "stride_lb", "stride_lh", "stride_ll", "H", "LQ"):
                        sig[n] = "i32"
                    sig.update({n: "constexpr" for n in consts})
                    specs.append(CompileSpec(
                        name=f"flash_attn_bwd_pre[sm{cc}x,{'varlen' if is_varlen else 'padded'},{dname},hd{hd},"
                             f"{bm},w{nw}]",
                        fn=_attn_bwd_preprocess_kernel, signature=sig, constexprs=consts, num_warps=nw,
                        num_stages=1, targets=(cc * 10,),
                        extra={"divisible_by_16": ["stride_ob", "stride_oh", "stride_ol", "stride_db", "stride_dh",
                                                   "stride_dl"]}))
    return specs

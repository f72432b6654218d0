"""Triton kernels of our attention: jit tile helpers, forward, backward (dQ; dK/dV; preprocess).

Each kernel's docstring-level behaviour is described in the package map (``__init__``). Everything here is
``@triton.jit`` behind one ``if HAS_TRITON:``."""
from __future__ import annotations

from vexpert_kernels._triton_compat import HAS_TRITON, tl, triton  # noqa: F401

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
            # bound-safe for any cu_seqlens: the launcher clamps them to [0, rows] and makes them non-decreasing on
            # the device, and no sequence is taken longer than max_seqlen (the grid covers max_seqlen rows)
            q_start = tl.load(CU_Q + b)
            len_q = tl.minimum(tl.load(CU_Q + b + 1) - q_start, LQ)
            k_start = tl.load(CU_K + b)
            len_k = tl.minimum(tl.load(CU_K + b + 1) - k_start, LK)
        else:
            q_start = 0
            len_q = LQ
            k_start = 0
            len_k = LK
        return q_start, len_q, k_start, len_k

    @triton.jit
    def _program_rows(pid, HEADS, CU_Q, CU_K, LQ, LK, IS_VARLEN: tl.constexpr):
        """Program set-up shared by every kernel: the (batch row or sequence, head) of grid index ``pid`` over
        ``B * HEADS`` and that sequence's query/key row ranges."""
        b = pid // HEADS
        head = pid % HEADS
        q_start, len_q, k_start, len_k = _seq_bounds(CU_Q, CU_K, b, LQ, LK, IS_VARLEN)
        return b, head, q_start, len_q, k_start, len_k

    @triton.jit
    def _row_offset(b, head, row, stride_b, stride_h, stride_l):
        """int64 element offset of (batch row b, head, sequence row) in a [B, heads, L, ...]-strided tensor."""
        return b.to(tl.int64) * stride_b + head.to(tl.int64) * stride_h + row.to(tl.int64) * stride_l

    @triton.jit
    def _routed_rows(OIDX_B, offs_m, m_valid, T_OUT):
        """Routed order (HAS_OIDX): sequence row offs_m of this (batch row, head) lives at row OIDX_B[offs_m] of the
        [T_OUT, H*hd] output. Returns those rows (int64) and which of them exist (out-of-range indices: skipped)."""
        r = tl.load(OIDX_B + offs_m, mask=m_valid, other=0).to(tl.int64)
        return r, m_valid & (r >= 0) & (r < T_OUT)

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
                  PREC: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, USE_TMA: tl.constexpr):
        # USE_TMA: k_ptr/v_ptr are tensor descriptors over this sequence's [len_k, HEAD_DIM] rows (bulk async copies,
        # rows past len_k and columns past HEAD_DIM arrive as zeros; no address registers)
        offs_n = start_n + offs_n0
        n_valid = offs_n < hi
        if USE_TMA:
            k = k_ptr.load([start_n, 0])
        else:
            k = _load_rows(k_ptr + offs_n[:, None] * stride_kl + offs_d[None, :], n_valid, d_valid, MASKED, HEAD_DIM,
                           BLOCK_D)
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
        if USE_TMA:
            v = v_ptr.load([start_n, 0])
            if MASKED:  # rows in [hi, len_k) are real (maybe non-finite padding) values: p = 0 there, but 0 * inf = nan
                v = tl.where(n_valid[:, None], v, 0.0)
        else:
            v = _load_rows(v_ptr + offs_n[:, None] * stride_vl + offs_d[None, :], n_valid, d_valid, MASKED, HEAD_DIM,
                           BLOCK_D)
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
    def _dkdv_tile(dk, dv, k, v, kkeep, ks, kpos, start_m, offs_m0, offs_n, n_valid, offs_d, d_valid, len_q, offset, q_ptr,
                   do_ptr, l_off, LSE, DELTA, stride_ql, stride_ol, stride_ll, span_b, qk_scale, oidx_b, T_OUT,
                   dq_ptr, MASKED: tl.constexpr, HAS_KPM: tl.constexpr, BIDIR: tl.constexpr, UPCAST: tl.constexpr,
                   PREC: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HAS_OIDX: tl.constexpr,
                   FUSED_DQ: tl.constexpr, USE_TMA: tl.constexpr, DQ_REDUCE: tl.constexpr):
        # Works on the transposed scores [BLOCK_N, BLOCK_M] (as FA2): P^T and dS^T come out of the dots already in
        # the orientation dV += P^T dO and dK += dS^T Q need, so no register tensor is transposed (no layout shuffle
        # through shared memory, fewer live registers). kkeep/ks: the key tile's padding keep flags and span ids.
        # USE_TMA: q_ptr (and do_ptr unless HAS_OIDX) are tensor descriptors over this (sequence, head)'s
        # [len_q, HEAD_DIM] rows: bulk copies, rows past len_q arrive as zeros, no [BLOCK_M, BLOCK_D] address
        # tensors held in registers. DQ_REDUCE: dq_ptr is a descriptor too and dQ is added by TMA reductions
        # (cp.reduce.async.bulk.tensor; rows past len_q are dropped) instead of per-element atomics.
        offs_m = start_m + offs_m0
        m_valid = offs_m < len_q
        if USE_TMA:
            qT = tl.trans(q_ptr.load([start_m, 0]))
        else:
            qt_ptrs = q_ptr + offs_m[None, :] * stride_ql + offs_d[:, None]
            if MASKED:
                qT = tl.load(qt_ptrs, mask=m_valid[None, :] & d_valid[:, None], other=0.0)
            elif HEAD_DIM == BLOCK_D:
                qT = tl.load(qt_ptrs)
            else:
                qT = tl.load(qt_ptrs, mask=d_valid[:, None], other=0.0)
        if USE_TMA and not HAS_OIDX:
            do = do_ptr.load([start_m, 0])
        elif HAS_OIDX:  # dO in the plan's routed order
            orow, o_ok = _routed_rows(oidx_b, offs_m, m_valid, T_OUT)
            do = tl.load(do_ptr + orow[:, None] * stride_ol + offs_d[None, :], mask=o_ok[:, None] & d_valid[None, :],
                         other=0.0)
        else:
            do = _load_rows(do_ptr + offs_m[:, None] * stride_ol + offs_d[None, :], m_valid, d_valid, MASKED,
                            HEAD_DIM, BLOCK_D)
        if MASKED or USE_TMA:
            lse2 = tl.load(LSE + l_off + offs_m * stride_ll, mask=m_valid, other=0.0) * 1.4426950408889634
            delta = tl.load(DELTA + l_off + offs_m * stride_ll, mask=m_valid, other=0.0)
        else:
            lse2 = tl.load(LSE + l_off + offs_m * stride_ll) * 1.4426950408889634
            delta = tl.load(DELTA + l_off + offs_m * stride_ll)
        sT = _dot(k, qT, UPCAST, PREC) * qk_scale
        pT = tl.exp2(sT - lse2[None, :])
        # where() after exp2: rows with lse=-inf give inf there, but such rows have no visible key
        if MASKED:
            if USE_TMA:
                # rows past len_q (zero Q and dO rows from TMA, lse = delta = 0) and keys past len_k (zero K/V rows)
                # contribute exactly 0 to dK/dV (dQ rows past len_q are dropped): causality, spans and padding
                # only, no row/key validity predicates
                # kpos: key positions in query coordinates, padded keys moved past every query, and ks: span ids,
                # 0 on padded keys -- padding folded into [BLOCK_N] vectors, no third [BLOCK_N, BLOCK_M] predicate
                ok = kpos[:, None] <= offs_m[None, :]
                if BIDIR:
                    qs = tl.load(span_b + offs_m, mask=m_valid, other=0)  # 0 past len_q, as ks past len_k
                    qs = tl.where(qs != 0, qs, -1)  # a text query matches no key's span id (text keys have 0)
                    ok = ok | (ks[:, None] == qs[None, :])
            else:
                ok = (offs_n[:, None] <= (offset + offs_m)[None, :]) & n_valid[:, None] & m_valid[None, :]
                if BIDIR:
                    qs = tl.load(span_b + offs_m, mask=m_valid, other=0)
                    ok = ok | ((ks[:, None] == qs[None, :]) & (qs[None, :] != 0) & n_valid[:, None] &
                               m_valid[None, :])
            if HAS_KPM and not USE_TMA:
                ok = ok & kkeep[:, None]
            pT = tl.where(ok, pT, 0.0)
        elif HAS_KPM:
            pT = tl.where(kkeep[:, None], pT, 0.0)
        dv += _dot(pT.to(do.dtype), do, UPCAST, PREC)
        dpT = _dot(v, tl.trans(do), UPCAST, PREC)
        dsT = pT * (dpT - delta[None, :])
        dk += _dot(dsT.to(qT.dtype), tl.trans(qT), UPCAST, PREC)
        if FUSED_DQ:  # the 5th matmul: dQ += dS K for this (query tile, key tile), fp32 atomics (unscaled)
            dq = _dot(tl.trans(dsT.to(k.dtype)), k, UPCAST, PREC)
            if DQ_REDUCE:
                dq_ptr.atomic_add([start_m, 0], dq)
            else:
                tl.atomic_add(dq_ptr + offs_m[:, None] * stride_ql + offs_d[None, :], dq,
                              mask=m_valid[:, None] & d_valid[None, :])
        return dk, dv

    @triton.jit
    def _attn_fwd_kernel(
        Q, K, V, O, LSE, CU_Q, CU_K, KV_LO, KV_HI, KPM, SPAN, SPAN_END, OIDX,
        stride_qb, stride_qh, stride_ql, stride_kb, stride_kh, stride_kl, stride_vb, stride_vh, stride_vl,
        stride_ob, stride_oh, stride_ol, stride_lb, stride_lh, stride_ll, stride_mb, stride_sb, stride_ib,
        H, LQ, LK, T_OUT, qk_scale,
        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr, IS_VARLEN: tl.constexpr, HAS_KPM: tl.constexpr, BIDIR: tl.constexpr,
        UPCAST: tl.constexpr, PREC: tl.constexpr, HAS_OIDX: tl.constexpr, USE_TMA: tl.constexpr = False,
    ):
        # heavy (late, long-causal-range) query tiles first: better tail balance on the causal triangle
        pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
        b, h, q_start, len_q, k_start, len_k = _program_rows(tl.program_id(1), H, CU_Q, CU_K, LQ, LK, IS_VARLEN)
        kvh = h // GROUP
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
        q_ptr = Q + _row_offset(b, h, q_start, stride_qb, stride_qh, stride_ql)
        k_ptr = K + _row_offset(b, kvh, k_start, stride_kb, stride_kh, stride_kl)
        v_ptr = V + _row_offset(b, kvh, k_start, stride_vb, stride_vh, stride_vl)
        span_b = SPAN + b64 * stride_sb + q_start
        q = tl.load(q_ptr + offs_m[:, None] * stride_ql + offs_d[None, :],
                    mask=m_valid[:, None] & d_valid[None, :], other=0.0)
        qpos = offset + offs_m
        qs = offs_m * 0
        if BIDIR:
            qs = tl.load(span_b + offs_m, mask=m_valid, other=0)
        lo, hi = _key_range(b, start_m, len_q, len_k, offs_m, m_valid, KV_LO, KV_HI, SPAN_END + b64 * stride_sb + q_start,
                            HAS_KPM, BIDIR, BLOCK_M, BLOCK_N)
        if USE_TMA:  # sm_90: K/V tiles by the tensor memory accelerator (descriptors built on the device)
            k_ptr = tl.make_tensor_descriptor(k_ptr, shape=[len_k, HEAD_DIM], strides=[stride_kl, 1],
                                              block_shape=[BLOCK_N, BLOCK_D])
            v_ptr = tl.make_tensor_descriptor(v_ptr, shape=[len_k, HEAD_DIM], strides=[stride_vl, 1],
                                              block_shape=[BLOCK_N, BLOCK_D])

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        # keys in [lo, full_end) are causally visible to every row of the tile: no causal/span mask there
        full_end = _full_end(lo, hi, offset + start_m + 1, BLOCK_N)
        for start_n in range(lo, full_end, BLOCK_N):
            m_i, l_i, acc = _fwd_tile(q, m_i, l_i, acc, start_n, hi, offs_n0, offs_d, d_valid, offs_m, m_valid, qpos,
                                      qs, b, offset, k_ptr, v_ptr, stride_kl, stride_vl, KPM, stride_mb, span_b,
                                      qk_scale, False, HAS_KPM, BIDIR, UPCAST, PREC, HEAD_DIM, BLOCK_D, USE_TMA)
        for start_n in range(full_end, hi, BLOCK_N):
            m_i, l_i, acc = _fwd_tile(q, m_i, l_i, acc, start_n, hi, offs_n0, offs_d, d_valid, offs_m, m_valid, qpos,
                                      qs, b, offset, k_ptr, v_ptr, stride_kl, stride_vl, KPM, stride_mb, span_b,
                                      qk_scale, True, HAS_KPM, BIDIR, UPCAST, PREC, HEAD_DIM, BLOCK_D, USE_TMA)
        empty = l_i == 0.0
        l_safe = tl.where(empty, 1.0, l_i)
        out = acc / l_safe[:, None]
        lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)
        if HAS_OIDX:  # O straight in the plan's routed order [T_OUT, H*hd]
            orow, o_ok = _routed_rows(OIDX + b64 * stride_ib + q_start, offs_m, m_valid, T_OUT)
            tl.store(O + h.to(tl.int64) * stride_oh + orow[:, None] * stride_ol + offs_d[None, :],
                     out.to(O.dtype.element_ty), mask=o_ok[:, None] & d_valid[None, :])
        else:
            o_ptr = O + _row_offset(b, h, q_start, stride_ob, stride_oh, stride_ol)
            tl.store(o_ptr + offs_m[:, None] * stride_ol + offs_d[None, :], out.to(O.dtype.element_ty),
                     mask=m_valid[:, None] & d_valid[None, :])
        l_ptr = LSE + _row_offset(b, h, q_start, stride_lb, stride_lh, stride_ll)
        tl.store(l_ptr + offs_m * stride_ll, lse, mask=m_valid)

    @triton.jit
    def _attn_bwd_dq_kernel(
        Q, K, V, DO, DQ, LSE, DELTA, CU_Q, CU_K, KV_LO, KV_HI, KPM, SPAN, SPAN_END, OIDX,
        stride_qb, stride_qh, stride_ql, stride_kb, stride_kh, stride_kl, stride_vb, stride_vh, stride_vl,
        stride_ob, stride_oh, stride_ol, stride_lb, stride_lh, stride_ll, stride_mb, stride_sb, stride_ib,
        H, LQ, LK, T_OUT, qk_scale, sm_scale,
        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr, IS_VARLEN: tl.constexpr, HAS_KPM: tl.constexpr, BIDIR: tl.constexpr,
        UPCAST: tl.constexpr, PREC: tl.constexpr, HAS_OIDX: tl.constexpr,
    ):
        # DQ is written with Q's strides, DO read with stride_o* (routed rows when HAS_OIDX); LSE and DELTA share
        # stride_l*.
        pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
        b, h, q_start, len_q, k_start, len_k = _program_rows(tl.program_id(1), H, CU_Q, CU_K, LQ, LK, IS_VARLEN)
        kvh = h // GROUP
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
        q_ptr = Q + _row_offset(b, h, q_start, stride_qb, stride_qh, stride_ql)
        k_ptr = K + _row_offset(b, kvh, k_start, stride_kb, stride_kh, stride_kl)
        v_ptr = V + _row_offset(b, kvh, k_start, stride_vb, stride_vh, stride_vl)
        l_off = _row_offset(b, h, q_start, stride_lb, stride_lh, stride_ll)
        span_b = SPAN + b64 * stride_sb + q_start
        q = tl.load(q_ptr + offs_m[:, None] * stride_ql + offs_d[None, :], mask=md_mask, other=0.0)
        if HAS_OIDX:
            orow, o_ok = _routed_rows(OIDX + b64 * stride_ib + q_start, offs_m, m_valid, T_OUT)
            do = tl.load(DO + h.to(tl.int64) * stride_oh + orow[:, None] * stride_ol + offs_d[None, :],
                         mask=o_ok[:, None] & d_valid[None, :], other=0.0)
        else:
            do = tl.load(DO + _row_offset(b, h, q_start, stride_ob, stride_oh, stride_ol) + offs_m[:, None] * stride_ol
                         + offs_d[None, :], mask=md_mask, other=0.0)
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
        dq_ptr = DQ + _row_offset(b, h, q_start, stride_qb, stride_qh, stride_ql)
        tl.store(dq_ptr + offs_m[:, None] * stride_ql + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=md_mask)

    @triton.jit
    def _attn_bwd_dkdv_kernel(
        Q, K, V, DO, DK, DV, DQ, LSE, DELTA, CU_Q, CU_K, KV_LO, KV_HI, KPM, SPAN, SPAN_START, OIDX,
        stride_qb, stride_qh, stride_ql, stride_kb, stride_kh, stride_kl, stride_vb, stride_vh, stride_vl,
        stride_ob, stride_oh, stride_ol, stride_lb, stride_lh, stride_ll, stride_mb, stride_sb, stride_ib,
        KVH, LQ, LK, T_OUT, qk_scale, sm_scale,
        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr, IS_VARLEN: tl.constexpr, HAS_KPM: tl.constexpr, BIDIR: tl.constexpr,
        UPCAST: tl.constexpr, PREC: tl.constexpr, HAS_OIDX: tl.constexpr, FUSED_DQ: tl.constexpr,
        USE_TMA: tl.constexpr = False, DQ_REDUCE: tl.constexpr = False,
    ):
        # DK/DV are written with K/V's strides, DO is read with stride_o*. FUSED_DQ: also dQ (fp32 [Q's strides],
        # zero-initialised, unscaled) by atomics -- the one-pass backward; else the dq kernel computes it.
        # USE_TMA (sm_90): K/V, Q and dO (unless routed) tiles through device-side tensor descriptors; DQ_REDUCE
        # (with USE_TMA and FUSED_DQ): dQ by TMA reductions (the launcher sets it on GPUs only: the Triton
        # interpreter has no descriptor reductions).
        pid_n = tl.program_id(0)
        b, kvh, q_start, len_q, k_start, len_k = _program_rows(tl.program_id(1), KVH, CU_Q, CU_K, LQ, LK, IS_VARLEN)
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
        k_off = _row_offset(b, kvh, k_start, stride_kb, stride_kh, stride_kl)
        v_off = _row_offset(b, kvh, k_start, stride_vb, stride_vh, stride_vl)
        if USE_TMA:
            k = tl.make_tensor_descriptor(K + k_off, shape=[len_k, HEAD_DIM], strides=[stride_kl, 1],
                                          block_shape=[BLOCK_N, BLOCK_D]).load([start_n, 0])
            v = tl.make_tensor_descriptor(V + v_off, shape=[len_k, HEAD_DIM], strides=[stride_vl, 1],
                                          block_shape=[BLOCK_N, BLOCK_D]).load([start_n, 0])
        else:
            k = tl.load(K + k_off + offs_n[:, None] * stride_kl + offs_d[None, :], mask=nd_mask, other=0.0)
            v = tl.load(V + v_off + offs_n[:, None] * stride_vl + offs_d[None, :], mask=nd_mask, other=0.0)
        span_b = SPAN + b64 * stride_sb + q_start
        # first query that can see a key of this tile: causal -> start_n - offset; bidirectional -> the start of
        # that query's image span (span_start is monotone, so the tile's first key gives the minimum)
        m_first = tl.maximum(start_n - offset, 0)
        if BIDIR:
            m_first = tl.load(SPAN_START + b64 * stride_sb + q_start + tl.maximum(tl.minimum(m_first, len_q - 1), 0))
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
        if USE_TMA:  # the ragged last query tile needs no row mask (see _dkdv_tile)
            m_b = m_hi
        else:
            m_b = tl.maximum(m_a, m_lo + ((m_hi - m_lo) // BLOCK_M) * BLOCK_M)
        kkeep = n_valid
        if HAS_KPM:
            kkeep = tl.load(KPM + b64 * stride_mb + offs_n, mask=n_valid, other=0) != 0
        ks = offs_n * 0
        if BIDIR:
            ks = tl.load(span_b + offs_n - offset, mask=n_valid & (offs_n >= offset), other=0)
        kpos = offs_n - offset
        if USE_TMA and HAS_KPM:  # see _dkdv_tile: padding folded into the key vectors
            kpos = tl.where(kkeep, kpos, 1 << 30)
            ks = tl.where(kkeep, ks, 0)
        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        oidx_b = OIDX + b64 * stride_ib + q_start
        for g in range(GROUP):  # the query heads sharing this kv head: summed here, no atomics
            h = (kvh * GROUP + g).to(tl.int64)
            q_ptr = Q + _row_offset(b, h, q_start, stride_qb, stride_qh, stride_ql)
            if HAS_OIDX:
                do_ptr = DO + h * stride_oh
            else:
                do_ptr = DO + _row_offset(b, h, q_start, stride_ob, stride_oh, stride_ol)
            l_off = _row_offset(b, h, q_start, stride_lb, stride_lh, stride_ll)
            dq_ptr = DQ + _row_offset(b, h, q_start, stride_qb, stride_qh, stride_ql)
            if USE_TMA:
                q_ptr = tl.make_tensor_descriptor(q_ptr, shape=[len_q, HEAD_DIM], strides=[stride_ql, 1],
                                                  block_shape=[BLOCK_M, BLOCK_D])
                if not HAS_OIDX:
                    do_ptr = tl.make_tensor_descriptor(do_ptr, shape=[len_q, HEAD_DIM], strides=[stride_ol, 1],
                                                       block_shape=[BLOCK_M, BLOCK_D])
                if DQ_REDUCE:
                    dq_ptr = tl.make_tensor_descriptor(dq_ptr, shape=[len_q, HEAD_DIM], strides=[stride_ql, 1],
                                                       block_shape=[BLOCK_M, BLOCK_D])
            # query tiles [m_a, m_b) are whole tiles whose every row sees every key of this tile causally: no
            # causal/span mask and no row masks there; the ragged ends run masked
            for start_m in range(m_lo, m_a, BLOCK_M):
                dk, dv = _dkdv_tile(dk, dv, k, v, kkeep, ks, kpos, start_m, offs_m0, offs_n, n_valid, offs_d, d_valid,
                                    len_q, offset, q_ptr, do_ptr, l_off, LSE, DELTA, stride_ql, stride_ol, stride_ll,
                                    span_b, qk_scale, oidx_b, T_OUT, dq_ptr, True, HAS_KPM, BIDIR, UPCAST, PREC,
                                    HEAD_DIM, BLOCK_D, HAS_OIDX, FUSED_DQ, USE_TMA, DQ_REDUCE)
            for start_m in range(m_a, m_b, BLOCK_M):
                dk, dv = _dkdv_tile(dk, dv, k, v, kkeep, ks, kpos, start_m, offs_m0, offs_n, n_valid, offs_d, d_valid,
                                    len_q, offset, q_ptr, do_ptr, l_off, LSE, DELTA, stride_ql, stride_ol, stride_ll,
                                    span_b, qk_scale, oidx_b, T_OUT, dq_ptr, False, HAS_KPM, BIDIR, UPCAST, PREC,
                                    HEAD_DIM, BLOCK_D, HAS_OIDX, FUSED_DQ, USE_TMA, DQ_REDUCE)
            if not USE_TMA:  # (TMA: the ragged last tile runs unmasked above, m_b == m_hi)
                for start_m in range(m_b, m_hi, BLOCK_M):
                    dk, dv = _dkdv_tile(dk, dv, k, v, kkeep, ks, kpos, start_m, offs_m0, offs_n, n_valid, offs_d,
                                        d_valid, len_q, offset, q_ptr, do_ptr, l_off, LSE, DELTA, stride_ql, stride_ol,
                                        stride_ll, span_b, qk_scale, oidx_b, T_OUT, dq_ptr, True, HAS_KPM, BIDIR,
                                        UPCAST, PREC, HEAD_DIM, BLOCK_D, HAS_OIDX, FUSED_DQ, USE_TMA, DQ_REDUCE)
        dk = dk * sm_scale
        tl.store(DK + k_off + offs_n[:, None] * stride_kl + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=nd_mask)
        tl.store(DV + v_off + offs_n[:, None] * stride_vl + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=nd_mask)

    @triton.jit
    def _attn_bwd_preprocess_kernel(
        O, DO, DLSE, DELTA, CU_Q, OIDX,
        stride_ob, stride_oh, stride_ol, stride_db, stride_dh, stride_dl, stride_lb, stride_lh, stride_ll, stride_ib,
        H, LQ, T_OUT,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, IS_VARLEN: tl.constexpr,
        HAS_DLSE: tl.constexpr, HAS_OIDX: tl.constexpr,
    ):
        """DELTA = rowsum(dO * O) - dlse in fp32 (lse layout), reading O and dO once each in their own dtype."""
        pid_m = tl.program_id(0)
        b, h, q_start, len_q, k_start, len_k = _program_rows(tl.program_id(1), H, CU_Q, CU_Q, LQ, LQ, IS_VARLEN)
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
        orows = rows
        omask = mask
        if HAS_OIDX:  # O and dO in the plan's routed order (the launcher passes batch strides 0)
            orows, o_ok = _routed_rows(OIDX + b64 * stride_ib + q_start, offs_m, m_valid, T_OUT)
            omask = o_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
        o = tl.load(O + b64 * stride_ob + h64 * stride_oh + orows[:, None] * stride_ol + offs_d[None, :], mask=omask,
                    other=0.0)
        do = tl.load(DO + b64 * stride_db + h64 * stride_dh + orows[:, None] * stride_dl + offs_d[None, :],
                     mask=omask, other=0.0)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
        l_ptrs = b64 * stride_lb + h64 * stride_lh + rows * stride_ll
        if HAS_DLSE:
            delta -= tl.load(DLSE + l_ptrs, mask=m_valid, other=0.0)
        tl.store(DELTA + l_ptrs, delta, mask=m_valid)


def aot_compile_specs() -> list:
    """The compile report discovers the module that owns the kernels; the specs are built in :mod:`.aot`."""
    from .aot import build_aot_specs

    return build_aot_specs()

"""Triton kernels of the routed linears: one persistent grouped GEMM with fused epilogues, and the weight gradient.

``EPI_*`` select the epilogue at compile time (constexpr ``EPILOGUE``). Nothing here allocates or launches; see
``launch.py``.
"""
from __future__ import annotations

from ..._triton_compat import HAS_TRITON, triton, tl

# Epilogue codes (compile-time constants of the same kernel).
EPI_LINEAR = 0       # out = acc (+ bias_e) (+ residual)
EPI_SWIGLU = 1       # out = silu(acc_gate) * acc_up (two accumulators from one X tile); SAVE_GU: out2 = [g | u]
EPI_SWIGLU_BWD = 2   # recompute g,u; out = dh*u*silu'(g), out2 = dh*silu(g)
EPI_QKV_ROPE = 3     # (+ bias_e), RoPE on q,k heads, store at sequence position perm[row] into [B, heads, L, hd]
EPI_DSWIGLU = 4      # acc = dh (down proj dX), g,u read from gu [T, 2N]; out = [dh*u*silu'(g) | dh*silu(g)] [T, 2N]


if HAS_TRITON:

    @triton.jit
    def _tile_coords(tile, offsets_ptr, num_n_tiles, BLOCK_M: tl.constexpr, GROUP_M: tl.constexpr):
        """Map a linear tile id onto (expert, first row, row end, n tile). Vision tiles come first; each expert's
        tiles start at its first row, so an expert boundary inside an M block is just a masked partial tile."""
        n_v = tl.load(offsets_ptr + 1)
        n_t = tl.load(offsets_ptr + 2)
        mt_v = tl.cdiv(n_v, BLOCK_M)
        mt_l = tl.cdiv(n_t - n_v, BLOCK_M)
        tiles_v = mt_v * num_n_tiles
        is_l = tile >= tiles_v
        local = tl.where(is_l, tile - tiles_v, tile)
        mt = tl.where(is_l, mt_l, mt_v)
        row0 = tl.where(is_l, n_v, 0)
        row_end = tl.where(is_l, n_t, n_v)
        # GROUP_M swizzle inside the expert: consecutive programs share W column blocks in L2.
        width = GROUP_M * num_n_tiles
        gid = local // width
        first_m = gid * GROUP_M
        gsz = tl.minimum(mt - first_m, GROUP_M)
        pid_m = first_m + (local % width) % gsz
        pid_n = (local % width) // gsz
        return is_l, row0 + pid_m * BLOCK_M, row_end, pid_n

    @triton.jit
    def _routed_gemm_kernel(
        x_ptr, wv_ptr, wl_ptr, w2v_ptr, w2l_ptr,          # w2*: up weights (SwiGLU), else any pointer
        bv_ptr, bl_ptr, res_ptr, out_ptr, out2_ptr, dh_ptr,
        offsets_ptr, perm_ptr, cos_ptr, sin_ptr, k_out_ptr, v_out_ptr,
        N, K, K1,
        stride_xm, stride_xk, stride_wn, stride_wk,
        stride_om, stride_rm, stride_dm,
        seq_len, num_heads, num_kv_heads, num_n_tiles, max_tiles,
        EPILOGUE: tl.constexpr, HAS_BIAS_V: tl.constexpr, HAS_BIAS_L: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
        UPCAST_DOT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
        SAVE_GU: tl.constexpr, SPLIT_K: tl.constexpr,
    ):
        """Persistent grouped GEMM: out[r, n] = sum_k x[r, k] * W_e[n, k] for rows r of expert e, + epilogue.

        W_e is addressed through (stride_wn, stride_wk), so the same kernel computes dX = dY W_e by passing the
        transposed weight view. The tile count (both experts) is read from the device offsets: no host sync.
        K1: the first loop's reduction length (K unless SPLIT_K). SPLIT_K (linear epilogue only): columns [K1, K) of
        x multiply the second weight pair w2* (SwiGLU dX = [dgate | dup] [Wg ; Wu]: one GEMM with K = 2I, two
        weight pointers, one accumulator). SAVE_GU (EPI_SWIGLU): also store the pre-activations into out2
        ([T, 2N], row stride stride_dm): gate in columns [0, N), up in [N, 2N).
        EPI_DSWIGLU: the tile is dh = dY W_down (never stored); dh_ptr is the saved gu = [g | u] ([T, 2N], row stride
        stride_dm) and out_ptr receives [dgate | dup] ([T, 2N], row stride stride_om).
        """
        pid = tl.program_id(0)
        nprog = tl.num_programs(0)
        n_v = tl.load(offsets_ptr + 1)
        n_t = tl.load(offsets_ptr + 2)
        total = (tl.cdiv(n_v, BLOCK_M) + tl.cdiv(n_t - n_v, BLOCK_M)) * num_n_tiles
        total = tl.minimum(total, max_tiles)
        offs_k = tl.arange(0, BLOCK_K)
        for tile in range(pid, total, nprog):
            is_l, row_start, row_end, pid_n = _tile_coords(tile, offsets_ptr, num_n_tiles, BLOCK_M, GROUP_M)
            rows = row_start + tl.arange(0, BLOCK_M)
            row_mask = rows < row_end
            rows64 = rows.to(tl.int64)
            if EPILOGUE == 3:
                # QKV: a tile covers BLOCK_N columns j of ONE head's first half (acc, x1) and the same columns
                # j + hd/2 of its second half (acc2, x2), the RoPE partners, so the rotation is elementwise.
                # pid_n = head * N_CHUNKS + chunk; BLOCK_N is a power of 2 (hd/2 = 40, 48: padded, masked).
                # The head being a per-tile scalar makes the q/k/v choice, the rotation and the destination row
                # scalars/row vectors, so the stores are contiguous (vectorized) rows; the old column-pair design
                # built per-element 64-bit addresses and selects, which spilled.
                HALF: tl.constexpr = HEAD_DIM // 2
                N_CHUNKS: tl.constexpr = (HALF + BLOCK_N - 1) // BLOCK_N
                head = pid_n // N_CHUNKS
                jj = (pid_n % N_CHUNKS) * BLOCK_N + tl.arange(0, BLOCK_N)
                if HALF % BLOCK_N == 0:
                    col_mask = tl.full([BLOCK_N], 1, tl.int1)
                else:
                    col_mask = jj < HALF
                cols = head * HEAD_DIM + jj
                cols2 = cols + HALF
            else:
                cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
                col_mask = cols < N
                cols2 = cols
            cols64 = cols.to(tl.int64)
            cols2_64 = cols2.to(tl.int64)
            w_base = tl.where(is_l, wl_ptr, wv_ptr)
            a_ptrs = x_ptr + rows64[:, None] * stride_xm + offs_k[None, :] * stride_xk
            b_ptrs = w_base + cols64[None, :] * stride_wn + offs_k[:, None] * stride_wk
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            if EPILOGUE == 1 or EPILOGUE == 2 or EPILOGUE == 3:
                if EPILOGUE == 3:
                    w2_base = w_base
                else:
                    w2_base = tl.where(is_l, w2l_ptr, w2v_ptr)
                b2_ptrs = w2_base + cols2_64[None, :] * stride_wn + offs_k[:, None] * stride_wk
                acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k0 in range(0, K1, BLOCK_K):
                k_mask = offs_k < K1 - k0
                a = tl.load(a_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
                b = tl.load(b_ptrs, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
                if UPCAST_DOT:  # interpreter: tl.dot on 16-bit operands is wrong there
                    a = a.to(tl.float32)
                    b = b.to(tl.float32)
                acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
                if EPILOGUE == 1 or EPILOGUE == 2 or EPILOGUE == 3:
                    b2 = tl.load(b2_ptrs, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
                    if UPCAST_DOT:
                        b2 = b2.to(tl.float32)
                    acc2 = tl.dot(a, b2, acc2, input_precision=INPUT_PRECISION)
                    b2_ptrs += BLOCK_K * stride_wk
                a_ptrs += BLOCK_K * stride_xk
                b_ptrs += BLOCK_K * stride_wk
            if SPLIT_K:  # second half of the reduction: x columns [K1, K) against the second weight pair
                w2_base = tl.where(is_l, w2l_ptr, w2v_ptr)
                a_ptrs = x_ptr + rows64[:, None] * stride_xm + (K1 + offs_k)[None, :] * stride_xk
                b_ptrs = w2_base + cols64[None, :] * stride_wn + offs_k[:, None] * stride_wk
                for k0 in range(K1, K, BLOCK_K):
                    k_mask = offs_k < K - k0
                    a = tl.load(a_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
                    b = tl.load(b_ptrs, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
                    if UPCAST_DOT:
                        a = a.to(tl.float32)
                        b = b.to(tl.float32)
                    acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
                    a_ptrs += BLOCK_K * stride_xk
                    b_ptrs += BLOCK_K * stride_wk

            out_mask = row_mask[:, None] & col_mask[None, :]
            if HAS_BIAS_V or HAS_BIAS_L:
                b_base = tl.where(is_l, bl_ptr, bv_ptr)
                # expert without bias: a zero column limit masks the load (block & scalar-bool masks trip the
                # interpreter, a scalar limit works everywhere)
                b_lim = N
                if not HAS_BIAS_V:
                    b_lim = tl.where(is_l, N, 0)
                if not HAS_BIAS_L:
                    b_lim = tl.where(is_l, 0, N)
                b_mask = col_mask & (cols < b_lim)
                bias = tl.load(b_base + cols, mask=b_mask, other=0.0)
                acc += bias.to(tl.float32)[None, :]
                if EPILOGUE == 3:
                    bias2 = tl.load(b_base + cols2, mask=b_mask, other=0.0)
                    acc2 += bias2.to(tl.float32)[None, :]
            if EPILOGUE == 0:
                if HAS_RESIDUAL:
                    r = tl.load(res_ptr + rows64[:, None] * stride_rm + cols64[None, :], mask=out_mask, other=0.0)
                    acc += r.to(tl.float32)
                tl.store(out_ptr + rows64[:, None] * stride_om + cols64[None, :],
                         acc.to(out_ptr.dtype.element_ty), mask=out_mask)
            elif EPILOGUE == 1:
                sig = 1.0 / (1.0 + tl.exp(-acc))
                h = acc * sig * acc2
                tl.store(out_ptr + rows64[:, None] * stride_om + cols64[None, :],
                         h.to(out_ptr.dtype.element_ty), mask=out_mask)
                if SAVE_GU:  # pre-activations for the backward (no GEMM recompute there)
                    gu_ptrs = out2_ptr + rows64[:, None] * stride_dm + cols64[None, :]
                    tl.store(gu_ptrs, acc.to(out2_ptr.dtype.element_ty), mask=out_mask)
                    tl.store(gu_ptrs + N, acc2.to(out2_ptr.dtype.element_ty), mask=out_mask)
            elif EPILOGUE == 2:
                # d/dg [g*sig(g)*u] = u*sig*(1 + g*(1-sig));  d/du = g*sig
                dh = tl.load(dh_ptr + rows64[:, None] * stride_dm + cols64[None, :], mask=out_mask,
                             other=0.0).to(tl.float32)
                sig = 1.0 / (1.0 + tl.exp(-acc))
                dg = dh * acc2 * sig * (1.0 + acc * (1.0 - sig))
                du = dh * acc * sig
                tl.store(out_ptr + rows64[:, None] * stride_om + cols64[None, :],
                         dg.to(out_ptr.dtype.element_ty), mask=out_mask)
                tl.store(out2_ptr + rows64[:, None] * stride_om + cols64[None, :],
                         du.to(out2_ptr.dtype.element_ty), mask=out_mask)
            elif EPILOGUE == 4:
                # SwiGLU backward fused into the down projection's dX: acc is dh, which never goes to memory
                gu_ptrs = dh_ptr + rows64[:, None] * stride_dm + cols64[None, :]
                g = tl.load(gu_ptrs, mask=out_mask, other=0.0).to(tl.float32)
                u = tl.load(gu_ptrs + N, mask=out_mask, other=0.0).to(tl.float32)
                sig = 1.0 / (1.0 + tl.exp(-g))
                o_ptrs = out_ptr + rows64[:, None] * stride_om + cols64[None, :]
                dg = acc * u * sig * (1.0 + g * (1.0 - sig))
                tl.store(o_ptrs, dg.to(out_ptr.dtype.element_ty), mask=out_mask)
                tl.store(o_ptrs + N, (acc * g * sig).to(out_ptr.dtype.element_ty), mask=out_mask)
            else:
                # QKV epilogue (tile = part of head `head`). cos/sin come from an fp32 [T, hd/2] table (torch, HF's
                # numerics): tl.cos/tl.sin would inline libdevice's Payne-Hanek slow path per element (a 28-byte
                # local array and hundreds of instructions).
                o1 = acc
                o2 = acc2
                if head < num_heads + num_kv_heads:                   # q and k heads rotate, v passes through
                    cs_off = rows64[:, None] * HALF + jj[None, :]
                    c = tl.load(cos_ptr + cs_off, mask=out_mask, other=1.0)
                    s = tl.load(sin_ptr + cs_off, mask=out_mask, other=0.0)
                    o1 = acc * c - acc2 * s
                    o2 = acc2 * c + acc * s
                p = tl.load(perm_ptr + rows, mask=row_mask, other=0).to(tl.int64)
                bb = p // seq_len
                ll = p % seq_len
                is_q = head < num_heads
                is_k = (head >= num_heads) & (head < num_heads + num_kv_heads)
                nh = tl.where(is_q, num_heads, num_kv_heads).to(tl.int64)
                h_loc = tl.where(is_q, head, tl.where(is_k, head - num_heads, head - num_heads - num_kv_heads))
                o_base = tl.where(is_q, out_ptr, tl.where(is_k, k_out_ptr, v_out_ptr))
                # row i lands at sequence position perm[i] = b*L + l of [B, heads, L, hd]
                row_off = ((bb * nh + h_loc.to(tl.int64)) * seq_len + ll) * HEAD_DIM
                o_ptrs = o_base + row_off[:, None] + jj[None, :]
                tl.store(o_ptrs, o1.to(out_ptr.dtype.element_ty), mask=out_mask)
                tl.store(o_ptrs + HALF, o2.to(out_ptr.dtype.element_ty), mask=out_mask)

    @triton.jit
    def _routed_wgrad_kernel(
        dy_ptr, x_ptr, dwv_ptr, dwl_ptr, dbv_ptr, dbl_ptr, offsets_ptr,
        N, K, stride_dym, stride_xm,
        HAS_DW: tl.constexpr, HAS_DB_V: tl.constexpr, HAS_DB_L: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        UPCAST_DOT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    ):
        """dW_e[n, k] = sum over expert-e rows r of dY[r, n] * X[r, k]; db_e[n] = sum_r dY[r, n].

        One program owns one (expert, N tile, K tile) block and reduces the expert's rows in a fixed order with an
        fp32 accumulator: deterministic, no atomics. dbias is produced by the K-tile-0 programs.
        """
        pid = tl.program_id(0)
        num_k_tiles = tl.cdiv(K, BLOCK_K)
        num_n_tiles = tl.cdiv(N, BLOCK_N)
        per_e = num_n_tiles * num_k_tiles
        e = pid // per_e
        rem = pid % per_e
        pid_n = rem // num_k_tiles
        pid_k = rem % num_k_tiles
        is_l = e == 1
        row_start = tl.where(is_l, tl.load(offsets_ptr + 1), 0)
        row_end = tl.where(is_l, tl.load(offsets_ptr + 2), tl.load(offsets_ptr + 1))
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        col_mask = cols < N
        k_mask = ks < K
        offs_m = tl.arange(0, BLOCK_M)
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        dbias = tl.zeros((BLOCK_N,), dtype=tl.float32)
        want_db = pid_k == 0
        if not HAS_DB_V:
            want_db = want_db & is_l
        if not HAS_DB_L:
            want_db = want_db & (is_l == 0)
        for m0 in range(row_start, row_end, BLOCK_M):
            rows = (m0 + offs_m).to(tl.int64)
            rmask = (m0 + offs_m) < row_end
            dy = tl.load(dy_ptr + rows[:, None] * stride_dym + cols[None, :], mask=rmask[:, None] & col_mask[None, :],
                         other=0.0)
            if HAS_DW:
                xx = tl.load(x_ptr + rows[:, None] * stride_xm + ks[None, :], mask=rmask[:, None] & k_mask[None, :],
                             other=0.0)
                dyt = tl.trans(dy)
                if UPCAST_DOT:
                    dyt = dyt.to(tl.float32)
                    xx = xx.to(tl.float32)
                acc = tl.dot(dyt, xx, acc, input_precision=INPUT_PRECISION)
            if HAS_DB_V or HAS_DB_L:
                if want_db:
                    dbias += tl.sum(dy.to(tl.float32), axis=0)
        if HAS_DW:
            dw_base = tl.where(is_l, dwl_ptr, dwv_ptr)
            offs = cols.to(tl.int64)[:, None] * K + ks[None, :]
            tl.store(dw_base + offs, acc.to(dw_base.dtype.element_ty), mask=col_mask[:, None] & k_mask[None, :])
        if HAS_DB_V or HAS_DB_L:
            db_base = tl.where(is_l, dbl_ptr, dbv_ptr)
            tl.store(db_base + cols, dbias.to(db_base.dtype.element_ty), mask=cols < tl.where(want_db, N, 0))

    @triton.jit
    def _swiglu_bwd_elementwise_kernel(
        gu_ptr, dh_ptr, dgu_ptr,
        T, I,
        stride_gm, stride_hm, stride_om,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        """From the saved pre-activations gu = [g | u] ([T, 2I]) and dh ([T, I]): dgu = [dh*u*silu'(g) | dh*silu(g)]
        (fp32 math, one pass). silu'(g) = sig(g) * (1 + g * (1 - sig(g)))."""
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = (rows < T)[:, None] & (cols < I)[None, :]
        g_ptrs = gu_ptr + rows[:, None] * stride_gm + cols[None, :]
        g = tl.load(g_ptrs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(g_ptrs + I, mask=mask, other=0.0).to(tl.float32)
        dh = tl.load(dh_ptr + rows[:, None] * stride_hm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        sig = 1.0 / (1.0 + tl.exp(-g))
        o_ptrs = dgu_ptr + rows[:, None] * stride_om + cols[None, :]
        tl.store(o_ptrs, (dh * u * sig * (1.0 + g * (1.0 - sig))).to(dgu_ptr.dtype.element_ty), mask=mask)
        tl.store(o_ptrs + I, (dh * g * sig).to(dgu_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _qkv_bwd_gather_kernel(
        dq_ptr, dk_ptr, dv_ptr, perm_ptr, cos_ptr, sin_ptr, out_ptr,
        T, seq_len, num_heads, num_kv_heads, stride_om,
        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr,
    ):
        """QKV backward glue in one pass: out[i, head*hd:(head+1)*hd] = R(-angle_i) d{q,k,v}[b, h, l, :] for routed
        row i at sequence position perm[i] = b*L + l (v heads are copied). The inverse of the forward epilogue's
        store + rotation (RoPE is orthogonal: its adjoint is the rotation by -angle), with the same cos/sin table.
        Grid: (row blocks, H + 2*KV heads); d{q,k,v} are contiguous [B, heads, L, hd]."""
        pid_m = tl.program_id(0)
        head = tl.program_id(1)
        HALF: tl.constexpr = HEAD_DIM // 2
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = rows < T
        rows64 = rows.to(tl.int64)
        jj = tl.arange(0, BLOCK_H)
        mask = row_mask[:, None] & (jj < HALF)[None, :]
        p = tl.load(perm_ptr + rows, mask=row_mask, other=0).to(tl.int64)
        bb = p // seq_len
        ll = p % seq_len
        is_q = head < num_heads
        is_k = (head >= num_heads) & (head < num_heads + num_kv_heads)
        nh = tl.where(is_q, num_heads, num_kv_heads).to(tl.int64)
        h_loc = tl.where(is_q, head, tl.where(is_k, head - num_heads, head - num_heads - num_kv_heads))
        src = tl.where(is_q, dq_ptr, tl.where(is_k, dk_ptr, dv_ptr))
        s_ptrs = src + (((bb * nh + h_loc.to(tl.int64)) * seq_len + ll) * HEAD_DIM)[:, None] + jj[None, :]
        x1 = tl.load(s_ptrs, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(s_ptrs + HALF, mask=mask, other=0.0).to(tl.float32)
        o1 = x1
        o2 = x2
        if head < num_heads + num_kv_heads:
            cs_off = rows64[:, None] * HALF + jj[None, :]
            c = tl.load(cos_ptr + cs_off, mask=mask, other=1.0)
            s = tl.load(sin_ptr + cs_off, mask=mask, other=0.0)
            o1 = x1 * c + x2 * s
            o2 = x2 * c - x1 * s
        o_ptrs = out_ptr + rows64[:, None] * stride_om + head * HEAD_DIM + jj[None, :]
        tl.store(o_ptrs, o1.to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(o_ptrs + HALF, o2.to(out_ptr.dtype.element_ty), mask=mask)

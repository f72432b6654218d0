"""sm_90 grouped-GEMM kernels: device-side TMA descriptors per expert, persistent tile loops (``@triton.jit`` only).

Rows are in routed order: expert 0 (vision) owns rows [0, n_v), expert 1 (language) rows [n_v, T); ``offsets_ptr``
points at the int32 device triple (0, n_v, T), read inside the kernel (no host sync).

Every operand that is row-indexed gets one descriptor per expert, based at the expert's first row with the expert's
row count as its outer shape: TMA zero-fills loads past the expert's last row and clips stores there, so the kernels
carry no row masks and never write across the expert boundary. Each expert's tiles are one persistent pass
(``tl.range(start, tiles, NUM_PROGS, flatten=FLATTEN, warp_specialize=WARP_SPEC)``); the second pass continues the
first one's round-robin (global tile g -> program g % NUM_PROGS), so the grid stays busy across the boundary.
"""
from __future__ import annotations

from ..._triton_compat import HAS_TRITON, tl, triton

if HAS_TRITON:

    @triton.jit
    def _grouped_tile(local, tiles_m, tiles_n, GROUP_M: tl.constexpr):
        """Expert-local tile id -> (pid_m, pid_n), GROUP_M row blocks at a time (neighbours share W tiles in L2)."""
        width = GROUP_M * tiles_n
        first_m = (local // width) * GROUP_M
        gsz = tl.minimum(tiles_m - first_m, GROUP_M)
        pid_m = first_m + (local % width) % gsz
        pid_n = (local % width) // gsz
        return pid_m, pid_n

    @triton.jit
    def _pass_start(pid, tiles_before, NUM_PROGS):
        """First expert-local tile of this program in a pass that starts at global tile ``tiles_before``."""
        return ((pid - tiles_before) % NUM_PROGS + NUM_PROGS) % NUM_PROGS

    @triton.jit
    def _store_tile(acc, y_desc, res_desc, off_m, off_n,
                    HAS_RESIDUAL: tl.constexpr, EPI_SPLIT: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr):
        """(+ residual) and TMA-store a [BLOCK_M, BLOCK_N] fp32 tile, in EPI_SPLIT column subtiles."""
        if EPI_SPLIT == 2:
            halves = tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1))
            a0, a1 = tl.split(halves)
            if HAS_RESIDUAL:
                a0 += res_desc.load([off_m, off_n]).to(tl.float32)
            y_desc.store([off_m, off_n], a0.to(y_desc.dtype))
            if HAS_RESIDUAL:
                a1 += res_desc.load([off_m, off_n + BLOCK_N // 2]).to(tl.float32)
            y_desc.store([off_m, off_n + BLOCK_N // 2], a1.to(y_desc.dtype))
        else:
            if HAS_RESIDUAL:
                acc += res_desc.load([off_m, off_n]).to(tl.float32)
            y_desc.store([off_m, off_n], acc.to(y_desc.dtype))

    @triton.jit
    def _dswiglu_subtile(dh, g_desc, u_desc, dg_desc, du_desc, off_m, off_n):
        """SwiGLU backward of one [BLOCK_M, SUB_N] subtile: dh (fp32, from the accumulator) and the saved g, u
        (TMA loads) -> dgate = dh*u*silu'(g), dup = dh*silu(g) (TMA stores; clipped at the expert's rows and I)."""
        g = g_desc.load([off_m, off_n]).to(tl.float32)
        u = u_desc.load([off_m, off_n]).to(tl.float32)
        sig = tl.sigmoid(g)
        dg_desc.store([off_m, off_n], (dh * u * sig * (1.0 + g * (1.0 - sig))).to(dg_desc.dtype))
        du_desc.store([off_m, off_n], (dh * g * sig).to(du_desc.dtype))

    @triton.jit
    def _dswiglu_tile(acc, g_desc, u_desc, dg_desc, du_desc, off_m, off_n,
                      EPI_SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        if EPI_SPLIT == 2:
            a0, a1 = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))
            _dswiglu_subtile(a0, g_desc, u_desc, dg_desc, du_desc, off_m, off_n)
            _dswiglu_subtile(a1, g_desc, u_desc, dg_desc, du_desc, off_m, off_n + BLOCK_N // 2)
        else:
            _dswiglu_subtile(acc, g_desc, u_desc, dg_desc, du_desc, off_m, off_n)

    @triton.jit
    def _gemm_pass(x_ptr, w_ptr, b_ptr, res_ptr, y_ptr,
                   rows, start, C, R, stride_xm, stride_rm, stride_ym, NUM_PROGS,
                   B_KMAJOR: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                   EPI_SPLIT: tl.constexpr, FLATTEN: tl.constexpr, WARP_SPEC: tl.constexpr,
                   UPCAST_DOT: tl.constexpr, DSWIGLU: tl.constexpr):
        """All tiles of one expert: y[i, :] = x[i, :] @ B (+ bias) (+ residual), i < rows; x_ptr, res_ptr and
        y_ptr point at the expert's first row.

        DSWIGLU (dX of the down projection, B_KMAJOR=False, no bias/residual): the tile is dh; res_ptr is the saved
        gu = [g | u] ([rows, 2C], row stride stride_rm) and y_ptr receives [dgate | dup] ([rows, 2C], stride_ym).
        g / u / dgate / dup each get a descriptor of width C (based at column 0 or C), so a partial column tile is
        clipped at C and never reads or writes the other half."""
        x_desc = tl.make_tensor_descriptor(x_ptr, shape=[rows, R], strides=[stride_xm, 1],
                                           block_shape=[BLOCK_M, BLOCK_K])
        if B_KMAJOR:  # forward: B = W^T, W stored [C, R] (nn.Linear layout)
            w_desc = tl.make_tensor_descriptor(w_ptr, shape=[C, R], strides=[R, 1], block_shape=[BLOCK_N, BLOCK_K])
        else:         # dX: B = W, stored [R, C]
            w_desc = tl.make_tensor_descriptor(w_ptr, shape=[R, C], strides=[C, 1], block_shape=[BLOCK_K, BLOCK_N])
        y_desc = tl.make_tensor_descriptor(y_ptr, shape=[rows, C], strides=[stride_ym, 1],
                                           block_shape=[BLOCK_M, BLOCK_N // EPI_SPLIT])
        res_desc = y_desc
        if HAS_RESIDUAL:
            res_desc = tl.make_tensor_descriptor(res_ptr, shape=[rows, C],
                                                 strides=[stride_rm, 1], block_shape=[BLOCK_M, BLOCK_N // EPI_SPLIT])
        g_desc = y_desc
        u_desc = y_desc
        du_desc = y_desc
        if DSWIGLU:
            g_desc = tl.make_tensor_descriptor(res_ptr, shape=[rows, C], strides=[stride_rm, 1],
                                               block_shape=[BLOCK_M, BLOCK_N // EPI_SPLIT])
            u_desc = tl.make_tensor_descriptor(res_ptr + C, shape=[rows, C], strides=[stride_rm, 1],
                                               block_shape=[BLOCK_M, BLOCK_N // EPI_SPLIT])
            du_desc = tl.make_tensor_descriptor(y_ptr + C, shape=[rows, C], strides=[stride_ym, 1],
                                                block_shape=[BLOCK_M, BLOCK_N // EPI_SPLIT])
        tiles_m = tl.cdiv(rows, BLOCK_M)
        tiles_n = tl.cdiv(C, BLOCK_N)
        tiles = tiles_m * tiles_n
        k_steps = tl.cdiv(R, BLOCK_K)
        # separate epilogue counter (as Triton's persistent tutorial): the epilogue does not depend on the
        # prologue's induction variable, which keeps the flattened loop pipelinable
        tile_c = start - NUM_PROGS
        for tile in tl.range(start, tiles, NUM_PROGS, flatten=FLATTEN, warp_specialize=WARP_SPEC):
            pid_m, pid_n = _grouped_tile(tile, tiles_m, tiles_n, GROUP_M)
            off_m = pid_m * BLOCK_M
            off_n = pid_n * BLOCK_N
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for ks in range(k_steps):
                off_k = ks * BLOCK_K
                a = x_desc.load([off_m, off_k])                       # [BM, BK]
                if B_KMAJOR:
                    b = w_desc.load([off_n, off_k]).T                 # [BK, BN]
                else:
                    b = w_desc.load([off_k, off_n])                   # [BK, BN]
                if UPCAST_DOT:  # interpreter: tl.dot on 16-bit operands multiplies raw bits there
                    a = a.to(tl.float32)
                    b = b.to(tl.float32)
                acc = tl.dot(a, b, acc)
            tile_c += NUM_PROGS
            pid_m, pid_n = _grouped_tile(tile_c, tiles_m, tiles_n, GROUP_M)
            off_m = pid_m * BLOCK_M
            off_n = pid_n * BLOCK_N
            if DSWIGLU:
                _dswiglu_tile(acc, g_desc, u_desc, y_desc, du_desc, off_m, off_n, EPI_SPLIT, BLOCK_M, BLOCK_N)
            else:
                if HAS_BIAS:
                    cols = off_n + tl.arange(0, BLOCK_N)
                    acc += tl.load(b_ptr + cols, mask=cols < C, other=0.0).to(tl.float32)[None, :]
                _store_tile(acc, y_desc, res_desc, off_m, off_n, HAS_RESIDUAL, EPI_SPLIT, BLOCK_M, BLOCK_N)

    @triton.jit
    def _grouped_gemm_sm90_kernel(
        x_ptr, wv_ptr, wl_ptr, bv_ptr, bl_ptr, res_ptr, y_ptr, offsets_ptr,
        C, R, stride_xm, stride_rm, stride_ym, NUM_PROGS,
        B_KMAJOR: tl.constexpr, HAS_BIAS_V: tl.constexpr, HAS_BIAS_L: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
        EPI_SPLIT: tl.constexpr, FLATTEN: tl.constexpr, WARP_SPEC: tl.constexpr, UPCAST_DOT: tl.constexpr,
    ):
        """y[T, C] = x[T, R] @ B_e (+ bias_e) (+ residual); B_e = W_e^T (B_KMAJOR, forward, W_e [C, R]) or W_e
        (dX, W_e [R, C]). Persistent: NUM_PROGS programs walk the vision tiles, then the language tiles."""
        pid = tl.program_id(0)
        n_v = tl.load(offsets_ptr + 1)
        n_t = tl.load(offsets_ptr + 2)
        tiles_n = tl.cdiv(C, BLOCK_N)
        tiles_v = tl.cdiv(n_v, BLOCK_M) * tiles_n
        _gemm_pass(x_ptr, wv_ptr, bv_ptr, res_ptr, y_ptr, n_v, pid, C, R, stride_xm, stride_rm, stride_ym,
                   NUM_PROGS, B_KMAJOR, HAS_BIAS_V, HAS_RESIDUAL, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, EPI_SPLIT,
                   FLATTEN, WARP_SPEC, UPCAST_DOT, False)
        r0 = n_v.to(tl.int64)  # language rows start here (64-bit: T * K may pass 2**31)
        _gemm_pass(x_ptr + r0 * stride_xm, wl_ptr, bl_ptr, res_ptr + r0 * stride_rm, y_ptr + r0 * stride_ym,
                   n_t - n_v, _pass_start(pid, tiles_v, NUM_PROGS),
                   C, R, stride_xm, stride_rm, stride_ym, NUM_PROGS, B_KMAJOR, HAS_BIAS_L, HAS_RESIDUAL,
                   BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, EPI_SPLIT, FLATTEN, WARP_SPEC, UPCAST_DOT, False)

    @triton.jit
    def _grouped_dx_dswiglu_sm90_kernel(
        dy_ptr, wv_ptr, wl_ptr, gu_ptr, dgu_ptr, offsets_ptr,
        I, D, stride_dym, stride_gm, stride_om, NUM_PROGS,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
        EPI_SPLIT: tl.constexpr, FLATTEN: tl.constexpr, WARP_SPEC: tl.constexpr, UPCAST_DOT: tl.constexpr,
    ):
        """Down projection's dX with the SwiGLU backward epilogue: dh = dy_e W_down_e (W_down_e [D, I], the tile
        stays in registers), dgu[T, 2I] = [dh*u*silu'(g) | dh*silu(g)] from gu[T, 2I] = [g | u]. Vision pass,
        then language."""
        pid = tl.program_id(0)
        n_v = tl.load(offsets_ptr + 1)
        n_t = tl.load(offsets_ptr + 2)
        tiles_v = tl.cdiv(n_v, BLOCK_M) * tl.cdiv(I, BLOCK_N)
        _gemm_pass(dy_ptr, wv_ptr, dgu_ptr, gu_ptr, dgu_ptr, n_v, pid, I, D, stride_dym, stride_gm, stride_om,
                   NUM_PROGS, False, False, False, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, EPI_SPLIT, FLATTEN, WARP_SPEC,
                   UPCAST_DOT, True)
        r0 = n_v.to(tl.int64)
        _gemm_pass(dy_ptr + r0 * stride_dym, wl_ptr, dgu_ptr, gu_ptr + r0 * stride_gm, dgu_ptr + r0 * stride_om,
                   n_t - n_v, _pass_start(pid, tiles_v, NUM_PROGS), I, D, stride_dym, stride_gm, stride_om,
                   NUM_PROGS, False, False, False, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, EPI_SPLIT, FLATTEN, WARP_SPEC,
                   UPCAST_DOT, True)

    @triton.jit
    def _wgrad_pass(dy_ptr, x_ptr, dw_ptr, db_ptr, rows, start, N, K, stride_dym, stride_xm, NUM_PROGS,
                    HAS_DB: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                    EPI_SPLIT: tl.constexpr, FLATTEN: tl.constexpr, WARP_SPEC: tl.constexpr,
                    UPCAST_DOT: tl.constexpr):
        """All [BLOCK_N, BLOCK_K] tiles of one expert's dW = dY_e^T X_e; each tile reduces the expert's rows in
        order (fp32 accumulator, no atomics: deterministic). Zero rows -> zero tiles. dy_ptr and x_ptr point at
        the expert's first row. HAS_DB: the tiles with pid_k == 0 also sum the dY tiles they load over the rows
        (fp32, same fixed order) into db[N] (each bias column summed by exactly one program: deterministic)."""
        dy_desc = tl.make_tensor_descriptor(dy_ptr, shape=[rows, N], strides=[stride_dym, 1],
                                            block_shape=[BLOCK_M, BLOCK_N])
        x_desc = tl.make_tensor_descriptor(x_ptr, shape=[rows, K], strides=[stride_xm, 1],
                                           block_shape=[BLOCK_M, BLOCK_K])
        dw_desc = tl.make_tensor_descriptor(dw_ptr, shape=[N, K], strides=[K, 1],
                                            block_shape=[BLOCK_N, BLOCK_K // EPI_SPLIT])
        tiles_n = tl.cdiv(N, BLOCK_N)
        tiles_k = tl.cdiv(K, BLOCK_K)
        tiles = tiles_n * tiles_k
        m_steps = tl.cdiv(rows, BLOCK_M)
        tile_c = start - NUM_PROGS
        # HAS_DB: no loop flattening. Triton 3.6's TritonGPUFuseNestedLoops fails on the conditional column sum
        # ("scf.if ... source has 3 operands, but target successor needs 4"); a dW tile reduces over all of its
        # expert's rows (~T / 2 / BLOCK_M steps), so its un-overlapped epilogue is a small part of the tile. (Nor is
        # a HAS_DB kernel warp-specialised by Triton 3.6 / 3.9: the launcher passes WARP_SPEC=False with it.)
        FLAT: tl.constexpr = FLATTEN and not HAS_DB
        for tile in tl.range(start, tiles, NUM_PROGS, flatten=FLAT, warp_specialize=WARP_SPEC):
            pid_n, pid_k = _grouped_tile(tile, tiles_n, tiles_k, GROUP_M)
            off_n = pid_n * BLOCK_N
            off_k = pid_k * BLOCK_K
            acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
            db = tl.zeros((BLOCK_N,), dtype=tl.float32)
            for ms in range(m_steps):
                off_m = ms * BLOCK_M
                gt = dy_desc.load([off_m, off_n])                     # [BM, BN]; zero past the expert's rows
                g = gt.T                                              # [BN, BM]
                xx = x_desc.load([off_m, off_k])                      # [BM, BK]
                if UPCAST_DOT:
                    g = g.to(tl.float32)
                    xx = xx.to(tl.float32)
                acc = tl.dot(g, xx, acc)
                if HAS_DB:
                    if pid_k == 0:
                        db += tl.sum(gt.to(tl.float32), axis=0)
            tile_c += NUM_PROGS
            pid_n, pid_k = _grouped_tile(tile_c, tiles_n, tiles_k, GROUP_M)
            _store_tile(acc, dw_desc, dw_desc, pid_n * BLOCK_N, pid_k * BLOCK_K, False, EPI_SPLIT, BLOCK_N,
                        BLOCK_K)
            if HAS_DB:
                if pid_k == 0:
                    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
                    tl.store(db_ptr + cols, db.to(db_ptr.dtype.element_ty), mask=cols < N)

    @triton.jit
    def _grouped_wgrad_sm90_kernel(
        dy_ptr, x_ptr, dwv_ptr, dwl_ptr, dbv_ptr, dbl_ptr, offsets_ptr,
        N, K, stride_dym, stride_xm, NUM_PROGS,
        HAS_DB: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
        EPI_SPLIT: tl.constexpr, FLATTEN: tl.constexpr, WARP_SPEC: tl.constexpr, UPCAST_DOT: tl.constexpr,
    ):
        """dW_e[N, K] = dY_e^T X_e for both experts (HAS_DB: and db_e[N] = sum over e's rows of dY, into dbv /
        dbl). Both experts have the same tile count; a tile costs its expert's row count, so the expert with more
        rows goes first and the cheap tiles of the other fill the programs that drew one expensive tile fewer
        (longest-processing-time-first on the static round-robin)."""
        pid = tl.program_id(0)
        n_v = tl.load(offsets_ptr + 1)
        n_t = tl.load(offsets_ptr + 2)
        n_l = n_t - n_v
        l_first = n_l > n_v
        tiles = tl.cdiv(N, BLOCK_N) * tl.cdiv(K, BLOCK_K)
        # first pass: the bigger expert
        row0_a = tl.where(l_first, n_v, 0).to(tl.int64)
        rows_a = tl.where(l_first, n_l, n_v)
        dw_a = tl.where(l_first, dwl_ptr, dwv_ptr)
        db_a = tl.where(l_first, dbl_ptr, dbv_ptr)
        _wgrad_pass(dy_ptr + row0_a * stride_dym, x_ptr + row0_a * stride_xm, dw_a, db_a, rows_a, pid, N, K,
                    stride_dym, stride_xm, NUM_PROGS, HAS_DB, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, EPI_SPLIT, FLATTEN,
                    WARP_SPEC, UPCAST_DOT)
        row0_b = tl.where(l_first, 0, n_v).to(tl.int64)
        rows_b = tl.where(l_first, n_v, n_l)
        dw_b = tl.where(l_first, dwv_ptr, dwl_ptr)
        db_b = tl.where(l_first, dbv_ptr, dbl_ptr)
        _wgrad_pass(dy_ptr + row0_b * stride_dym, x_ptr + row0_b * stride_xm, dw_b, db_b, rows_b,
                    _pass_start(pid, tiles, NUM_PROGS), N, K, stride_dym, stride_xm, NUM_PROGS, HAS_DB, BLOCK_M,
                    BLOCK_N, BLOCK_K, GROUP_M, EPI_SPLIT, FLATTEN, WARP_SPEC, UPCAST_DOT)

    @triton.jit
    def _swiglu_store(g, u, h_desc, g_desc, u_desc, off_m, off_n):
        """h = silu(g) * u from the fp32 accumulators; g and u are saved too (for the backward)."""
        h = g * tl.sigmoid(g) * u
        h_desc.store([off_m, off_n], h.to(h_desc.dtype))
        g_desc.store([off_m, off_n], g.to(g_desc.dtype))
        u_desc.store([off_m, off_n], u.to(u_desc.dtype))

    @triton.jit
    def _swiglu_pass(x_ptr, wg_ptr, wu_ptr, h_ptr, gu_ptr, rows, start, I, K, stride_xm, stride_hm, stride_gm,
                     NUM_PROGS,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                     EPI_SPLIT: tl.constexpr, FLATTEN: tl.constexpr, WARP_SPEC: tl.constexpr,
                     UPCAST_DOT: tl.constexpr):
        """One expert: g = x Wg^T, u = x Wu^T (two accumulators, one x tile), h = silu(g) * u.
        gu is [rows, 2I] = [g | u]: two descriptors of width I, so a partial column tile of g is clipped at I
        and never lands in u's columns."""
        x_desc = tl.make_tensor_descriptor(x_ptr, shape=[rows, K], strides=[stride_xm, 1],
                                           block_shape=[BLOCK_M, BLOCK_K])
        wg_desc = tl.make_tensor_descriptor(wg_ptr, shape=[I, K], strides=[K, 1], block_shape=[BLOCK_N, BLOCK_K])
        wu_desc = tl.make_tensor_descriptor(wu_ptr, shape=[I, K], strides=[K, 1], block_shape=[BLOCK_N, BLOCK_K])
        SUB_N: tl.constexpr = BLOCK_N // EPI_SPLIT
        h_desc = tl.make_tensor_descriptor(h_ptr, shape=[rows, I], strides=[stride_hm, 1],
                                           block_shape=[BLOCK_M, SUB_N])
        g_desc = tl.make_tensor_descriptor(gu_ptr, shape=[rows, I], strides=[stride_gm, 1],
                                           block_shape=[BLOCK_M, SUB_N])
        u_desc = tl.make_tensor_descriptor(gu_ptr + I, shape=[rows, I], strides=[stride_gm, 1],
                                           block_shape=[BLOCK_M, SUB_N])
        tiles_m = tl.cdiv(rows, BLOCK_M)
        tiles_n = tl.cdiv(I, BLOCK_N)
        k_steps = tl.cdiv(K, BLOCK_K)
        tile_c = start - NUM_PROGS
        for tile in tl.range(start, tiles_m * tiles_n, NUM_PROGS, flatten=FLATTEN, warp_specialize=WARP_SPEC):
            pid_m, pid_n = _grouped_tile(tile, tiles_m, tiles_n, GROUP_M)
            off_m = pid_m * BLOCK_M
            off_n = pid_n * BLOCK_N
            acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for ks in range(k_steps):
                off_k = ks * BLOCK_K
                a = x_desc.load([off_m, off_k])
                bg = wg_desc.load([off_n, off_k]).T
                bu = wu_desc.load([off_n, off_k]).T
                if UPCAST_DOT:
                    a = a.to(tl.float32)
                    bg = bg.to(tl.float32)
                    bu = bu.to(tl.float32)
                acc_g = tl.dot(a, bg, acc_g)
                acc_u = tl.dot(a, bu, acc_u)
            tile_c += NUM_PROGS
            pid_m, pid_n = _grouped_tile(tile_c, tiles_m, tiles_n, GROUP_M)
            off_m = pid_m * BLOCK_M
            off_n = pid_n * BLOCK_N
            if EPI_SPLIT == 2:
                g0, g1 = tl.split(tl.permute(tl.reshape(acc_g, (BLOCK_M, 2, SUB_N)), (0, 2, 1)))
                u0, u1 = tl.split(tl.permute(tl.reshape(acc_u, (BLOCK_M, 2, SUB_N)), (0, 2, 1)))
                _swiglu_store(g0, u0, h_desc, g_desc, u_desc, off_m, off_n)
                _swiglu_store(g1, u1, h_desc, g_desc, u_desc, off_m, off_n + SUB_N)
            else:
                _swiglu_store(acc_g, acc_u, h_desc, g_desc, u_desc, off_m, off_n)

    @triton.jit
    def _grouped_swiglu_sm90_kernel(
        x_ptr, gv_ptr, uv_ptr, gl_ptr, ul_ptr, h_ptr, gu_ptr, offsets_ptr,
        I, K, stride_xm, stride_hm, stride_gm, NUM_PROGS,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
        EPI_SPLIT: tl.constexpr, FLATTEN: tl.constexpr, WARP_SPEC: tl.constexpr, UPCAST_DOT: tl.constexpr,
    ):
        """h[T, I] = silu(x Wg_e^T) * (x Wu_e^T), gu[T, 2I] = [g | u] per expert; vision pass, then language."""
        pid = tl.program_id(0)
        n_v = tl.load(offsets_ptr + 1)
        n_t = tl.load(offsets_ptr + 2)
        tiles_v = tl.cdiv(n_v, BLOCK_M) * tl.cdiv(I, BLOCK_N)
        _swiglu_pass(x_ptr, gv_ptr, uv_ptr, h_ptr, gu_ptr, n_v, pid, I, K, stride_xm, stride_hm, stride_gm,
                     NUM_PROGS, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, EPI_SPLIT, FLATTEN, WARP_SPEC, UPCAST_DOT)
        r0 = n_v.to(tl.int64)
        _swiglu_pass(x_ptr + r0 * stride_xm, gl_ptr, ul_ptr, h_ptr + r0 * stride_hm, gu_ptr + r0 * stride_gm,
                     n_t - n_v, _pass_start(pid, tiles_v, NUM_PROGS), I, K, stride_xm, stride_hm, stride_gm,
                     NUM_PROGS, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, EPI_SPLIT, FLATTEN, WARP_SPEC, UPCAST_DOT)

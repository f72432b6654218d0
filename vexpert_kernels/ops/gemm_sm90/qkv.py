"""sm_90 grouped QKV projection + RoPE + attention layout: TMA-descriptor loads, persistent tile loop, fused epilogue.

    q, k, v = grouped_qkv_rope_sm90(x [T, K], wv [N, K], wl [N, K], offsets, perm [T], cos [T, hd/2], sin [T, hd/2],
                                    batch_size=B, seq_len=L, num_heads=H, num_kv_heads=KV, bias_v=None, bias_l=None)
    # q [B, H, L, hd], k and v [B, KV, L, hd]; N = (H + 2 KV) hd, columns q | k | v (HF order)

Per routed row i of expert e (rows [0, n_vision) vision, [n_vision, T) language, ``offsets`` = (0, n_vision, T) int32
on the device, no host sync): ``qkv_i = x_i W_e^T (+ b_e)`` (fp32 accumulator); q and k heads get GPT-NeoX RoPE
(rotate half: ``o[j] = a[j] c_j - a[j + hd/2] s_j``, ``o[j + hd/2] = a[j + hd/2] c_j + a[j] s_j`` with the fp32
``cos[i, j]``, ``sin[i, j]`` table in routed order, exactly as the Ampere epilogue and the float64 reference);
v passes through; row i is stored at sequence position ``perm[i] = b L + l`` of [B, heads, L, hd].

Tile shape: BLOCK_N = 1 or 2 whole heads (``qkv_config_reason``), so both members of every rotate-half pair are in
the tile's fp32 accumulator; the epilogue splits the accumulator into heads and halves in registers
(reshape / permute / split, as the plain kernel's epilogue subtiling) and the rotation is elementwise. The head is a
per-tile scalar: q / k / v choice, rotation and destination are scalars or row vectors.

Loads are TMA (one x descriptor per expert, based at its first row, zero-filled past its last row; one W descriptor
per expert). The store is a *pointer* scatter, not a TMA store: the rows of one tile land at unrelated sequence
positions perm[i] (a TMA store writes a box of consecutive rows). Each row of a head is hd contiguous elements
(256 B at hd 128, bf16), so the scatter writes whole 128-byte lines; a row mask stops at the expert's last row.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..._triton_compat import HAS_TRITON, interpret_mode, tl, triton
from ...validation import check_tensor
from .configs import INTERP_QKV_CONFIGS, SM90_QKV_CONFIGS, SM90Config, gemm_reason, qkv_config_reason
from .launch import _check_common, _num_programs, _row_major, _set_scratch

__all__ = ["grouped_qkv_rope_sm90", "qkv_sm90_configs", "qkv_sm90_reason"]

if HAS_TRITON:
    from .kernels import _grouped_tile, _pass_start

    @triton.jit
    def _halves(t, BLOCK_M: tl.constexpr, WIDTH: tl.constexpr):
        """[BLOCK_M, WIDTH] -> (columns [0, WIDTH/2), columns [WIDTH/2, WIDTH)), in registers."""
        return tl.split(tl.permute(tl.reshape(t, (BLOCK_M, 2, WIDTH // 2)), (0, 2, 1)))

    @triton.jit
    def _qkv_store_head(acc, head, rows, row_ok, perm_ptr, cos_ptr, sin_ptr, q_ptr, k_ptr, v_ptr,
                        seq_len, num_heads, num_kv_heads,
                        BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr):
        """RoPE (q, k heads) and scatter-store one head's [BLOCK_M, HEAD_DIM] fp32 tile. rows: expert-local row
        indices (perm_ptr, cos_ptr, sin_ptr point at the expert's first row); row_ok: rows < the expert's rows."""
        HALF: tl.constexpr = HEAD_DIM // 2
        a1, a2 = _halves(acc, BLOCK_M, HEAD_DIM)                   # [BM, HALF] each: the rotate-half partners
        jj = tl.arange(0, HALF)
        rows64 = rows.to(tl.int64)
        mask = row_ok[:, None] & (jj < HALF)[None, :]
        o1 = a1
        o2 = a2
        if head < num_heads + num_kv_heads:                         # q and k heads rotate, v passes through
            cs = rows64[:, None] * HALF + jj[None, :]
            c = tl.load(cos_ptr + cs, mask=mask, other=1.0)
            s = tl.load(sin_ptr + cs, mask=mask, other=0.0)
            o1 = a1 * c - a2 * s
            o2 = a2 * c + a1 * s
        # 32-bit index math (a 64-bit division is a long software sequence): perm[i] < B L and the destination row
        # (b nh + h) L + l < B heads L fit in int32; only the element offset (row * HEAD_DIM) is 64-bit
        p = tl.load(perm_ptr + rows64, mask=row_ok, other=0).to(tl.int32)
        bb = p // seq_len
        ll = p % seq_len
        is_q = head < num_heads
        is_k = (head >= num_heads) & (head < num_heads + num_kv_heads)
        nh = tl.where(is_q, num_heads, num_kv_heads)
        h_loc = tl.where(is_q, head, tl.where(is_k, head - num_heads, head - num_heads - num_kv_heads))
        o_base = tl.where(is_q, q_ptr, tl.where(is_k, k_ptr, v_ptr))
        dst = (bb * nh + h_loc) * seq_len + ll                                # [BM]: row perm[i] of head h_loc
        row_off = dst.to(tl.int64) * HEAD_DIM
        o_ptrs = o_base + row_off[:, None] + jj[None, :]
        tl.store(o_ptrs, o1.to(q_ptr.dtype.element_ty), mask=mask)
        tl.store(o_ptrs + HALF, o2.to(q_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _qkv_pass(x_ptr, w_ptr, b_ptr, perm_ptr, cos_ptr, sin_ptr, q_ptr, k_ptr, v_ptr,
                  rows, start, N, K, stride_xm, seq_len, num_heads, num_kv_heads, NUM_PROGS,
                  HAS_BIAS: tl.constexpr, HEAD_DIM: tl.constexpr, HEADS_PER_TILE: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                  FLATTEN: tl.constexpr, WARP_SPEC: tl.constexpr, UPCAST_DOT: tl.constexpr):
        """All tiles of one expert; x_ptr, perm_ptr, cos_ptr, sin_ptr point at the expert's first row."""
        BLOCK_N: tl.constexpr = HEAD_DIM * HEADS_PER_TILE
        x_desc = tl.make_tensor_descriptor(x_ptr, shape=[rows, K], strides=[stride_xm, 1],
                                           block_shape=[BLOCK_M, BLOCK_K])
        w_desc = tl.make_tensor_descriptor(w_ptr, shape=[N, K], strides=[K, 1], block_shape=[BLOCK_N, BLOCK_K])
        tiles_m = tl.cdiv(rows, BLOCK_M)
        tiles_n = N // BLOCK_N                                      # whole heads: N is a multiple of BLOCK_N
        k_steps = tl.cdiv(K, BLOCK_K)
        tile_c = start - NUM_PROGS                                  # epilogue counter (see kernels._gemm_pass)
        for tile in tl.range(start, tiles_m * tiles_n, NUM_PROGS, flatten=FLATTEN, warp_specialize=WARP_SPEC):
            pid_m, pid_n = _grouped_tile(tile, tiles_m, tiles_n, GROUP_M)
            off_m = pid_m * BLOCK_M
            off_n = pid_n * BLOCK_N
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for ks in range(k_steps):
                off_k = ks * BLOCK_K
                a = x_desc.load([off_m, off_k])                     # [BM, BK]
                b = w_desc.load([off_n, off_k]).T                   # [BK, BN]
                if UPCAST_DOT:  # interpreter: tl.dot on 16-bit operands multiplies raw bits there
                    a = a.to(tl.float32)
                    b = b.to(tl.float32)
                acc = tl.dot(a, b, acc)
            tile_c += NUM_PROGS
            pid_m, pid_n = _grouped_tile(tile_c, tiles_m, tiles_n, GROUP_M)
            off_m = pid_m * BLOCK_M
            if HAS_BIAS:
                cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
                acc += tl.load(b_ptr + cols).to(tl.float32)[None, :]
            r = off_m + tl.arange(0, BLOCK_M)
            row_ok = r < rows
            head0 = pid_n * HEADS_PER_TILE
            if HEADS_PER_TILE == 2:
                h0, h1 = _halves(acc, BLOCK_M, BLOCK_N)
                _qkv_store_head(h0, head0, r, row_ok, perm_ptr, cos_ptr, sin_ptr, q_ptr, k_ptr, v_ptr, seq_len,
                                num_heads, num_kv_heads, BLOCK_M, HEAD_DIM)
                _qkv_store_head(h1, head0 + 1, r, row_ok, perm_ptr, cos_ptr, sin_ptr, q_ptr, k_ptr, v_ptr, seq_len,
                                num_heads, num_kv_heads, BLOCK_M, HEAD_DIM)
            else:
                _qkv_store_head(acc, head0, r, row_ok, perm_ptr, cos_ptr, sin_ptr, q_ptr, k_ptr, v_ptr, seq_len,
                                num_heads, num_kv_heads, BLOCK_M, HEAD_DIM)

    @triton.jit
    def _grouped_qkv_rope_sm90_kernel(
        x_ptr, wv_ptr, wl_ptr, bv_ptr, bl_ptr, offsets_ptr, perm_ptr, cos_ptr, sin_ptr, q_ptr, k_ptr, v_ptr,
        N, K, stride_xm, seq_len, num_heads, num_kv_heads, NUM_PROGS,
        HAS_BIAS_V: tl.constexpr, HAS_BIAS_L: tl.constexpr, HEAD_DIM: tl.constexpr,
        HEADS_PER_TILE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
        FLATTEN: tl.constexpr, WARP_SPEC: tl.constexpr, UPCAST_DOT: tl.constexpr,
    ):
        """q / k / v [B, heads, L, HEAD_DIM] <- RoPE(x W_e^T (+ b_e)) per routed row, at position perm[row].
        Persistent: NUM_PROGS programs walk the vision tiles, then the language tiles (round-robin continues)."""
        pid = tl.program_id(0)
        n_v = tl.load(offsets_ptr + 1)
        n_t = tl.load(offsets_ptr + 2)
        HALF: tl.constexpr = HEAD_DIM // 2
        tiles_v = tl.cdiv(n_v, BLOCK_M) * (N // (HEAD_DIM * HEADS_PER_TILE))
        _qkv_pass(x_ptr, wv_ptr, bv_ptr, perm_ptr, cos_ptr, sin_ptr, q_ptr, k_ptr, v_ptr, n_v, pid, N, K, stride_xm,
                  seq_len, num_heads, num_kv_heads, NUM_PROGS, HAS_BIAS_V, HEAD_DIM, HEADS_PER_TILE, BLOCK_M,
                  BLOCK_K, GROUP_M, FLATTEN, WARP_SPEC, UPCAST_DOT)
        r0 = n_v.to(tl.int64)  # language rows start here (64-bit: T * K may pass 2**31)
        _qkv_pass(x_ptr + r0 * stride_xm, wl_ptr, bl_ptr, perm_ptr + r0, cos_ptr + r0 * HALF, sin_ptr + r0 * HALF,
                  q_ptr, k_ptr, v_ptr, n_t - n_v, _pass_start(pid, tiles_v, NUM_PROGS), N, K, stride_xm, seq_len,
                  num_heads, num_kv_heads, NUM_PROGS, HAS_BIAS_L, HEAD_DIM, HEADS_PER_TILE, BLOCK_M, BLOCK_K,
                  GROUP_M, FLATTEN, WARP_SPEC, UPCAST_DOT)


def qkv_sm90_configs(device: torch.device) -> list:
    """The configs for ``device``: the GPU list on CUDA, the interpreter's tiny tiles on CPU."""
    return list(SM90_QKV_CONFIGS if device.type == "cuda" else INTERP_QKV_CONFIGS)


def qkv_sm90_reason(x: torch.Tensor, w: torch.Tensor, num_heads: int, num_kv_heads: int,
                    cfg: Optional[SM90Config] = None) -> Optional[str]:
    """None when the sm_90 QKV kernel can run ``x [T, K]`` with ``w [(H + 2 KV) hd, K]`` (and ``cfg``, when
    given: the head layout must fit its tile, see ``configs.qkv_config_reason``); else a reason string."""
    if not isinstance(x, torch.Tensor) or not isinstance(w, torch.Tensor) or x.dim() != 2 or w.dim() != 2:
        return "needs tensors x [T, K] and w [N, K]"
    if x.dtype != w.dtype or x.device != w.device or x.shape[1] != w.shape[1]:
        return f"x {tuple(x.shape)} {x.dtype} {x.device} and w {tuple(w.shape)} {w.dtype} {w.device} disagree"
    heads = num_heads + 2 * num_kv_heads
    if num_heads <= 0 or num_kv_heads <= 0 or num_heads % num_kv_heads or w.shape[0] % heads:
        return f"N = {w.shape[0]} is not (num_heads {num_heads} + 2 num_kv_heads {num_kv_heads}) whole heads"
    reason = gemm_reason(x.device, x.dtype, w.shape[0], w.shape[1])
    if reason is None and cfg is not None:
        reason = qkv_config_reason(cfg, w.shape[0] // heads, num_heads, num_kv_heads)
    return reason


def grouped_qkv_rope_sm90(x, wv, wl, offsets, perm, cos, sin, *, batch_size: int, seq_len: int, num_heads: int,
                          num_kv_heads: int, bias_v=None, bias_l=None, config: Optional[SM90Config] = None, out=None):
    """(q [B, H, L, hd], k [B, KV, L, hd], v [B, KV, L, hd]) in x.dtype; see the module docstring.

    x [T = B L, K] routed rows; wv, wl [(H + 2 KV) hd, K]; offsets int32 [3] = (0, n_vision, T); perm [T] int
    (sequence position b L + l of routed row i, a permutation); cos, sin fp32 [T, hd/2] in routed order; bias_* [N]
    or None. config: an SM90Config whose tile holds 1 or 2 heads (default: the first that fits). out: optional
    (q, k, v) contiguous buffers, written in place. Raises TypeError / ValueError naming the argument on bad input,
    before any kernel runs."""
    _check_common("x", x, wv, wl, offsets)
    T, K = x.shape
    N = wv.shape[0]
    if K != wv.shape[1]:
        raise ValueError(f"x [T, K] and wv [N, K] disagree on K: {tuple(x.shape)} vs {tuple(wv.shape)}")
    B, L, H, KV = batch_size, seq_len, num_heads, num_kv_heads
    for name, v, lo in (("batch_size", B, 0), ("seq_len", L, 0), ("num_heads", H, 1), ("num_kv_heads", KV, 1)):
        if not isinstance(v, int) or isinstance(v, bool) or v < lo:
            raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
    if B * L != T:
        raise ValueError(f"x must have T = batch_size * seq_len = {B * L} rows, got {T}")
    heads = H + 2 * KV
    if H % KV or N % heads:
        raise ValueError(f"wv has N={N} rows: not (num_heads {H} + 2 num_kv_heads {KV}) whole heads "
                         f"(num_heads must be a multiple of num_kv_heads)")
    hd = N // heads
    check_tensor("perm", perm, shape=(T,), dtypes=(torch.int32, torch.int64), device=x.device)
    check_tensor("cos", cos, shape=(T, hd // 2), dtypes=(torch.float32,), device=x.device)
    check_tensor("sin", sin, shape=(T, hd // 2), dtypes=(torch.float32,), device=x.device)
    check_tensor("bias_v", bias_v, shape=(N,), dtypes=(x.dtype,), device=x.device, allow_none=True)
    check_tensor("bias_l", bias_l, shape=(N,), dtypes=(x.dtype,), device=x.device, allow_none=True)
    if config is None:
        config = next((c for c in qkv_sm90_configs(x.device) if qkv_config_reason(c, hd, H, KV) is None), None)
        if config is None:
            raise ValueError(f"sm_90 QKV kernel unsupported here: no config fits head_dim {hd}, num_heads {H}, "
                             f"num_kv_heads {KV}")
    reason = qkv_sm90_reason(x, wv, H, KV, config)
    if reason is not None:
        raise ValueError(f"sm_90 QKV kernel unsupported here: {reason}")
    shapes = ((B, H, L, hd), (B, KV, L, hd), (B, KV, L, hd))
    if out is None:
        out = tuple(torch.empty(s, dtype=x.dtype, device=x.device) for s in shapes)
    else:
        if not isinstance(out, (tuple, list)) or len(out) != 3:
            raise TypeError("out must be a (q, k, v) tuple")
        for i, (o, s) in enumerate(zip(out, shapes)):
            check_tensor(f"out[{i}]", o, shape=s, dtypes=(x.dtype,), device=x.device)
            if not o.is_contiguous():
                raise ValueError(f"out[{i}] must be contiguous")
        out = tuple(out)
    if T == 0:
        return out
    q, k, v = out
    x = _row_major(x)
    wv, wl = wv.contiguous(), wl.contiguous()
    cos, sin, perm = cos.contiguous(), sin.contiguous(), perm.contiguous()
    bias_v = bias_v.contiguous() if bias_v is not None else None
    bias_l = bias_l.contiguous() if bias_l is not None else None
    hpt = config.block_n // hd
    max_tiles = (triton.cdiv(T, config.block_m) + 1) * (heads // hpt)   # +1: the split tile
    grid = max(1, min(_num_programs(x.device), max_tiles))
    _set_scratch(x.device)
    _grouped_qkv_rope_sm90_kernel[(grid,)](
        x, wv, wl, bias_v if bias_v is not None else wv, bias_l if bias_l is not None else wv, offsets, perm, cos,
        sin, q, k, v,
        N, K, x.stride(0), L, H, KV, grid,
        HAS_BIAS_V=bias_v is not None, HAS_BIAS_L=bias_l is not None, HEAD_DIM=hd, HEADS_PER_TILE=hpt,
        BLOCK_M=config.block_m, BLOCK_K=config.block_k, GROUP_M=config.group_m, FLATTEN=config.flatten,
        WARP_SPEC=config.warp_specialize, UPCAST_DOT=interpret_mode(),
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return out

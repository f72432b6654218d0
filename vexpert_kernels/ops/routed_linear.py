"""Routed (visual-expert) linears as grouped GEMMs with fused epilogues, forward and backward.

Rows are in *routed order* (all vision rows, then all language rows; ``plan.expert_offsets = (0, n_vision, T)`` on
the device), so every routed linear is a GEMM over two contiguous row ranges with two weight matrices.

Public functions (shapes; weights in HF ``nn.Linear`` layout ``[N, K]``, one tensor per expert):

* ``routed_linear(x [T,K], w_v [N,K], w_l [N,K], plan, bias_vision=None, bias_language=None, residual=None)``
  -> ``[T, N]`` = ``residual + x W_e^T + b_e`` per expert.
* ``routed_swiglu(x [T,K], gate_v [I,K], up_v [I,K], gate_l, up_l, plan)`` -> ``[T, I]`` = ``silu(x Wg^T) * (x Wu^T)``.
* ``routed_qkv_rope(x [T,D], w_v [(H+2KV)hd, D], w_l, plan, num_heads=H, num_kv_heads=KV, rope_theta=...)``
  -> ``q [B,H,L,hd], k [B,KV,L,hd], v [B,KV,L,hd]`` in sequence order, RoPE (GPT-NeoX half rotation) applied to q, k.

Backends (``backend=``): ``"triton"`` (one persistent grouped-GEMM launch over the tiles of both experts; the epilogue
is fused), ``"torch"`` (two GEMMs on zero-copy row slices writing into slices of one output + PyTorch elementwise;
the CPU fallback and the baseline), ``"grouped_mm"`` (``torch._grouped_mm`` where available, plain linear only),
``"auto"`` (Triton where usable unless ``_MEASURED_BACKEND`` says torch was faster; ``VEXPERT_GEMM_BACKEND``
overrides).

Layout: kernels (``_routed_gemm_kernel``, ``_routed_wgrad_kernel``) -> launchers -> torch backend -> custom ops
(``torch.library.custom_op`` with fake impls and ``register_autograd``) -> public functions -> ``aot_compile_specs``.

Backward: dX is the same grouped GEMM with the transposed weight views (no copies); dW_e = dY_e^T X_e and
db_e = sum(dY_e) come from ``_routed_wgrad_kernel``: one program owns one (expert, N-tile, K-tile) block of dW and
walks that expert's rows in order with an fp32 accumulator -> deterministic, no atomics.
Saved for backward: the inputs only (x, weights); SwiGLU recomputes gate/up from x in one fused kernel
(``EPI_SWIGLU_BWD``: the GEMM's epilogue turns dh into dgate, dup directly) and QKV re-derives the pre-RoPE gradient
by the inverse rotation of dq, dk (RoPE is orthogonal), so no [T, 2I] or [T, N] intermediate is kept.

QKV forward tiles: one tile = BLOCK_M rows x one head's BLOCK_N first-half columns (accumulator 1) and the matching
second-half columns (accumulator 2, the RoPE partners); cos/sin come from an fp32 [T, hd/2] table built by torch
(HF's numerics). Both choices keep the epilogue free of spills on sm_90/sm_80 (the compile report lists registers).
"""
from __future__ import annotations

import math
import os
from typing import Optional

import torch

from .._triton_compat import HAS_TRITON, interpret_mode, require_triton, triton, tl, triton_usable_for
from ..validation import check_positive_finite, check_tensor

__all__ = ["routed_linear", "routed_swiglu", "routed_qkv_rope", "aot_compile_specs", "select_backend",
           "routed_linear_reference", "routed_swiglu_reference", "routed_qkv_rope_reference"]

BACKENDS = ("auto", "triton", "torch", "grouped_mm")

# Epilogue codes (compile-time constants of the same kernel).
EPI_LINEAR = 0       # out = acc (+ bias_e) (+ residual)
EPI_SWIGLU = 1       # out = silu(acc_gate) * acc_up           (two accumulators from one X tile)
EPI_SWIGLU_BWD = 2   # recompute g,u; out = dh*u*silu'(g), out2 = dh*silu(g)
EPI_QKV_ROPE = 3     # (+ bias_e), RoPE on q,k heads, store at sequence position perm[row] into [B, heads, L, hd]

# Measured dispatch table for backend="auto": (op, shape class) -> backend. Empty until GPU measurements
# (benchmarks/) fill it; an entry "torch" makes auto skip Triton where Triton was measured slower.
# Keys: ("linear" | "linear_bias" | "linear_residual" | "swiglu" | "qkv_rope", _shape_class(T, N, K), device cc major).
_MEASURED_BACKEND: dict = {}


def _shape_class(T: int, N: int, K: int) -> str:
    def b(v):
        return "s" if v < 1024 else ("m" if v < 8192 else "l")
    return f"T{b(T)}N{b(N)}K{b(K)}"


# ============================================================================================== Triton kernels
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
        N, K,
        stride_xm, stride_xk, stride_wn, stride_wk,
        stride_om, stride_rm, stride_dm,
        seq_len, num_heads, num_kv_heads, num_n_tiles, max_tiles,
        EPILOGUE: tl.constexpr, HAS_BIAS_V: tl.constexpr, HAS_BIAS_L: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
        UPCAST_DOT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    ):
        """Persistent grouped GEMM: out[r, n] = sum_k x[r, k] * W_e[n, k] for rows r of expert e, + epilogue.

        W_e is addressed through (stride_wn, stride_wk), so the same kernel computes dX = dY W_e by passing the
        transposed weight view. The tile count (both experts) is read from the device offsets: no host sync.
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
            for k0 in range(0, K, BLOCK_K):
                k_mask = offs_k < K - k0
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


# ============================================================================================== configs
# (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages). Hopper: 128x256x64 w8s3 was the best pointer-load
# config of the H200 probe (anchors/gemm_probe.json); 128x128 for two-accumulator (SwiGLU) and narrow N; 64-row tiles
# for small T. Ampere (less smem: 164 KB) gets BLOCK_K 32 / fewer stages on the wide tiles.
_GEMM_CONFIGS = {
    90: {
        "16bit": {
            "large": (128, 256, 64, 8, 8, 3),
            "medium": (128, 128, 64, 8, 8, 4),
            "small": (64, 128, 64, 8, 4, 4),
            "dual": (128, 128, 64, 8, 8, 3),        # SwiGLU: two fp32 accumulators
            "dual_small": (64, 128, 64, 8, 4, 3),
            "dual_bwd": (128, 64, 64, 8, 8, 3),      # SwiGLU backward: + dh tile and two outputs
            # QKV: BLOCK_N = half-head width (x2 accumulators: 128 rows x one hd=128 head); 184 regs, no spill
            "qkv": (128, 64, 64, 8, 8, 3),
        },
        # fp32 inputs run as TF32 on tensor cores (like torch's allow_tf32); fp32 tiles are twice as wide in smem
        # and registers, so smaller tiles (tf32x3 spilled at every useful tile size: not used)
        "fp32": {"large": (64, 128, 32, 8, 8, 3), "medium": (64, 128, 32, 8, 8, 3), "small": (64, 128, 32, 8, 8, 3),
                 "dual": (64, 64, 32, 8, 4, 2), "dual_small": (64, 64, 32, 8, 4, 2),
                 "dual_bwd": (64, 64, 32, 8, 4, 2), "qkv": (128, 64, 32, 8, 8, 3)},
    },
    80: {
        "16bit": {
            # sm_80 has no wgmma: mma.sync accumulators + epilogue spilled at 128x256 w8 and 128x128 w4
            "large": (128, 128, 32, 8, 8, 3),
            "medium": (128, 128, 32, 8, 8, 3),
            "small": (64, 128, 32, 8, 4, 4),
            "dual": (128, 64, 32, 8, 8, 3),
            "dual_small": (64, 128, 32, 8, 4, 3),
            "dual_bwd": (128, 64, 32, 8, 8, 3),
            "qkv": (128, 64, 32, 8, 8, 3),           # 212 regs; BLOCK_K 64 spills, 4 warps spills
        },
        "fp32": {"large": (64, 128, 32, 8, 8, 3), "medium": (64, 128, 32, 8, 8, 3), "small": (64, 128, 32, 8, 8, 3),
                 "dual": (64, 128, 32, 8, 8, 3), "dual_small": (64, 128, 32, 8, 8, 3),
                 "dual_bwd": (64, 128, 32, 8, 8, 3), "qkv": (64, 64, 32, 8, 8, 3)},
    },
}
_WGRAD_CONFIGS = {  # (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)
    90: {"large": (64, 128, 128, 8, 3), "small": (64, 64, 64, 4, 3)},
    80: {"large": (32, 128, 128, 8, 3), "small": (32, 64, 64, 4, 3)},
}
# Interpreter: tiny tiles (every dot is a numpy matmul; block sizes 16/32 keep tests fast and hit masking).
_INTERP_GEMM = {"large": (32, 32, 16, 2, 1, 1), "medium": (16, 32, 16, 2, 1, 1), "small": (16, 16, 16, 2, 1, 1),
                "dual": (16, 32, 16, 2, 1, 1), "dual_small": (16, 16, 16, 2, 1, 1), "dual_bwd": (16, 16, 16, 2, 1, 1),
                "qkv": (16, 16, 16, 2, 1, 1)}
_INTERP_WGRAD = {"large": (16, 32, 32, 1, 1), "small": (16, 16, 16, 1, 1)}
_INTERP_NUM_PROGRAMS = 3  # a persistent grid smaller than the tile count, so the tile loop is exercised


def _cc(device: torch.device) -> int:
    if device.type != "cuda":
        return 90
    major, _ = torch.cuda.get_device_capability(device)
    return 90 if major >= 9 else 80


def _gemm_config(device, dtype, T, N, K, epilogue, plain=True):
    """plain: forward linear without residual and with [N, K] weights. 128x256 tiles spill (sm_90) once a residual
    tile or the transposed-weight (dX) loads join, so those use the 128x128 config."""
    dual = epilogue in (EPI_SWIGLU, EPI_SWIGLU_BWD, EPI_QKV_ROPE)
    table = _INTERP_GEMM if device.type == "cpu" else \
        _GEMM_CONFIGS[_cc(device)]["fp32" if dtype == torch.float32 else "16bit"]
    if epilogue == EPI_QKV_ROPE:
        key = "qkv"
    elif epilogue == EPI_SWIGLU_BWD:
        key = "dual_bwd"
    elif dual:
        key = "dual_small" if T <= 2048 else "dual"
    elif T <= 1024:
        key = "small"
    elif N >= 8192 and T >= 4096 and plain:
        key = "large"
    else:
        key = "medium"
    return table[key]


def _qkv_block_n(head_dim: int, max_bn: int) -> int:
    """Half-head chunk width of the QKV kernel: the power of 2 >= hd/2 (at least 16, the smallest MMA N), capped
    at the config's BLOCK_N (hd 256 -> two 64-wide chunks per head)."""
    return min(max_bn, max(16, triton.next_power_of_2(head_dim // 2)))


def _wgrad_config(device, N, K):
    table = _INTERP_WGRAD if device.type == "cpu" else _WGRAD_CONFIGS[_cc(device)]
    return table["large" if N * K >= (1 << 22) else "small"]


def _num_programs(device) -> int:
    if device.type == "cpu":
        return _INTERP_NUM_PROGRAMS
    return torch.cuda.get_device_properties(device).multi_processor_count


def _precision(dtype) -> str:
    # fp32 inputs: exact fp32 products (no silent TF32); 16-bit inputs ignore this
    return "ieee" if interpret_mode() else "tf32"


# ============================================================================================== launchers
def _launch_gemm(x, wv, wl, offsets, out, *, epilogue=EPI_LINEAR, w2v=None, w2l=None, bv=None, bl=None,
                 residual=None, out2=None, dh=None, perm=None, cos=None, sin=None, k_out=None, v_out=None,
                 seq_len=1, num_heads=0, num_kv_heads=0, head_dim=0, n_cols=None):
    """Launch the grouped GEMM. ``wv``/``wl`` are [N, K]-shaped views (any strides, identical for both experts)."""
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
    BM, BN, BK, GM, nw, ns = _gemm_config(x.device, x.dtype, T, N, K, epilogue,
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
        N, K,
        x.stride(0), x.stride(1), wv.stride(0), wv.stride(1),
        out.stride(0) if epilogue != EPI_QKV_ROPE else 0,
        residual.stride(0) if residual is not None else 0,
        dh.stride(0) if dh is not None else 0,
        seq_len, num_heads, num_kv_heads, num_n, max_tiles,
        EPILOGUE=epilogue, HAS_BIAS_V=bv is not None, HAS_BIAS_L=bl is not None,
        HAS_RESIDUAL=residual is not None, HEAD_DIM=head_dim if epilogue == EPI_QKV_ROPE else 0,
        BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, GROUP_M=GM,
        UPCAST_DOT=interpret_mode(), INPUT_PRECISION=_precision(x.dtype),
        num_warps=nw, num_stages=ns,
    )


def _launch_wgrad(dy, x, offsets, dwv, dwl, dbv, dbl):
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
    BM, BN, BK, nw, ns = _wgrad_config(dy.device, N, K)
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


# ============================================================================================== torch backend
# Two GEMMs on zero-copy row slices (x[:nv], x[nv:]) writing into row slices of one output: the measured baseline
# (0.96-1.03x of one dense cuBLAS GEMM, anchors/README.md) and the CPU fallback. nv is the plan's cached host count.
def _torch_linear_into(out, x, w, b, residual, sl):
    xs, o = x[sl], out[sl]
    if xs.shape[0] == 0:
        return
    if residual is not None:
        torch.addmm(residual[sl], xs, w.t(), out=o)
        if b is not None:
            o.add_(b)
    elif b is not None:
        torch.addmm(b, xs, w.t(), out=o)
    else:
        torch.matmul(xs, w.t(), out=o)


def _torch_linear_fwd(x, wv, wl, nv, bv, bl, residual):
    T = x.shape[0]
    out = _out(x, T, wv.shape[0])
    _torch_linear_into(out, x, wv, bv, residual, slice(0, nv))
    _torch_linear_into(out, x, wl, bl, residual, slice(nv, T))
    return out


def _torch_linear_bwd(dy, x, wv, wl, nv, need_dx, need_dw, need_dbv, need_dbl):
    T = x.shape[0]
    dx = dwv = dwl = dbv = dbl = None
    parts = ((slice(0, nv), wv), (slice(nv, T), wl))
    if need_dx:
        dx = _out(x, x.shape)
        for sl, w in parts:
            if dy[sl].shape[0]:
                torch.matmul(dy[sl], w, out=dx[sl])
    if need_dw:
        # fp32 accumulate, then cast: matches the Triton path's numerics on 16-bit inputs
        dwv, dwl = [(dy[sl].t().float() @ x[sl].float()).to(w.dtype) for sl, w in parts]
    if need_dbv:
        dbv = dy[:nv].float().sum(0)
    if need_dbl:
        dbl = dy[nv:].float().sum(0)
    return dx, dwv, dwl, dbv, dbl


def _torch_swiglu_fwd(x, gv, uv, gl, ul, nv):
    T = x.shape[0]
    out = _out(x, T, gv.shape[0])
    for sl, g_w, u_w in ((slice(0, nv), gv, uv), (slice(nv, T), gl, ul)):
        xs = x[sl]
        if xs.shape[0]:
            torch.mul(torch.nn.functional.silu(xs @ g_w.t()), xs @ u_w.t(), out=out[sl])
    return out


def _swiglu_grads(g, u, dh):
    g, u, dh = g.float(), u.float(), dh.float()
    sig = torch.sigmoid(g)
    return dh * u * sig * (1 + g * (1 - sig)), dh * g * sig


# ============================================================================================== shared helpers
def _rope_inv_freq(head_dim: int, theta: float, device) -> torch.Tensor:
    """HF: inv_freq = 1 / theta ** (arange(0, hd, 2) / hd), fp32."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.int64).float() / head_dim))


def _rope_cos_sin(pos_f32, inv_freq):
    ang = pos_f32[:, None] * inv_freq[None, :]  # fp32 [T, hd/2], as HF builds its table
    return ang.cos(), ang.sin()


def _rope_rows(t, cos, sin, n_rot_heads, head_dim, inverse=False):
    """Apply (or undo) NeoX RoPE to the first n_rot_heads heads of routed rows t [T, heads*hd] (float math)."""
    T = t.shape[0]
    h = t[:, :n_rot_heads * head_dim].reshape(T, n_rot_heads, 2, head_dim // 2).float()
    x1, x2 = h[:, :, 0], h[:, :, 1]
    c, s = cos[:, None, :], sin[:, None, :]
    if inverse:
        s = -s
    rot = torch.stack([x1 * c - x2 * s, x2 * c + x1 * s], dim=2).reshape(T, n_rot_heads * head_dim)
    return torch.cat([rot.to(t.dtype), t[:, n_rot_heads * head_dim:]], dim=1)


def _qkv_routed_to_heads(qkv, perm, B, L, H, KV, hd):
    """[T, (H+2KV)hd] routed rows -> q [B,H,L,hd], k, v [B,KV,L,hd] in sequence order (torch path)."""
    seq = torch.empty_like(qkv).index_copy_(0, perm, qkv).view(B, L, H + 2 * KV, hd)
    q, k, v = seq.split([H, KV, KV], dim=2)
    # clone, not contiguous(): for L == 1 the views are already contiguous and would alias one buffer
    return tuple(t.transpose(1, 2).clone(memory_format=torch.contiguous_format) for t in (q, k, v))


def _qkv_heads_to_routed(dq, dk, dv, perm):
    """Inverse of the QKV store: [B,heads,L,hd] x3 -> [T, (H+2KV)hd] rows in routed order (one gather)."""
    B, _, L, hd = dq.shape
    seq = torch.cat([dq, dk, dv], dim=1).transpose(1, 2).reshape(B * L, -1)
    return seq.index_select(0, perm)


# ============================================================================================== op bodies
def _linear_fwd_impl(x, wv, wl, offsets, nv, bv, bl, residual, backend):
    if backend == "torch":
        return _torch_linear_fwd(x, wv, wl, nv, bv, bl, residual)
    if backend == "grouped_mm":
        return _grouped_mm_fwd(x, wv, wl, offsets, bv, bl, residual)
    out = _out(x, x.shape[0], wv.shape[0])
    _launch_gemm(x, wv, wl, offsets, out, bv=bv, bl=bl, residual=residual)
    return out


def _linear_bwd_impl(dy, x, wv, wl, offsets, nv, need_dx, need_dw, need_dbv, need_dbl, backend,
                     bias_dtype=None):
    dy = dy.contiguous()
    if backend != "triton":
        return _torch_linear_bwd(dy, x, wv, wl, nv, need_dx, need_dw, need_dbv, need_dbl)
    T, K = x.shape
    N = wv.shape[0]
    dx = dwv = dwl = dbv = dbl = None
    if need_dx:
        dx = _out(x, T, K)
        _launch_gemm(dy, wv.t(), wl.t(), offsets, dx)  # dX = dY W_e: the [K, N] transposed views, no copies
    if need_dw:
        dwv = _out(wv, N, K)
        dwl = _out(wl, N, K)
    if need_dbv:
        dbv = _out(x, N, dtype=bias_dtype or torch.float32)
    if need_dbl:
        dbl = _out(x, N, dtype=bias_dtype or torch.float32)
    _launch_wgrad(dy, x, offsets, dwv, dwl, dbv, dbl)
    return dx, dwv, dwl, dbv, dbl


def _swiglu_fwd_impl(x, gv, uv, gl, ul, offsets, nv, backend):
    if backend != "triton":
        return _torch_swiglu_fwd(x, gv, uv, gl, ul, nv)
    out = _out(x, x.shape[0], gv.shape[0])
    _launch_gemm(x, gv, gl, offsets, out, epilogue=EPI_SWIGLU, w2v=uv, w2l=ul)
    return out


def _swiglu_bwd_impl(dh, x, gv, uv, gl, ul, offsets, nv, need_dx, need_dw, backend):
    """Recompute g, u from x; dg = dh*u*silu'(g), du = dh*silu(g); dX = dg Wg + du Wu; dWg = dg^T x, dWu = du^T x."""
    dh = dh.contiguous()
    T, K = x.shape
    I = gv.shape[0]
    if backend != "triton":
        dg = _out(x, T, I)
        du = _out(x, T, I)
        for sl, g_w, u_w in ((slice(0, nv), gv, uv), (slice(nv, T), gl, ul)):
            if x[sl].shape[0]:
                a, b = _swiglu_grads(x[sl] @ g_w.t(), x[sl] @ u_w.t(), dh[sl])
                dg[sl], du[sl] = a, b
    else:
        dg = _out(x, T, I)
        du = _out(x, T, I)
        _launch_gemm(x, gv, gl, offsets, dg, epilogue=EPI_SWIGLU_BWD, w2v=uv, w2l=ul, out2=du, dh=dh)
    dx, dgv, dgl, _, _ = _linear_bwd_impl(dg, x, gv, gl, offsets, nv, need_dx, need_dw, False, False, backend)
    if need_dx:
        # dX += du Wu (second GEMM; the first result enters through the residual epilogue, fp32 add)
        if backend == "triton":
            dx2 = _out(x, T, K)
            _launch_gemm(du, uv.t(), ul.t(), offsets, dx2, residual=dx)
            dx = dx2
        else:
            for sl, u_w in ((slice(0, nv), uv), (slice(nv, T), ul)):
                if x[sl].shape[0]:
                    dx[sl].addmm_(du[sl], u_w)
    duv = dul = None
    if need_dw:
        _, duv, dul, _, _ = _linear_bwd_impl(du, x, uv, ul, offsets, nv, False, True, False, False, backend)
    return dx, dgv, duv, dgl, dul


def _qkv_fwd_impl(x, wv, wl, offsets, nv, bv, bl, perm, cos, sin, B, L, H, KV, backend):
    hd = wv.shape[0] // (H + 2 * KV)
    if backend != "triton":
        qkv = _torch_linear_fwd(x, wv, wl, nv, bv, bl, None)
        qkv = _rope_rows(qkv, cos, sin, H + KV, hd)
        return _qkv_routed_to_heads(qkv, perm, B, L, H, KV, hd)
    q = _out(x, B, H, L, hd)
    k = _out(x, B, KV, L, hd)
    v = _out(x, B, KV, L, hd)
    # cos, sin: [T, hd/2] fp32 each in routed order, read by the epilogue (see the kernel)
    _launch_gemm(x, wv, wl, offsets, q, epilogue=EPI_QKV_ROPE, bv=bv, bl=bl, perm=perm, cos=cos.contiguous(),
                 sin=sin.contiguous(), k_out=k, v_out=v, seq_len=L, num_heads=H, num_kv_heads=KV, head_dim=hd,
                 n_cols=wv.shape[0])
    return q, k, v


def _qkv_bwd_impl(dq, dk, dv, x, wv, wl, offsets, nv, perm, cos, sin, need_dx, need_dw, need_dbv, need_dbl,
                  backend, bias_dtype):
    H, KV, hd = dq.shape[1], dk.shape[1], dq.shape[3]
    dqkv = _qkv_heads_to_routed(dq.to(x.dtype), dk.to(x.dtype), dv.to(x.dtype), perm)
    dqkv = _rope_rows(dqkv, cos, sin, H + KV, hd, inverse=True)  # RoPE is a rotation: its adjoint is R(-theta)
    return _linear_bwd_impl(dqkv, x, wv, wl, offsets, nv, need_dx, need_dw, need_dbv, need_dbl, backend,
                            bias_dtype)


def _grouped_mm_available(device) -> bool:
    if not hasattr(torch, "_grouped_mm") or device.type != "cuda":
        return False
    return torch.cuda.get_device_capability(device)[0] >= 9


def _grouped_mm_fwd(x, wv, wl, offsets, bv, bl, residual):
    # torch._grouped_mm wants ONE [2, K, N] weight: this stacks (a weight copy per call) -> a baseline only.
    if not _grouped_mm_available(x.device):
        raise RuntimeError("backend='grouped_mm' needs torch._grouped_mm on a CUDA device with compute capability >= 9")
    w = torch.stack([wv, wl]).transpose(-2, -1)
    out = torch._grouped_mm(x, w, offs=offsets[1:].contiguous())
    nv_mask = (torch.arange(x.shape[0], device=x.device) < offsets[1])[:, None]
    if bv is not None or bl is not None:
        zero = out.new_zeros(out.shape[1])
        out = out + torch.where(nv_mask, bv if bv is not None else zero, bl if bl is not None else zero)
    if residual is not None:
        out = out + residual
    return out


# ============================================================================================== torch.library ops
def _opt(t):
    return t if t is not None and t.numel() > 0 else None


def _none_to_empty(ts, like):
    return tuple(t if t is not None else like.new_empty(0) for t in ts)


@torch.library.custom_op("vexpert::routed_linear", mutates_args=())
def _routed_linear_op(x: torch.Tensor, weight_vision: torch.Tensor, weight_language: torch.Tensor,
                      offsets: torch.Tensor, num_vision: int, bias_vision: Optional[torch.Tensor],
                      bias_language: Optional[torch.Tensor], residual: Optional[torch.Tensor],
                      backend: str) -> torch.Tensor:
    return _linear_fwd_impl(x, weight_vision, weight_language, offsets, num_vision, bias_vision, bias_language,
                            residual, backend)


@_routed_linear_op.register_fake
def _(x, weight_vision, weight_language, offsets, num_vision, bias_vision, bias_language, residual, backend):
    return x.new_empty(x.shape[0], weight_vision.shape[0])


@torch.library.custom_op("vexpert::routed_linear_backward", mutates_args=())
def _routed_linear_bwd_op(dy: torch.Tensor, x: torch.Tensor, weight_vision: torch.Tensor,
                          weight_language: torch.Tensor, offsets: torch.Tensor, num_vision: int, need_dx: bool,
                          need_dw: bool, need_dbv: bool, need_dbl: bool, backend: str,
                          bias_dtype: Optional[torch.dtype]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                     torch.Tensor, torch.Tensor]:
    res = _linear_bwd_impl(dy, x, weight_vision, weight_language, offsets, num_vision, need_dx, need_dw, need_dbv,
                           need_dbl, backend, bias_dtype)
    dbv, dbl = [(t.to(bias_dtype) if t is not None and bias_dtype is not None else t) for t in res[3:]]
    return _none_to_empty((res[0], res[1], res[2], dbv, dbl), x)


@_routed_linear_bwd_op.register_fake
def _(dy, x, weight_vision, weight_language, offsets, num_vision, need_dx, need_dw, need_dbv, need_dbl, backend,
      bias_dtype):
    return _linear_bwd_fake(x, weight_vision, weight_language, need_dx, need_dw, need_dbv, need_dbl, bias_dtype)


def _routed_linear_setup(ctx, inputs, output):
    x, wv, wl, offsets, nv, bv, bl, residual, backend = inputs
    ctx.save_for_backward(x, wv, wl, offsets)
    ctx.nv, ctx.backend = nv, backend
    ctx.bias_dtype = bv.dtype if bv is not None else (bl.dtype if bl is not None else None)
    ctx.has_res = residual is not None


def _routed_linear_backward(ctx, dy):
    x, wv, wl, offsets = ctx.saved_tensors
    ni = ctx.needs_input_grad
    need_dw = bool(ni[1] or ni[2])
    dx, dwv, dwl, dbv, dbl = _routed_linear_bwd_op(dy, x, wv, wl, offsets, ctx.nv, bool(ni[0]), need_dw,
                                                   bool(ni[5]), bool(ni[6]), ctx.backend, ctx.bias_dtype)
    return (dx if ni[0] else None, dwv if ni[1] else None, dwl if ni[2] else None, None, None,
            dbv if ni[5] else None, dbl if ni[6] else None, dy if (ctx.has_res and ni[7]) else None, None)


_routed_linear_op.register_autograd(_routed_linear_backward, setup_context=_routed_linear_setup)


@torch.library.custom_op("vexpert::routed_swiglu", mutates_args=())
def _routed_swiglu_op(x: torch.Tensor, gate_vision: torch.Tensor, up_vision: torch.Tensor,
                      gate_language: torch.Tensor, up_language: torch.Tensor, offsets: torch.Tensor, num_vision: int,
                      backend: str) -> torch.Tensor:
    return _swiglu_fwd_impl(x, gate_vision, up_vision, gate_language, up_language, offsets, num_vision, backend)


@_routed_swiglu_op.register_fake
def _(x, gate_vision, up_vision, gate_language, up_language, offsets, num_vision, backend):
    return x.new_empty(x.shape[0], gate_vision.shape[0])


@torch.library.custom_op("vexpert::routed_swiglu_backward", mutates_args=())
def _routed_swiglu_bwd_op(dh: torch.Tensor, x: torch.Tensor, gate_vision: torch.Tensor, up_vision: torch.Tensor,
                          gate_language: torch.Tensor, up_language: torch.Tensor, offsets: torch.Tensor,
                          num_vision: int, need_dx: bool, need_dw: bool,
                          backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    res = _swiglu_bwd_impl(dh, x, gate_vision, up_vision, gate_language, up_language, offsets, num_vision, need_dx,
                           need_dw, backend)
    return _none_to_empty(res, x)


@_routed_swiglu_bwd_op.register_fake
def _(dh, x, gate_vision, up_vision, gate_language, up_language, offsets, num_vision, need_dx, need_dw, backend):
    e = x.new_empty(0)
    return (x.new_empty(x.shape) if need_dx else e,) + tuple(
        w.new_empty(w.shape) if need_dw else e for w in (gate_vision, up_vision, gate_language, up_language))


def _routed_swiglu_setup(ctx, inputs, output):
    x, gv, uv, gl, ul, offsets, nv, backend = inputs
    ctx.save_for_backward(x, gv, uv, gl, ul, offsets)  # inputs only: g, u are recomputed in backward
    ctx.nv, ctx.backend = nv, backend


def _routed_swiglu_backward(ctx, dh):
    x, gv, uv, gl, ul, offsets = ctx.saved_tensors
    ni = ctx.needs_input_grad
    need_dw = bool(any(ni[1:5]))
    dx, dgv, duv, dgl, dul = _routed_swiglu_bwd_op(dh, x, gv, uv, gl, ul, offsets, ctx.nv, bool(ni[0]), need_dw,
                                                   ctx.backend)
    pick = lambda t, i: t if ni[i] else None  # noqa: E731
    return pick(dx, 0), pick(dgv, 1), pick(duv, 2), pick(dgl, 3), pick(dul, 4), None, None, None


_routed_swiglu_op.register_autograd(_routed_swiglu_backward, setup_context=_routed_swiglu_setup)


@torch.library.custom_op("vexpert::routed_qkv_rope", mutates_args=())
def _routed_qkv_rope_op(x: torch.Tensor, weight_vision: torch.Tensor, weight_language: torch.Tensor,
                        offsets: torch.Tensor, num_vision: int, bias_vision: Optional[torch.Tensor],
                        bias_language: Optional[torch.Tensor], perm: torch.Tensor, rope_cos: torch.Tensor,
                        rope_sin: torch.Tensor, batch_size: int, seq_len: int, num_heads: int, num_kv_heads: int,
                        backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _qkv_fwd_impl(x, weight_vision, weight_language, offsets, num_vision, bias_vision, bias_language, perm,
                         rope_cos, rope_sin, batch_size, seq_len, num_heads, num_kv_heads, backend)


@_routed_qkv_rope_op.register_fake
def _(x, weight_vision, weight_language, offsets, num_vision, bias_vision, bias_language, perm, rope_cos, rope_sin,
      batch_size, seq_len, num_heads, num_kv_heads, backend):
    hd = weight_vision.shape[0] // (num_heads + 2 * num_kv_heads)
    return (x.new_empty(batch_size, num_heads, seq_len, hd), x.new_empty(batch_size, num_kv_heads, seq_len, hd),
            x.new_empty(batch_size, num_kv_heads, seq_len, hd))


@torch.library.custom_op("vexpert::routed_qkv_rope_backward", mutates_args=())
def _routed_qkv_rope_bwd_op(dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, x: torch.Tensor,
                            weight_vision: torch.Tensor, weight_language: torch.Tensor, offsets: torch.Tensor,
                            num_vision: int, perm: torch.Tensor, rope_cos: torch.Tensor, rope_sin: torch.Tensor,
                            need_dx: bool, need_dw: bool, need_dbv: bool, need_dbl: bool, backend: str,
                            bias_dtype: Optional[torch.dtype]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                       torch.Tensor, torch.Tensor]:
    res = _qkv_bwd_impl(dq, dk, dv, x, weight_vision, weight_language, offsets, num_vision, perm, rope_cos,
                        rope_sin, need_dx, need_dw, need_dbv, need_dbl, backend, bias_dtype)
    dbv, dbl = [(t.to(bias_dtype) if t is not None and bias_dtype is not None else t) for t in res[3:]]
    return _none_to_empty((res[0], res[1], res[2], dbv, dbl), x)


@_routed_qkv_rope_bwd_op.register_fake
def _(dq, dk, dv, x, weight_vision, weight_language, offsets, num_vision, perm, rope_cos, rope_sin, need_dx,
      need_dw, need_dbv, need_dbl, backend, bias_dtype):
    return _linear_bwd_fake(x, weight_vision, weight_language, need_dx, need_dw, need_dbv, need_dbl, bias_dtype)


def _linear_bwd_fake(x, wv, wl, need_dx, need_dw, need_dbv, need_dbl, bias_dtype):
    N, K = wv.shape
    e = x.new_empty(0)
    bd = bias_dtype or torch.float32
    return (x.new_empty(x.shape) if need_dx else e, wv.new_empty(N, K) if need_dw else e,
            wl.new_empty(N, K) if need_dw else e,
            x.new_empty(N, dtype=bd) if need_dbv else e, x.new_empty(N, dtype=bd) if need_dbl else e)


def _routed_qkv_setup(ctx, inputs, output):
    (x, wv, wl, offsets, nv, bv, bl, perm, cos, sin, B, L, H, KV, backend) = inputs
    ctx.save_for_backward(x, wv, wl, offsets, perm, cos, sin)
    ctx.nv, ctx.backend = nv, backend
    ctx.bias_dtype = bv.dtype if bv is not None else (bl.dtype if bl is not None else None)


def _routed_qkv_backward(ctx, dq, dk, dv):
    x, wv, wl, offsets, perm, cos, sin = ctx.saved_tensors
    ni = ctx.needs_input_grad
    dx, dwv, dwl, dbv, dbl = _routed_qkv_rope_bwd_op(dq, dk, dv, x, wv, wl, offsets, ctx.nv, perm, cos, sin,
                                                     bool(ni[0]), bool(ni[1] or ni[2]), bool(ni[5]), bool(ni[6]),
                                                     ctx.backend, ctx.bias_dtype)
    return (dx if ni[0] else None, dwv if ni[1] else None, dwl if ni[2] else None, None, None,
            dbv if ni[5] else None, dbl if ni[6] else None) + (None,) * 8


_routed_qkv_rope_op.register_autograd(_routed_qkv_backward, setup_context=_routed_qkv_setup)


# ============================================================================================== dispatch + checks
def select_backend(backend: str, x: torch.Tensor, op: str, N: int, K: int, *, triton_ok: bool = True) -> str:
    """Resolve ``backend`` for one call. Explicit names win; "auto" honours VEXPERT_GEMM_BACKEND, then the measured
    table (never a backend measured slower), then Triton where usable, else torch."""
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        env = os.environ.get("VEXPERT_GEMM_BACKEND", "").strip().lower()
        if env and env != "auto":
            if env not in BACKENDS:
                raise ValueError(f"VEXPERT_GEMM_BACKEND must be one of {BACKENDS}, got {env!r}")
            backend = env
    if backend == "auto":
        if not (triton_ok and triton_usable_for(x)):
            return "torch"
        cc = torch.cuda.get_device_capability(x.device)[0] if x.is_cuda else 0
        measured = _MEASURED_BACKEND.get((op, _shape_class(x.shape[0], N, K), cc))
        return measured or "triton"
    if backend == "triton":
        require_triton("backend='triton'")
        if not triton_usable_for(x):
            raise ValueError(f"backend='triton' needs a CUDA tensor (or TRITON_INTERPRET=1 for CPU), x is on {x.device}")
        if not triton_ok:
            raise ValueError(f"backend='triton' does not support this {op} call (see the docstring), use 'torch'")
    if backend == "grouped_mm":
        if op != "linear":
            raise ValueError(f"backend='grouped_mm' only implements routed_linear, not {op}")
        if not _grouped_mm_available(x.device):
            raise ValueError("backend='grouped_mm' needs torch._grouped_mm and a CUDA device with compute "
                             "capability >= 9.0")
    return backend


_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_tensor(t, name, shape, dtype, device, allow_none=False):
    if t is None:
        if allow_none:
            return
        raise TypeError(f"{name} must be a torch.Tensor, got None")
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor{' or None' if allow_none else ''}, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype} (same as x), got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but x is on {device}")


def _check_x_plan(x, plan):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor [T, K], got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [T, K] in routed order, got shape {tuple(x.shape)}")
    if x.dtype not in _DTYPES:
        raise TypeError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    if not hasattr(plan, "expert_offsets") or not hasattr(plan, "perm"):
        raise TypeError(f"plan must be a vexpert_kernels.RoutingPlan, got {type(plan).__name__}")
    if x.shape[0] != plan.perm.shape[0]:
        raise ValueError(f"x must have T={plan.perm.shape[0]} rows (the plan's B*L, routed order), "
                         f"got {x.shape[0]}")
    if plan.expert_offsets.device != x.device:
        raise ValueError(f"plan is on {plan.expert_offsets.device} but x is on {x.device}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    return x


def _check_weights(pairs, N, K, x):
    for name, w in pairs:
        _check_tensor(w, name, (N, K), x.dtype, x.device)
    return [w if w.stride(-1) == 1 else w.contiguous() for _, w in pairs]


def _weight_shape(w, name):
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor [N, K], got {type(w).__name__}")
    if w.dim() != 2:
        raise ValueError(f"{name} must be 2-D [N, K] (nn.Linear layout), got shape {tuple(w.shape)}")
    return w.shape


def _nv_for(backend, plan) -> int:
    return plan.num_vision if backend == "torch" else -1  # the torch path slices on the host (one cached sync)


# ============================================================================================== public API
def routed_linear(x, weight_vision, weight_language, plan, *, bias_vision=None, bias_language=None, residual=None,
                  backend: str = "auto") -> torch.Tensor:
    """Routed linear: ``out[r] = residual[r] + x[r] @ W_e^T + b_e`` with e the expert of routed row r.

    Args:
        x: [T, K] rows in routed order (``plan.perm``), float32/float16/bfloat16.
        weight_vision, weight_language: [N, K] each (nn.Linear layout; separate tensors, never stacked).
        plan: the RoutingPlan (uses ``plan.expert_offsets`` on device; the torch backend uses ``plan.num_vision``).
        bias_vision, bias_language: [N] or None, per expert.
        residual: [T, N] or None, added in the epilogue (fp32 add). Gradient = dY.
        backend: "auto" | "triton" | "torch" | "grouped_mm".
    Returns: [T, N] in x.dtype, routed order.
    """
    x = _check_x_plan(x, plan)
    N, K = _weight_shape(weight_vision, "weight_vision")
    if K != x.shape[1]:
        raise ValueError(f"weight_vision must have shape [N, K={x.shape[1]}] to match x, got {tuple(weight_vision.shape)}")
    wv, wl = _check_weights([("weight_vision", weight_vision), ("weight_language", weight_language)], N, K, x)
    _check_tensor(bias_vision, "bias_vision", (N,), x.dtype, x.device, allow_none=True)
    _check_tensor(bias_language, "bias_language", (N,), x.dtype, x.device, allow_none=True)
    _check_tensor(residual, "residual", (x.shape[0], N), x.dtype, x.device, allow_none=True)
    if residual is not None and residual.stride(-1) != 1:
        residual = residual.contiguous()
    op = "linear_residual" if residual is not None else (
        "linear_bias" if (bias_vision is not None or bias_language is not None) else "linear")
    be = select_backend(backend, x, "linear" if backend == "grouped_mm" else op, N, K)
    if be == "grouped_mm":  # differentiable through torch's own grouped_mm autograd
        return _grouped_mm_fwd(x, wv, wl, plan.expert_offsets, bias_vision, bias_language, residual)
    return _routed_linear_op(x, wv, wl, plan.expert_offsets, _nv_for(be, plan), bias_vision, bias_language,
                             residual, be)


def routed_swiglu(x, gate_vision, up_vision, gate_language, up_language, plan, *, backend: str = "auto"):
    """Routed SwiGLU MLP input half: ``silu(x @ Wg_e^T) * (x @ Wu_e^T)``.

    Args:
        x: [T, K] routed order; gate_*/up_*: [I, K] each per expert (HF gate_proj / up_proj weights, no bias).
    Returns: [T, I]. The Triton kernel computes gate and up tiles from the same X tile (two accumulators) and writes
    only the I product columns. Backward saves x and the weights only and recomputes gate/up.
    """
    x = _check_x_plan(x, plan)
    I, K = _weight_shape(gate_vision, "gate_vision")
    if K != x.shape[1]:
        raise ValueError(f"gate_vision must have shape [I, K={x.shape[1]}] to match x, got {tuple(gate_vision.shape)}")
    gv, uv, gl, ul = _check_weights([("gate_vision", gate_vision), ("up_vision", up_vision),
                                     ("gate_language", gate_language), ("up_language", up_language)], I, K, x)
    be = select_backend(backend, x, "swiglu", I, K)
    return _routed_swiglu_op(x, gv, uv, gl, ul, plan.expert_offsets, _nv_for(be, plan), be)


def routed_qkv_rope(x, weight_vision, weight_language, plan, *, num_heads: int, num_kv_heads: int,
                    rope_theta: Optional[float] = None, bias_vision=None, bias_language=None, positions=None,
                    position_dtype=None, rope_cos_sin=None, backend: str = "auto"):
    """Routed QKV projection + RoPE + split + un-permute, fused.

    Args:
        x: [T, D] routed order. weight_*: [(H + 2*KV) * hd, D] (HF column order q | k | v). bias_*: [N] or None.
        num_heads (H), num_kv_heads (KV, GQA), rope_theta: RoPE base; head_dim hd = N / (H + 2*KV).
        positions: [T] position of each routed row (default ``plan.routed_position_ids``).
        position_dtype: e.g. torch.bfloat16 rounds positions through that dtype first (HF's bf16 table quirk).
        rope_cos_sin: optional precomputed table ``(cos, sin)``, each fp32 [T, hd/2] in routed order (row i holds
            cos/sin of the angles of routed row i) — e.g. built once per forward from an HF rotary module's own
            ``inv_freq`` (see ``RoutingPlan``). When given, ``rope_theta``, ``positions`` and ``position_dtype`` are
            not used. Exactly one of ``rope_theta`` / ``rope_cos_sin`` must be given.
    Returns: q [B, H, L, hd], k [B, KV, L, hd], v [B, KV, L, hd] in sequence order (row i of x lands at sequence
    position ``plan.perm[i]``), RoPE (GPT-NeoX half rotation, fp32 cos/sin) applied to q and k.
    """
    x = _check_x_plan(x, plan)
    for name, v in (("num_heads", num_heads), ("num_kv_heads", num_kv_heads)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    if (rope_theta is None) == (rope_cos_sin is None):
        raise ValueError("routed_qkv_rope needs exactly one of rope_theta= (RoPE base) or rope_cos_sin= (a "
                         f"precomputed (cos, sin) table), got rope_theta={rope_theta!r} and rope_cos_sin="
                         f"{'None' if rope_cos_sin is None else 'a table'}")
    if rope_theta is not None:
        check_positive_finite("rope_theta", rope_theta)
    N, K = _weight_shape(weight_vision, "weight_vision")
    if K != x.shape[1]:
        raise ValueError(f"weight_vision must have shape [N, K={x.shape[1]}] to match x, got {tuple(weight_vision.shape)}")
    heads = num_heads + 2 * num_kv_heads
    if N % heads or (N // heads) % 2:
        raise ValueError(f"weight_vision has N={N} rows, which is not (num_heads + 2*num_kv_heads)={heads} times an "
                         "even head_dim")
    hd = N // heads
    wv, wl = _check_weights([("weight_vision", weight_vision), ("weight_language", weight_language)], N, K, x)
    _check_tensor(bias_vision, "bias_vision", (N,), x.dtype, x.device, allow_none=True)
    _check_tensor(bias_language, "bias_language", (N,), x.dtype, x.device, allow_none=True)
    if rope_cos_sin is not None:
        if not isinstance(rope_cos_sin, (tuple, list)) or len(rope_cos_sin) != 2:
            raise TypeError(f"rope_cos_sin must be a (cos, sin) pair, got {type(rope_cos_sin).__name__}")
        cos, sin = (check_tensor(n, t, shape=(x.shape[0], hd // 2), dtypes=(torch.float32,), device=x.device)
                    for n, t in zip(("rope_cos_sin[0] (cos)", "rope_cos_sin[1] (sin)"), rope_cos_sin))
    else:
        if positions is None:
            positions = plan.routed_position_ids
        if not isinstance(positions, torch.Tensor) or tuple(positions.shape) != (x.shape[0],):
            raise ValueError(f"positions must be a tensor [T={x.shape[0]}] in routed order, got "
                             f"{getattr(positions, 'shape', type(positions).__name__)}")
        if positions.device != x.device:
            raise ValueError(f"positions is on {positions.device} but x is on {x.device}")
        if position_dtype is not None:
            if not isinstance(position_dtype, torch.dtype) or not position_dtype.is_floating_point:
                raise TypeError(f"position_dtype must be a floating torch.dtype or None, got {position_dtype!r}")
            positions = positions.to(position_dtype)
        cos, sin = _rope_cos_sin(positions.to(torch.float32), _rope_inv_freq(hd, float(rope_theta), x.device))
    be = select_backend(backend, x, "qkv_rope", N, K)
    B, L = plan.batch_size, plan.seq_len
    return _routed_qkv_rope_op(x, wv, wl, plan.expert_offsets, _nv_for(be, plan), bias_vision, bias_language,
                               plan.perm, cos.contiguous(), sin.contiguous(), B, L, num_heads, num_kv_heads, be)


# ============================================================================================== float64 references
def _ref_linear(x, wv, wl, vis_rows, bv=None, bl=None, residual=None):
    x, wv, wl = x.double(), wv.double(), wl.double()
    yv, yl = x @ wv.t(), x @ wl.t()
    if bv is not None:
        yv = yv + bv.double()
    if bl is not None:
        yl = yl + bl.double()
    y = torch.where(vis_rows[:, None], yv, yl)
    return y + residual.double() if residual is not None else y


def routed_linear_reference(x, weight_vision, weight_language, plan, *, bias_vision=None, bias_language=None,
                            residual=None):
    """Plain float64 PyTorch oracle (differentiable)."""
    vis = torch.arange(x.shape[0], device=x.device) < plan.expert_offsets[1]
    return _ref_linear(x, weight_vision, weight_language, vis, bias_vision, bias_language, residual)


def routed_swiglu_reference(x, gate_vision, up_vision, gate_language, up_language, plan):
    vis = torch.arange(x.shape[0], device=x.device) < plan.expert_offsets[1]
    g = _ref_linear(x, gate_vision, gate_language, vis)
    u = _ref_linear(x, up_vision, up_language, vis)
    return torch.nn.functional.silu(g) * u


def routed_qkv_rope_reference(x, weight_vision, weight_language, plan, *, num_heads, num_kv_heads, rope_theta,
                              bias_vision=None, bias_language=None, positions=None, position_dtype=None):
    """float64 oracle: per-expert linear, HF RoPE (fp32 cos/sin table at the positions), split, un-permute."""
    vis = torch.arange(x.shape[0], device=x.device) < plan.expert_offsets[1]
    qkv = _ref_linear(x, weight_vision, weight_language, vis, bias_vision, bias_language)
    H, KV = num_heads, num_kv_heads
    hd = qkv.shape[1] // (H + 2 * KV)
    B, L = plan.batch_size, plan.seq_len
    seq = qkv[plan.inv_perm].view(B, L, H + 2 * KV, hd).transpose(1, 2)  # [B, heads, L, hd]
    q, k, v = seq.split([H, KV, KV], dim=1)
    pos = plan.position_ids if positions is None else positions[plan.inv_perm].view(B, L)
    if position_dtype is not None:
        pos = pos.to(position_dtype)
    inv_freq = _rope_inv_freq(hd, float(rope_theta), x.device)
    freqs = pos.float()[..., None] * inv_freq            # fp32, as HF
    emb = torch.cat([freqs, freqs], -1)
    cos, sin = emb.cos().double()[:, None], emb.sin().double()[:, None]

    def rot(t):
        return torch.cat([-t[..., hd // 2:], t[..., :hd // 2]], -1)
    return q * cos + rot(q) * sin, k * cos + rot(k) * sin, v


# ============================================================================================== AOT compile specs
_TL_DTYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}

# (epilogue, HAS_BIAS_V, HAS_BIAS_L, HAS_RESIDUAL, HEAD_DIM) variants the launchers produce.
_LINEAR_VARIANTS = (
    ("linear", EPI_LINEAR, False, False, False, 0),          # plain GEMM and every dX GEMM
    ("bias", EPI_LINEAR, True, True, False, 0),
    ("bias_v", EPI_LINEAR, True, False, False, 0),            # CogVLM2: only the vision QKV has a bias
    ("residual", EPI_LINEAR, False, False, True, 0),          # o / down projections, SwiGLU dX second GEMM
)
_QKV_VARIANTS = (  # HEAD_DIM is a constexpr: hd 128 (CogVLM/CogVLM2) in every dtype, other head dims in bf16
    ("qkv_hd128", EPI_QKV_ROPE, False, False, False, 128),
    ("qkv_bias_v_hd128", EPI_QKV_ROPE, True, False, False, 128),
)
_QKV_EXTRA_HD = (  # (bf16 only: the 16-bit kernels differ only in the MMA dtype)
    ("qkv_bias_hd64", EPI_QKV_ROPE, True, True, False, 64),
    ("qkv_bias_v_hd80", EPI_QKV_ROPE, True, False, False, 80),    # hd/2 = 40: padded 64-wide chunk, masked
    ("qkv_bias_v_hd96", EPI_QKV_ROPE, True, False, False, 96),
    ("qkv_hd256", EPI_QKV_ROPE, False, False, False, 256),        # two 64-wide chunks per head half
)
_DUAL_VARIANTS = (("swiglu", EPI_SWIGLU, False, False, False, 0), ("swiglu_bwd", EPI_SWIGLU_BWD, False, False, False, 0))


def _gemm_signature(dt: str) -> dict:
    p = "*" + dt
    sig = {"x_ptr": p, "wv_ptr": p, "wl_ptr": p, "w2v_ptr": p, "w2l_ptr": p, "bv_ptr": p, "bl_ptr": p,
           "res_ptr": p, "out_ptr": p, "out2_ptr": p, "dh_ptr": p, "offsets_ptr": "*i32", "perm_ptr": "*i64",
           "cos_ptr": "*fp32", "sin_ptr": "*fp32", "k_out_ptr": p, "v_out_ptr": p}
    for name in ("N", "K", "stride_xm", "stride_xk", "stride_wn", "stride_wk", "stride_om", "stride_rm",
                 "stride_dm", "seq_len", "num_heads", "num_kv_heads", "num_n_tiles", "max_tiles"):
        sig[name] = "i32"
    for name in ("EPILOGUE", "HAS_BIAS_V", "HAS_BIAS_L", "HAS_RESIDUAL", "HEAD_DIM", "BLOCK_M", "BLOCK_N", "BLOCK_K",
                 "GROUP_M", "UPCAST_DOT", "INPUT_PRECISION"):
        sig[name] = "constexpr"
    return sig


def _wgrad_signature(dt: str) -> dict:
    p = "*" + dt
    sig = {"dy_ptr": p, "x_ptr": p, "dwv_ptr": p, "dwl_ptr": p, "dbv_ptr": p, "dbl_ptr": p, "offsets_ptr": "*i32",
           "N": "i32", "K": "i32", "stride_dym": "i32", "stride_xm": "i32"}
    for name in ("HAS_DW", "HAS_DB_V", "HAS_DB_L", "BLOCK_M", "BLOCK_N", "BLOCK_K", "UPCAST_DOT", "INPUT_PRECISION"):
        sig[name] = "constexpr"
    return sig


def aot_compile_specs():
    """Every (kernel, GPU config, epilogue, dtype) the launchers may pick on sm_90 / sm_80, for the compile report."""
    if not HAS_TRITON:
        return []
    from .._aot import CompileSpec
    specs = []
    for cc, tables in _GEMM_CONFIGS.items():
        for dtype, dt in _TL_DTYPE.items():
            prec = "tf32"
            table = tables["fp32" if dtype == torch.float32 else "16bit"]
            for key, (BM, BN, BK, GM, nw, ns) in table.items():
                dual = key.startswith("dual") or key == "qkv"
                variants = {"qkv": _QKV_VARIANTS + (_QKV_EXTRA_HD if dtype == torch.bfloat16 else ()),
                            "dual_bwd": _DUAL_VARIANTS[1:]}.get(key, _DUAL_VARIANTS[:1] if dual else _LINEAR_VARIANTS)
                if key == "large":  # dispatcher: plain forward only (see _gemm_config)
                    variants = tuple(v for v in variants if not v[4])
                if not dual and key != "large":  # dX = dY W_e: the transposed weight view (stride_wn == 1)
                    variants = variants + (("dx", EPI_LINEAR, False, False, False, 0, "nn"),
                                           ("dx_residual", EPI_LINEAR, False, False, True, 0, "nn"))
                for vname, epi, hbv, hbl, hres, hd, *layout in variants:
                    bn = _qkv_block_n(hd, BN) if epi == EPI_QKV_ROPE else BN  # what _launch_gemm passes
                    cfg = dict(EPILOGUE=epi, HAS_BIAS_V=hbv, HAS_BIAS_L=hbl, HAS_RESIDUAL=hres, HEAD_DIM=hd,
                               BLOCK_M=BM, BLOCK_N=bn, BLOCK_K=BK, GROUP_M=GM, UPCAST_DOT=False,
                               INPUT_PRECISION=prec, stride_xk=1)
                    # the JIT turns unit strides into constants; mirror it or the AOT code is not what runs
                    cfg["stride_wn" if layout else "stride_wk"] = 1
                    div16 = ["N", "K", "stride_xm", "stride_om", "stride_rm", "stride_dm",
                             "stride_wk" if layout else "stride_wn"]
                    specs.append(CompileSpec(
                        name=f"routed_gemm[{vname},{dt},{BM}x{bn}x{BK},w{nw}s{ns},sm{cc}]",
                        fn=_routed_gemm_kernel, signature=_gemm_signature(dt), constexprs=cfg, num_warps=nw,
                        num_stages=ns, targets=(cc,), extra={"config": key, "divisible_by_16": div16}))
        for dtype, dt in _TL_DTYPE.items():
            prec = "tf32"
            for key, (BM, BN, BK, nw, ns) in _WGRAD_CONFIGS[cc].items():
                for vname, hdw, hdbv, hdbl in (("dw", True, False, False), ("dw_db", True, True, True),
                                               ("dw_db_v", True, True, False), ("db", False, True, True)):
                    cfg = dict(HAS_DW=hdw, HAS_DB_V=hdbv, HAS_DB_L=hdbl, BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK,
                               UPCAST_DOT=False, INPUT_PRECISION=prec)
                    specs.append(CompileSpec(
                        name=f"routed_wgrad[{vname},{dt},{BM}x{BN}x{BK},w{nw}s{ns},sm{cc}]",
                        fn=_routed_wgrad_kernel, signature=_wgrad_signature(dt), constexprs=cfg, num_warps=nw,
                        num_stages=ns, targets=(cc,),
                        extra={"config": key, "divisible_by_16": ["N", "K", "stride_dym", "stride_xm"]}))
    # table entries that share a config (e.g. fp32 large/medium/small) compile once
    unique = {}
    for sp in specs:
        unique.setdefault(sp.name, sp)
    return list(unique.values())

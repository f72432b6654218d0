"""Warp-specialised sm_90 attention forward: ``_attn_fwd_ws_kernel`` (``@triton.jit``, behind one ``if HAS_TRITON:``).

Same arguments, masking model and outputs as ``kernels._attn_fwd_kernel`` (see the package map; ``SPAN`` /
``SPAN_END`` carry the launcher's per-tile span buffers instead), written in the one form Triton 3.6 / 3.9
warp-specialise on sm_90a (docs/warp_specialization.md): ONE key loop
``tl.range(lo, hi, BLOCK_N, warp_specialize=WARP_SPEC)`` with the causal / span / padding mask computed on every
tile (no interior/edge split into two loops), no early ``return`` (a query tile past a short varlen sequence runs an
empty loop and stores nothing), no ``if``/``else`` on run-time values, Q/K/V by tensor descriptors (TMA), launched
with num_warps=4: the Hopper pass then splits the whole kernel into a TMA producer warpgroup and two wgmma consumer
warpgroups (12 warps, ``setmaxnreg``).

The Hopper pass hands every load inside the loop to the producer warpgroup and only knows TMA loads there (a
pointer ``tl.load`` in the loop fails the pass: "unsupported load type for producer commit", and so does a
[BLOCK_M] pointer load before the loop whose value the loop uses; scalar loads are fine), and it splits every
[BLOCK_M, ...] value between the two consumer warpgroups through a fixed set of ops (no reductions; Triton 3.6 not
even reshape/split). So:

* key padding: the keep flags come through a [1, BLOCK_N] int8 tensor descriptor per key tile (``launch_ws`` gives
  them 16-byte aligned rows);
* bidirectional image spans: canonical span ids are contiguous runs, so query ``i`` sees key ``j`` (query coords
  ``j - offset``) iff ``j - offset < span_end[i]``: keys before ``i`` are causally visible anyway, later ones only
  inside ``i``'s span, and ``span_end[i] = i + 1`` outside images. The per-row ends come as bytes in a
  [BLOCK_M, 16] fp16 TMA box per query tile (columns end % 256, end // 256, zeros; ``launch_ws._span_rows``), and a
  K=16 matmul with a constant selector turns them into a [BLOCK_M, BLOCK_N] tile of ends -- exact (integers
  < 2**16, fp32 accumulation) and the one row-to-tile broadcast the pass partitions on 3.6 and 3.9
  (docs/warp_specialization.md lists the forms it rejects). The tile's key bound is the tile's largest span end,
  a scalar load.

Keys outside the tile's range never reach the accumulator as non-finite values: the K/V descriptors start at the
first kept key of the row (key padding) and end at the tile's key bound ``hi``, so TMA zero-fills everything else
(negative and past-the-end coordinates) -- no [BLOCK_N, D] select on V, which would pull V out of shared memory.
"""
from __future__ import annotations

from vexpert_kernels._triton_compat import HAS_TRITON, tl, triton  # noqa: F401

if HAS_TRITON:
    from .kernels import _dot, _program_rows, _routed_rows, _row_offset

    @triton.jit
    def _attn_fwd_ws_kernel(
        Q, K, V, O, LSE, CU_Q, CU_K, KV_LO, KV_HI, KPM, SPAN, SPAN_END, OIDX,
        stride_qb, stride_qh, stride_ql, stride_kb, stride_kh, stride_kl, stride_vb, stride_vh, stride_vl,
        stride_ob, stride_oh, stride_ol, stride_lb, stride_lh, stride_ll, stride_mb, stride_sb, stride_ib,
        H, LQ, LK, T_OUT, qk_scale,
        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr, IS_VARLEN: tl.constexpr, HAS_KPM: tl.constexpr, BIDIR: tl.constexpr,
        UPCAST: tl.constexpr, PREC: tl.constexpr, HAS_OIDX: tl.constexpr, USE_TMA: tl.constexpr = True,
        WARP_SPEC: tl.constexpr = True,
    ):
        # USE_TMA is always true here (the launcher passes it to either forward kernel); HEAD_DIM == BLOCK_D (TMA)
        tl.static_assert(HEAD_DIM == BLOCK_D)
        pid_m = tl.num_programs(0) - 1 - tl.program_id(0)  # heavy (late) causal tiles first
        b, h, q_start, len_q, k_start, len_k = _program_rows(tl.program_id(1), H, CU_Q, CU_K, LQ, LK, IS_VARLEN)
        kvh = h // GROUP
        start_m = pid_m * BLOCK_M
        offset = len_k - len_q
        offs_m = start_m + tl.arange(0, BLOCK_M)
        offs_n0 = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        m_valid = offs_m < len_q
        b64 = b.to(tl.int64)
        qpos = offset + offs_m
        # [lo, hi): the keys any row of this tile may see (as kernels._key_range, without row-indexed loads)
        q_end = tl.minimum(start_m + BLOCK_M, len_q)
        if BIDIR:
            # SPAN: [B * n_query_tiles * BLOCK_M, 16] fp16 span-end bytes of each query row (module docstring);
            # SPAN_END: [B * n_query_tiles] int32, each query tile's largest span end
            row0 = (b * tl.num_programs(0) + pid_m) * BLOCK_M
            span_bytes = tl.make_tensor_descriptor(SPAN, shape=[row0 + BLOCK_M, 16], strides=[16, 1],
                                                   block_shape=[BLOCK_M, 16]).load([row0, 0])
            sel = tl.arange(0, 16)[:, None] + tl.zeros([16, BLOCK_N], tl.int32)
            sel = tl.where(sel == 0, 1.0, tl.where(sel == 1, 256.0, 0.0)).to(tl.float16)  # end = b0 + 256 b1
            q_end = tl.load(SPAN_END + b * tl.num_programs(0) + pid_m)
        hi = tl.minimum(offset + q_end, len_k)
        lo = hi * 0
        if HAS_KPM:  # rows of padded batches: keys before the first / after the last kept key are all masked
            lo = tl.load(KV_LO + b)
            hi = tl.minimum(hi, tl.load(KV_HI + b))
        lo = (lo // BLOCK_N) * BLOCK_N
        # a query tile past the end of a short (varlen) sequence: no keys (instead of an early return, which the
        # warp-specialisation pass cannot partition)
        hi = tl.where(start_m < len_q, hi, lo)
        # first key row the descriptors may return: the first kept key (padded rows), else the sequence start
        k_first = lo * 0
        if HAS_KPM:
            k_first = tl.minimum(tl.load(KV_LO + b), len_k)
        # descriptor extents are kept >= 1 row (a zero-row TMA box is not a valid tensor map); an empty range
        # means an empty loop, so that row is never read
        q_desc = tl.make_tensor_descriptor(Q + _row_offset(b, h, q_start, stride_qb, stride_qh, stride_ql),
                                           shape=[tl.maximum(len_q, 1), HEAD_DIM], strides=[stride_ql, 1],
                                           block_shape=[BLOCK_M, BLOCK_D])
        k_desc = tl.make_tensor_descriptor(K + _row_offset(b, kvh, k_start + k_first, stride_kb, stride_kh, stride_kl),
                                           shape=[tl.maximum(hi - k_first, 1), HEAD_DIM], strides=[stride_kl, 1],
                                           block_shape=[BLOCK_N, BLOCK_D])
        v_desc = tl.make_tensor_descriptor(V + _row_offset(b, kvh, k_start + k_first, stride_vb, stride_vh, stride_vl),
                                           shape=[tl.maximum(hi - k_first, 1), HEAD_DIM], strides=[stride_vl, 1],
                                           block_shape=[BLOCK_N, BLOCK_D])
        q = q_desc.load([start_m, 0])  # rows past len_q arrive as zeros
        if HAS_KPM:  # keep flags [B, LK] int8, 16-byte aligned rows (launch_ws); keys past len_k arrive as 0
            kpm_desc = tl.make_tensor_descriptor(KPM, shape=[b + 1, len_k], strides=[stride_mb, 1],
                                                 block_shape=[1, BLOCK_N])

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for start_n in tl.range(lo, hi, BLOCK_N, warp_specialize=WARP_SPEC):
            offs_n = start_n + offs_n0
            k = k_desc.load([start_n - k_first, 0])  # [BLOCK_N, D]; rows before k_first / from hi on: zeros
            s = _dot(q, tl.trans(k), UPCAST, PREC) * qk_scale  # log2 domain: qk_scale = softmax_scale * log2(e)
            # causal (bottom-right); keys from hi on are never visible to a real row (hi bounds its causal / span
            # range, or the padding does), and rows past len_q are never stored
            if BIDIR:  # j - offset < span_end[i] (causal included), ends broadcast over the keys by a K=16 matmul
                ok = (offs_n - offset).to(tl.float32)[None, :] < _dot(span_bytes, sel, UPCAST, PREC)
            else:
                ok = offs_n[None, :] <= qpos[:, None]
            if HAS_KPM:
                ok = ok & (kpm_desc.load([b, start_n]) != 0)  # [1, BLOCK_N] keep flags
            s = tl.where(ok, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing visible yet: no NaN
            p = tl.exp2(s - m_safe[:, None])
            alpha = tl.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = v_desc.load([start_n - k_first, 0])
            acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, UPCAST, PREC)
            m_i = m_new

        empty = l_i == 0.0
        l_safe = tl.where(empty, 1.0, l_i)
        out = acc / l_safe[:, None]
        lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)
        if HAS_OIDX:  # O straight in the plan's routed order [T_OUT, H*hd]
            orow, o_ok = _routed_rows(OIDX + b64 * stride_ib + q_start, offs_m, m_valid, T_OUT)
            tl.store(O + h.to(tl.int64) * stride_oh + orow[:, None] * stride_ol + offs_d[None, :],
                     out.to(O.dtype.element_ty), mask=o_ok[:, None])
        else:
            o_ptr = O + _row_offset(b, h, q_start, stride_ob, stride_oh, stride_ol)
            tl.store(o_ptr + offs_m[:, None] * stride_ol + offs_d[None, :], out.to(O.dtype.element_ty),
                     mask=m_valid[:, None])
        l_ptr = LSE + _row_offset(b, h, q_start, stride_lb, stride_lh, stride_ll)
        tl.store(l_ptr + offs_m * stride_ll, lse, mask=m_valid)


def aot_compile_specs() -> list:
    """The compile report discovers the module that owns the kernel; the specs are built in :mod:`.aot_ws`."""
    from .aot_ws import build_ws_aot_specs

    return build_ws_aot_specs()

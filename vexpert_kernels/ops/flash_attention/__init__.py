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
The table's dK/dV tiles take 16-32 queries per step (16 x 128 keys on sm_90 at hd 128: pointer tensors and K/V in
registers leave no room). On sm_90 the backward's tuning candidates (``bwd_tune_configs``; ``flash_attention(...,
bwd_config=tile | "auto")``, see :mod:`.bwd_tuning`) take 64-query steps: pointer tiles at hd 64 and a TMA variant
of the dK/dV kernel (``USE_TMA``: K/V, Q and dO through device-side tensor descriptors, validity-free masks, dQ by
TMA reductions) at hd 64 and 128; ``configs`` records their registers under Triton 3.6 and 3.9.

Warp-specialised sm_90 forward (``kernels_ws.py`` + ``configs_ws.py`` + ``launch_ws.py`` + ``aot_ws.py``): one masked
KV loop ``tl.range(..., warp_specialize=True)`` over 4 warps, Q/K/V by TMA, which Triton's Hopper pass splits into a
TMA producer and two wgmma consumer warpgroups (docs/warp_specialization.md); a forward tuning candidate on sm_90
(``fwd_config`` 5th entry 2), never an untuned default.
"""
from __future__ import annotations

from .api import MAX_HEAD_DIM, SUPPORTED_DTYPES, flash_attention  # noqa: F401
from .configs import (_GPU_CONFIGS, _INTERPRET_CONFIG, _PREPROCESS_CONFIG, _configs_for, bwd_tune_configs,  # noqa: F401
                      fwd_tune_configs)
from .launch import bwd_tma_usable  # noqa: F401
from .launch import tma_usable  # noqa: F401
from .masks import canonical_span_ids, span_bounds  # noqa: F401

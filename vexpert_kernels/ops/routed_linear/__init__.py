"""Routed (visual-expert) linears as grouped GEMMs with fused epilogues, forward and backward.

Rows are in *routed order* (all vision rows, then all language rows; ``plan.expert_offsets = (0, n_vision, T)`` on
the device), so every routed linear is a GEMM over two contiguous row ranges with two weight matrices.

Public functions (shapes; weights in HF ``nn.Linear`` layout ``[N, K]``, one tensor per expert):

* ``routed_linear(x [T,K], w_v [N,K], w_l [N,K], plan, bias_vision=None, bias_language=None, residual=None)``
  -> ``[T, N]`` = ``residual + x W_e^T + b_e`` per expert.
* ``routed_swiglu(x [T,K], gate_v [I,K], up_v [I,K], gate_l, up_l, plan)`` -> ``[T, I]`` = ``silu(x Wg^T) * (x Wu^T)``.
* ``routed_swiglu_mlp(x [T,K], gate_v, up_v, down_v [D,I], gate_l, up_l, down_l, plan, residual=None)`` -> ``[T, D]``
  = ``residual + down(swiglu(x))``; its backward fuses the SwiGLU backward into the down projection's dX epilogue.
* ``routed_qkv_rope(x [T,D], w_v [(H+2KV)hd, D], w_l, plan, num_heads=H, num_kv_heads=KV, rope_theta=...)``
  -> ``q [B,H,L,hd], k [B,KV,L,hd], v [B,KV,L,hd]`` in sequence order, RoPE (GPT-NeoX half rotation) applied to q, k.

Backends (``backend=``): ``"triton"`` (one persistent grouped-GEMM launch over the tiles of both experts; the epilogue
is fused), ``"torch"`` (two GEMMs on zero-copy row slices writing into slices of one output + PyTorch elementwise;
the CPU fallback and the baseline), ``"grouped_mm"`` (``torch._grouped_mm`` where available, plain linear only),
``"auto"``: the environment variable ``VEXPERT_GEMM_BACKEND`` (one of the names above; anything else raises) wins;
then on CUDA every call's key (dtype, N, K, epilogue, bias, residual, token bucket) is tuned once by
``vexpert_kernels.autotune.select`` over torch, grouped_mm (bf16), 2-4 Triton configs and any launcher registered in
``tuning._extra_candidates``, each checked against the torch path (static choice: torch); the backward tunes its dX
and dW GEMMs the same way ("routed_linear_dx", "routed_linear_dw"). On CPU: our Triton kernels through the
interpreter when it is on, else torch. ``last_backend(op)`` tells which path the last call ran.

Layout: kernels (``_routed_gemm_kernel``, ``_routed_wgrad_kernel``) -> launchers -> torch backend -> custom ops
(``torch.library.custom_op`` with fake impls and ``register_autograd``) -> public functions -> ``aot_compile_specs``.

Backward: dX is the same grouped GEMM with the transposed weight views (no copies); dW_e = dY_e^T X_e and
db_e = sum(dY_e) come from ``_routed_wgrad_kernel``: one program owns one (expert, N-tile, K-tile) block of dW and
walks that expert's rows in order with an fp32 accumulator -> deterministic, no atomics.
Saved for backward: the inputs (x, weights); SwiGLU also saves its gate/up pre-activations [T, 2I] (written by the
forward kernel) so its backward is one elementwise pass + ONE dX GEMM over K = 2I (two weight pointers) + dW;
``recompute=True`` saves only the inputs and recomputes gate/up in the backward GEMM (``EPI_SWIGLU_BWD``). QKV
re-derives the pre-RoPE gradient by the inverse rotation of dq, dk (RoPE is orthogonal) with the forward's cos/sin
table, in one gather kernel into a [T, N] buffer. fp32 inputs follow ``torch.get_float32_matmul_precision()``
("highest": IEEE fp32 products, else TF32), like cuBLAS.

QKV forward tiles: one tile = BLOCK_M rows x one head's BLOCK_N first-half columns (accumulator 1) and the matching
second-half columns (accumulator 2, the RoPE partners); cos/sin come from an fp32 [T, hd/2] table built by torch
(HF's numerics). Both choices keep the epilogue free of spills on sm_90/sm_80 (the compile report lists registers).
"""
from __future__ import annotations

# Package map (imports point left only):
#   kernels.py     EPI_*, _tile_coords, _routed_gemm_kernel, _routed_wgrad_kernel   (@triton.jit only)
#   configs.py     _GEMM_CONFIGS / _WGRAD_CONFIGS / _INTERP_*, _gemm_config, _wgrad_config, _qkv_block_n
#   launch.py      _launch_gemm, _launch_wgrad, _num_programs, _precision, _out (NaN-poisoned in tests)
#   torch_impl.py  torch backend (two GEMMs on row slices), _swiglu_grads, torch._grouped_mm baseline
#   rope.py        _rope_inv_freq, _rope_cos_sin, _rope_rows, _qkv_routed_to_heads, _qkv_heads_to_routed
#   custom_ops.py  _*_impl bodies, the six vexpert:: ops, fakes, autograd
#   mlp.py         the fused SwiGLU MLP op (vexpert::routed_swiglu_mlp + backward), its EPI_DSWIGLU dX step
#   tuning.py      backend="auto" on CUDA: candidates + keys for autotune.select, backend names, _extra_candidates
#   api.py         select_backend, last_backend, argument checks, routed_linear / routed_swiglu / routed_qkv_rope
#   reference.py   float64 oracles *_reference
#   aot.py         aot_compile_specs (defined only there: compile_report walks every module)
from .api import BACKENDS, ENV_BACKEND, last_backend, routed_linear, routed_qkv_rope, routed_swiglu, select_backend  # noqa: F401
from .api import routed_swiglu_mlp  # noqa: F401
from .reference import (  # noqa: F401
    routed_linear_reference,
    routed_qkv_rope_reference,
    routed_swiglu_mlp_reference,
    routed_swiglu_reference,
)

__all__ = ["routed_linear", "routed_swiglu", "routed_qkv_rope", "routed_swiglu_mlp", "select_backend", "last_backend",
           "BACKENDS", "routed_linear_reference", "routed_swiglu_reference", "routed_qkv_rope_reference",
           "routed_swiglu_mlp_reference"]

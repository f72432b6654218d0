"""Hopper (sm_90) grouped GEMMs for the routed (visual-expert) linears: TMA descriptors, persistent tile loops.

Map: ``kernels.py`` (``@triton.jit``: forward/dX kernel, dW kernel) -> ``configs.py`` (``SM90Config``,
``SM90_CONFIGS``, ``SM90_WGRAD_CONFIGS``, interpreter configs, ``sm90_unsupported_reason``) -> ``launch.py`` (the
three launchers) ; ``aot.py`` (``aot_compile_specs`` for ``python -m vexpert_kernels.compile_report``; defined only
there so the report does not list the specs twice).

Contract (weights in ``nn.Linear`` layout [N, K]; ``offsets`` int32 [3] device tensor (0, n_vision, T); rows
[0, n_vision) use the vision weight, [n_vision, T) the language weight; no host sync):

* ``grouped_gemm_sm90(x [T,K], wv, wl, offsets, *, bias_v=None, bias_l=None, residual=None, config=None)``
  -> ``y [T,N]``
* ``grouped_gemm_dx_sm90(dy [T,N], wv, wl, offsets, config=None)`` -> ``dx [T,K]``
* ``grouped_wgrad_sm90(dy [T,N], x [T,K], offsets, config=None)`` -> ``(dwv [N,K], dwl [N,K])``
* ``grouped_swiglu_sm90(x [T,K], gv [I,K], uv [I,K], gl, ul, offsets, config=None)`` -> ``(h [T,I], gu [T,2I])``
* ``grouped_dx_dswiglu_sm90(dy [T,D], wv [D,I], wl, gu [T,2I], offsets, config=None)`` -> ``dgu [T,2I]`` (the down
  projection's dX with the SwiGLU backward in its epilogue)
* ``grouped_qkv_rope_sm90(x, wv, wl, offsets, perm, cos, sin, *, batch_size, seq_len, num_heads, num_kv_heads,
  bias_v=None, bias_l=None, config=None)`` -> ``(q [B,H,L,hd], k [B,KV,L,hd], v)`` (``qkv.py``: 1-2 whole heads per
  tile, RoPE in the epilogue, pointer-scatter store to sequence position ``perm[row]``)
* ``grouped_wgrad_sm90(..., dbias=(dbv, dbl))`` also writes the per-expert bias gradients (fp32 column sums).

``qkv_selfcheck.py`` / ``selfcheck.py``: GPU scripts timing these against cuBLAS / our plain sm_90 GEMM.

These are autotune candidates (``config.name`` is the candidate name); nothing here has been timed on a GPU.
"""
from .configs import (INTERP_CONFIGS, INTERP_WGRAD_CONFIGS, SM90_CONFIGS, SM90_SWIGLU_CONFIGS, SM90_WGRAD_CONFIGS,
                      SM90Config, sm90_unsupported_reason, triton_sm90_reason)
from .configs import SM90_DSWIGLU_CONFIGS, SM90_QKV_CONFIGS
from .launch import (grouped_dx_dswiglu_sm90, grouped_gemm_dx_sm90, grouped_gemm_sm90, grouped_swiglu_sm90,
                     grouped_wgrad_sm90)
from .qkv import grouped_qkv_rope_sm90

__all__ = ["grouped_gemm_sm90", "grouped_gemm_dx_sm90", "grouped_wgrad_sm90", "grouped_swiglu_sm90", "SM90Config",
           "SM90_CONFIGS", "SM90_WGRAD_CONFIGS", "SM90_SWIGLU_CONFIGS", "INTERP_CONFIGS", "INTERP_WGRAD_CONFIGS",
           "sm90_unsupported_reason", "triton_sm90_reason", "grouped_dx_dswiglu_sm90", "grouped_qkv_rope_sm90",
           "SM90_DSWIGLU_CONFIGS", "SM90_QKV_CONFIGS"]

"""Causal attention over mixed image/text sequences: one public function, several backends behind it.

``mixed_attention`` (padded [B,H,L,hd]) and ``mixed_attention_varlen`` (packed [total,H,hd]) implement ONE masking
model on every backend (see :mod:`vexpert_kernels.ops.flash_attention` for the exact rule): bottom-right aligned
causal (KV-cache prefill/decode), key padding, GQA, and optionally bidirectional attention inside contiguous image
spans (the CogVLM paper's ablation). Backends:

  triton      ours (flash_attention.py): CUDA (fp16/bf16), or CPU tensors under TRITON_INTERPRET=1 (also fp32);
              head dim <= 128. Everything but attn_bias; returns lse; deterministic backward.
  sdpa        torch scaled_dot_product_attention; a boolean mask when the request needs one. No lse.
  flex        torch.nn.attention.flex_attention with a block mask (skips masked blocks; natural for image spans).
              On CPU it runs eagerly and has no backward (refused when inputs require grad).
  varlen      torch.nn.attention.varlen.varlen_attn (CUDA flash): packed causal only.
  flash_attn  flash-attn 2 when installed (CUDA, fp16/bf16): causal, no padding, no image spans.
  xformers    xformers when installed (CUDA): causal, no padding, no image spans.
  math        float reference on any device (the oracle; materialises scores).

``backend="auto"``: on CUDA every backend that serves the request competes in ``vexpert_kernels.autotune.select``
("attention_fwd"; our kernel with 2-3 forward tiles, sdpa, flex, varlen_attn, flash-attn/xformers when installed),
each checked against the plain PyTorch result; untuned it runs torch's own path (sdpa, else flex, else math). On CPU
it runs our Triton kernel when the interpreter serves the request (TRITON_INTERPRET=1; how CI tests it), else sdpa,
else math. Head dims above 128 therefore go to sdpa/flex/math. ``VEXPERT_ATTENTION_BACKEND=<name>`` replaces
``auto`` (an unknown name raises, naming the variable). An explicit backend that cannot serve the request raises —
there is never a silent fallback to different semantics. ``last_backend()`` names the path the last call ran.

Bad input raises before any kernel runs (``softmax_scale`` finite and > 0, ``cu_seqlens`` 1-D integers from 0,
non-decreasing, ending at the row count, no sequence longer than ``max_seqlen``: checked on the host when the
tensors are on the CPU, on CUDA only with ``VEXPERT_DEBUG=1`` to keep the hot path free of host syncs). The Triton
kernels are bound-safe for any ``cu_seqlens`` (clamped to the rows on the device), so a bad CUDA one that slips
through gives wrong rows, never an out-of-bounds access.
"""
from __future__ import annotations

from .api import (IMAGE_ATTENTION_MODES, attention_backend_reason, mixed_attention,  # noqa: F401
                  mixed_attention_varlen)
from .backends import attention_keep_mask  # noqa: F401
from .dispatch import BACKENDS, ENV_VAR, available_attention_backends, last_backend  # noqa: F401

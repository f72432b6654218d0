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

``backend="auto"`` walks a preference table (data, below) and takes the first backend that can serve the request;
``VEXPERT_ATTENTION_BACKEND`` overrides auto. An explicit backend that cannot serve the request raises — there is
never a silent fallback to different semantics.
"""
from __future__ import annotations

from .api import (IMAGE_ATTENTION_MODES, attention_backend_reason, mixed_attention,  # noqa: F401
                  mixed_attention_varlen)
from .backends import attention_keep_mask  # noqa: F401
from .dispatch import BACKENDS, ENV_VAR, available_attention_backends  # noqa: F401

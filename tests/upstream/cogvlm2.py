"""CogVLM2 (THUDM/cogvlm2-llama3-chat-19B layout): GQA, a bias on the vision QKV only, ``FastRotaryEmbedding``.

Interface facts reproduced: ``FastRotaryEmbedding(dim, base=500000, pos_idx_in_fp32=False)`` keeps ``inv_freq`` as a
persistent buffer (the checkpoint stores it, so it is bf16 after a bf16 load), builds cos/sin from positions and
frequencies in ``inv_freq``'s dtype, is called as ``rotary_emb(q, k, position_ids=..., max_seqlen=...)`` and rotates
q and k IN PLACE (fp32 math, result stored in the input dtype).
"""
from __future__ import annotations

import torch
from torch import nn

from . import cogvlm_v1
from .common import CausalLMBase, CogVLMDecoderModelBase


class FastRotaryEmbedding(nn.Module):
    def __init__(self, dim, base=10000, interleaved=False, scale_base=None, pos_idx_in_fp32=True, device=None):
        super().__init__()
        self.dim, self.base, self.pos_idx_in_fp32 = dim, float(base), pos_idx_in_fp32
        self.register_buffer("inv_freq", self._compute_inv_freq(device), persistent=True)

    def _compute_inv_freq(self, device=None):
        return 1.0 / (self.base ** (torch.arange(0, self.dim, 2, device=device, dtype=torch.float32) / self.dim))

    def _cos_sin(self, seqlen, device, dtype):
        if self.pos_idx_in_fp32:
            t = torch.arange(seqlen, device=device, dtype=torch.float32)
            inv = self.inv_freq if self.inv_freq.dtype == torch.float32 else self._compute_inv_freq(device)
        else:
            t = torch.arange(seqlen, device=device, dtype=self.inv_freq.dtype)
            inv = self.inv_freq
        freqs = torch.outer(t, inv)
        return freqs.cos().to(dtype), freqs.sin().to(dtype)

    @staticmethod
    def _rotate_(x, cos, sin):
        """x [B, heads, L, hd] rotated in place (fp32 math); cos/sin [B, L, hd/2]."""
        c, s = cos[:, None].float(), sin[:, None].float()
        x1, x2 = x.float().chunk(2, dim=-1)
        x.copy_(torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1))

    def forward(self, q, k, position_ids, max_seqlen):
        cos, sin = self._cos_sin(int(max_seqlen), q.device, q.dtype)
        cos, sin = cos[position_ids], sin[position_ids]
        self._rotate_(q, cos, sin)
        self._rotate_(k, cos, sin)
        return q, k


class VisionExpertAttention(cogvlm_v1.VisionExpertAttention):
    qkv_bias = (True, False)

    def _make_rotary(self):
        return FastRotaryEmbedding(dim=self.head_dim, pos_idx_in_fp32=False, base=500000)

    def _rope(self, q, k, v, position_ids):
        q, k = q.contiguous(), k.contiguous()  # (the upstream kernel writes into its own buffers)
        return self.rotary_emb(q, k, position_ids=position_ids, max_seqlen=position_ids.max() + 1)


class CogVLMDecoderLayer(cogvlm_v1.CogVLMDecoderLayer):
    attention_cls = VisionExpertAttention


class CogVLMModel(CogVLMDecoderModelBase):
    def _make_layer(self, config):
        return CogVLMDecoderLayer(config)


class CogVLMForCausalLM(CausalLMBase):
    def __init__(self, config):
        super().__init__(config, CogVLMModel)

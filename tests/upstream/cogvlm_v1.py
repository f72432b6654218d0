"""CogVLM v1 (THUDM/cogvlm-chat-hf layout): MHA, no QKV bias, ``RotaryEmbedding(dim, base=10000)``.

Interface facts reproduced: the rotary module keeps ``inv_freq`` as a persistent buffer and builds its cos/sin cache
from ``arange(seq, dtype=inv_freq.dtype) * inv_freq`` (so a bf16 model rounds positions to bf16), is called as
``rotary_emb(value_states, seq_len=...)`` and returns (cos, sin) caches in the input dtype, which the attention gathers
at ``position_ids``; the layer gets the decoder's 4-D additive mask and a (k, v) tuple cache.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .common import (CausalLMBase, CogVLMDecoderModelBase, RMSNorm, VisionExpertMLP, rotate_half, route)


class RotaryEmbedding(nn.Module):
    def __init__(self, dim, max_position_embeddings=2048, base=10000, device=None):
        super().__init__()
        self.dim, self.base = dim, base
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, device=device).float() / dim))
        self.register_buffer("inv_freq", inv_freq)  # persistent
        self.max_seq_len_cached = 0
        self.cos_cached = self.sin_cached = None

    def _cache(self, seq_len, device, dtype):
        t = torch.arange(seq_len, device=device, dtype=self.inv_freq.dtype)
        freqs = torch.einsum("i,j->ij", t, self.inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos_cached, self.sin_cached = emb.cos().to(dtype), emb.sin().to(dtype)
        self.max_seq_len_cached = seq_len

    def forward(self, x, seq_len):
        seq_len = int(seq_len)
        if seq_len > self.max_seq_len_cached or self.cos_cached.dtype != x.dtype or self.cos_cached.device != x.device:
            self._cache(max(seq_len, 16), x.device, x.dtype)
        return self.cos_cached[:seq_len].to(x.dtype), self.sin_cached[:seq_len].to(x.dtype)

    def _apply(self, fn, *args, **kwargs):  # .to()/.half() etc. change inv_freq: drop the cos/sin cache
        self.max_seq_len_cached = 0
        return super()._apply(fn, *args, **kwargs)


def apply_rotary_pos_emb_index(q, k, cos, sin, position_ids):
    cos, sin = F.embedding(position_ids, cos).unsqueeze(1), F.embedding(position_ids, sin).unsqueeze(1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


class VisionExpertAttention(nn.Module):
    qkv_bias = (False, False)  # (vision, language)

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.hidden_size = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_multi_query_heads", self.num_heads)
        self.head_dim = self.hidden_size // self.num_heads
        self.qkv_size = (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
        self.rotary_emb = self._make_rotary()
        self.vision_expert_query_key_value = nn.Linear(self.hidden_size, self.qkv_size, bias=self.qkv_bias[0])
        self.vision_expert_dense = nn.Linear(self.hidden_size, self.hidden_size, bias=False)
        self.language_expert_query_key_value = nn.Linear(self.hidden_size, self.qkv_size, bias=self.qkv_bias[1])
        self.language_expert_dense = nn.Linear(self.hidden_size, self.hidden_size, bias=False)

    def _make_rotary(self):
        return RotaryEmbedding(self.head_dim)

    def _heads(self, x, n):
        B, L, _ = x.shape
        return x.view(B, L, n, self.head_dim).transpose(1, 2)

    def _rope(self, q, k, v, position_ids):
        cos, sin = self.rotary_emb(v, seq_len=position_ids.max() + 1)
        return apply_rotary_pos_emb_index(q, k, cos, sin, position_ids)

    def forward(self, hidden_states, token_type_ids, position_ids, attention_mask=None, past_key_value=None,
                output_attentions=False, use_cache=False):
        H, KV, hd = self.num_heads, self.num_kv_heads, self.head_dim
        mixed = route(hidden_states, token_type_ids, self.vision_expert_query_key_value,
                      self.language_expert_query_key_value, self.qkv_size)
        q, k, v = torch.split(mixed, [H * hd, KV * hd, KV * hd], dim=-1)
        q, k, v = self._heads(q, H), self._heads(k, KV), self._heads(v, KV)
        q, k = self._rope(q, k, v, position_ids)
        if past_key_value is not None:
            k = torch.cat([past_key_value[0], k], dim=2)
            v = torch.cat([past_key_value[1], v], dim=2)
        present = (k, v) if use_cache else None
        rep = H // KV
        kf = k.unsqueeze(2).expand(-1, -1, rep, -1, -1).reshape(k.shape[0], H, k.shape[2], hd)
        vf = v.unsqueeze(2).expand(-1, -1, rep, -1, -1).reshape(v.shape[0], H, v.shape[2], hd)
        ctx = F.scaled_dot_product_attention(q, kf, vf, attn_mask=attention_mask, is_causal=False)
        B, L = hidden_states.shape[:2]
        ctx = ctx.transpose(1, 2).reshape(B, L, H * hd)
        out = route(ctx, token_type_ids, self.vision_expert_dense, self.language_expert_dense, self.hidden_size)
        return out, None, present


class CogVLMDecoderLayer(nn.Module):
    attention_cls = VisionExpertAttention

    def __init__(self, config):
        super().__init__()
        self.hidden_size = config.hidden_size
        self.self_attn = self.attention_cls(config)
        self.mlp = VisionExpertMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_states, token_type_ids, position_ids, attention_mask=None, past_key_value=None,
                output_attentions=False, use_cache=False):
        residual = hidden_states
        h, _, present = self.self_attn(self.input_layernorm(hidden_states), token_type_ids=token_type_ids,
                                       position_ids=position_ids, attention_mask=attention_mask,
                                       past_key_value=past_key_value, output_attentions=output_attentions,
                                       use_cache=use_cache)
        hidden_states = residual + h
        hidden_states = hidden_states + self.mlp(self.post_attention_layernorm(hidden_states), token_type_ids)
        outputs = (hidden_states,)
        if output_attentions:
            outputs += (None,)
        if use_cache:
            outputs += (present,)
        return outputs


class CogVLMModel(CogVLMDecoderModelBase):
    def _make_layer(self, config):
        return CogVLMDecoderLayer(config)


class CogVLMForCausalLM(CausalLMBase):
    def __init__(self, config):
        super().__init__(config, CogVLMModel)

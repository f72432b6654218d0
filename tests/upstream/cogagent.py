"""CogAgent (THUDM/cogagent-chat-hf layout): each decoder layer = visual-expert self-attention + cross-attention to
high-resolution image features (``encoder_outputs`` [B, N, cross_hidden]) + visual-expert MLP.

Interface facts reproduced: ``CogAgentDecoderLayer.forward(hidden_states, encoder_outputs, token_type_ids,
position_ids, attention_mask, cross_attention_mask, past_key_value, output_attentions, use_cache)``; its cache is
``(k, v, (cross_k, cross_v))`` — the self-attention pair plus the cross-attention's keys/values, computed once from
the image features at prefill and reused while decoding (``encoder_outputs`` is then not needed).
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from .cogvlm_v1 import VisionExpertAttention
from .common import CausalLMBase, CogVLMDecoderModelBase, RMSNorm, VisionExpertMLP


class CrossAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.compute = config.cross_compute_hidden_size
        self.head_dim = self.compute // self.num_heads
        self.query = nn.Linear(config.hidden_size, self.compute, bias=False)
        self.key_value = nn.Linear(config.cross_hidden_size, 2 * self.compute, bias=False)
        self.dense = nn.Linear(self.compute, config.hidden_size, bias=False)

    def _heads(self, x):
        B, N, _ = x.shape
        return x.view(B, N, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, hidden_states, encoder_outputs, attention_mask=None, past_key_value=None,
                output_attentions=False, use_cache=False):
        q = self._heads(self.query(hidden_states))
        if past_key_value is None:
            k, v = self.key_value(encoder_outputs).split(self.compute, dim=-1)
            k, v = self._heads(k), self._heads(v)
        else:
            k, v = past_key_value
        ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask)
        B, _, L, _ = ctx.shape
        out = self.dense(ctx.transpose(1, 2).reshape(B, L, self.compute))
        return out, None, ((k, v) if use_cache else None)


class CogAgentDecoderLayer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.hidden_size = config.hidden_size
        self.self_attn = VisionExpertAttention(config)
        self.cross_attn = CrossAttention(config)
        self.mlp = VisionExpertMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_cross_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_states, encoder_outputs, token_type_ids, position_ids, attention_mask=None,
                cross_attention_mask=None, past_key_value=None, output_attentions=False, use_cache=False):
        residual = hidden_states
        h, _, present = self.self_attn(self.input_layernorm(hidden_states), token_type_ids=token_type_ids,
                                       position_ids=position_ids, attention_mask=attention_mask,
                                       past_key_value=past_key_value[:2] if past_key_value is not None else None,
                                       output_attentions=output_attentions, use_cache=use_cache)
        hidden_states = residual + h
        c, _, present_cross = self.cross_attn(
            self.post_cross_attention_layernorm(hidden_states), encoder_outputs=encoder_outputs,
            attention_mask=cross_attention_mask,
            past_key_value=past_key_value[-1] if past_key_value is not None else None,
            output_attentions=output_attentions, use_cache=use_cache)
        hidden_states = hidden_states + c
        hidden_states = hidden_states + self.mlp(self.post_attention_layernorm(hidden_states), token_type_ids)
        outputs = (hidden_states,)
        if output_attentions:
            outputs += (None,)
        if use_cache:
            outputs += (present + (present_cross,),)
        return outputs


class CogAgentModel(CogVLMDecoderModelBase):
    def _make_layer(self, config):
        return CogAgentDecoderLayer(config)

    def _layer_call(self, layer, h, token_type_ids, position_ids, mask, past, use_cache, extra):
        return layer(h, encoder_outputs=extra.get("encoder_outputs"), token_type_ids=token_type_ids,
                     position_ids=position_ids, attention_mask=mask, cross_attention_mask=None,
                     past_key_value=past, output_attentions=False, use_cache=use_cache)


class CogAgentForCausalLM(CausalLMBase):
    def __init__(self, config):
        super().__init__(config, CogAgentModel)

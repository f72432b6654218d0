"""Pieces shared by the upstream reproductions: config, RMSNorm, expert MLP, masks, position ids, greedy decode."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

LANGUAGE_TOKEN_TYPE, VISION_TOKEN_TYPE = 0, 1


@dataclass
class TinyConfig:
    hidden_size: int = 64
    intermediate_size: int = 88
    num_attention_heads: int = 4
    num_multi_query_heads: int = 4      # CogVLM2's name for the KV head count (GQA when < num_attention_heads)
    num_hidden_layers: int = 2
    vocab_size: int = 48
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 64
    cross_hidden_size: int = 24         # CogAgent: width of the high-resolution image features
    cross_compute_hidden_size: int = 32  # CogAgent: width inside its cross-attention
    cross_image_tokens: int = 5


class RMSNorm(nn.Module):
    def __init__(self, hidden_size, eps=1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        dtype = hidden_states.dtype
        x = hidden_states.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return (self.weight * x).to(dtype)


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def get_expert_mask(token_type_ids):
    vision = torch.zeros_like(token_type_ids, dtype=torch.bool)
    vision[:, :-1] = (token_type_ids[:, :-1] == VISION_TOKEN_TYPE) & (token_type_ids[:, 1:] == VISION_TOKEN_TYPE)
    return vision, ~vision


class VisionExpertMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.language_mlp = MLP(config)
        self.vision_mlp = MLP(config)

    def forward(self, hidden_states, token_type_ids):
        out = torch.empty_like(hidden_states)
        vision, language = get_expert_mask(token_type_ids)
        out[vision] = self.vision_mlp(hidden_states[vision])
        out[language] = self.language_mlp(hidden_states[language])
        return out


def route(x, token_type_ids, f_vision, f_language, width):
    out = torch.empty(*x.shape[:-1], width, dtype=x.dtype, device=x.device)
    vision, language = get_expert_mask(token_type_ids)
    out[vision] = f_vision(x[vision])
    out[language] = f_language(x[language])
    return out


def rotate_half(x):
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def build_position_ids(x, attention_mask=None):
    """bos 0, boi 1, patches share 2, eoi 3, text 4, 5 ... (padding counts as type -1)."""
    t = x.clone()
    if attention_mask is not None:
        t[~attention_mask.bool()] = -1
    boi_eoi = torch.zeros_like(t, dtype=torch.bool)
    boi_eoi[:, 1:] |= (t[:, 1:] == VISION_TOKEN_TYPE) & (t[:, :-1] == LANGUAGE_TOKEN_TYPE)
    boi_eoi[:, 0] |= t[:, 0] == VISION_TOKEN_TYPE
    boi_eoi[:, :-1] |= (t[:, :-1] == VISION_TOKEN_TYPE) & (t[:, 1:] == LANGUAGE_TOKEN_TYPE)
    boi_eoi[:, -1] |= t[:, -1] == VISION_TOKEN_TYPE
    t[boi_eoi] = LANGUAGE_TOKEN_TYPE
    y = torch.zeros_like(t)
    y[:, 1:] = (t[:, 1:] == LANGUAGE_TOKEN_TYPE) | ((t[:, 1:] == VISION_TOKEN_TYPE) & (t[:, :-1] == LANGUAGE_TOKEN_TYPE))
    return y.cumsum(-1)


def decoder_attention_mask(attention_mask, batch, seq_len, dtype, device, past_len):
    """The upstream decoders' 4-D additive mask [B, 1, L, past+L]: a causal part plus an expanded key-padding part,
    each finfo(dtype).min where masked, added together (as the upstream code does)."""
    neg = torch.finfo(dtype).min
    causal = torch.full((seq_len, seq_len), neg, dtype=dtype, device=device).triu(1)
    causal = torch.cat([torch.zeros(seq_len, past_len, dtype=dtype, device=device), causal], dim=-1)
    causal = causal[None, None].expand(batch, 1, seq_len, past_len + seq_len)
    if attention_mask is None:
        return causal
    inverted = 1.0 - attention_mask[:, None, None, :].to(dtype).expand(batch, 1, seq_len, past_len + seq_len)
    return causal + inverted.masked_fill(inverted.bool(), neg)


class CogVLMDecoderModelBase(nn.Module):
    """embed -> layers (each gets the 4-D mask, its tuple cache and token_type_ids) -> norm. Subclasses define
    ``_make_layer``. ``forward`` returns (hidden [B, L, D], cache tuple or None)."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(self._make_layer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def _make_layer(self, config):
        raise NotImplementedError

    def _layer_call(self, layer, h, token_type_ids, position_ids, mask, past, use_cache, extra):
        return layer(h, token_type_ids=token_type_ids, position_ids=position_ids, attention_mask=mask,
                     past_key_value=past, output_attentions=False, use_cache=use_cache)

    def forward(self, input_ids, token_type_ids, attention_mask=None, position_ids=None, past_key_values=None,
                images_features=None, use_cache=False, **extra):
        B, L = input_ids.shape
        h = self.embed_tokens(input_ids)
        if images_features is not None:
            h = h.index_put([token_type_ids == VISION_TOKEN_TYPE], images_features.to(h.dtype))
        past_len = past_key_values[0][0].shape[2] if past_key_values is not None else 0
        if position_ids is None:
            position_ids = build_position_ids(token_type_ids, attention_mask)
        if attention_mask is None:
            attention_mask = torch.ones(B, past_len + L, dtype=torch.bool, device=input_ids.device)
        mask = decoder_attention_mask(attention_mask, B, L, h.dtype, h.device, past_len)
        next_cache = ()
        for i, layer in enumerate(self.layers):
            past = past_key_values[i] if past_key_values is not None else None
            out = self._layer_call(layer, h, token_type_ids, position_ids, mask, past, use_cache, extra)
            h = out[0]
            if use_cache:
                next_cache += (out[-1],)
        return self.norm(h), (next_cache if use_cache else None)


class CausalLMBase(nn.Module):
    def __init__(self, config, model_cls):
        super().__init__()
        self.config = config
        self.model = model_cls(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def forward(self, input_ids, token_type_ids, attention_mask=None, position_ids=None, past_key_values=None,
                images_features=None, use_cache=False, **extra):
        h, cache = self.model(input_ids=input_ids, token_type_ids=token_type_ids, attention_mask=attention_mask,
                              position_ids=position_ids, past_key_values=past_key_values,
                              images_features=images_features, use_cache=use_cache, **extra)
        return self.lm_head(h).float(), cache

    @torch.no_grad()
    def generate(self, input_ids, token_type_ids, attention_mask=None, images_features=None, max_new_tokens=4,
                 **extra):
        """Greedy decode with the tuple KV cache (what HF generate does for these models): returns (tokens [B, n],
        scores: list of n logits [B, V])."""
        B, L = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones(B, L, dtype=torch.long, device=input_ids.device)
        position_ids = build_position_ids(token_type_ids, attention_mask)
        logits, cache = self(input_ids, token_type_ids, attention_mask, position_ids, None, images_features,
                             use_cache=True, **extra)
        tokens, scores = [], []
        last = logits[:, -1]
        for step in range(max_new_tokens):
            scores.append(last)
            nxt = last.argmax(-1, keepdim=True)
            tokens.append(nxt)
            if step == max_new_tokens - 1:
                break
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(B, 1)], dim=1)
            position_ids = position_ids[:, -1:] + 1
            tt = torch.zeros_like(nxt)
            logits, cache = self(nxt, tt, attention_mask, position_ids, cache, None, use_cache=True,
                                 **{k: v for k, v in extra.items() if k != "encoder_outputs"})
            last = logits[:, -1]
        return torch.cat(tokens, dim=1), scores

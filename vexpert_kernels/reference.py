"""The oracle: a plain-PyTorch CogVLM visual-expert decoder layer, HF-exact (see shared COGVLM_SPEC.md).

Same parameter names, state-dict keys and forward signature as HF's ``CogVLMDecoderLayer``. Routing uses boolean-mask
gather/scatter exactly like the public code. Deliberately simple: every kernel in this package is tested against it.

Independent of the code under test: the expert rule, the position ids, RoPE, the attention mask and the input checks
are written here from the spec, and nothing is imported from ``routing.py`` or ``ops/`` -- a bug planted in the
library's RoutingPlan or kernels cannot also move the oracle.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .config import VisualExpertConfig
from .validation import check_forward_args as _check_forward_args  # input checks only (no routing rules)

LANGUAGE_TOKEN_TYPE, VISION_TOKEN_TYPE = 0, 1  # spec: per-token types in token_type_ids


def vision_expert_mask(token_type_ids: torch.Tensor) -> torch.Tensor:
    """Spec expert rule (HF ``get_expert_mask``): vision iff this AND the next token are vision tokens, so eoi and a
    vision token last in its row use the language expert."""
    tt = token_type_ids
    vision = torch.zeros_like(tt, dtype=torch.bool)
    vision[:, :-1] = (tt[:, :-1] == VISION_TOKEN_TYPE) & (tt[:, 1:] == VISION_TOKEN_TYPE)
    return vision


def spec_position_ids(token_type_ids: torch.Tensor, keep: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Spec position ids (HF ``build_position_ids``), written out from COGVLM_SPEC.md: masked positions count as type
    -1; boi/eoi (a vision token with a language token, or the row edge, before/after it) are relabelled language;
    ``y[:, 0] = 0``, ``y[:, j] = t_j is language or (t_j is vision and t_{j-1} is language)``; cumsum.
    So bos 0, boi 1, all patches 2, eoi 3, text 4, 5, ..."""
    LANG, VIS = LANGUAGE_TOKEN_TYPE, VISION_TOKEN_TYPE
    t = token_type_ids.clone()
    if keep is not None:
        t[~keep.bool()] = -1
    boi_eoi = torch.zeros_like(t, dtype=torch.bool)
    boi_eoi[:, 1:] |= (t[:, 1:] == VIS) & (t[:, :-1] == LANG)
    boi_eoi[:, 0] |= t[:, 0] == VIS
    boi_eoi[:, :-1] |= (t[:, :-1] == VIS) & (t[:, 1:] == LANG)
    boi_eoi[:, -1] |= t[:, -1] == VIS
    t[boi_eoi] = LANG
    y = torch.zeros_like(t, dtype=torch.long)
    y[:, 1:] = (t[:, 1:] == LANG) | ((t[:, 1:] == VIS) & (t[:, :-1] == LANG))
    return y.cumsum(-1)


class RMSNorm(nn.Module):
    """HF RMSNorm: normalise in fp32, multiply by the weight, cast back to the input dtype."""

    def __init__(self, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        x = hidden_states.to(torch.float32) if input_dtype != torch.float64 else hidden_states
        variance = x.pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.variance_epsilon)
        return (self.weight * x).to(input_dtype)


class MLP(nn.Module):
    """SwiGLU MLP without biases: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: VisualExpertConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def get_expert_mask(token_type_ids: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(vision_mask, language_mask) with the HF rule (eoi and a row's last token use the language expert)."""
    vision = vision_expert_mask(token_type_ids)
    return vision, ~vision


def _route(x: torch.Tensor, token_type_ids: torch.Tensor, f_vision, f_language, out_features: int) -> torch.Tensor:
    """HF-style boolean-mask routing: y[vision] = f_vision(x[vision]); y[language] = f_language(x[language])."""
    vision, language = get_expert_mask(token_type_ids)
    out = torch.empty(*x.shape[:-1], out_features, dtype=x.dtype, device=x.device)
    out[vision] = f_vision(x[vision])
    out[language] = f_language(x[language])
    return out


class VisionExpertMLP(nn.Module):
    def __init__(self, config: VisualExpertConfig):
        super().__init__()
        self.config = config
        self.language_mlp = MLP(config)
        self.vision_mlp = MLP(config)

    def forward(self, hidden_states: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        return _route(hidden_states, token_type_ids, self.vision_mlp, self.language_mlp, self.config.hidden_size)


class RotaryEmbedding(nn.Module):
    """GPT-NeoX rotary embedding (half rotation, rotary dim = head dim); cos/sin in fp32 at the given positions."""

    def __init__(self, dim: int, base: float = 10000.0, position_dtype=None):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        self.register_buffer("inv_freq", inv_freq)
        self.position_dtype = position_dtype

    def cos_sin(self, position_ids: torch.Tensor, dtype: torch.dtype):
        pos = position_ids.to(torch.float32)
        if self.position_dtype is not None:  # HF quirk: positions built in the dtype of inv_freq (bf16 checkpoints)
            pos = pos.to(self.position_dtype).to(torch.float32)
        compute = torch.float64 if dtype == torch.float64 else torch.float32
        freqs = pos.to(compute)[..., None] * self.inv_freq.to(compute)
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, heads, L, hd]; cos/sin [B, L, hd] (fp32 or fp64). Computed in cos's dtype, cast back."""
    c, s = cos[:, None], sin[:, None]
    xc = x.to(c.dtype)
    return (xc * c + rotate_half(xc) * s).to(x.dtype)


def attention_bias(attention_mask: Optional[torch.Tensor], batch: int, q_len: int, kv_len: int, dtype, device,
                   image_span_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Additive mask [B, 1, q_len, kv_len] from None / 2-D keep mask / 4-D additive mask (used as given).

    Causal is bottom-right aligned (query i sits at key position kv_len - q_len + i). ``image_span_ids`` [B, q_len]
    (nonzero = id of a contiguous image span) lets tokens of the same span see each other (bidirectional images).
    Masked entries use finfo(dtype).min, as HF does, so fully masked (padded) query rows stay finite.
    """
    neg = torch.finfo(dtype).min
    if attention_mask is not None and attention_mask.dim() == 4:
        if attention_mask.shape[-2:] != (q_len, kv_len) or attention_mask.shape[0] not in (1, batch):
            raise ValueError(f"attention_mask (4-D additive) must have shape [B, 1, {q_len}, {kv_len}], "
                             f"got {tuple(attention_mask.shape)}")
        return attention_mask.to(dtype)
    qpos = torch.arange(q_len, device=device)[:, None] + (kv_len - q_len)
    kpos = torch.arange(kv_len, device=device)[None, :]
    allowed = (kpos <= qpos).expand(batch, q_len, kv_len)
    if image_span_ids is not None:
        span_k = torch.zeros(batch, kv_len, dtype=image_span_ids.dtype, device=device)
        span_k[:, kv_len - q_len:] = image_span_ids
        same = (image_span_ids[:, :, None] == span_k[:, None, :]) & (image_span_ids[:, :, None] != 0)
        allowed = allowed | same
    if attention_mask is not None:
        if attention_mask.dim() != 2 or tuple(attention_mask.shape) != (batch, kv_len):
            raise ValueError(f"attention_mask must be a 2-D keep mask [B={batch}, past+L={kv_len}] or a 4-D additive "
                             f"mask [B, 1, L, past+L], got {tuple(attention_mask.shape)}")
        allowed = allowed & (attention_mask != 0)[:, None, :]
    bias = torch.zeros(batch, 1, q_len, kv_len, dtype=dtype, device=device)
    return bias.masked_fill(~allowed[:, None], neg)


def image_spans_of(token_type_ids: torch.Tensor) -> torch.Tensor:
    """int32 [B, L]: id (1, 2, ...) of the contiguous run of type-1 tokens each token is in, 0 for text."""
    is_img = token_type_ids == 1
    starts = is_img.clone()
    starts[:, 1:] &= ~is_img[:, :-1]
    ids = starts.to(torch.int32).cumsum(-1, dtype=torch.int32)
    return torch.where(is_img, ids, torch.zeros_like(ids))


class VisionExpertAttention(nn.Module):
    def __init__(self, config: VisualExpertConfig):
        super().__init__()
        self.config = config
        self.hidden_size = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        qkv = config.qkv_size
        self.rotary_emb = RotaryEmbedding(self.head_dim, config.rope_theta, config.rope_position_dtype)
        self.vision_expert_query_key_value = nn.Linear(self.hidden_size, qkv, bias=config.vision_qkv_bias)
        self.vision_expert_dense = nn.Linear(self.hidden_size, self.hidden_size, bias=False)
        self.language_expert_query_key_value = nn.Linear(self.hidden_size, qkv, bias=config.language_qkv_bias)
        self.language_expert_dense = nn.Linear(self.hidden_size, self.hidden_size, bias=False)

    def qkv_rope(self, hidden_states, token_type_ids, position_ids):
        """Routed QKV projection, split into heads, RoPE on q and k -> q [B, H, L, hd], k and v [B, KV, L, hd]."""
        B, L, _ = hidden_states.shape
        H, KV, hd = self.num_heads, self.num_key_value_heads, self.head_dim
        qkv = _route(hidden_states, token_type_ids, self.vision_expert_query_key_value,
                     self.language_expert_query_key_value, self.config.qkv_size)
        q, k, v = torch.split(qkv, [H * hd, KV * hd, KV * hd], dim=-1)
        q = q.view(B, L, H, hd).transpose(1, 2)
        k = k.view(B, L, KV, hd).transpose(1, 2)
        v = v.view(B, L, KV, hd).transpose(1, 2)
        cos, sin = self.rotary_emb.cos_sin(position_ids, q.dtype)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v

    def forward(self, hidden_states, token_type_ids, position_ids, attention_mask=None, past_key_value=None,
                output_attentions=False, use_cache=False):
        B, L, _ = hidden_states.shape
        H, hd = self.num_heads, self.head_dim
        q, k, v = self.qkv_rope(hidden_states, token_type_ids, position_ids)
        if past_key_value is not None:
            k = torch.cat([past_key_value[0], k], dim=2)
            v = torch.cat([past_key_value[1], v], dim=2)
        present = (k, v) if use_cache else None
        spans = image_spans_of(token_type_ids) if self.config.image_attention == "bidirectional" else None
        if spans is not None and attention_mask is not None and attention_mask.dim() == 2:
            spans = spans * (attention_mask[:, -L:] != 0)
        bias = attention_bias(attention_mask, B, L, k.shape[2], torch.float32 if q.dtype != torch.float64
                              else torch.float64, q.device, spans)
        ctx = attend(q, k, v, bias)
        ctx = ctx.transpose(1, 2).reshape(B, L, H * hd)
        out = _route(ctx, token_type_ids, self.vision_expert_dense, self.language_expert_dense, self.hidden_size)
        return out, None, present


def attend(q, k, v, bias):
    """Eager softmax attention in ``bias``'s dtype: q [B, H, L, hd], k/v [B, KV, Lk, hd] (GQA: each KV head serves
    H/KV query heads), bias additive [B, 1, L, Lk] -> [B, H, L, hd] in q's dtype. Scale 1/sqrt(hd)."""
    H, KV, hd = q.shape[1], k.shape[1], q.shape[-1]
    k_full = k.repeat_interleave(H // KV, dim=1)
    v_full = v.repeat_interleave(H // KV, dim=1)
    compute = bias.dtype
    scores = (q.to(compute) @ k_full.to(compute).transpose(-1, -2)) / math.sqrt(hd) + bias
    probs = scores.softmax(-1)
    return (probs @ v_full.to(compute)).to(q.dtype)


def default_position_ids(token_type_ids, attention_mask, past_key_value):
    """HF rule when no position ids are given; a chunk after a KV cache cannot know its positions, so it must pass them."""
    if past_key_value is not None:
        raise ValueError("position_ids is required with past_key_value: image tokens compress positions, so a chunk "
                         "after a cache cannot infer its own (pass last_position + 1, ...)")
    keep = None
    if attention_mask is not None and attention_mask.dim() == 2:
        keep = attention_mask[:, -token_type_ids.shape[1]:] != 0
    return spec_position_ids(token_type_ids, keep)


class VisualExpertBlock(nn.Module):
    """Reference CogVLM decoder layer (HF ``CogVLMDecoderLayer``): pre-norm attention + MLP, routed experts."""

    def __init__(self, config: VisualExpertConfig):
        super().__init__()
        self.config = config
        self.hidden_size = config.hidden_size
        self.self_attn = VisionExpertAttention(config)
        self.mlp = VisionExpertMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    backend = "reference"

    def forward(self, hidden_states, token_type_ids, position_ids=None, attention_mask=None, past_key_value=None,
                output_attentions=False, use_cache=False, plan=None):
        """hidden_states [B, L, D]; token_type_ids [B, L]; position_ids [B, L] (HF rule if None);
        attention_mask None | 2-D keep [B, past+L] | 4-D additive [B, 1, L, past+L]; past_key_value (k, v) each
        [B, KV, past, hd]. Returns ``(hidden_states,)`` (+ ``(None,)`` if output_attentions) (+ ``(present,)`` if
        use_cache). ``plan`` is accepted for interface parity with the fused block and ignored."""
        token_type_ids = _check_forward_args(hidden_states, token_type_ids, self.hidden_size)
        if position_ids is None:
            position_ids = default_position_ids(token_type_ids, attention_mask, past_key_value)
        residual = hidden_states
        h = self.input_layernorm(hidden_states)
        h, attn_weights, present = self.self_attn(h, token_type_ids, position_ids, attention_mask, past_key_value,
                                                  output_attentions, use_cache)
        hidden_states = residual + h
        residual = hidden_states
        h = self.post_attention_layernorm(hidden_states)
        hidden_states = residual + self.mlp(h, token_type_ids)
        outputs = (hidden_states,)
        if output_attentions:
            outputs += (attn_weights,)
        if use_cache:
            outputs += (present,)
        return outputs

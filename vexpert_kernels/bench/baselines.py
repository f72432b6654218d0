"""Plain-PyTorch baselines on a parameter dict with HF state-dict names (one CogVLM layer).

``params`` maps the HF names (``self_attn.vision_expert_query_key_value.weight``, ``mlp.language_mlp.gate_proj.weight``,
``input_layernorm.weight`` ...) to tensors; ``make_params`` builds them from the reference layer, so every baseline
uses the very same weights as ``hf_reference`` and the fused block.

Layer baselines (input and output ``[B, L, D]`` in sequence order):
* ``hf_layer``      HF-style routing: boolean masks per linear, ``y[mask] = x[mask] @ W_e^T`` (gather/scatter),
                    attention with SDPA causal — what the public CogVLM code runs (its ``attention_fn`` takes SDPA with
                    ``is_causal=True`` for an unpadded batch).
* ``slices_layer``  tokens permuted once (vision rows first), each routed linear = two GEMMs on contiguous slices +
                    ``torch.cat``, un-permute q/k/v before attention and permute its output back, un-permute at the end.
                    ``torch.compile`` of this function is ``slices_compiled``.
* ``dense_layer``   a plain Llama layer with ONE weight set (the language expert's): same FLOPs, no routing — the
                    physical anchor for what routing costs.
Decode baselines take ``past_k``, ``past_v`` ``[B, KV, past, hd]`` and concatenate (HF's legacy tuple cache).
Per-op baselines: ``dense_gemm`` (one GEMM of the same total M), ``slices_gemm`` / ``slices_gemm_into`` (two GEMMs,
``cat`` or written into views of one output), ``sdpa_causal``, ``copy`` (a clone of the same bytes).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..config import VisualExpertConfig
from ..routing import expert_vision_mask

ATTN = "self_attn."


def make_params(cfg: VisualExpertConfig, dtype, device, seed: int = 0):
    """(reference layer, params dict) with random non-trivial weights (norm weights ~ 1 + 0.1 N(0,1), biases random)."""
    from ..reference import VisualExpertBlock as ReferenceBlock
    device = torch.device(device)
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.device(device):  # build and fill on the device: 400M parameters on a CPU take seconds
        ref = ReferenceBlock(cfg).to(dtype=dtype)
    with torch.no_grad():
        for name, t in ref.named_parameters():
            r = torch.randn(t.shape, generator=g, device=device, dtype=torch.float32)
            if name.endswith("layernorm.weight"):
                t.copy_(1 + 0.1 * r)
            elif name.endswith("bias"):
                t.copy_(0.02 * r)
            else:  # ~ nn.Linear's scale, fixed seed
                t.copy_(r / t.shape[-1] ** 0.5)
    params = dict(ref.named_parameters())
    return ref, params


def _w(p, name):
    return p[name]


def _b(p, name):
    return p.get(name)


def rmsnorm(x, w, eps):
    x32 = x.float()
    return (w * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype))


def rope_cos_sin(position_ids, head_dim: int, theta: float, dtype):
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32) / head_dim)
    freqs = position_ids.float()[..., None] * inv_freq
    emb = torch.cat([freqs, freqs], -1)
    return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]  # [B, 1, L, hd]


def apply_rope(x, cos, sin):
    h = x.shape[-1] // 2
    rot = torch.cat([-x[..., h:], x[..., :h]], -1)
    return x * cos + rot * sin


def sdpa_causal(q, k, v, causal: bool = True):
    """q [B, H, Lq, hd], k/v [B, KV, Lk, hd] (GQA without materialising repeated K/V where torch supports it)."""
    H, KV = q.shape[1], k.shape[1]
    if H != KV:
        try:
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
        except TypeError:  # torch < 2.5
            k, v = k.repeat_interleave(H // KV, 1), v.repeat_interleave(H // KV, 1)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def _split_heads(qkv, cfg, B, L):
    H, KV, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    q, k, v = qkv.split([H * hd, KV * hd, KV * hd], -1)
    return (q.reshape(B, L, H, hd).transpose(1, 2), k.reshape(B, L, KV, hd).transpose(1, 2),
            v.reshape(B, L, KV, hd).transpose(1, 2))


def _attention(qkv, cfg, B, L, position_ids, past=None):
    q, k, v = _split_heads(qkv, cfg, B, L)
    cos, sin = rope_cos_sin(position_ids, cfg.head_dim, cfg.rope_theta, q.dtype)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    if past is not None:
        k, v = torch.cat([past[0], k], 2), torch.cat([past[1], v], 2)
        o = sdpa_causal(q, k, v, causal=False)  # one new token sees the whole cache
    else:
        o = sdpa_causal(q, k, v)
    return o.transpose(1, 2).reshape(B, L, cfg.num_attention_heads * cfg.head_dim)


# ------------------------------------------------------------------------------------------------- HF-style
def _hf_route(x, vision, language, wv, wl, bv=None, bl=None):
    out = x.new_empty(*x.shape[:-1], wv.shape[0])
    out[vision] = F.linear(x[vision], wv, bv)
    out[language] = F.linear(x[language], wl, bl)
    return out


def _hf_mlp(p, x, vision, language):
    def mlp(z, e):
        pre = f"mlp.{e}_mlp."
        return F.linear(F.silu(F.linear(z, p[pre + "gate_proj.weight"])) * F.linear(z, p[pre + "up_proj.weight"]),
                        p[pre + "down_proj.weight"])
    out = x.new_empty(x.shape)
    out[vision] = mlp(x[vision], "vision")
    out[language] = mlp(x[language], "language")
    return out


def hf_layer(p, cfg: VisualExpertConfig, x, token_type_ids, position_ids, past=None):
    """HF CogVLMDecoderLayer data flow (masks rebuilt per layer, as HF does)."""
    B, L, _ = x.shape
    vision = expert_vision_mask(token_type_ids)
    language = ~vision
    h = rmsnorm(x, p["input_layernorm.weight"], cfg.rms_norm_eps)
    qkv = _hf_route(h, vision, language, p[ATTN + "vision_expert_query_key_value.weight"],
                    p[ATTN + "language_expert_query_key_value.weight"],
                    _b(p, ATTN + "vision_expert_query_key_value.bias"), _b(p, ATTN + "language_expert_query_key_value.bias"))
    a = _attention(qkv, cfg, B, L, position_ids, past)
    x = x + _hf_route(a, vision, language, p[ATTN + "vision_expert_dense.weight"], p[ATTN + "language_expert_dense.weight"])
    h = rmsnorm(x, p["post_attention_layernorm.weight"], cfg.rms_norm_eps)
    return x + _hf_mlp(p, h, vision, language)


# ------------------------------------------------------------------------------------------------- permuted slices
def _slices(x, nv: int, wv, wl, bv=None, bl=None):
    return torch.cat([F.linear(x[:nv], wv, bv), F.linear(x[nv:], wl, bl)], 0)


def slices_layer(p, cfg: VisualExpertConfig, x, perm, inv_perm, nv: int, position_ids):
    """x [B, L, D] -> [B, L, D]; ``perm``/``inv_perm``/``nv`` come from a RoutingPlan built once per forward."""
    B, L, D = x.shape
    xr = x.reshape(B * L, D).index_select(0, perm)  # routed order: vision rows first
    h = rmsnorm(xr, p["input_layernorm.weight"], cfg.rms_norm_eps)
    qkv = _slices(h, nv, p[ATTN + "vision_expert_query_key_value.weight"],
                  p[ATTN + "language_expert_query_key_value.weight"],
                  _b(p, ATTN + "vision_expert_query_key_value.bias"), _b(p, ATTN + "language_expert_query_key_value.bias"))
    qkv = qkv.index_select(0, inv_perm).reshape(B, L, -1)  # attention needs sequence order
    a = _attention(qkv, cfg, B, L, position_ids).reshape(B * L, -1).index_select(0, perm)
    xr = xr + _slices(a, nv, p[ATTN + "vision_expert_dense.weight"], p[ATTN + "language_expert_dense.weight"])
    h = rmsnorm(xr, p["post_attention_layernorm.weight"], cfg.rms_norm_eps)
    m = "mlp.vision_mlp.", "mlp.language_mlp."
    g = _slices(h, nv, p[m[0] + "gate_proj.weight"], p[m[1] + "gate_proj.weight"])
    u = _slices(h, nv, p[m[0] + "up_proj.weight"], p[m[1] + "up_proj.weight"])
    xr = xr + _slices(F.silu(g) * u, nv, p[m[0] + "down_proj.weight"], p[m[1] + "down_proj.weight"])
    return xr.index_select(0, inv_perm).reshape(B, L, D)


# ------------------------------------------------------------------------------------------------- dense Llama layer
def dense_layer(p, cfg: VisualExpertConfig, x, position_ids, past=None):
    """A Llama layer with the language expert's weights for every token (one weight set, no routing)."""
    B, L, _ = x.shape
    h = rmsnorm(x, p["input_layernorm.weight"], cfg.rms_norm_eps)
    qkv = F.linear(h, p[ATTN + "language_expert_query_key_value.weight"],
                   _b(p, ATTN + "language_expert_query_key_value.bias"))
    x = x + F.linear(_attention(qkv, cfg, B, L, position_ids, past), p[ATTN + "language_expert_dense.weight"])
    h = rmsnorm(x, p["post_attention_layernorm.weight"], cfg.rms_norm_eps)
    m = "mlp.language_mlp."
    return x + F.linear(F.silu(F.linear(h, p[m + "gate_proj.weight"])) * F.linear(h, p[m + "up_proj.weight"]),
                        p[m + "down_proj.weight"])


# ------------------------------------------------------------------------------------------------- per-op
def dense_gemm(x, w):
    """One GEMM over all T rows: the ceiling a routed linear of the same total M aims at."""
    return F.linear(x, w)


def slices_gemm(x, wv, wl, nv: int):
    return _slices(x, nv, wv, wl)


def slices_gemm_into(x, wv, wl, nv: int, out=None):
    """Two GEMMs writing into row ranges of one output (no cat): the strongest cuBLAS formulation (anchors)."""
    if out is None:
        out = x.new_empty(x.shape[0], wv.shape[0])
    torch.mm(x[:nv], wv.t(), out=out[:nv])
    torch.mm(x[nv:], wl.t(), out=out[nv:])
    return out


def slices_swiglu(x, gv, uv, gl, ul, nv: int):
    return F.silu(_slices(x, nv, gv, gl)) * _slices(x, nv, uv, ul)


def copy(x):
    """A copy of the same bytes (the memory-traffic floor of a permute)."""
    return x.clone()

"""Float64 plain-PyTorch oracles, one per public op (same signatures, differentiable)."""
from __future__ import annotations

import torch

from .rope import _rope_inv_freq


def _ref_linear(x, wv, wl, vis_rows, bv=None, bl=None, residual=None):
    x, wv, wl = x.double(), wv.double(), wl.double()
    yv, yl = x @ wv.t(), x @ wl.t()
    if bv is not None:
        yv = yv + bv.double()
    if bl is not None:
        yl = yl + bl.double()
    y = torch.where(vis_rows[:, None], yv, yl)
    return y + residual.double() if residual is not None else y


def routed_linear_reference(x, weight_vision, weight_language, plan, *, bias_vision=None, bias_language=None,
                            residual=None):
    """Plain float64 PyTorch oracle (differentiable)."""
    vis = torch.arange(x.shape[0], device=x.device) < plan.expert_offsets[1]
    return _ref_linear(x, weight_vision, weight_language, vis, bias_vision, bias_language, residual)


def routed_swiglu_reference(x, gate_vision, up_vision, gate_language, up_language, plan):
    vis = torch.arange(x.shape[0], device=x.device) < plan.expert_offsets[1]
    g = _ref_linear(x, gate_vision, gate_language, vis)
    u = _ref_linear(x, up_vision, up_language, vis)
    return torch.nn.functional.silu(g) * u


def routed_swiglu_mlp_reference(x, gate_vision, up_vision, down_vision, gate_language, up_language, down_language,
                                plan, *, residual=None):
    """float64 oracle of routed_swiglu_mlp (differentiable)."""
    vis = torch.arange(x.shape[0], device=x.device) < plan.expert_offsets[1]
    h = routed_swiglu_reference(x, gate_vision, up_vision, gate_language, up_language, plan)
    return _ref_linear(h, down_vision, down_language, vis, residual=residual)


def routed_qkv_rope_reference(x, weight_vision, weight_language, plan, *, num_heads, num_kv_heads, rope_theta,
                              bias_vision=None, bias_language=None, positions=None, position_dtype=None):
    """float64 oracle: per-expert linear, HF RoPE (fp32 cos/sin table at the positions), split, un-permute."""
    vis = torch.arange(x.shape[0], device=x.device) < plan.expert_offsets[1]
    qkv = _ref_linear(x, weight_vision, weight_language, vis, bias_vision, bias_language)
    H, KV = num_heads, num_kv_heads
    hd = qkv.shape[1] // (H + 2 * KV)
    B, L = plan.batch_size, plan.seq_len
    seq = qkv[plan.inv_perm].view(B, L, H + 2 * KV, hd).transpose(1, 2)  # [B, heads, L, hd]
    q, k, v = seq.split([H, KV, KV], dim=1)
    pos = plan.position_ids if positions is None else positions[plan.inv_perm].view(B, L)
    if position_dtype is not None:
        pos = pos.to(position_dtype)
    inv_freq = _rope_inv_freq(hd, float(rope_theta), x.device)
    freqs = pos.float()[..., None] * inv_freq            # fp32, as HF
    emb = torch.cat([freqs, freqs], -1)
    cos, sin = emb.cos().double()[:, None], emb.sin().double()[:, None]

    def rot(t):
        return torch.cat([-t[..., hd // 2:], t[..., :hd // 2]], -1)
    return q * cos + rot(q) * sin, k * cos + rot(k) * sin, v

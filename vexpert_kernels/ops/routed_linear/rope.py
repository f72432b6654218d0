"""RoPE tables (HF numerics: fp32 cos/sin) and the routed-rows <-> [B, heads, L, hd] layout moves of the QKV op."""
from __future__ import annotations

import torch


def _rope_inv_freq(head_dim: int, theta: float, device) -> torch.Tensor:
    """HF: inv_freq = 1 / theta ** (arange(0, hd, 2) / hd), fp32."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.int64).float() / head_dim))


def _rope_cos_sin(pos_f32, inv_freq):
    ang = pos_f32[:, None] * inv_freq[None, :]  # fp32 [T, hd/2], as HF builds its table
    return ang.cos(), ang.sin()


def _rope_rows(t, cos, sin, n_rot_heads, head_dim, inverse=False):
    """Apply (or undo) NeoX RoPE to the first n_rot_heads heads of routed rows t [T, heads*hd] (float math)."""
    T = t.shape[0]
    h = t[:, :n_rot_heads * head_dim].reshape(T, n_rot_heads, 2, head_dim // 2).float()
    x1, x2 = h[:, :, 0], h[:, :, 1]
    c, s = cos[:, None, :], sin[:, None, :]
    if inverse:
        s = -s
    rot = torch.stack([x1 * c - x2 * s, x2 * c + x1 * s], dim=2).reshape(T, n_rot_heads * head_dim)
    return torch.cat([rot.to(t.dtype), t[:, n_rot_heads * head_dim:]], dim=1)


def _qkv_routed_to_heads(qkv, perm, B, L, H, KV, hd):
    """[T, (H+2KV)hd] routed rows -> q [B,H,L,hd], k, v [B,KV,L,hd] in sequence order (torch path)."""
    seq = torch.empty_like(qkv).index_copy_(0, perm, qkv).view(B, L, H + 2 * KV, hd)
    q, k, v = seq.split([H, KV, KV], dim=2)
    # clone, not contiguous(): for L == 1 the views are already contiguous and would alias one buffer
    return tuple(t.transpose(1, 2).clone(memory_format=torch.contiguous_format) for t in (q, k, v))


def _qkv_heads_to_routed(dq, dk, dv, perm):
    """Inverse of the QKV store: [B,heads,L,hd] x3 -> [T, (H+2KV)hd] rows in routed order (one gather)."""
    B, _, L, hd = dq.shape
    seq = torch.cat([dq, dk, dv], dim=1).transpose(1, 2).reshape(B * L, -1)
    return seq.index_select(0, perm)

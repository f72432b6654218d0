"""The backends behind ``mixed_attention``: the keep-mask rule, math (oracle), sdpa, flex, flash-attn, xformers."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from vexpert_kernels.ops.flash_attention import canonical_span_ids


# ------------------------------------------------------------------------------------------------- masks + math
def attention_keep_mask(B: int, Lq: int, Lk: int, device, key_padding_mask=None, image_span_ids=None,
                        bidirectional: bool = False) -> torch.Tensor:
    """bool [B, 1, Lq, Lk]: the exact visibility rule every backend implements."""
    qpos = torch.arange(Lq, device=device) + (Lk - Lq)
    kpos = torch.arange(Lk, device=device)
    keep = (kpos[None, :] <= qpos[:, None]).expand(B, Lq, Lk)
    if bidirectional and image_span_ids is not None:
        qs = canonical_span_ids(image_span_ids)
        ks = torch.zeros(B, Lk, dtype=qs.dtype, device=device)
        ks[:, Lk - Lq:] = qs
        keep = keep | ((qs[:, :, None] == ks[:, None, :]) & (qs[:, :, None] != 0))
    if key_padding_mask is not None:
        keep = keep & key_padding_mask[:, None, :]
    return keep[:, None]


def _math_attention(q, k, v, keep, attn_bias, scale, return_lse):
    """Float reference: fp32 (fp64 for fp64 inputs). Rows with nothing visible give 0 and lse=-inf, finite grads."""
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    H, KV = q.shape[1], k.shape[1]
    qf, kf, vf = q.to(cdt), k.to(cdt), v.to(cdt)
    if H != KV:
        kf = kf.repeat_interleave(H // KV, dim=1)
        vf = vf.repeat_interleave(H // KV, dim=1)
    s = torch.matmul(qf, kf.transpose(-1, -2)) * scale
    if attn_bias is not None:
        s = s + attn_bias.to(cdt)
        vis = torch.isfinite(s) if keep is None else keep & torch.isfinite(s)
    else:
        vis = keep
    if vis is not None:
        s = s.masked_fill(~vis, float("-inf"))
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m)).detach()
    p = torch.exp(s - m)
    l = p.sum(-1, keepdim=True)
    nonempty = l > 0
    out = torch.matmul(p, vf) / torch.where(nonempty, l, torch.ones_like(l))
    out = out.to(q.dtype)
    if not return_lse:
        return out
    lse = torch.where(nonempty, m + torch.log(torch.where(nonempty, l, torch.ones_like(l))),
                      torch.full_like(l, float("-inf"))).squeeze(-1).float()
    return out, lse


def _sdpa_attention(q, k, v, keep, attn_bias, scale, simple_causal):
    kw = {"enable_gqa": True} if q.shape[1] != k.shape[1] else {}
    if attn_bias is not None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias.to(q.dtype), scale=scale, **kw)
    if simple_causal:  # square causal, no padding/spans: the flash/cuDNN path
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, **kw)
    if keep is None:  # Lq < Lk, nothing masked, e.g. decode with one query
        return F.scaled_dot_product_attention(q, k, v, scale=scale, **kw)
    # rows with no visible key make SDPA produce NaN (and NaN grads): let them see key 0, then zero them out
    nonempty = keep.any(-1, keepdim=True)
    first = torch.zeros_like(keep)
    first[..., 0] = True
    mask = keep | (~nonempty & first)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, **kw)
    return torch.where(nonempty, out, torch.zeros_like(out))


def _flex_attention(q, k, v, key_padding_mask, span, bidir, scale, return_lse):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention as _flex

    B, H, Lq, _ = q.shape
    Lk = k.shape[2]
    off = Lk - Lq
    kpm = key_padding_mask
    if bidir and span is not None:
        qs = canonical_span_ids(span)
        ks = torch.zeros(B, Lk, dtype=qs.dtype, device=q.device)
        ks[:, off:] = qs
    else:
        qs = ks = None

    def mask_mod(b, h, qi, kj):
        ok = kj <= qi + off
        if qs is not None:
            sq = qs[b, qi]
            ok = ok | ((sq != 0) & (sq == ks[b, kj]))
        if kpm is not None:
            ok = ok & kpm[b, kj]
        return ok

    bm = create_block_mask(mask_mod, B, None, Lq, Lk, device=q.device)
    kw = {"enable_gqa": True} if H != k.shape[1] else {}
    if return_lse:
        try:
            from torch.nn.attention.flex_attention import AuxRequest

            out, aux = _flex(q, k, v, block_mask=bm, scale=scale, return_aux=AuxRequest(lse=True), **kw)
            lse = aux.lse
        except ImportError:  # older torch: return_lse
            out, lse = _flex(q, k, v, block_mask=bm, scale=scale, return_lse=True, **kw)
        return out, lse.float()
    return _flex(q, k, v, block_mask=bm, scale=scale, **kw)


def _flash_attn_backend(q, k, v, scale):
    from flash_attn import flash_attn_func  # optional dependency

    out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale, causal=True)
    return out.transpose(1, 2)


def _xformers_backend(q, k, v, scale):
    import xformers.ops as xops  # optional dependency
    from xformers.ops.fmha.attn_bias import LowerTriangularFromBottomRightMask

    out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          attn_bias=LowerTriangularFromBottomRightMask(), scale=scale)
    return out.transpose(1, 2)


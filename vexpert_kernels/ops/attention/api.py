"""Public API: ``mixed_attention`` (padded) and ``mixed_attention_varlen`` (packed), their checks."""
from __future__ import annotations

import math

import torch

from vexpert_kernels.ops.flash_attention import flash_attention, fwd_tune_configs, tma_usable
from vexpert_kernels.ops.flash_attention.configs_ws import ws_fwd_tune_configs

from vexpert_kernels.validation import check_cu_seqlens, check_positive_finite, check_tensor, debug_checks_enabled

from .backends import (_flash_attn_backend, _flex_attention, _math_attention, _sdpa_attention, _xformers_backend,
                       attention_keep_mask)
from .dispatch import (_VARLEN_PARAMS, BACKENDS, TUNE_CANDIDATES, _Request, _select_backend, _unsupported_reason,
                       record_backend, requested_backend, serving_backends, static_backend, tune_key)

IMAGE_ATTENTION_MODES = ("causal", "bidirectional")


# ------------------------------------------------------------------------------------------------- validation
def _check_tensor(name, t, dims):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != dims:
        raise ValueError(f"{name} must be {dims}-D, got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")


def _check_qkv(q, k, v, varlen):
    dims = 3 if varlen else 4
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_tensor(name, t, dims)
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.device != k.device or q.device != v.device:
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    hd_axis, h_axis = -1, (1 if varlen else 1)
    if q.shape[hd_axis] != k.shape[hd_axis]:
        raise ValueError(f"q and k must share the head dim, got {q.shape[-1]} and {k.shape[-1]}")
    H, KV = q.shape[h_axis], k.shape[h_axis]
    if KV == 0 or H % KV != 0:
        raise ValueError(f"the number of query heads ({H}) must be a multiple of the kv heads ({KV}) (GQA)")
    if not varlen:
        if q.shape[0] != k.shape[0]:
            raise ValueError(f"q and k must share the batch size, got {q.shape[0]} and {k.shape[0]}")
        if k.shape[2] < q.shape[2]:
            raise ValueError(f"need Lk >= Lq (queries are the last Lq key positions), got Lq={q.shape[2]}, "
                             f"Lk={k.shape[2]}")


def _check_mode(image_attention):
    if image_attention not in IMAGE_ATTENTION_MODES:
        raise ValueError(f"image_attention must be one of {IMAGE_ATTENTION_MODES}, got {image_attention!r}")


def _check_span(name, span, shape, device):
    if span is None:
        return None
    if not isinstance(span, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(span).__name__}")
    if span.is_floating_point() or span.is_complex() or span.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {span.dtype}")
    if tuple(span.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(span.shape)}")
    if span.device != device:
        raise ValueError(f"{name} is on {span.device} but q is on {device}")
    return span


def _check_out_index(out_index, shape, device):
    """int [*shape] permutation of range(prod(shape)), or None. Values checked where the host has them."""
    if out_index is None:
        return None
    check_tensor("out_index", out_index, shape=shape, integer=True, device=device)
    if out_index.device.type == "cpu" or debug_checks_enabled():
        if not torch.compiler.is_compiling():
            flat = out_index.reshape(-1)
            if not torch.equal(torch.sort(flat).values, torch.arange(flat.numel(), device=flat.device)):
                raise ValueError(f"out_index must be a permutation of range({flat.numel()}) (e.g. a RoutingPlan's "
                                 "inv_perm), got repeated or out-of-range rows")
    return out_index


def _scatter_rows(flat, out_index):
    """out[out_index[i]] = flat[i] (differentiable)."""
    return flat.new_zeros(flat.shape).index_copy(0, out_index.reshape(-1).to(torch.long), flat)


def _needs_grad(q, k, v) -> bool:
    return torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)


def _default_scale(softmax_scale, hd):
    if softmax_scale is None:
        return 1.0 / math.sqrt(hd)
    return check_positive_finite("softmax_scale", softmax_scale)


# ------------------------------------------------------------------------------------------------- auto dispatch
def triton_name(cfg) -> str:
    """Stable candidate name of our kernel with forward tile ``cfg`` = (BLOCK_M, BLOCK_N, warps, stages[, tma])."""
    bm, bn, nw, ns, *tma = cfg
    return f"triton:{bm}x{bn}:w{nw}s{ns}" + {1: ":tma", 2: ":ws"}.get(tma[0] if tma else 0, "")  # 2: kernels_ws


def parse_triton_name(name: str):
    """Inverse of :func:`triton_name`; plain "triton" -> None (the table's tile)."""
    if ":" not in name:
        return None
    _, tile, ws, *tma = name.split(":")
    bm, bn = tile.split("x")
    nw, ns = ws[1:].split("s")
    return (int(bm), int(bn), int(nw), int(ns)) + {("tma",): (1,), ("ws",): (2,)}.get(tuple(tma), ())


def _candidates(req: _Request, run, device, masked: bool, lq: int, tma: bool) -> dict:
    """{name: fn} for autotune.select: every backend of TUNE_CANDIDATES that serves ``req`` (our kernel once per
    tuning tile) plus the static choice; each runs forward only, without autograd."""
    def nograd(name):
        def fn():
            with torch.no_grad():
                return run(name)
        return fn

    names = []
    for b in serving_backends(req, TUNE_CANDIDATES):
        if b == "triton":
            block_d = max(16, 1 << (req.head_dim - 1).bit_length())
            names += [triton_name(c) for c in fwd_tune_configs(device, block_d, masked, req.varlen, lq, tma)]
            names += [triton_name(c) for c in ws_fwd_tune_configs(device, block_d, masked, req.varlen, lq, tma,
                                                                   req.bidir)]  # sm_90 warp-specialised forward
        else:
            names.append(b)
    static = static_backend(req)
    if static not in names:
        names.append(static)
    return {n: nograd(n) for n in names}


def _dispatch(backend, req: _Request, key: tuple, run, masked: bool, lq: int, tensors=()):
    """Resolve ``backend`` (auto: tune on CUDA), record it (``last_backend()``), run it."""
    name = _select_backend(backend, req)
    if name == "auto":
        from vexpert_kernels import autotune

        tma = bool(tensors) and not torch.compiler.is_compiling() and tma_usable(*tensors)
        cands = _candidates(req, run, torch.device(req.device), masked, lq, tma)

        def reference():
            with torch.no_grad():
                return run("math")  # the plain-PyTorch result every candidate is checked against

        name = autotune.select("attention_fwd", key, cands, reference, static=static_backend(req), dtype=req.dtype)
    record_backend(name)
    return run(name)


# ------------------------------------------------------------------------------------------------- public API
def _resolve_padded(q, k, v, plan, key_padding_mask, image_span_ids, image_attention, attn_bias, softmax_scale,
                    return_lse):
    """Validate a padded-layout request, apply the plan's defaults; -> (key_padding_mask, spans, bidir, scale, req)."""
    _check_qkv(q, k, v, varlen=False)
    _check_mode(image_attention)
    B, H, Lq, hd = q.shape
    KV, Lk = k.shape[1], k.shape[2]
    if plan is not None and Lk == plan.seq_len and B == plan.batch_size:
        if key_padding_mask is None:
            key_padding_mask = plan.attention_mask
        if image_span_ids is None and image_attention == "bidirectional":
            image_span_ids = plan.image_span_ids[:, Lk - Lq:]
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor):
            raise TypeError(f"key_padding_mask must be a bool torch.Tensor or None, got "
                            f"{type(key_padding_mask).__name__}")
        if tuple(key_padding_mask.shape) != (B, Lk):
            raise ValueError(f"key_padding_mask must have shape [B={B}, Lk={Lk}], got "
                             f"{tuple(key_padding_mask.shape)}")
        if key_padding_mask.device != q.device:
            raise ValueError(f"key_padding_mask is on {key_padding_mask.device} but q is on {q.device}")
        if key_padding_mask.dtype != torch.bool:
            key_padding_mask = key_padding_mask != 0
    image_span_ids = _check_span("image_span_ids", image_span_ids, (B, Lq), q.device)
    bidir = image_attention == "bidirectional" and image_span_ids is not None
    if attn_bias is not None:
        if not isinstance(attn_bias, torch.Tensor) or not attn_bias.is_floating_point():
            raise TypeError("attn_bias must be a floating-point torch.Tensor (additive mask) or None")
        try:
            torch.broadcast_shapes(attn_bias.shape, (B, H, Lq, Lk))
        except RuntimeError:
            raise ValueError(f"attn_bias of shape {tuple(attn_bias.shape)} does not broadcast to "
                             f"[B, H, Lq, Lk] = {(B, H, Lq, Lk)}") from None
    scale = _default_scale(softmax_scale, hd)
    req = _Request(device=q.device.type, dtype=q.dtype, head_dim=hd, gqa=H != KV, kv_offset=Lk > Lq,
                   padding=key_padding_mask is not None, bidir=bidir, bias=attn_bias is not None,
                   need_lse=bool(return_lse), varlen=False, grad=_needs_grad(q, k, v))
    return key_padding_mask, image_span_ids, bidir, scale, req


def attention_backend_reason(backend, q, k, v, plan=None, *, key_padding_mask=None, image_span_ids=None,
                             image_attention="causal", attn_bias=None, softmax_scale=None, return_lse=False):
    """None if ``mixed_attention(q, k, v, plan, ..., backend=backend)`` can run with exactly these semantics, else
    the reason it would raise (for benchmarks and callers that want to skip instead of catching ValueError)."""
    req = _resolve_padded(q, k, v, plan, key_padding_mask, image_span_ids, image_attention, attn_bias, softmax_scale,
                          return_lse)[-1]
    if backend not in BACKENDS:
        return f"backend must be one of {BACKENDS}, got {backend!r}"
    return _unsupported_reason(backend, req)


def mixed_attention(q, k, v, plan=None, *, key_padding_mask=None, image_span_ids=None, image_attention="causal",
                    attn_bias=None, softmax_scale=None, return_lse=False, backend="auto", out_index=None,
                    deterministic=False):
    """Causal attention for mixed image/text sequences.

    Args:
        q: [B, H, Lq, hd]; k, v: [B, KV, Lk, hd] with H % KV == 0 (GQA, K/V never repeated in memory for
            triton/sdpa/flex) and Lk >= Lq: query i sits at key position Lk - Lq + i (bottom-right causal).
        plan: optional RoutingPlan; if Lk == plan.seq_len, key_padding_mask defaults to plan.attention_mask and
            image_span_ids to the last Lq columns of plan.image_span_ids.
        key_padding_mask: bool [B, Lk] keep mask (True = real key).
        image_span_ids: int [B, Lq]: 0 outside images, equal nonzero ids on one contiguous image span.
        image_attention: "causal" (default) or "bidirectional" (tokens of one image span see each other fully).
        attn_bias: additive float mask broadcastable to [B, H, Lq, Lk]; replaces causal/padding/span semantics
            (the caller's mask is the whole truth). sdpa and math only.
        softmax_scale: default 1/sqrt(hd). return_lse: also return lse fp32 [B, H, Lq] (natural log; -inf on rows
            with no visible key, whose output is 0). backend: "auto" or one of BACKENDS.
        out_index: optional int [B, Lq], a permutation of range(B*Lq): the output is then [B*Lq, H*hd] with query
            (b, i) in row out_index[b, i] -- pass ``plan.inv_perm.view(B, L)`` to get it straight in the plan's
            routed order (triton writes it there and reads dO from it; other backends scatter a copy). Checked on
            the host for CPU tensors, on CUDA with VEXPERT_DEBUG=1 (the kernel skips out-of-range rows regardless).
        deterministic: triton only: a bitwise-repeatable backward (two kernels, no atomics) instead of the default
            one-pass backward (dQ accumulated with fp32 atomics).
    Returns:
        out [B, H, Lq, hd] (q's dtype) or [B*Lq, H*hd] with out_index, or (out, lse).
    """
    key_padding_mask, image_span_ids, bidir, scale, req = _resolve_padded(
        q, k, v, plan, key_padding_mask, image_span_ids, image_attention, attn_bias, softmax_scale, return_lse)
    B, H, Lq, hd = q.shape
    Lk = k.shape[2]
    masked = key_padding_mask is not None or bidir
    out_index = _check_out_index(out_index, (B, Lq), q.device)
    bwd_cfg = "auto" if requested_backend(backend) == "auto" else None  # auto: the backward tile is tuned too

    def run(name):
        if name.startswith("triton"):
            out, lse = flash_attention(q, k, v, key_padding_mask=key_padding_mask, image_span_ids=image_span_ids,
                                       bidirectional=bidir, softmax_scale=scale, fwd_config=parse_triton_name(name),
                                       out_index=out_index, deterministic=deterministic, bwd_config=bwd_cfg)
            return (out, lse) if return_lse else out
        res = _run_torch(name)
        if out_index is None:
            return res
        out, lse = res if return_lse else (res, None)
        out = _scatter_rows(out.transpose(1, 2).reshape(B * Lq, H * hd), out_index)
        return (out, lse) if return_lse else out

    def _run_torch(name):
        if name == "flex":
            return _flex_attention(q, k, v, key_padding_mask, image_span_ids, bidir, scale, return_lse)
        if name == "flash_attn":
            return _flash_attn_backend(q, k, v, scale)
        if name == "xformers":
            return _xformers_backend(q, k, v, scale)
        simple_causal = Lq == Lk and key_padding_mask is None and not bidir
        if attn_bias is not None:
            keep = None
        elif Lq == 1 and key_padding_mask is None and name == "sdpa":
            keep = None  # decode: the single query sees every key
        else:
            keep = attention_keep_mask(B, Lq, Lk, q.device, key_padding_mask, image_span_ids, bidir)
        if name == "sdpa":
            return _sdpa_attention(q, k, v, None if simple_causal else keep, attn_bias, scale, simple_causal)
        return _math_attention(q, k, v, keep, attn_bias, scale, return_lse)

    return _dispatch(backend, req, tune_key(req, H, k.shape[1], Lq, Lk), run, masked, Lq, (q, k, v))


def mixed_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, image_span_ids=None,
                           image_attention="causal", softmax_scale=None, return_lse=False, backend="auto",
                           out_index=None, deterministic=False):
    """Packed (varlen) variant: q [total_q, H, hd], k/v [total_k, KV, hd], cu_seqlens_q/k int [S+1].

    Sequence s has queries cu_seqlens_q[s]:cu_seqlens_q[s+1] and keys cu_seqlens_k[s]:cu_seqlens_k[s+1], with
    bottom-right causal alignment per sequence (len_k >= len_q). image_span_ids: int [total_q] (spans never cross
    sequences). Returns out [total_q, H, hd], or (out, lse fp32 [H, total_q]) as flash-attn does. ``out_index``: int
    [total_q] permutation: out is then [total_q, H*hd] with packed row t in row out_index[t] (see mixed_attention).
    ``deterministic``: as in mixed_attention.
    cu_seqlens values are checked on the host for CPU tensors, on CUDA with VEXPERT_DEBUG=1; the Triton kernels
    are bound-safe for any values (clamped to the rows and max_seqlen on the device).
    """
    _check_qkv(q, k, v, varlen=True)
    _check_mode(image_attention)
    for name, val in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if isinstance(val, bool) or not isinstance(val, int) or val < 0:
            raise ValueError(f"{name} must be a non-negative int, got {val!r}")
    # values checked where the host has them (CPU tensors) or under VEXPERT_DEBUG=1; the kernels are bound-safe
    # for anything else (every sequence is clamped to the rows and to max_seqlen on the device)
    check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, total=q.shape[0], max_seqlen=max_seqlen_q, device=q.device)
    check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, total=k.shape[0], max_seqlen=max_seqlen_k, device=q.device)
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must describe the same number of sequences, got "
                         f"{cu_seqlens_q.numel() - 1} and {cu_seqlens_k.numel() - 1}")
    image_span_ids = _check_span("image_span_ids", image_span_ids, (q.shape[0],), q.device)
    bidir = image_attention == "bidirectional" and image_span_ids is not None
    total_q, H, hd = q.shape
    scale = _default_scale(softmax_scale, hd)
    req = _Request(device=q.device.type, dtype=q.dtype, head_dim=hd, gqa=H != k.shape[1], kv_offset=True,
                   padding=False, bidir=bidir, bias=False, need_lse=bool(return_lse), varlen=True,
                   grad=_needs_grad(q, k, v), custom_scale=abs(scale - 1.0 / math.sqrt(hd)) > 1e-12)
    out_index = _check_out_index(out_index, (total_q,), q.device)
    bwd_cfg = "auto" if requested_backend(backend) == "auto" else None  # auto: the backward tile is tuned too

    def run(name):
        if name.startswith("triton"):
            out, lse = flash_attention(q, k, v, image_span_ids=image_span_ids, bidirectional=bidir,
                                       softmax_scale=scale, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                                       max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k,
                                       fwd_config=parse_triton_name(name), out_index=out_index,
                                       deterministic=deterministic, bwd_config=bwd_cfg)
            return (out, lse) if return_lse else out
        res = _run_torch(name)
        if out_index is None:
            return res
        out, lse = res if return_lse else (res, None)
        out = _scatter_rows(out.reshape(total_q, H * hd), out_index)
        return (out, lse) if return_lse else out

    def _run_torch(name):
        if name == "varlen":
            from torch.nn.attention.varlen import varlen_attn

            kw = {"window_size": (-1, 0)} if "window_size" in _VARLEN_PARAMS else {"is_causal": True}
            if H != k.shape[1]:
                kw["enable_gqa"] = True
            if "scale" in _VARLEN_PARAMS:
                kw["scale"] = scale
            return varlen_attn(q, k, v, cu_seqlens_q.to(torch.int32), cu_seqlens_k.to(torch.int32), max_seqlen_q,
                               max_seqlen_k, **kw)
        if name == "flash_attn":
            from flash_attn import flash_attn_varlen_func

            return flash_attn_varlen_func(q, k, v, cu_seqlens_q.to(torch.int32), cu_seqlens_k.to(torch.int32),
                                          max_seqlen_q, max_seqlen_k, softmax_scale=scale, causal=True)
        return _varlen_by_sequence(name, q, k, v, cu_seqlens_q, cu_seqlens_k, image_span_ids, image_attention,
                                   bidir, scale, return_lse)

    return _dispatch(backend, req, tune_key(req, H, k.shape[1], max_seqlen_q, max_seqlen_k), run, bidir,
                     max_seqlen_q, (q, k, v))


def _varlen_by_sequence(name, q, k, v, cu_seqlens_q, cu_seqlens_k, image_span_ids, image_attention, bidir, scale,
                        return_lse):
    """sdpa / math on packed input: one padded call per sequence (host sync for the lengths: reference paths)."""
    H, hd = q.shape[1], q.shape[2]
    cq = cu_seqlens_q.tolist()
    ck = cu_seqlens_k.tolist()
    outs, lses = [], []
    for s in range(len(cq) - 1):
        qs = q[cq[s]:cq[s + 1]].transpose(0, 1).unsqueeze(0)
        ks = k[ck[s]:ck[s + 1]].transpose(0, 1).unsqueeze(0)
        vs = v[ck[s]:ck[s + 1]].transpose(0, 1).unsqueeze(0)
        if ks.shape[2] < qs.shape[2]:
            raise ValueError(f"sequence {s}: need len_k >= len_q, got {qs.shape[2]} > {ks.shape[2]}")
        if qs.shape[2] == 0:
            outs.append(q.new_zeros(0, H, hd))
            lses.append(torch.zeros(H, 0, dtype=torch.float32, device=q.device))
            continue
        span = image_span_ids[cq[s]:cq[s + 1]].unsqueeze(0) if bidir else None
        res = mixed_attention(qs, ks, vs, image_span_ids=span, image_attention=image_attention,
                              softmax_scale=scale, return_lse=return_lse, backend=name)
        if return_lse:
            res, lse = res
            lses.append(lse[0])
        outs.append(res[0].transpose(0, 1))
    out = torch.cat(outs, 0)
    return (out, torch.cat(lses, 1)) if return_lse else out


"""Self-tuned backward (``flash_attention(..., bwd_config="auto")``): which dK/dV tile -- or the plain PyTorch
gradient -- computes dq, dk, dv on CUDA, chosen by :func:`vexpert_kernels.autotune.select` on the real inputs.

Candidates: ``"torch"`` (the plain-PyTorch gradient of the math attention: also the reference every candidate is
checked against, and the static choice when tuning cannot run, as the contract asks), and our backward once per tile
of :func:`.configs.bwd_tune_configs` (the table's tile first; on sm_90 the 64-query tiles, TMA ones when the tensors
allow descriptors), named ``"triton_bwd:<BLOCK_M>x<BLOCK_N>:w<warps>s<stages>[:tma]"``. Off CUDA (the interpreter)
nothing is tuned: the table's tile runs."""
from __future__ import annotations

import torch

from vexpert_kernels.ops.attention.dispatch import bwd_tune_key

from .configs import _block_d, bwd_tune_configs

STATIC = "torch"


def bwd_name(cfg) -> str:
    bm, bn, nw, ns, *tma = cfg
    return f"triton_bwd:{bm}x{bn}:w{nw}s{ns}" + (":tma" if tma and tma[0] else "")


def parse_bwd_name(name: str):
    """Inverse of :func:`bwd_name`; ``"torch"`` -> None."""
    if name == STATIC:
        return None
    _, tile, ws, *tma = name.split(":")
    bm, bn = tile.split("x")
    nw, ns = ws[1:].split("s")
    return (int(bm), int(bn), int(nw), int(ns)) + ((1,) if tma == ["tma"] else ())


def torch_grads(do, q, k, v, dlse, kpm, span, cu_q, cu_k, max_q, max_k, softmax_scale, bidir, oidx):
    """(dq, dk, dv) of the plain-PyTorch math attention with the same semantics (fp32 math; q's dtype out)."""
    from vexpert_kernels.ops.attention import mixed_attention, mixed_attention_varlen  # lazy: ops.attention imports us

    mode = "bidirectional" if bidir else "causal"
    with torch.enable_grad():
        qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
        if cu_q is not None:
            out, lse = mixed_attention_varlen(qq, kk, vv, cu_q, cu_k, max_q, max_k, image_span_ids=span,
                                              image_attention=mode, softmax_scale=softmax_scale, return_lse=True,
                                              backend="math", out_index=oidx)
        else:
            out, lse = mixed_attention(qq, kk, vv, key_padding_mask=kpm, image_span_ids=span, image_attention=mode,
                                       softmax_scale=softmax_scale, return_lse=True, backend="math", out_index=oidx)
        outs, grads = [out], [do.to(out.dtype)]
        if dlse is not None:
            outs.append(lse)
            grads.append(dlse.to(lse.dtype))
        return torch.autograd.grad(outs, (qq, kk, vv), grads)


def select_bwd(do, q, k, v, out, lse, dlse, kpm, span, cu_q, cu_k, max_q, max_k, softmax_scale, bidir, oidx,
               deterministic, run_triton):
    """Tune (or reuse the decision) and return (dq, dk, dv). ``run_triton(cfg)`` runs our backward with dK/dV tile
    ``cfg``."""
    from vexpert_kernels import autotune

    from .launch import bwd_tma_usable

    varlen = cu_q is not None
    hd = q.shape[-1]
    routed = oidx is not None
    tma = not torch.compiler.is_compiling() and bwd_tma_usable(q, k, v, None if routed else do)
    cfgs = bwd_tune_configs(q.device, _block_d(hd), kpm is not None or bidir, varlen, deterministic, tma, routed)

    def plain():
        return torch_grads(do, q, k, v, dlse, kpm, span, cu_q, cu_k, max_q, max_k, softmax_scale, bidir, oidx)

    cands = {STATIC: plain}
    for c in cfgs:
        cands[bwd_name(c)] = (lambda c=c: run_triton(c))
    H, KV = q.shape[-2] if varlen else q.shape[1], k.shape[-2] if varlen else k.shape[1]
    lq, lk = (max_q, max_k) if varlen else (q.shape[2], k.shape[2])
    key = bwd_tune_key(q.dtype, hd, H, KV, "padded" if kpm is not None else "causal", bidir, varlen, routed,
                       dlse is not None, deterministic, lq, lk)
    name = autotune.select("attention_bwd", key, cands, plain, static=STATIC, dtype=q.dtype)
    return plain() if name == STATIC else run_triton(parse_bwd_name(name))

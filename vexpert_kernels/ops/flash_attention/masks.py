"""Mask metadata built on the device (no host sync): canonical span ids, span bounds, padding key ranges."""
from __future__ import annotations

import torch


def canonical_span_ids(span_ids: torch.Tensor) -> torch.Tensor:
    """int32 ids that are equal iff two tokens lie in the same *contiguous* run of one nonzero id (0 stays 0).

    Works along the last dim. Equal ids in two separate runs become different spans, so every backend sees the
    same (contiguous) spans and the kernels' per-tile span bounds are exact.
    """
    s = span_ids.to(torch.int32)
    nz = s != 0
    start = nz.clone()
    start[..., 1:] &= s[..., 1:] != s[..., :-1]
    run = start.to(torch.int32).cumsum(-1, dtype=torch.int32)
    return torch.where(nz, run, torch.zeros_like(run))


def span_bounds(canon: torch.Tensor):
    """(span_start, span_end) int32 [..., L]: first index and exclusive end of each token's span (i, i+1 outside)."""
    L = canon.shape[-1]
    idx = torch.arange(L, device=canon.device, dtype=torch.int32).expand_as(canon)
    nz = canon != 0
    is_start = torch.ones_like(nz)
    is_start[..., 1:] = ~nz[..., 1:] | (canon[..., 1:] != canon[..., :-1])
    start = torch.where(is_start, idx, torch.zeros_like(idx)).cummax(-1).values
    is_end = torch.ones_like(nz)  # is the last token of its run
    is_end[..., :-1] = ~nz[..., :-1] | (canon[..., 1:] != canon[..., :-1])
    end_r = torch.where(is_end, idx, torch.full_like(idx, L)).flip(-1).cummin(-1).values.flip(-1)
    return start.contiguous(), (end_r + 1).contiguous()


def _varlen_span_bounds(canon_packed: torch.Tensor, cu_q: torch.Tensor):
    """Span bounds for packed spans, local to each sequence (spans never cross sequences: cut at boundaries)."""
    total = canon_packed.shape[0]
    pos = torch.arange(total, device=canon_packed.device, dtype=torch.int32)
    seq = torch.searchsorted(cu_q[1:].contiguous(), pos, right=True)
    # a sequence boundary ends every span: give the canonical ids a per-sequence offset, then re-canonicalise
    ids = torch.where(canon_packed != 0, canon_packed + seq.to(torch.int32) * (total + 1), torch.zeros_like(canon_packed))
    canon = canonical_span_ids(ids)
    start, end = span_bounds(canon)
    base = cu_q.to(torch.int32)[seq]
    return canon, (start - base).contiguous(), (end - base).contiguous()


def _kv_range(kpm: torch.Tensor):
    """Per batch row: [first kept key, last kept key + 1) (an empty range [Lk, 0) when nothing is kept)."""
    Lk = kpm.shape[-1]
    keep = kpm.to(torch.int32)
    anyk = keep.any(-1)
    lo = torch.where(anyk, keep.argmax(-1), torch.full_like(anyk, Lk, dtype=torch.long))
    hi = torch.where(anyk, Lk - keep.flip(-1).argmax(-1), torch.zeros_like(lo))
    return lo.to(torch.int32).contiguous(), hi.to(torch.int32).contiguous()


"""Small helpers shared by tests and benchmarks."""
from __future__ import annotations

import torch


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative error ||out - ref|| / ||ref||, computed in float64. NaN anywhere gives inf."""
    out = out.detach().double().cpu()
    ref = ref.detach().double().cpu()
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def random_token_types(batch: int, length: int, *, images_per_row=(0, 2), image_len=(1, 12), generator=None):
    """Random CogVLM-like token types [B, L]: text with 0..k image spans (each a run of type-1 tokens) anywhere."""
    g = generator
    tt = torch.zeros(batch, length, dtype=torch.long)
    for b in range(batch):
        n_img = int(torch.randint(images_per_row[0], images_per_row[1] + 1, (1,), generator=g))
        for _ in range(n_img):
            n = int(torch.randint(image_len[0], image_len[1] + 1, (1,), generator=g))
            n = min(n, length)
            s = int(torch.randint(0, length - n + 1, (1,), generator=g))
            tt[b, s:s + n] = 1
    return tt

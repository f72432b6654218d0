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


def synthetic_batch(batch, length, vocab, hidden, image_len, generator, device):
    """A learnable mixed image/text batch: [bos] image(image_len) text..., where text counts up by an offset (1 or
    2) chosen by the sign of the image features' mean. Returns input_ids, token_type_ids, image_features, labels."""
    tt = torch.zeros(batch, length, dtype=torch.long)
    ids = torch.zeros(batch, length, dtype=torch.long)
    feats = []
    for b in range(batch):
        start = 1
        tt[b, start:start + image_len] = 1
        f = torch.randn(image_len, hidden, generator=generator)
        offset = 1 if f.mean() > 0 else 2
        feats.append(f)
        tok = int(torch.randint(0, vocab, (1,), generator=generator))
        for i in range(start + image_len, length):
            ids[b, i] = tok
            tok = (tok + offset) % vocab
    labels = ids.clone()
    labels[tt == 1] = -100
    labels[:, : 1 + image_len + 1] = -100  # the first text token is random
    return ids.to(device), tt.to(device), torch.cat(feats).to(device), labels.to(device)


@torch.no_grad()
def randomize_norms_and_biases(module: torch.nn.Module, scale: float = 0.1) -> torch.nn.Module:
    """Give RMSNorm weights (init 1) and biases (init 0) non-trivial values so tests can see them (never test on
    the trivial init). Linear weights keep their random init."""
    for name, p in module.named_parameters():
        if "layernorm" in name:
            p.copy_(1 + scale * torch.randn_like(p))
        elif name.endswith("bias"):
            p.copy_(scale * torch.randn_like(p))
    return module


def reference_and_fused(config, dtype=torch.float32, backend="auto", seed=0):
    """(reference block in float64, fused VisualExpertBlock in ``dtype``) with identical, non-trivial weights."""
    from .block import VisualExpertBlock
    from .reference import VisualExpertBlock as ReferenceBlock

    torch.manual_seed(seed)
    ref = randomize_norms_and_biases(ReferenceBlock(config))
    fused = VisualExpertBlock(config, backend=backend)
    fused.load_state_dict(ref.state_dict())
    return ref.double(), fused.to(dtype)

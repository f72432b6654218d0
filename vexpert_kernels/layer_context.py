"""What a fused layer takes from the model around it for one forward (used by block.py and integrations.hf):

  PlanCache                  one RoutingPlan per model forward for layers an HF decoder calls one by one
  keep_mask_from_additive    the key-padding keep mask inside an HF decoder's 4-D causal + padding mask (no sync)
  rope_inputs                (inv_freq, position dtype) from a rotary module's own state, never an inferred theta
"""
from __future__ import annotations

import weakref

import torch
from torch import nn


def _same(ref, tensor) -> bool:
    """``ref`` = (weakref, version) recorded for a tensor (or None for None): is ``tensor`` that same, unchanged?"""
    if ref is None or tensor is None:
        return ref is None and tensor is None
    return ref[0]() is tensor and ref[1] == tensor._version


def _ref(tensor):
    return None if tensor is None else (weakref.ref(tensor), tensor._version)


class PlanCache:
    """One RoutingPlan per model forward for layers that an HF decoder calls one by one with the same
    ``token_type_ids`` and ``attention_mask`` tensors (``patch_cogvlm`` gives all fused layers of a model one cache).

    The key is the identity (and in-place version) of those two tensors, held by weak reference: the first layer of a
    forward builds the plan, every later layer — and a gradient-checkpointing recompute — reuses it; a new forward
    brings new tensors and so a new plan. No host synchronisation is involved. Under ``torch.compile`` nothing is
    cached (each call builds its plan)."""

    def __init__(self):
        self._key = None
        self._value = None
        self.builds = 0  # how many plans were built (tests check one per model forward)

    def get(self, token_type_ids, attention_mask, build):
        if torch.compiler.is_compiling():
            return build()
        if self._key is not None and _same(self._key[0], token_type_ids) and _same(self._key[1], attention_mask):
            return self._value
        value = build()
        self.builds += 1
        self._key, self._value = (_ref(token_type_ids), _ref(attention_mask)), value
        return value

    def clear(self):
        self._key = self._value = None


def keep_mask_from_additive(attention_mask: torch.Tensor, batch: int) -> torch.Tensor:
    """bool keep mask [B, past+L] from an HF decoder's 4-D mask [B|1, 1, L, past+L] that is causal + key padding
    (additive: 0 keep, a large negative value drop; or bool: True keep). The LAST query row sees every key causally, so
    it holds exactly the key padding. A device op: no host sync."""
    row = attention_mask[:, 0, -1, :]
    if row.dtype == torch.bool:
        keep = row
    else:
        keep = row > torch.finfo(row.dtype).min / 2 if row.is_floating_point() else row != 0
    return keep.expand(batch, keep.shape[-1])


def rope_inputs(rotary_emb: nn.Module, positions: str = "module"):
    """(inv_freq, position_dtype, description) the fused layer uses for RoPE, read from a rotary module's state.

    * our ``reference.RotaryEmbedding``: its ``inv_freq`` and ``position_dtype`` (None = exact positions);
    * ``FastRotaryEmbedding`` with ``pos_idx_in_fp32=True``: fp32 positions and an fp32 ``inv_freq`` (recomputed from
      its ``base`` if the buffer is not fp32), as that module does;
    * any other module with an ``inv_freq`` buffer (CogVLM v1 ``RotaryEmbedding``, CogVLM2 ``FastRotaryEmbedding``
      with ``pos_idx_in_fp32=False``): the buffer as it is, positions in its dtype — the HF table.
    ``positions="fp32"`` keeps the module's ``inv_freq`` but uses exact positions. Returns None if the module has no
    ``inv_freq`` (the layer then uses ``config.rope_theta``)."""
    if positions not in ("module", "fp32"):
        raise ValueError(f"rope positions must be 'module' or 'fp32', got {positions!r}")
    inv = getattr(rotary_emb, "inv_freq", None)
    if not isinstance(inv, torch.Tensor):
        return None
    name = type(rotary_emb).__name__
    if hasattr(rotary_emb, "position_dtype"):
        pdt, how = rotary_emb.position_dtype, "positions exact" if rotary_emb.position_dtype is None else \
            f"positions in {rotary_emb.position_dtype}"
    elif getattr(rotary_emb, "pos_idx_in_fp32", False):
        if inv.dtype != torch.float32 and hasattr(rotary_emb, "base"):
            dim = 2 * inv.numel()
            inv = 1.0 / (float(rotary_emb.base) ** (torch.arange(0, dim, 2, device=inv.device,
                                                                 dtype=torch.float32) / dim))
        pdt, how = None, "pos_idx_in_fp32: fp32 positions"
    else:
        pdt, how = inv.dtype, f"positions in inv_freq's dtype ({inv.dtype})"
    if positions == "fp32":
        pdt, how = None, "positions exact (rope_positions='fp32')"
    if pdt == torch.float32:
        pdt = None  # exact for every position a model reaches
    return inv, pdt, f"{name}.inv_freq ({inv.dtype}), {how}"

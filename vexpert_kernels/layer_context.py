"""What a fused layer takes from the model around it for one forward (used by block.py and integrations.hf):

  PlanCache                  one RoutingPlan (and default position ids) per model forward for layers an HF decoder
                             calls one by one
  RopeCache                  one RoPE cos/sin table per model forward for all the layers of a model
  keep_mask_from_additive    the key-padding keep mask inside an HF decoder's 4-D causal + padding mask (no sync)
  rope_inputs                (inv_freq, position dtype) from a rotary module's own state, never an inferred theta
  same_rope_state            whether two rotary modules give the same table (a host compare: once, not per forward)
  rope_position_ids          [1, L] / [B, L] integer position ids as the int64 [B, L] a RoPE table is built from

Per-forward state is built by the first layer of a forward and reused by every later layer (and a gradient-checkpoint
recompute): the caches key on the identity and in-place version of the tensors the decoder hands every layer
(token_type_ids, attention_mask, position_ids) and of the rotary ``inv_freq`` buffers, held by weak reference — no
host synchronisation. Under ``torch.compile`` nothing is cached (each call builds what it needs).
"""
from __future__ import annotations

import functools
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
    brings new tensors and so a new plan. The HF default position ids (when the decoder passes none) are kept under
    the same key (:meth:`positions`). No host synchronisation is involved. Under ``torch.compile`` nothing is
    cached (each call builds its plan)."""

    def __init__(self):
        self._key = None
        self._value = None
        self._positions = None
        self.builds = 0  # how many plans were built (tests check one per model forward)

    def _hit(self, token_type_ids, attention_mask) -> bool:
        return self._key is not None and _same(self._key[0], token_type_ids) and _same(self._key[1], attention_mask)

    def get(self, token_type_ids, attention_mask, build):
        if torch.compiler.is_compiling():
            return build()
        if self._hit(token_type_ids, attention_mask) and self._value is not None:
            return self._value
        value = build()
        self.builds += 1
        if not self._hit(token_type_ids, attention_mask):
            self._positions = None
        self._key, self._value = (_ref(token_type_ids), _ref(attention_mask)), value
        return value

    def positions(self, token_type_ids, attention_mask, build):
        """The default position ids of this forward (``build()`` once per key, like the plan)."""
        if torch.compiler.is_compiling():
            return build()
        if not self._hit(token_type_ids, attention_mask):
            self._key, self._value, self._positions = (_ref(token_type_ids), _ref(attention_mask)), None, None
        if self._positions is None:
            self._positions = build()
        return self._positions

    def clear(self):
        self._key = self._value = self._positions = None

    def __getstate__(self):  # copies / pickles start empty (weak references do not pickle)
        return dict(self.__dict__, _key=None, _value=None, _positions=None)


def rope_position_ids(position_ids, batch: int, length: int):
    """None, or integer [B, L] / [1, L] position ids -> int64 [B, L] (the tensor itself when it already is one)."""
    if position_ids is None or (position_ids.dtype == torch.int64 and tuple(position_ids.shape) == (batch, length)):
        return position_ids
    return position_ids.long().expand(batch, length)


def same_rope_state(a: nn.Module, b: nn.Module) -> bool:
    """Whether rotary modules ``a`` and ``b`` give the same RoPE table: same type, ``inv_freq`` of the same dtype,
    shape, device and values, same position rounding (``position_dtype`` / ``pos_idx_in_fp32``) and ``base``.
    Compares values on the host (a sync for CUDA buffers): call it once per buffer, not per forward."""
    if a is b:
        return True
    ia, ib = getattr(a, "inv_freq", None), getattr(b, "inv_freq", None)
    if not (isinstance(ia, torch.Tensor) and isinstance(ib, torch.Tensor)):
        return False
    return (type(a) is type(b) and ia.dtype == ib.dtype and ia.shape == ib.shape and ia.device == ib.device
            and all(getattr(a, n, None) == getattr(b, n, None) for n in ("position_dtype", "pos_idx_in_fp32", "base"))
            and bool(torch.equal(ia, ib)))


def _forget_tables(cache_ref, plan_ref) -> None:
    """The plan of a RopeCache's tables is gone (its forward is over): free the tables with it."""
    cache = cache_ref()
    if cache is not None and cache._plan is plan_ref:
        cache._plan, cache._tables = None, []


class RopeCache:
    """One RoPE (cos, sin) table per model forward for all the layers given this cache (``patch_cogvlm``,
    ``VisualExpertLM`` and ``VisualExpertStack`` give all their layers one; a lone block has its own).

    * rotary modules: the first one seen leads; another layer's module whose state is the same
      (:func:`same_rope_state`: every checkpoint) uses the leader's table. The compare runs on the host once per
      module, and again only when either ``inv_freq`` is replaced or changed in place (``.to()``,
      ``load_state_dict``) — never per forward. A module that differs keeps its own table.
    * inputs: :func:`rope_inputs` of a module once per buffer version (a derived fp32 ``inv_freq`` is one tensor).
    * tables: keyed by the RoutingPlan (one per forward; a new plan drops the last forward's tables), the
      ``inv_freq`` tensor, the position dtype and the position ids tensor the layer was handed (identity and
      in-place version, before any broadcast of ``[1, L]`` or cast to int64); built by ``RoutingPlan.rope_table``.
    ``builds`` counts tables built (tests check one per forward). Nothing is cached under ``torch.compile``."""

    def __init__(self):
        self.clear()
        self.builds = 0

    @classmethod
    def shared_by(cls, layers) -> "RopeCache":
        """One new cache given to every layer of ``layers`` (their ``rope_cache``); returns it."""
        cache = cls()
        for layer in layers:
            layer.rope_cache = cache
        return cache

    def clear(self):
        self._lead = None                              # weakref to the leading rotary module
        self._verdicts = weakref.WeakKeyDictionary()   # module -> (its inv_freq ref, lead's inv_freq ref, same?)
        self._inputs = weakref.WeakKeyDictionary()     # module -> (inv_freq ref, positions, rope_inputs(...))
        self._theta = {}                               # (theta, head_dim, device) -> inv_freq
        self._plan = None                              # weakref to the plan of the cached tables
        self._tables = []                              # [(inv_freq ref, position dtype, position_ids ref, table)]

    def __getstate__(self):  # copies / pickles start empty (weak references do not pickle)
        return {"builds": self.builds}

    def __setstate__(self, state):
        self.clear()
        self.__dict__.update(state)

    def _shared(self, rotary: nn.Module) -> nn.Module:
        lead = self._lead() if self._lead is not None else None
        if lead is None:
            self._lead, self._verdicts = weakref.ref(rotary), weakref.WeakKeyDictionary()
            return rotary
        if rotary is lead:
            return rotary
        mine, theirs = getattr(rotary, "inv_freq", None), getattr(lead, "inv_freq", None)
        v = self._verdicts.get(rotary)
        if v is None or not (_same(v[0], mine) and _same(v[1], theirs)):
            same = isinstance(mine, torch.Tensor) and isinstance(theirs, torch.Tensor) and same_rope_state(rotary, lead)
            v = (_ref(mine) if isinstance(mine, torch.Tensor) else None,
                 _ref(theirs) if isinstance(theirs, torch.Tensor) else None, same)
            self._verdicts[rotary] = v
        return lead if v[2] else rotary

    def inputs(self, rotary: nn.Module, positions: str = "module"):
        """:func:`rope_inputs` for a layer whose rotary module is ``rotary`` (the leader's when the states match)."""
        if torch.compiler.is_compiling():
            return rope_inputs(rotary, positions)
        rotary = self._shared(rotary)
        inv = getattr(rotary, "inv_freq", None)
        if not isinstance(inv, torch.Tensor):
            return rope_inputs(rotary, positions)
        memo = self._inputs.get(rotary)
        if memo is None or memo[1] != positions or not _same(memo[0], inv):
            memo = (_ref(inv), positions, rope_inputs(rotary, positions))
            self._inputs[rotary] = memo
        return memo[2]

    def theta_inv_freq(self, theta: float, head_dim: int, device) -> torch.Tensor:
        """fp32 [head_dim/2] from ``config.rope_theta`` (layers without an ``inv_freq`` buffer): the formula and fp32
        rounding of ``ops.routed_qkv_rope(rope_theta=...)``."""
        key = (float(theta), head_dim, torch.device(device))
        inv = None if torch.compiler.is_compiling() else self._theta.get(key)
        if inv is None:
            exps = torch.arange(0, head_dim, 2, device=device, dtype=torch.int64).float() / head_dim
            inv = 1.0 / (float(theta) ** exps)
            if not torch.compiler.is_compiling():
                self._theta[key] = inv
        return inv

    def table(self, plan, inv_freq: torch.Tensor, position_dtype, position_ids=None):
        """fp32 (cos, sin) [T, hd/2] in ``plan``'s routed order; ``position_ids`` None (the plan's) or integer
        [B, L] / [1, L] in sequence order."""
        if torch.compiler.is_compiling():
            return plan.rope_table(inv_freq, position_dtype,
                                   rope_position_ids(position_ids, plan.batch_size, plan.seq_len))
        if self._plan is None or self._plan() is not plan:
            self._plan, self._tables = weakref.ref(plan, functools.partial(_forget_tables, weakref.ref(self))), []
        for inv_ref, pdt, pos_ref, table in self._tables:
            if _same(inv_ref, inv_freq) and pdt == position_dtype and _same(pos_ref, position_ids):
                return table
        table = plan.rope_table(inv_freq, position_dtype, rope_position_ids(position_ids, plan.batch_size,
                                                                             plan.seq_len))
        self.builds += 1
        self._tables.append((_ref(inv_freq), position_dtype, _ref(position_ids), table))
        return table


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

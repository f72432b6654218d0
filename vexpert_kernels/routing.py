"""RoutingPlan: which expert each token uses, and the expert-contiguous token order, built once per forward.

Token types never change across layers, so a plan is built once from ``token_type_ids`` and handed to every layer.
Hidden states can then live in *routed order* (all vision rows, then all language rows) and every routed linear is
a GEMM over two contiguous row ranges.

Routed order covers all ``B*L`` positions, padding included (padding is computed like any token and ignored, as in
HF), so every shape is static and the build needs no host synchronisation. The only host sync a plan ever makes is
in :attr:`RoutingPlan.host_counts` (one ``.tolist()``, cached), used by code that needs expert sizes on the host
(the ``torch`` GEMM backend, packing for varlen attention).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from .validation import check_keep_mask, check_plan_cu_seqlens, check_tensor, check_token_type_ids

LANGUAGE_TOKEN_TYPE = 0
VISION_TOKEN_TYPE = 1
VISION, LANGUAGE = 0, 1  # expert index: weights are ordered (vision, language) everywhere in this package


def expert_vision_mask(token_type_ids: torch.Tensor, same_segment_as_next: Optional[torch.Tensor] = None):
    """HF rule: a token uses the vision expert iff it and the NEXT token are vision tokens (so eoi, and any vision
    token last in its row, use the language expert)."""
    tt = token_type_ids
    vision = torch.zeros_like(tt, dtype=torch.bool)
    vision[:, :-1] = (tt[:, :-1] == VISION_TOKEN_TYPE) & (tt[:, 1:] == VISION_TOKEN_TYPE)
    if same_segment_as_next is not None:
        vision[:, :-1] &= same_segment_as_next
    return vision


def build_position_ids(token_type_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                       same_segment_as_next: Optional[torch.Tensor] = None) -> torch.Tensor:
    """HF ``build_position_ids``: bos 0, boi 1, all patches share 2, eoi 3, text 4, 5, ...

    Masked positions count as type -1 (so left padding sits at 0 and the first real token gets 1, as in HF).
    With ``same_segment_as_next`` (packed sequences) rows restart at each segment start.
    """
    tmp = token_type_ids.clone()
    if attention_mask is not None:
        tmp[~attention_mask] = -1
    L, V = LANGUAGE_TOKEN_TYPE, VISION_TOKEN_TYPE
    if same_segment_as_next is None:
        starts_prev = torch.zeros_like(tmp[:, 1:], dtype=torch.bool)  # position j (>0) starts a new segment
    else:
        starts_prev = ~same_segment_as_next
    left, right = tmp[:, :-1], tmp[:, 1:]  # each adjacent pair (j-1, j)
    is_boi_eoi = torch.zeros_like(tmp, dtype=torch.bool)
    # boi: vision after language (or vision first in its row/segment)
    is_boi_eoi[:, 1:] |= (right == V) & ((left == L) | starts_prev)
    is_boi_eoi[:, 0] |= tmp[:, 0] == V
    # eoi: vision before language (or vision last in its row/segment)
    is_boi_eoi[:, :-1] |= (left == V) & ((right == L) | starts_prev)
    is_boi_eoi[:, -1] |= tmp[:, -1] == V
    tmp[is_boi_eoi] = L
    left, right = tmp[:, :-1], tmp[:, 1:]  # relabelled
    step = torch.zeros_like(tmp, dtype=torch.long)
    step[:, 1:] = (right == L) | ((right == V) & (left == L))
    if same_segment_as_next is None:
        return step.cumsum(-1)
    # packed: restart the count at every segment start (segment start gets 0, like column 0 of a row)
    step[:, 1:] = torch.where(starts_prev, torch.zeros_like(step[:, 1:]), step[:, 1:])
    total = step.cumsum(-1)
    start_flag = torch.ones_like(tmp, dtype=torch.bool)
    start_flag[:, 1:] = starts_prev
    idx = torch.arange(tmp.shape[1], device=tmp.device).expand_as(tmp)
    seg_start = torch.where(start_flag, idx, torch.zeros_like(idx)).cummax(-1).values
    return total - total.gather(1, seg_start)


def _image_span_ids(token_type_ids: torch.Tensor, keep: Optional[torch.Tensor],
                    same_segment_as_next: Optional[torch.Tensor]) -> torch.Tensor:
    """int32 [B, L]: 0 for non-image tokens, else a per-row id (1, 2, ...) of the contiguous run of type-1 tokens
    (boi, patches, eoi) the token belongs to. Used for bidirectional attention inside each image."""
    is_img = token_type_ids == VISION_TOKEN_TYPE
    if keep is not None:
        is_img = is_img & keep
    starts = is_img.clone()
    cont = is_img[:, :-1]
    if same_segment_as_next is not None:
        cont = cont & same_segment_as_next
    starts[:, 1:] &= ~cont
    ids = starts.to(torch.int32).cumsum(-1, dtype=torch.int32)
    return torch.where(is_img, ids, torch.zeros_like(ids))


@dataclass(eq=False)
class RoutingPlan:
    """Everything routing needs, computed once per forward on the tokens' device.

    Shapes (``T = B * L``, all positions including padding):
      token_type_ids  int64 [B, L]     0 language, 1 vision (as given)
      vision_mask     bool  [B, L]     HF expert rule; ``language_mask = ~vision_mask``
      attention_mask  bool  [B, L]     keep mask (None = no padding)
      position_ids    int64 [B, L]     HF ``build_position_ids``
      perm            int64 [T]        routed row -> flat sequence index ``b*L + l`` (vision rows first, stable)
      inv_perm        int64 [T]        flat sequence index -> routed row
      expert_counts   int64 [2]        (vision, language) on the device
      expert_offsets  int32 [3]        (0, n_vision, T) on the device: row ranges of the two experts
      routed_position_ids int64 [T]    position id of each routed row
      image_span_ids  int32 [B, L]     0 outside images, else id of the contiguous image run in its row
      seq_lens        int32 [B]        tokens kept per row (L without a mask)
      cu_seqlens      int32 [B+1]      prefix sums of seq_lens, for varlen (packed) attention
      seq_idx         int32 [B, L]     for packed input built with ``cu_seqlens``: segment of each token
    """

    token_type_ids: torch.Tensor
    vision_mask: torch.Tensor
    attention_mask: Optional[torch.Tensor]
    position_ids: torch.Tensor
    perm: torch.Tensor
    inv_perm: torch.Tensor
    expert_counts: torch.Tensor
    expert_offsets: torch.Tensor
    routed_position_ids: torch.Tensor
    image_span_ids: torch.Tensor
    seq_lens: torch.Tensor
    cu_seqlens: torch.Tensor
    packed_cu_seqlens: Optional[torch.Tensor] = None
    _host_counts: Optional[tuple] = field(default=None, repr=False)
    _rope_tables: list = field(default_factory=list, repr=False)

    # ------------------------------------------------------------------ construction
    @classmethod
    def build(cls, token_type_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, *,
              cu_seqlens: Optional[torch.Tensor] = None) -> "RoutingPlan":
        """Build the plan for one forward.

        Args:
            token_type_ids: int [B, L] (or [L]): 0 language, 1 vision.
            attention_mask: optional keep mask [B, L] (1/True keep, 0/False padding; left or right padding).
            cu_seqlens: optional int [S+1] for *packed* input: ``token_type_ids`` is [1, total] (or [total]) holding
                S sequences back to back; the expert rule and position ids then restart at each sequence.
        No host synchronisation happens here (on CUDA, invalid token types trip a device-side assert).
        Raises TypeError/ValueError (vexpert_kernels.validation) for non-integer or non-0/1 token types, a keep mask of another
        shape or device, and ``cu_seqlens`` that are not 1-D integer, do not start at 0, decrease, or do not end at
        ``total`` (values checked on the host for CPU tensors; for CUDA ``cu_seqlens`` only under
        ``VEXPERT_DEBUG=1``).
        """
        tt = check_token_type_ids(token_type_ids).long()
        keep = check_keep_mask(attention_mask, tt.shape, tt.device)
        if tt.is_cuda and cu_seqlens is None:
            from ._cuda import build_plan_cuda, cuda_extension_available

            if cuda_extension_available():  # csrc/routing_plan.cu: same fields in 3 launches, no sort
                return cls(token_type_ids=tt, attention_mask=keep, **build_plan_cuda(tt, keep))
        same_seg = None
        packed = None
        if cu_seqlens is not None:
            if tt.shape[0] != 1:
                raise ValueError(f"with cu_seqlens, token_type_ids must be packed as [1, total] or [total], got "
                                 f"{tuple(token_type_ids.shape)}")
            packed = check_plan_cu_seqlens(cu_seqlens, tt.shape[1], tt.device)
            pos = torch.arange(tt.shape[1], device=tt.device)
            seg = torch.searchsorted(packed[1:].contiguous(), pos, right=True)
            same_seg = (seg[1:] == seg[:-1]).unsqueeze(0)
        vision = expert_vision_mask(tt, same_seg)  # raw token types, padding included, exactly as HF
        position_ids = build_position_ids(tt, keep, same_seg)
        B, L = tt.shape
        flat_vision = vision.reshape(-1)
        # stable partition: vision rows first, each expert keeps sequence order (a stable sort of a 0/1 key)
        perm = torch.argsort((~flat_vision).to(torch.int8), stable=True)
        inv_perm = torch.empty_like(perm)
        inv_perm[perm] = torch.arange(perm.numel(), device=perm.device)
        n_vision = flat_vision.sum()
        counts = torch.stack([n_vision, flat_vision.numel() - n_vision])
        offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(torch.int32)
        seq_lens = (keep.sum(-1) if keep is not None else torch.full((B,), L, device=tt.device)).to(torch.int32)
        cu = torch.zeros(B + 1, dtype=torch.int32, device=tt.device)
        cu[1:] = seq_lens.cumsum(0)
        return cls(token_type_ids=tt, vision_mask=vision, attention_mask=keep, position_ids=position_ids,
                   perm=perm, inv_perm=inv_perm, expert_counts=counts, expert_offsets=offsets,
                   routed_position_ids=position_ids.reshape(-1)[perm], image_span_ids=_image_span_ids(tt, keep, same_seg),
                   seq_lens=seq_lens, cu_seqlens=packed if packed is not None else cu, packed_cu_seqlens=packed)

    # ------------------------------------------------------------------ sizes
    @property
    def batch_size(self) -> int:
        return self.token_type_ids.shape[0]

    @property
    def seq_len(self) -> int:
        return self.token_type_ids.shape[1]

    @property
    def num_tokens(self) -> int:
        return self.token_type_ids.numel()

    @property
    def device(self) -> torch.device:
        return self.token_type_ids.device

    @property
    def language_mask(self) -> torch.Tensor:
        return ~self.vision_mask

    @property
    def is_language_only(self) -> bool:
        """Statically known language-only plan (L == 1: the last token of a row is always language, e.g. decode)."""
        return self.seq_len == 1 and self.packed_cu_seqlens is None

    @property
    def host_counts(self) -> tuple:
        """(n_vision, n_language, max_seqlen) as Python ints. THE one host sync of a plan (cached)."""
        if self._host_counts is None:
            if self.is_language_only:
                self._host_counts = (0, self.num_tokens, 1)
            else:
                seg = self.cu_seqlens[1:] - self.cu_seqlens[:-1]
                vals = torch.cat([self.expert_counts, seg.max().reshape(1).long()]).tolist()
                self._host_counts = tuple(int(v) for v in vals)
        return self._host_counts

    @property
    def num_vision(self) -> int:
        return self.host_counts[0]

    @property
    def max_seqlen(self) -> int:
        return self.host_counts[2]

    # ------------------------------------------------------------------ RoPE
    def rope_table(self, inv_freq: torch.Tensor, position_dtype: Optional[torch.dtype] = None,
                   position_ids: Optional[torch.Tensor] = None):
        """RoPE angles' (cos, sin), each fp32 [T, hd/2] in routed order, built ONCE per plan and reused by every
        layer (cached per (inv_freq, position_dtype, position_ids) object; rebuilt if either tensor changes in place).

        inv_freq: [hd/2] frequencies exactly as the rotary module holds them (e.g. an HF checkpoint's bf16 buffer:
            its values are used as they are — theta is never inferred from them).
        position_dtype: dtype the positions are rounded through first (HF builds its table with
            ``arange(..., dtype=inv_freq.dtype)``, so a bf16 model rounds positions to bf16); None = exact.
        position_ids: int [B, L] in sequence order (what the HF decoder hands each layer); None =
            ``self.position_ids``. Angles are ``pos * inv_freq`` in fp32, as in the table of
            ``ops.routed_qkv_rope(rope_theta=...)``, so a table from an fp32 ``inv_freq`` gives identical results.
        """
        compiling = torch.compiler.is_compiling()
        if not compiling:
            for inv, inv_ver, pdt, pos, pos_ver, table in self._rope_tables:
                if inv is inv_freq and inv_ver == inv_freq._version and pdt == position_dtype and pos is position_ids \
                        and (pos is None or pos_ver == pos._version):
                    return table
        if inv_freq.dim() != 1:
            raise ValueError(f"inv_freq must be a 1-D tensor [head_dim/2], got shape {tuple(inv_freq.shape)}")
        if position_ids is None:
            pos = self.routed_position_ids
        else:
            if position_ids.numel() != self.num_tokens:
                raise ValueError(f"position_ids must have B*L={self.num_tokens} elements ([B, L] in sequence order), "
                                 f"got shape {tuple(position_ids.shape)}")
            pos = position_ids.reshape(-1).to(self.device).index_select(0, self.perm)
        if position_dtype is not None:
            pos = pos.to(position_dtype)
        with torch.no_grad():
            ang = pos.to(torch.float32)[:, None] * inv_freq.detach().to(device=self.device, dtype=torch.float32)[None]
            table = (ang.cos(), ang.sin())
        if not compiling:
            self._rope_tables.append((inv_freq, inv_freq._version, position_dtype, position_ids,
                                      None if position_ids is None else position_ids._version, table))
        return table

    # ------------------------------------------------------------------ layout changes
    def permute(self, x: torch.Tensor) -> torch.Tensor:
        """[B, L, ...] or [T, ...] in sequence order -> [T, ...] in routed order (a gather copy)."""
        flat = self._flatten(x, "x")
        return flat.index_select(0, self.perm)

    def unpermute(self, y: torch.Tensor) -> torch.Tensor:
        """[T, ...] in routed order -> [B, L, ...] in sequence order (a gather copy)."""
        check_tensor("y", y)
        if y.dim() < 1 or y.shape[0] != self.num_tokens:
            raise ValueError(f"y must have {self.num_tokens} rows in routed order (B*L), got shape {tuple(y.shape)}")
        if y.device != self.device:
            raise ValueError(f"y is on {y.device} but the plan is on {self.device}")
        return y.index_select(0, self.inv_perm).reshape(self.batch_size, self.seq_len, *y.shape[1:])

    def _flatten(self, x: torch.Tensor, name: str) -> torch.Tensor:
        check_tensor(name, x)
        if x.dim() == 0:
            raise ValueError(f"{name} must have shape [B={self.batch_size}, L={self.seq_len}, ...] or "
                             f"[T={self.num_tokens}, ...], got a 0-d tensor")
        if x.device != self.device:
            raise ValueError(f"{name} is on {x.device} but the plan is on {self.device}")
        if x.dim() >= 2 and tuple(x.shape[:2]) == (self.batch_size, self.seq_len):
            return x.reshape(self.num_tokens, *x.shape[2:])
        if x.shape[0] == self.num_tokens:
            return x
        raise ValueError(f"{name} must have shape [B={self.batch_size}, L={self.seq_len}, ...] or "
                         f"[T={self.num_tokens}, ...], got {tuple(x.shape)}")

    def to(self, device) -> "RoutingPlan":
        kw = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()
              if k not in ("_host_counts", "_rope_tables")}
        return RoutingPlan(**kw)

"""A thin visual-expert language model: embeddings, image features in the image positions, N layers, norm, LM head."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .block import VisualExpertBlock, visual_expert_layers
from .config import VisualExpertConfig
from .layer_context import RopeCache
from .reference import RMSNorm
from .reference import VisualExpertBlock as ReferenceBlock
from .validation import check_lm_forward, check_lm_init


class VisualExpertLM(nn.Module):
    """CogVLM-shaped decoder: ``backend="fused"`` (one RoutingPlan, routed order through all layers; the layers'
    kernel path is ``kernel_backend``) or ``"reference"`` (HF-style layers). Both have the same parameter names, so
    state dicts move between them. ``checkpoint=True`` recomputes each fused layer in backward."""

    def __init__(self, config: VisualExpertConfig, num_layers: int, vocab_size: int, *, backend: str = "fused",
                 kernel_backend: str = "auto", checkpoint: bool = False):
        super().__init__()
        check_lm_init(config, num_layers, vocab_size, backend, kernel_backend, checkpoint)
        self.config, self.backend, self.checkpoint = config, backend, checkpoint
        self.embed_tokens = nn.Embedding(vocab_size, config.hidden_size)
        if backend == "fused":
            self.layers = nn.ModuleList(VisualExpertBlock(config, backend=kernel_backend) for _ in range(num_layers))
            RopeCache.shared_by(self.layers)  # one RoPE cos/sin table per forward for all layers
        else:
            self.layers = nn.ModuleList(ReferenceBlock(config) for _ in range(num_layers))
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, vocab_size, bias=False)

    def embed(self, input_ids, token_type_ids, image_features: Optional[torch.Tensor] = None):
        """Token embeddings with ``image_features`` [n_image_tokens, D] written, in order, into the positions where
        ``token_type_ids == 1`` (as CogVLM does with its vision tower's output). No host sync (masked_scatter)."""
        x = self.embed_tokens(input_ids)
        if image_features is not None:
            if image_features.dim() != 2 or image_features.shape[-1] != self.config.hidden_size:
                raise ValueError(f"image_features must be [n_image_tokens, {self.config.hidden_size}], got "
                                 f"{tuple(image_features.shape)}")
            mask = (token_type_ids == 1).unsqueeze(-1).expand_as(x)
            x = x.masked_scatter(mask, image_features.to(x.dtype))
        return x

    def forward(self, input_ids, token_type_ids, image_features=None, attention_mask=None, labels=None):
        """input_ids, token_type_ids [B, L]; attention_mask 2-D keep [B, L] or None; labels [B, L] (-100 ignored).
        Returns logits [B, L, V], or (loss, logits) with labels (next-token loss).

        Inputs are validated first (``validation.check_lm_forward``): ids in [0, vocab_size) and one image_features
        row per image token are checked on the host for CPU tensors or under ``VEXPERT_DEBUG=1`` (no sync on CUDA)."""
        check_lm_forward(self, input_ids, token_type_ids, image_features, attention_mask, labels)
        x = self.embed(input_ids, token_type_ids, image_features)
        if self.backend == "fused":
            x = visual_expert_layers(self.layers, x, token_type_ids, attention_mask=attention_mask,
                                     checkpoint=self.checkpoint)
        else:
            for layer in self.layers:
                (x,) = layer(x, token_type_ids, attention_mask=attention_mask)
        logits = self.lm_head(self.norm(x))
        if labels is None:
            return logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1),
                               ignore_index=-100)
        return loss, logits

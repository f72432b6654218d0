"""Benchmark cases.

GPU ("real") cases, bf16, one decoder layer:
* CogVLM-17B (``VisualExpertConfig.cogvlm_chat_17b()``) and CogVLM2-19B (``cogvlm2_19b()``) dims;
* B x L = 4 x 2048 with 1227 image tokens per sample, 1 x 4096 with 2306, 8 x 1024 with 258;
* a token-count sweep (CogVLM-17B, one sample, 1227 image tokens, L = 1536 .. 8192);
* decode: B sequences, one new token each after a KV cache of ``past`` tokens.
CPU ("tiny") cases: ``VisualExpertConfig.tiny()``, fp32, a few dozen tokens — real measurements that prove the suite
and every provider run; not performance figures.

A sample is ``[bos] [boi, patches..., eoi] [text...]`` (all image tokens have type 1), as in CogVLM.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..config import VisualExpertConfig

MODELS = {
    "cogvlm-17b": VisualExpertConfig.cogvlm_chat_17b,
    "cogvlm2-19b": VisualExpertConfig.cogvlm2_19b,
    "tiny": VisualExpertConfig.tiny,
}


@dataclass(frozen=True)
class Case:
    model: str
    batch: int
    seq_len: int
    image_tokens: int   # per sample (boi + patches + eoi)
    kind: str = "layer"  # "layer" | "sweep" | "decode"
    past: int = 0        # decode: cached tokens before the new one

    @property
    def config(self) -> VisualExpertConfig:
        return MODELS[self.model]()

    @property
    def tokens(self) -> int:
        return self.batch * self.seq_len

    @property
    def id(self) -> str:
        if self.kind == "decode":
            return f"{self.model}-decode-{self.batch}x{self.past}"
        return f"{self.model}-{self.batch}x{self.seq_len}-img{self.image_tokens}"

    @property
    def label(self) -> str:
        if self.kind == "decode":
            return f"{self.model} decode B={self.batch} past={self.past}"
        return f"{self.model} {self.batch}x{self.seq_len} ({self.image_tokens} img/sample)"


def token_type_ids(case: Case, device="cpu", generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """[B, L] int64: bos, then the image (type 1) at position 1, then text. Odd rows shift the image by a few tokens
    so samples differ (as real batches do); the image always fits."""
    B, L, n = case.batch, case.seq_len, case.image_tokens
    if n > L - 1:
        raise ValueError(f"case {case.id}: {n} image tokens do not fit a sequence of {L} (bos + image)")
    tt = torch.zeros(B, L, dtype=torch.long)
    for b in range(B):
        start = 1 + (b % 2) * min(7, L - 1 - n)
        tt[b, start:start + n] = 1
    return tt.to(device)


REAL_LAYER_CASES = [
    Case("cogvlm-17b", 4, 2048, 1227),
    Case("cogvlm-17b", 1, 4096, 2306),
    Case("cogvlm-17b", 8, 1024, 258),
    Case("cogvlm2-19b", 4, 2048, 1227),
    Case("cogvlm2-19b", 1, 4096, 2306),
    Case("cogvlm2-19b", 8, 1024, 258),
]
REAL_SWEEP_CASES = [Case("cogvlm-17b", 1, L, 1227, kind="sweep") for L in (1536, 2048, 4096, 8192)]
REAL_DECODE_CASES = [Case("cogvlm-17b", 8, 1, 0, kind="decode", past=2048),
                     Case("cogvlm2-19b", 8, 1, 0, kind="decode", past=2048)]

TINY_LAYER_CASES = [Case("tiny", 2, 48, 20), Case("tiny", 1, 64, 37)]
TINY_SWEEP_CASES = [Case("tiny", 1, L, 20, kind="sweep") for L in (32, 96)]
TINY_DECODE_CASES = [Case("tiny", 2, 1, 0, kind="decode", past=40)]


def cases(kind: str, real: bool) -> list:
    table = {("layer", True): REAL_LAYER_CASES, ("sweep", True): REAL_SWEEP_CASES,
             ("decode", True): REAL_DECODE_CASES, ("layer", False): TINY_LAYER_CASES,
             ("sweep", False): TINY_SWEEP_CASES, ("decode", False): TINY_DECODE_CASES}
    return list(table[(kind, real)])

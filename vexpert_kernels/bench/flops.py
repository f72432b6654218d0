"""FLOP counting for the benchmarks (what every TFLOP/s figure means).

Conventions (the same as shared/anchors, so numbers compare with the H200 anchors):
* A linear [T, K] x [K, N] costs ``2*T*N*K`` (multiply + add). A routed linear costs the same: each row goes through
  exactly one expert, so the total over both experts is ``2*T*N*K``.
* One layer's linears: QKV ``N = (H + 2*KV)*hd``, O ``N = D``, gate+up ``N = 2*I``, down ``K = I, N = D``.
* Attention forward: ``4*B*H*Lq*Lk*hd`` for a full mask (QK^T and PV); causal self-attention (Lq = Lk = L) counts
  half: ``2*B*H*L*L*hd``. Decode (one query against ``past + 1`` keys): ``4*B*H*(past+1)*hd``.
* Backward = 2x forward, so forward+backward = 3x the forward count (for attention too, as in the anchors; FA's
  recomputation is not counted: it is overhead, not useful work).
* Norms, RoPE, SwiGLU, residual adds, permutes: not counted (a few GFLOP; they cost memory traffic, not FLOPs).
"""
from __future__ import annotations

from ..config import VisualExpertConfig


def linear_flops(T: int, N: int, K: int) -> int:
    return 2 * T * N * K


def layer_linear_flops(cfg: VisualExpertConfig, T: int) -> int:
    D, I = cfg.hidden_size, cfg.intermediate_size
    return 2 * T * D * (cfg.qkv_size + D + 2 * I) + 2 * T * I * D


def attention_flops(B: int, H: int, Lq: int, Lk: int, hd: int, causal: bool = True) -> int:
    full = 4 * B * H * Lq * Lk * hd
    return full // 2 if causal and Lq == Lk else full


def layer_flops(cfg: VisualExpertConfig, B: int, L: int, mode: str = "fwd", past: int = 0) -> int:
    """FLOPs of one decoder layer. mode: 'fwd' | 'fwd+bwd' | 'decode' (L new tokens after ``past`` cached ones)."""
    H, hd = cfg.num_attention_heads, cfg.head_dim
    if mode == "decode":
        return layer_linear_flops(cfg, B * L) + attention_flops(B, H, L, past + L, hd, causal=False)
    fwd = layer_linear_flops(cfg, B * L) + attention_flops(B, H, L, L, hd, causal=True)
    if mode == "fwd":
        return fwd
    if mode == "fwd+bwd":
        return 3 * fwd
    raise ValueError(f"mode must be 'fwd', 'fwd+bwd' or 'decode', got {mode!r}")


def tflops(flops: int, ms: float) -> float:
    return flops / (ms * 1e-3) / 1e12 if ms and ms > 0 else float("nan")

"""Tile configs of our attention kernels: data with provenance (card, Triton version, registers/spills)."""
from __future__ import annotations

import torch

from vexpert_kernels._triton_compat import HAS_TRITON, triton

# ----------------------------------------------------------------------------------------------------------- configs
# (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel, keyed by (compute capability major, head-dim bucket, masked),
# where masked = key padding and/or bidirectional image spans (more live registers: span ids, padding vectors).
# Hopper: 128-query tiles over 8 warps (two wgmma warpgroups) and 2-3 stages of K/V in the 228 KB SMEM; Ampere: the
# same tiles where they fit 164 KB and 255 registers. dK/dV keeps two [BLOCK_N, D] fp32 accumulators plus K and V of
# its key tile in registers, so it takes few queries per step. Every entry was chosen as the largest candidate that
# compiles WITHOUT register spills for sm_90 / sm_80 under BOTH Triton 3.6 (the GPU machines) and 3.9 (CI)
# (triton.compile + cuobjdump --dump-resource-usage, with the 16-divisible stride hints the JIT uses at run time);
# aot_compile_specs() lists them all for the compile report. Triton 3.6 allocates a few more registers than 3.9 for
# the same kernel, and entries that sat at 255 registers under 3.9 spilled 8..40 B there; those were retuned:
# sm_90 dK/dV at hd 80..128 went 32x128 -> 16x128 (keeps the 128-key tile and its Q/dO reuse; 3.6: 248/238/240 regs,
# 3.9: 222/232/234 for causal/padded/varlen), sm_80 dK/dV at hd 64 -> 16x64 w8s2, and packed (varlen) bidirectional
# forward at hd 64 got smaller tiles (sm_90 128x64 w8s3, sm_80 128x64 w8s2).
_GPU_CONFIGS = {
    # (cc_major, d_bucket, masked): {"fwd": ..., "dq": ..., "dkdv": ...}; "<kernel>_varlen" overrides for packed input
    (9, 64, False): {"fwd": (128, 128, 8, 3), "dq": (128, 64, 8, 2), "dkdv": (32, 128, 8, 2)},
    (9, 64, True): {"fwd": (128, 128, 8, 3), "dq": (128, 64, 8, 2), "dkdv": (32, 128, 8, 2),
                    "fwd_varlen": (128, 64, 8, 3)},  # 128x128 spills 8 B under Triton 3.6 with cu_seqlens
    (9, 128, False): {"fwd": (128, 64, 8, 3), "dq": (128, 64, 8, 2), "dkdv": (16, 128, 8, 3)},
    (9, 128, True): {"fwd": (128, 64, 8, 3), "dq": (128, 64, 8, 2), "dkdv": (16, 128, 8, 3)},
    (8, 64, False): {"fwd": (128, 128, 8, 3), "dq": (128, 64, 8, 2), "dkdv": (16, 64, 8, 2)},
    (8, 64, True): {"fwd": (128, 64, 8, 3), "dq": (128, 32, 8, 2), "dkdv": (16, 64, 8, 2),
                    "fwd_varlen": (128, 64, 8, 2)},  # 3 stages spill 8 B under Triton 3.6 with cu_seqlens
    (8, 128, False): {"fwd": (128, 64, 8, 3), "dq": (128, 32, 8, 2), "dkdv": (32, 64, 8, 2)},
    # one-pass backward ("dkdv_fused": dK/dV + atomic dQ): 32x64 spilled 16-32 B under Triton 3.9 (hd 80/96,
    # routed hd 128); 16x64 w8s2 compiles at 255 registers without spills under 3.6 and 3.9
    (8, 128, True): {"fwd": (128, 32, 8, 3), "dq": (64, 32, 4, 2), "dkdv": (32, 64, 8, 2),
                     "dkdv_fused": (16, 64, 8, 2)},
}
# rowsum(dO*O): memory bound, one pass; 64 rows x up to 128 dims per program keeps it spill-free on 4 warps.
_PREPROCESS_CONFIG = (64, 4)
# The interpreter runs every tile op in numpy: the smallest legal tl.dot tiles keep tests fast.
_INTERPRET_CONFIG = {"fwd": (16, 16, 4, 1), "dq": (16, 16, 4, 1), "dkdv": (16, 16, 4, 1),
                     "dkdv_fused": (16, 16, 4, 1)}


def _d_bucket(block_d: int) -> int:
    return 64 if block_d <= 64 else 128


def _pick(cfgs: dict, kernel: str, varlen: bool) -> tuple:
    return cfgs.get(kernel + "_varlen", cfgs[kernel]) if varlen else cfgs[kernel]


# Decode (at most DECODE_MAX_LQ queries per sequence, e.g. one new token against a KV cache): a 16-query tile
# instead of a 128-row tile that would be >= 87% masked rows, over 64-key tiles (2-3 stages, <= 96 KB of shared memory
# at hd 128). Measured with the compile report: 16x128 w4s3 spilled 8-16 B with padding/spans/varlen, and so did
# 16x64 over 4 warps under Triton 3.9 (ptxas held those at 128 registers); 16x64 over 8 warps compiles at 57-128
# registers without spills (sm_80: 3 stages; sm_90: 2 stages -- 3 left an 8 B stack frame at hd 128 under 3.6).
# Backward keeps the training tiles.
DECODE_MAX_LQ = 16
_DECODE_CONFIG = {9: (16, 64, 8, 2), 8: (16, 64, 8, 3)}


def _configs_for(device: torch.device, block_d: int, masked: bool, varlen: bool = False, lq: int = None) -> dict:
    """{"fwd"|"dq"|"dkdv": (BLOCK_M, BLOCK_N, num_warps, num_stages)} for this device and problem; ``lq``: the
    (max) number of queries per sequence (decode tiles when <= DECODE_MAX_LQ)."""
    if device.type != "cuda":
        out = dict(_INTERPRET_CONFIG)
        out.setdefault("dkdv_fused", out["dkdv"])
        return out
    major = 9 if torch.cuda.get_device_capability(device)[0] >= 9 else 8
    cfgs = _GPU_CONFIGS[(major, _d_bucket(block_d), bool(masked or varlen))]
    out = {k: _pick(cfgs, k, varlen) for k in ("fwd", "dq", "dkdv")}
    out["dkdv_fused"] = cfgs.get("dkdv_fused", out["dkdv"])
    if lq is not None and lq <= DECODE_MAX_LQ:
        out["fwd"] = _DECODE_CONFIG[major]
    return out


def _block_d(hd: int) -> int:
    return max(16, triton.next_power_of_2(hd)) if HAS_TRITON else max(16, 1 << (hd - 1).bit_length())


# Forward tiles the autotuner times besides the table's choice (vexpert_kernels.autotune.select checks each against
# the PyTorch result): smaller tiles win on short or heavily padded sequences and on few (batch x head) programs.
# (aot.py lists them with the table's tiles). 64x64 over 4 warps only for head dims <= 64: at hd 128 it spilled
# 24 B on sm_80 with padding + spans (255 registers, Triton 3.6) and sat at 252 registers on sm_90.
_FWD_TUNE_ALTERNATIVES = {64: ((128, 32, 8, 2), (64, 64, 4, 2)), 128: ((128, 32, 8, 2),)}


# sm_90 TMA forward (K/V by tensor descriptors: no address registers, so the 128-key tile fits): tuning candidates
# only -- never the untuned default -- each (BLOCK_M, BLOCK_N, warps, stages, USE_TMA=1). 128x128 with 2 stages:
# Q 32 KB + 2 x (K 32 KB + V 32 KB) = 160 KB of 228 KB shared memory at hd 128. Keyed by masked (padding, image
# spans or varlen): the 128-key tile spilled 8 B there (padded bidirectional, hd 64, Triton 3.6: 255 registers), so
# masked requests get the 64-key TMA tile only.
_TMA_FWD_CONFIGS = {False: ((128, 128, 8, 2, 1), (128, 64, 8, 3, 1)), True: ((128, 64, 8, 3, 1),)}


def fwd_tune_configs(device: torch.device, block_d: int, masked: bool, varlen: bool = False, lq: int = None,
                     tma: bool = False) -> list:
    """Forward (BLOCK_M, BLOCK_N, num_warps, num_stages[, USE_TMA]) candidates for tuning: the table's choice
    first; ``tma``: the tensors allow TMA (launch.tma_usable) -- adds the TMA tiles on sm_90."""
    first = _configs_for(device, block_d, masked, varlen, lq)["fwd"]
    if device.type != "cuda" or first in _DECODE_CONFIG.values():
        return [first]
    out = [first] + [c for c in _FWD_TUNE_ALTERNATIVES[_d_bucket(block_d)] if c != first]
    if tma and torch.cuda.get_device_capability(device)[0] >= 9:
        out += list(_TMA_FWD_CONFIGS[bool(masked or varlen)])
    return out

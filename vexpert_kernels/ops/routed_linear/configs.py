"""Launch configurations (tile sizes, warps, stages) per GPU generation and shape class, with their provenance."""
from __future__ import annotations

import torch

from ..._triton_compat import triton
from .kernels import EPI_DSWIGLU, EPI_QKV_ROPE, EPI_SWIGLU, EPI_SWIGLU_BWD

# (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages). Hopper: 128x256x64 w8s3 was the best pointer-load
# config of the H200 probe (anchors/gemm_probe.json); 128x128 for two-accumulator (SwiGLU) and narrow N; 64-row tiles
# for small T. Ampere (less smem: 164 KB) gets BLOCK_K 32 / fewer stages on the wide tiles.
_GEMM_CONFIGS = {
    90: {
        "16bit": {
            "large": (128, 256, 64, 8, 8, 3),
            "medium": (128, 128, 64, 8, 8, 4),
            "small": (64, 128, 64, 8, 4, 4),
            # SwiGLU: two fp32 accumulators (+ gate|up stores on the default save path): 128x128 spilled 24 B under
            # Triton 3.9 with the stores, so 128x64
            "dual": (128, 64, 64, 8, 8, 3),
            "dual_small": (64, 64, 64, 8, 4, 3),     # 64x128 w4 spilled with the gate|up stores (Triton 3.9)
            "dual_bwd": (128, 64, 64, 8, 8, 3),      # SwiGLU backward: + dh tile and two outputs
            # QKV: BLOCK_N = half-head width (x2 accumulators: 128 rows x one hd=128 head); 184 regs, no spill
            "qkv": (128, 64, 64, 8, 8, 3),
            # down-projection dX + SwiGLU backward epilogue (g, u tile loads, two stores): 128x128 w8 and 64x128 w4
            # spilled 24-88 B (Triton 3.6 and 3.9); these: 144-193 registers, no spill under both
            "dswiglu": (128, 64, 64, 8, 8, 3),
            "dswiglu_small": (64, 128, 64, 8, 8, 3),
        },
        # fp32 inputs run as TF32 on tensor cores (like torch's allow_tf32); fp32 tiles are twice as wide in smem
        # and registers, so smaller tiles (tf32x3 spilled at every useful tile size: not used)
        "fp32": {"large": (64, 128, 32, 8, 8, 3), "medium": (64, 128, 32, 8, 8, 3), "small": (64, 128, 32, 8, 8, 3),
                 "dual": (64, 64, 32, 8, 4, 2), "dual_small": (64, 64, 32, 8, 4, 2),
                 "dual_bwd": (64, 64, 32, 8, 4, 2), "qkv": (128, 64, 32, 8, 8, 3), "dswiglu": (64, 128, 32, 8, 8, 3),
                 "dswiglu_small": (64, 128, 32, 8, 8, 3)},
    },
    80: {
        "16bit": {
            # sm_80 has no wgmma: mma.sync accumulators + epilogue spilled at 128x256 w8 and 128x128 w4
            "large": (128, 128, 32, 8, 8, 3),
            "medium": (128, 128, 32, 8, 8, 3),
            "small": (64, 128, 32, 8, 4, 4),
            "dual": (128, 64, 32, 8, 8, 3),
            "dual_small": (64, 128, 32, 8, 4, 3),
            "dual_bwd": (128, 64, 32, 8, 8, 3),
            "qkv": (128, 64, 32, 8, 8, 3),           # 212 regs; BLOCK_K 64 spills, 4 warps spills
            "dswiglu": (128, 64, 32, 8, 8, 3),       # 128x128 w8 spilled 120-128 B (3.9); 178-180 regs
            "dswiglu_small": (64, 128, 32, 8, 4, 4),
        },
        "fp32": {"large": (64, 128, 32, 8, 8, 3), "medium": (64, 128, 32, 8, 8, 3), "small": (64, 128, 32, 8, 8, 3),
                 "dual": (64, 128, 32, 8, 8, 3), "dual_small": (64, 128, 32, 8, 8, 3),
                 "dual_bwd": (64, 128, 32, 8, 8, 3), "qkv": (64, 64, 32, 8, 8, 3),
                 "dswiglu": (64, 64, 32, 8, 4, 3), "dswiglu_small": (64, 64, 32, 8, 4, 3)},  # 64x128 spilled 24 B (3.6)
    },
}
_WGRAD_CONFIGS = {  # (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)
    90: {"large": (64, 128, 128, 8, 3), "small": (64, 64, 64, 4, 3)},
    80: {"large": (32, 128, 128, 8, 3), "small": (32, 64, 64, 4, 3)},
}
# Interpreter: tiny tiles (every dot is a numpy matmul; block sizes 16/32 keep tests fast and hit masking).
_INTERP_GEMM = {"large": (32, 32, 16, 2, 1, 1), "medium": (16, 32, 16, 2, 1, 1), "small": (16, 16, 16, 2, 1, 1),
                "dual": (16, 32, 16, 2, 1, 1), "dual_small": (16, 16, 16, 2, 1, 1), "dual_bwd": (16, 16, 16, 2, 1, 1),
                "qkv": (16, 16, 16, 2, 1, 1), "dswiglu": (16, 16, 16, 2, 1, 1),
                "dswiglu_small": (16, 16, 16, 2, 1, 1)}
_INTERP_WGRAD = {"large": (16, 32, 32, 1, 1), "small": (16, 16, 16, 1, 1)}
_INTERP_NUM_PROGRAMS = 3  # a persistent grid smaller than the tile count, so the tile loop is exercised


def _cc(device: torch.device) -> int:
    if device.type != "cuda":
        return 90
    major, _ = torch.cuda.get_device_capability(device)
    return 90 if major >= 9 else 80


def _gemm_config(device, dtype, T, N, K, epilogue, plain=True):
    """plain: forward linear without residual and with [N, K] weights. 128x256 tiles spill (sm_90) once a residual
    tile or the transposed-weight (dX) loads join, so those use the 128x128 config."""
    dual = epilogue in (EPI_SWIGLU, EPI_SWIGLU_BWD, EPI_QKV_ROPE)
    table = _INTERP_GEMM if device.type == "cpu" else \
        _GEMM_CONFIGS[_cc(device)]["fp32" if dtype == torch.float32 else "16bit"]
    if epilogue == EPI_QKV_ROPE:
        key = "qkv"
    elif epilogue == EPI_DSWIGLU:
        key = "dswiglu_small" if T <= 1024 else "dswiglu"
    elif epilogue == EPI_SWIGLU_BWD:
        key = "dual_bwd"
    elif dual:
        key = "dual_small" if T <= 2048 else "dual"
    elif T <= 1024:
        key = "small"
    elif N >= 8192 and T >= 4096 and plain:
        key = "large"
    else:
        key = "medium"
    return table[key]


def _qkv_block_n(head_dim: int, max_bn: int) -> int:
    """Half-head chunk width of the QKV kernel: the power of 2 >= hd/2 (at least 16, the smallest MMA N), capped
    at the config's BLOCK_N (hd 256 -> two 64-wide chunks per head)."""
    return min(max_bn, max(16, triton.next_power_of_2(head_dim // 2)))


def _wgrad_config(device, N, K):
    table = _INTERP_WGRAD if device.type == "cpu" else _WGRAD_CONFIGS[_cc(device)]
    return table["large" if N * K >= (1 << 22) else "small"]

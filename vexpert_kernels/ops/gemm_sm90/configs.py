"""Launch configs of the sm_90 grouped GEMMs (data), and what a launch needs from the machine.

Provenance: tiles follow the Hopper practice of Triton's persistent-matmul tutorial and the H200 probe in
``shared/anchors`` (128x256x64 w8 s3 was the best pointer-load config there). Every GPU config below AOT-compiles
for sm_90a under Triton 3.6 and 3.9 with wgmma, TMA loads and stores and no spills (``tests/test_gemm_sm90.py``,
``python -m vexpert_kernels.compile_report --module vexpert_kernels.ops.gemm_sm90.aot``). None has been timed on a
GPU yet: they are autotune *candidates*, never a static choice.

Shared memory (bf16): a 128x256x64 stage is 16 KiB (x) + 32 KiB (W) = 48 KiB; 3 stages + one 128x128 epilogue
subtile (32 KiB) = 176 KiB of the 227 KiB an sm_90 CTA may use. Epilogue subtiling (``epi_split=2``) halves the
store staging buffer, which is what lets the 128x256 / 256x128 tiles keep 3 stages.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Optional

import torch

from ..._triton_compat import HAS_TRITON, TRITON_IMPORT_ERROR, tl, triton


@dataclass(frozen=True)
class SM90Config:
    """One launch config. ``name`` is stable (autotune decisions are cached on disk by it)."""
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    group_m: int = 8
    epi_split: int = 1           # store the output tile in this many column subtiles (1 or 2)
    warp_specialize: bool = False
    flatten: bool = True         # tl.range(flatten=True): prologue of tile i+1 overlaps the epilogue of tile i

    @property
    def name(self) -> str:
        s = f"sm90:{self.block_m}x{self.block_n}x{self.block_k}:w{self.num_warps}:s{self.num_stages}"
        if self.epi_split > 1:
            s += f":sub{self.epi_split}"
        if self.warp_specialize:
            s += ":ws"
        if not self.flatten:
            s += ":noflat"
        return s


def hopper_ws_pass_available() -> bool:
    """Capability probe (no compile): this Triton's NVIDIA backend has the sm_90 warp-specialisation pass
    (``nvidia.passes.hopper.add_hopper_warpspec``, run by ``make_ttgir`` for capability 9.x). Whether a given kernel
    is actually split is checked by compiling it (``tests/test_warp_specialize.py``, the compile report's ws column)."""
    if not HAS_TRITON:
        return False
    try:
        from triton._C.libtriton import nvidia
    except Exception:  # pragma: no cover - a Triton build without the NVIDIA backend
        return False
    return callable(getattr(getattr(nvidia.passes, "hopper", None), "add_hopper_warpspec", None))


def _ws_configs(*cfgs: SM90Config) -> list:
    """The ``:ws`` configs, only where the sm_90 warp-specialisation pass exists (else they would just duplicate
    a plain 4-warp candidate)."""
    return list(cfgs) if hopper_ws_pass_available() else []


# Forward and dX (x [T, R] @ B -> y [T, C]); the tile is BLOCK_M rows x BLOCK_N output columns.
# Warp specialisation (docs/warp_specialization.md): Triton 3.6 and 3.9 split an sm_90 kernel into one TMA-producer
# and two wgmma-consumer warpgroups (ttg.warp_specialize, 12 warps, setmaxnreg) only for num_warps=4 and a loop that
# is NOT flattened; with num_warps=8 or flatten=True the request is silently dropped. Hence the ":ws:noflat" configs
# (appended last: launch.py picks defaults by index). Their pipeline buffers are allocated per expert pass, so they
# need fewer stages; epi_split=2 crashes the pass (3.6 and 3.9), so they store whole tiles.
SM90_CONFIGS = [
    SM90Config(128, 256, 64, 8, 3, epi_split=2),    # big T, wide N (gate-up; o/down at T >= 4k); 176-213 KiB smem
    SM90Config(256, 128, 64, 8, 3, epi_split=2),    # tall tiles: fewer W re-reads when T >> N
    SM90Config(128, 128, 64, 8, 4),                 # medium
    SM90Config(128, 128, 64, 4, 4),                 # one consumer warpgroup, 128 accumulator registers/thread
    SM90Config(64, 128, 64, 4, 4),                  # small T: more tiles for 132 SMs
] + _ws_configs(SM90Config(128, 128, 64, 4, 3, warp_specialize=True, flatten=False),   # 225 KiB smem (3.9)
                SM90Config(64, 128, 64, 4, 3, warp_specialize=True, flatten=False))    # 177 KiB

# dW_e = dY_e^T X_e: the tile is BLOCK_N x BLOCK_K of dW, the reduction walks BLOCK_M rows at a time.
SM90_WGRAD_CONFIGS = [
    SM90Config(64, 128, 256, 8, 3, epi_split=2),
    SM90Config(64, 256, 128, 8, 3, epi_split=2),
    SM90Config(64, 128, 128, 8, 4),
    SM90Config(64, 128, 128, 4, 4),
] + _ws_configs(SM90Config(64, 128, 128, 4, 3, warp_specialize=True, flatten=False))   # 225 KiB smem

# SwiGLU (gate + up in one pass): two fp32 accumulators per tile, three outputs (h, g, u) per epilogue subtile.
SM90_SWIGLU_CONFIGS = [
    SM90Config(128, 128, 64, 8, 3, epi_split=2),    # 255 registers under 3.6 (no spill), 173 under 3.9
    SM90Config(128, 64, 64, 8, 4),                  # (128x64 w4 s4 spilled 16 B under 3.6: dropped)
    SM90Config(64, 128, 64, 8, 3),
] + _ws_configs(SM90Config(128, 64, 64, 4, 3, warp_specialize=True, flatten=False))    # 209 KiB smem

# Down projection's dX with the SwiGLU backward epilogue (dh tile -> [dgate | dup]): one accumulator, but each
# epilogue subtile adds two TMA loads (g, u) and two TMA stores, so the tiles are smaller than the plain dX ones.
# SASS (sm_90a, bf16), registers under Triton 3.6 / 3.9: 128x256 w8 s3 sub2 spilled (255 regs + 16 B / 8 B stack),
# 256x128 w8 s3 sub2 and 128x128 w4 s4 sub2 spilled 128-144 B (3.9), 64x128 w4 s4 without subtiling 16 B (3.9):
# all dropped. The kept ones: HGMMA, TMA loads and stores, no local memory under both.
SM90_DSWIGLU_CONFIGS = [
    SM90Config(128, 128, 64, 8, 4, epi_split=2),    # 176 / 175 regs, 160 KiB smem
    SM90Config(64, 256, 64, 8, 3, epi_split=2),     # wide I tiles, fewer dY re-reads; 242 / 252 regs, 168 KiB smem
    SM90Config(64, 128, 64, 4, 4, epi_split=2),     # small T; 168 / 168 regs, 112 KiB smem
]

# Interpreter (CPU) configs: tiny tiles so tests run in seconds, and so that T, N, K and the expert boundary are
# not multiples of the tile. Same kernels and code paths (epi_split 1 and 2, both B layouts).
INTERP_CONFIGS = [
    SM90Config(16, 16, 16, 1, 1, group_m=2, epi_split=2),
    SM90Config(16, 32, 16, 1, 1, group_m=2),
]
INTERP_WGRAD_CONFIGS = [
    SM90Config(16, 16, 32, 1, 1, group_m=2, epi_split=2),
    SM90Config(16, 32, 16, 1, 1, group_m=2),
]
INTERP_NUM_PROGRAMS = 3  # fewer programs than tiles: the persistent loop and the pass hand-over run


def _tl_range_kwargs() -> set:
    if not HAS_TRITON:
        return set()
    try:
        return set(inspect.signature(tl.range.__init__).parameters)
    except (TypeError, ValueError):  # pragma: no cover
        return set()


def triton_sm90_reason() -> Optional[str]:
    """Why this Triton cannot build the sm_90 kernels (None when it can)."""
    if not HAS_TRITON:
        return f"Triton failed to import ({TRITON_IMPORT_ERROR})"
    if not hasattr(tl, "make_tensor_descriptor"):
        return f"Triton {triton.__version__} lacks tl.make_tensor_descriptor (device-side TMA descriptors)"
    if not hasattr(triton, "set_allocator"):
        return f"Triton {triton.__version__} lacks triton.set_allocator (descriptor scratch memory)"
    missing = {"flatten", "warp_specialize"} - _tl_range_kwargs()
    if missing:
        return f"Triton {triton.__version__}: tl.range lacks {sorted(missing)}"
    return None


_TMA_DTYPES = (torch.bfloat16, torch.float16)


def sm90_unsupported_reason(x: torch.Tensor, w: torch.Tensor) -> Optional[str]:
    """None when the sm_90 kernels can run ``x [T, K] @ w [N, K]^T`` (and its dX / dW); else a reason string.

    Needs a CUDA device of compute capability 9.x (or CPU tensors under the Triton interpreter), bf16/fp16 operands
    of one dtype, and K and N rows whose byte size is a multiple of 16 (TMA strides and base addresses)."""
    if not isinstance(x, torch.Tensor) or not isinstance(w, torch.Tensor):
        return "x and w must be tensors"
    if x.device != w.device:
        return f"x is on {x.device}, w on {w.device}"
    if w.dtype != x.dtype:
        return f"x and w dtypes differ: {x.dtype} vs {w.dtype}"
    if x.dim() != 2 or w.dim() != 2 or x.shape[1] != w.shape[1]:
        return f"needs x [T, K] and w [N, K], got {tuple(x.shape)} and {tuple(w.shape)}"
    return gemm_reason(x.device, x.dtype, w.shape[0], w.shape[1])


def gemm_reason(device: torch.device, dtype: torch.dtype, N: int, K: int) -> Optional[str]:
    """The device / dtype / TMA-alignment part of :func:`sm90_unsupported_reason` for an [N, K] weight."""
    from ..._triton_compat import interpret_mode
    reason = triton_sm90_reason()
    if reason:
        return reason
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if major != 9:
            return f"needs compute capability 9.x (Hopper), device has {major}.{minor}"
    elif not (device.type == "cpu" and interpret_mode()):
        return f"device {device} is neither CUDA nor CPU under TRITON_INTERPRET=1"
    if dtype not in _TMA_DTYPES:
        return f"needs bf16/fp16 operands, got {dtype}"
    es = torch.empty((), dtype=dtype).element_size()
    if N == 0 or K == 0:
        return f"empty GEMM (N={N}, K={K})"
    if (K * es) % 16 or (N * es) % 16:
        return f"TMA needs K*{es} and N*{es} bytes to be multiples of 16, got K={K}, N={N}"
    return None


# QKV + RoPE + attention layout (qkv.py). ``block_n`` is the tile width in whole heads: a tile holds
# block_n // head_dim = 1 or 2 heads (so each head's rotate-half partners, columns j and j + hd/2, are in-tile);
# a config applies to a head_dim that divides block_n (``qkv_config_reason``). Written for head_dim 128 (CogVLM-17B,
# CogVLM2-19B). No epilogue subtiling: the store is a pointer scatter (rows go to sequence positions perm[row]), so
# there is no shared-memory staging buffer.
# Provenance: AOT for sm_90a at head_dim 128, both biases (registers Triton 3.9 / 3.6; no spill, no stack, HGMMA and
# TMA loads in the SASS; `compile_report --module vexpert_kernels.ops.gemm_sm90.aot`, tests/test_gemm_sm90_qkv.py).
# Not timed on a GPU yet (qkv_selfcheck.py measures the issue-14 ratio against the plain sm_90 GEMM). The epilogue's
# index math is 32-bit (perm // L, perm % L): with 64-bit math 128x128 w8 took 192 registers (3.9) and every 128-
# register-accumulator tile spilled. Dropped: 256x128 w8 s3 (spills 24 B under 3.9, 8 B under 3.6); loading one
# cos / sin tile per tile for both heads of a 2-head tile (instead of per head) raised the pressure (208 B stack).
SM90_QKV_CONFIGS = [
    SM90Config(128, 128, 64, 8, 4),                 # one head per tile, two consumer warpgroups; 141 / 130 regs
    SM90Config(128, 128, 64, 8, 3),                 # 139 / 130 regs, 113 KiB smem
    SM90Config(128, 128, 128, 8, 3),                # fewer k steps; 139 / 130 regs, 209 KiB smem
    SM90Config(64, 128, 64, 4, 4),                  # small T: more tiles for 132 SMs; 174 / 130 regs
    SM90Config(128, 256, 64, 8, 3),                 # two heads per tile (the plain GEMM's widest tile); 255 / 190 regs
    SM90Config(128, 256, 64, 8, 3, flatten=False),  # the same without loop flattening: 190 / 186 regs (headroom)
]
# dW with fused dbias (kernels._wgrad_pass, HAS_DB; same SM90_WGRAD_CONFIGS, no loop flattening): registers 213 / 223
# (64x128x256 w8 s3 sub2), 239 / 241 (64x256x128 w8 s3 sub2), 129 / 123 (64x128x128 w8 s4), 241 / 247 (64x128x128
# w4 s4) under Triton 3.9 / 3.6, no spill; without dbias 183 / 179 / 116 / 175 (3.9).
# Interpreter: head_dim 16 -> 1 or 2 heads per tile, head_dim 32 -> 1 head (tests).
INTERP_QKV_CONFIGS = [
    SM90Config(16, 16, 16, 1, 1, group_m=2),
    SM90Config(16, 32, 16, 1, 1, group_m=2),
]


def qkv_config_reason(cfg: SM90Config, head_dim: int, num_heads: int, num_kv_heads: int) -> Optional[str]:
    """None when ``cfg`` can run the QKV kernel for this head layout: head_dim a power of two >= 16 dividing
    block_n into 1 or 2 heads per tile, and q / k / v head groups that never share a tile."""
    if head_dim < 16 or head_dim & (head_dim - 1):
        return f"head_dim must be a power of two >= 16, got {head_dim}"
    if cfg.block_n % head_dim or cfg.block_n // head_dim not in (1, 2):
        return f"{cfg.name}: block_n {cfg.block_n} is not 1 or 2 heads of head_dim {head_dim}"
    hpt = cfg.block_n // head_dim
    if num_heads % hpt or num_kv_heads % hpt:
        return f"{cfg.name}: {hpt} heads per tile would mix q/k/v heads (num_heads {num_heads}, " \
               f"num_kv_heads {num_kv_heads})"
    return None

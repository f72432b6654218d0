"""Tile configs of the warp-specialised sm_90 forward (``kernels_ws._attn_fwd_ws_kernel``) and when it is offered.

A forward config is ``(BLOCK_M, BLOCK_N, num_warps, num_stages, KIND)``; ``KIND`` 1 is the TMA forward of
``kernels._attn_fwd_kernel``, ``KIND == WS_FWD`` (2) this kernel (TMA + warp specialisation). Tuning candidates only:
``autotune.select`` checks each against PyTorch on the GPU before it can be chosen, never the untuned default.
"""
from __future__ import annotations

import torch

from vexpert_kernels.ops.gemm_sm90.configs import hopper_ws_pass_available

from .configs import _d_bucket

WS_FWD = 2  # 5th entry of a forward config: the warp-specialised TMA kernel

# num_warps=4 is the Hopper pass's gate (3 warpgroups after the split: one TMA producer, two wgmma consumers of 64
# query rows each); BLOCK_M 128 gives each consumer warpgroup one m64 wgmma row block. Keyed by (head-dim bucket,
# masked = key padding, image spans or varlen). Measured with the compile report (sm_90a, 16-divisible strides; every
# spec of aot_ws) under Triton 3.6.0 and 3.9.0: split into 12 warps, setmaxnreg 40 (producer) / 232 (consumers),
# wgmma + TMA, no spill except the masked 128x128 tile at hd 128 (padding + spans: 8 B under 3.6, 32 B under 3.9; the
# span ends' [64, 128] fp32 tile on top of S and O), left out there. Shared memory (compile report) hd 64 / 128:
# 128x128 s2 97 / 177 KiB, 128x64 s3 81 / 145 KiB (+ 4-7 KiB with spans). Not timed on a GPU yet.
_WS_128x128, _WS_128x64 = (128, 128, 4, 2, WS_FWD), (128, 64, 4, 3, WS_FWD)
_WS_FWD_CONFIGS = {
    (64, False): (_WS_128x128, _WS_128x64),
    (64, True): (_WS_128x128, _WS_128x64),
    (128, False): (_WS_128x128, _WS_128x64),
    (128, True): (_WS_128x64,),
}
WS_MIN_LQ = 64  # shorter query blocks (decode, short prefill) waste most of a 128-row tile: not offered
WS_MAX_SPAN_LQ = (1 << 16) - 1  # image spans: the kernel gets span ends as two bytes (kernels_ws)


def ws_fwd_supported(device: torch.device, block_d: int, lq: int = None, tma: bool = False,
                     bidir: bool = False) -> bool:
    """Whether the warp-specialised forward may be offered: CUDA capability 9.x with Triton's Hopper
    warp-specialisation pass, tensors the TMA kernels can address (``tma``, see ``launch.tma_usable``: unit-stride
    16-byte aligned rows, head dim a power of two), head dim 16..128, at least ``WS_MIN_LQ`` queries per sequence
    (``lq``: the (max) query length; None: unknown, offered) and, with bidirectional image spans (``bidir``), at
    most ``WS_MAX_SPAN_LQ``. Causal (bottom-right for Lk > Lq), GQA, key padding, image spans, varlen, lse and
    routed output order are served."""
    if not tma or device.type != "cuda" or not 16 <= block_d <= 128:
        return False
    if lq is not None and (lq < WS_MIN_LQ or (bidir and lq > WS_MAX_SPAN_LQ)):
        return False
    return torch.cuda.get_device_capability(device)[0] == 9 and hopper_ws_pass_available()


def ws_fwd_tune_configs(device: torch.device, block_d: int, masked: bool, varlen: bool = False, lq: int = None,
                        tma: bool = False, bidir: bool = False) -> list:
    """The warp-specialised forward's tuning candidates for this request (empty where it is not offered);
    ``masked``: key padding or image spans (as ``configs.fwd_tune_configs``), ``bidir``: image spans."""
    if not ws_fwd_supported(device, block_d, lq, tma, bidir):
        return []
    return list(_WS_FWD_CONFIGS[(_d_bucket(block_d), bool(masked or varlen))])

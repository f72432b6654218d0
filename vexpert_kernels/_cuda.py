"""Loader and Python bindings for the CUDA kernels in ``csrc/`` (routing plan, fused RMSNorm + permute).

Nothing is compiled at import. The first call that needs the library on a CUDA machine builds it with nvcc (ninja
when present; see ``_cuda_build``) for the local GPU's arch, caches it in ``$VEXPERT_CACHE_DIR`` or
``~/.cache/vexpert_kernels/csrc-<hash>`` and loads it with ctypes; an ahead-of-time build from
``VEXPERT_BUILD_CUDA=1 pip install .`` (``vexpert_kernels/_prebuilt``) is used first when it matches. Where the
library cannot be had (no CUDA device, no nvcc, a compile error, ``VEXPERT_DISABLE_CSRC=1``) one line is logged and
callers fall back to the Triton / PyTorch paths; :func:`cuda_extension_status` says why.

The kernels take raw pointers and the current stream, so there is no ATen dependency and no host synchronisation;
they are wrapped as ``torch.library`` custom ops (with fake impls) so ``torch.compile`` can trace them.
"""
from __future__ import annotations

import ctypes
import json
import logging
import os
import threading
from pathlib import Path
from typing import List, Optional, Tuple

import torch

from . import _cuda_build

log = logging.getLogger("vexpert_kernels")

_DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_lock = threading.Lock()
_state = {"lib": None, "tried": False, "reason": "not tried yet (the library is built on first use on a CUDA device)"}


# ------------------------------------------------------------------------------------------------ loading
def _declare(lib) -> None:
    P, I64, I32, D = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_double
    lib.vx_routing_plan.argtypes = [P, P, I64, I64] + [P] * 10 + [P, I64, P]
    lib.vx_routing_plan.restype = I32
    lib.vx_routing_plan_workspace_bytes.argtypes = [I64, I64]
    lib.vx_routing_plan_workspace_bytes.restype = I64
    lib.vx_routing_plan_host.argtypes = [P, P, I64, I64, P, P, P, P, P]
    lib.vx_routing_plan_host.restype = I32
    lib.vx_rmsnorm_fwd.argtypes = [P, P, P, P, P, I64, I64, D, I32, I32, P]
    lib.vx_rmsnorm_fwd.restype = I32
    lib.vx_rmsnorm_bwd.argtypes = [P, P, P, P, P, P, P, P, I64, I64, I64, I32, I32, I32, P]
    lib.vx_rmsnorm_bwd.restype = I32
    lib.vx_rmsnorm_max_dim.argtypes = [I32, I32]
    lib.vx_rmsnorm_max_dim.restype = I32
    lib.vx_error_string.argtypes = [I32]
    lib.vx_error_string.restype = ctypes.c_char_p


def _arch_of(device_index: int) -> str:
    major, minor = torch.cuda.get_device_capability(device_index)
    arch = f"{major}{minor}"
    return arch + "a" if major == 9 and minor == 0 else arch  # sm_90a: Hopper SASS (no sm_90a-only features used)


def _prebuilt(arch: str) -> Optional[Path]:
    d = Path(__file__).resolve().parent / "_prebuilt"
    meta = d / "build.json"
    if not meta.is_file():
        return None
    try:
        info = json.loads(meta.read_text())
    except ValueError:
        return None
    built = set(info.get("archs", []))
    if (arch in built or arch.rstrip("a") in built) and (d / _cuda_build.LIB_NAME).is_file():
        return d / _cuda_build.LIB_NAME
    return None


def load_library(archs: Optional[List[str]] = None):
    """Build (if needed) and load the library; returns the ctypes handle. Raises RuntimeError with the reason.
    ``archs`` defaults to the current GPU's; passing it allows a build without a GPU (tests load the host-only
    entry points this way)."""
    if archs is None:
        if not torch.cuda.is_available():
            raise RuntimeError("no CUDA device (torch.cuda.is_available() is False)")
        archs = [_arch_of(torch.cuda.current_device())]
    path = _prebuilt(archs[0]) if len(archs) == 1 else None
    if path is None:
        path = _cuda_build.build_library(archs)
    lib = ctypes.CDLL(str(path))
    _declare(lib)
    lib._vx_path = str(path)
    return lib


def get_library():
    """The loaded library, or None where it cannot be had (reason logged once, see cuda_extension_status)."""
    if _state["tried"]:
        return _state["lib"]
    with _lock:
        if _state["tried"]:
            return _state["lib"]
        reason = None
        if os.environ.get("VEXPERT_DISABLE_CSRC", "0") not in ("", "0"):
            reason = "disabled by VEXPERT_DISABLE_CSRC"
        elif not torch.cuda.is_available():
            reason = "no CUDA device (torch.cuda.is_available() is False)"
        elif torch.version.hip is not None:
            reason = "ROCm build of torch (the csrc kernels are CUDA-only)"
        if reason is None:
            try:
                lib = load_library()
                _state["lib"] = lib
                _state["reason"] = f"loaded {lib._vx_path}"
            except Exception as exc:  # noqa: BLE001 - any failure means: use the fallback path
                reason = str(exc)
        if reason is not None:
            _state["reason"] = reason
            if torch.cuda.is_available():  # on CPU-only machines this is expected, not worth a warning
                log.warning("vexpert_kernels: CUDA csrc kernels unavailable, using Triton/PyTorch paths: %s", reason)
        _state["tried"] = True
        return _state["lib"]


def cuda_extension_status(build: bool = True) -> Tuple[bool, str]:
    """(available, reason). With ``build`` (default) this tries to build/load the library on a CUDA machine; it
    never raises."""
    if build:
        get_library()
    elif not _state["tried"] and not torch.cuda.is_available():
        return False, "no CUDA device (torch.cuda.is_available() is False)"
    return _state["lib"] is not None, _state["reason"]


def cuda_extension_available() -> bool:
    return get_library() is not None


def _check(rc: int, what: str) -> None:
    if rc != 0:
        lib = _state["lib"]
        msg = lib.vx_error_string(rc).decode() if lib is not None else str(rc)
        raise RuntimeError(f"{what} failed: {msg} (code {rc})")


def _require_lib():
    lib = get_library()
    if lib is None:
        raise RuntimeError(f"the csrc CUDA kernels are unavailable: {_state['reason']}")
    return lib


def _ptr(t: Optional[torch.Tensor]):
    return ctypes.c_void_p(t.data_ptr()) if t is not None else None


def _stream(device: torch.device):
    return ctypes.c_void_p(torch.cuda.current_stream(device).cuda_stream)


# ------------------------------------------------------------------------------------------------ routing plan
_PLAN_FIELDS = ("vision_mask", "position_ids", "perm", "inv_perm", "expert_counts", "expert_offsets",
                "routed_position_ids", "image_span_ids", "seq_lens", "cu_seqlens")


@torch.library.custom_op("vexpert::csrc_routing_plan", mutates_args=())
def _routing_plan_op(token_type_ids: torch.Tensor, keep: Optional[torch.Tensor]) -> Tuple[
        torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
        torch.Tensor, torch.Tensor, torch.Tensor]:
    lib = _require_lib()
    B, L = token_type_ids.shape
    T = B * L
    dev = token_type_ids.device
    tt = token_type_ids.contiguous()
    kp = keep.contiguous() if keep is not None else None
    vision = torch.empty(B, L, dtype=torch.bool, device=dev)
    pos = torch.empty(B, L, dtype=torch.long, device=dev)
    perm = torch.empty(T, dtype=torch.long, device=dev)
    inv = torch.empty(T, dtype=torch.long, device=dev)
    counts = torch.empty(2, dtype=torch.long, device=dev)
    offsets = torch.empty(3, dtype=torch.int32, device=dev)
    rpos = torch.empty(T, dtype=torch.long, device=dev)
    spans = torch.empty(B, L, dtype=torch.int32, device=dev)
    seq_lens = torch.empty(B, dtype=torch.int32, device=dev)
    cu = torch.empty(B + 1, dtype=torch.int32, device=dev)
    ws_bytes = int(lib.vx_routing_plan_workspace_bytes(B, L))
    ws = torch.empty(max(ws_bytes, 16), dtype=torch.uint8, device=dev)
    with torch.cuda.device(dev):
        rc = lib.vx_routing_plan(_ptr(tt), _ptr(kp), B, L, _ptr(vision), _ptr(pos), _ptr(perm), _ptr(inv),
                                 _ptr(counts), _ptr(offsets), _ptr(rpos), _ptr(spans), _ptr(seq_lens), _ptr(cu),
                                 _ptr(ws), ws_bytes, _stream(dev))
    _check(rc, "vx_routing_plan")
    return vision, pos, perm, inv, counts, offsets, rpos, spans, seq_lens, cu


@_routing_plan_op.register_fake
def _(token_type_ids, keep):
    B, L = token_type_ids.shape
    T = B * L
    e = token_type_ids.new_empty
    return (e((B, L), dtype=torch.bool), e((B, L), dtype=torch.long), e((T,), dtype=torch.long),
            e((T,), dtype=torch.long), e((2,), dtype=torch.long), e((3,), dtype=torch.int32),
            e((T,), dtype=torch.long), e((B, L), dtype=torch.int32), e((B,), dtype=torch.int32),
            e((B + 1,), dtype=torch.int32))


def build_plan_cuda(token_type_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> dict:
    """RoutingPlan tensors computed by the csrc kernels (3 launches, no host sync, CUDA-graph capturable).

    Args:
        token_type_ids: int [B, L] on a CUDA device (0 language, 1 vision; validated by the caller).
        attention_mask: keep mask [B, L] (bool or 0/1 ints; nonzero = keep) or None. 2-D only; packed input
            (cu_seqlens) is not handled here - use the torch path for it.
    Returns a dict with keys vision_mask bool [B,L], position_ids int64 [B,L], perm int64 [T], inv_perm int64 [T],
    expert_counts int64 [2], expert_offsets int32 [3], routed_position_ids int64 [T], image_span_ids int32 [B,L],
    seq_lens int32 [B], cu_seqlens int32 [B+1] - equal to RoutingPlan.build's torch path.
    Raises RuntimeError when the library is unavailable (check cuda_extension_available() first).
    """
    if not isinstance(token_type_ids, torch.Tensor) or token_type_ids.dim() != 2:
        raise ValueError("token_type_ids must be a 2-D tensor [B, L]")
    if not token_type_ids.is_cuda:
        raise ValueError(f"build_plan_cuda needs CUDA tensors, token_type_ids is on {token_type_ids.device}")
    if token_type_ids.numel() == 0:
        raise ValueError("token_type_ids must not be empty")
    tt = token_type_ids.to(torch.long)
    keep = None
    if attention_mask is not None:
        if tuple(attention_mask.shape) != tuple(tt.shape):
            raise ValueError(f"attention_mask must have shape {tuple(tt.shape)}, got {tuple(attention_mask.shape)}")
        keep = attention_mask if attention_mask.dtype == torch.bool else attention_mask != 0
    return dict(zip(_PLAN_FIELDS, torch.ops.vexpert.csrc_routing_plan(tt, keep)))


def routing_plan_host(token_type_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, lib=None) -> dict:
    """CPU twin of the per-token routing logic compiled from routing_plan.cu (for tests without a GPU)."""
    lib = lib or _require_lib()
    tt = token_type_ids.to(torch.long).contiguous().cpu()
    B, L = tt.shape
    keep = None if attention_mask is None else (attention_mask != 0).contiguous().cpu()
    out = dict(vision_mask=torch.empty(B, L, dtype=torch.bool), position_ids=torch.empty(B, L, dtype=torch.long),
               perm=torch.empty(B * L, dtype=torch.long), inv_perm=torch.empty(B * L, dtype=torch.long),
               image_span_ids=torch.empty(B, L, dtype=torch.int32))
    rc = lib.vx_routing_plan_host(_ptr(tt), _ptr(keep), B, L, _ptr(out["vision_mask"]), _ptr(out["position_ids"]),
                                  _ptr(out["perm"]), _ptr(out["inv_perm"]), _ptr(out["image_span_ids"]))
    if rc != 0:
        raise RuntimeError(f"vx_routing_plan_host failed with code {rc}")
    return out


# ------------------------------------------------------------------------------------------------ RMSNorm
def rmsnorm_max_dim(dtype: torch.dtype, aligned: bool = True) -> int:
    """Widest row the csrc RMSNorm takes (whole row held in registers of one block)."""
    elt = torch.finfo(dtype).bits // 8
    return 1024 * 8 * (16 // elt if aligned else 1)


def rmsnorm_fwd_cuda(x: torch.Tensor, weight: torch.Tensor, eps: float,
                     dst_index: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """x [R, D] contiguous -> (y [R, D] with y[dst_index[r]] = norm(x[r]), rstd fp32 [R])."""
    lib = _require_lib()
    R, D = x.shape
    y = torch.empty_like(x)
    rstd = torch.empty(R, dtype=torch.float32, device=x.device)
    with torch.cuda.device(x.device):
        rc = lib.vx_rmsnorm_fwd(_ptr(x), _ptr(weight), _ptr(y), _ptr(rstd), _ptr(dst_index), R, D, float(eps),
                                _DTYPE_CODE[x.dtype], _DTYPE_CODE[weight.dtype], _stream(x.device))
    _check(rc, "vx_rmsnorm_fwd")
    return y, rstd


def _bwd_blocks(device: torch.device, rows: int) -> int:
    # ~4 blocks per SM keeps enough loads in flight; the fp32 partials cost nblocks*D*4 bytes (~8 MB at D=4096).
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(rows, 4 * sms))


def rmsnorm_bwd_cuda(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
                     dst_index: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """-> (dx [R, D] in x's row order, dweight [D] in weight's dtype); deterministic."""
    lib = _require_lib()
    R, D = x.shape
    nb = _bwd_blocks(x.device, R)
    dx = torch.empty_like(x)
    dw = torch.empty_like(weight)
    ws = torch.empty(nb, D, dtype=torch.float32, device=x.device)
    with torch.cuda.device(x.device):
        rc = lib.vx_rmsnorm_bwd(_ptr(dy), _ptr(x), _ptr(weight), _ptr(rstd), _ptr(dst_index), _ptr(dx), _ptr(dw),
                                _ptr(ws), ws.numel() * 4, R, D, nb, _DTYPE_CODE[x.dtype], _DTYPE_CODE[weight.dtype],
                                _stream(x.device))
    _check(rc, "vx_rmsnorm_bwd")
    return dx, dw


# ------------------------------------------------------------------------------------------------ benchmark
def _median_ms(fn, iters: int = 50, warmup: int = 10) -> float:
    from .autotune.tuner import cuda_event_timer  # the one CUDA-event timer

    for _ in range(warmup):
        fn()
    return cuda_event_timer(fn, reps=iters)


def benchmark_cuda_kernels(device="cuda") -> dict:
    """Time the csrc kernels on ``device`` (CUDA events, medians) and prove the plan build needs no host sync.

    Returns a dict: rmsnorm_permute_us / copy_us (8192x4096 bf16, fused norm+permute vs a device-to-device copy of
    the same bytes), their GB/s (bytes read + written) and bandwidth_ratio (target >= 0.8); routing_plan_us (8x4096
    tokens, eager, includes Python/ctypes overhead) and routing_plan_graph_us (CUDA-graph replay: device time);
    graph_capture_ok (the plan build was captured in a CUDA graph, so it makes no host sync) and graph_matches_eager.
    """
    from .testing import random_token_types

    device = torch.device(device)
    if device.type != "cuda" or not cuda_extension_available():
        return {"available": False, "reason": cuda_extension_status()[1]}
    out = {"available": True, "device": torch.cuda.get_device_name(device)}
    with torch.cuda.device(device):
        T, D = 8192, 4096
        g = torch.Generator().manual_seed(0)
        x = torch.randn(T, D, generator=g).to(device=device, dtype=torch.bfloat16)
        w = (1 + 0.1 * torch.randn(D, generator=g)).to(device=device, dtype=torch.bfloat16)
        inv = torch.randperm(T, generator=g).to(device)
        dst = torch.empty_like(x)
        nbytes = 2 * x.numel() * x.element_size()
        t_norm = _median_ms(lambda: rmsnorm_fwd_cuda(x, w, 1e-5, inv))
        t_copy = _median_ms(lambda: dst.copy_(x))
        out.update(rmsnorm_permute_us=t_norm * 1e3, copy_us=t_copy * 1e3,
                   rmsnorm_permute_GBps=nbytes / t_norm / 1e6, copy_GBps=nbytes / t_copy / 1e6,
                   bandwidth_ratio=t_copy / t_norm)

        tt = random_token_types(8, 4096, images_per_row=(1, 3), image_len=(200, 1300), generator=g).to(device)
        keep = torch.ones(8, 4096, dtype=torch.bool, device=device)
        keep[1, :300] = False  # left padding
        keep[5, -700:] = False  # right padding
        out["routing_plan_us"] = _median_ms(lambda: build_plan_cuda(tt, keep)) * 1e3
        eager = build_plan_cuda(tt, keep)
        try:
            build_plan_cuda(tt, keep)  # warm the allocator on this stream before capture
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                captured = build_plan_cuda(tt, keep)
            graph.replay()
            torch.cuda.synchronize()
            out["graph_capture_ok"] = True
            out["graph_matches_eager"] = all(torch.equal(captured[k], eager[k]) for k in eager)
            out["routing_plan_graph_us"] = _median_ms(graph.replay) * 1e3
        except Exception as exc:  # noqa: BLE001 - report, do not raise: the benchmark caller prints the dict
            out["graph_capture_ok"] = False
            out["graph_error"] = repr(exc)
    return out

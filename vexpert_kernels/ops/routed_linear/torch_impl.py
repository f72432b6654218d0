"""The torch backend (two cuBLAS GEMMs on row slices + PyTorch elementwise) and the ``torch._grouped_mm`` baseline."""
from __future__ import annotations

import torch

from .launch import _out


# Two GEMMs on zero-copy row slices (x[:nv], x[nv:]) writing into row slices of one output: the measured baseline
# (0.96-1.03x of one dense cuBLAS GEMM, anchors/README.md) and the CPU fallback. nv is the plan's cached host count.
def _torch_linear_into(out, x, w, b, residual, sl):
    xs, o = x[sl], out[sl]
    if xs.shape[0] == 0:
        return
    if residual is not None:
        torch.addmm(residual[sl], xs, w.t(), out=o)
        if b is not None:
            o.add_(b)
    elif b is not None:
        torch.addmm(b, xs, w.t(), out=o)
    else:
        torch.matmul(xs, w.t(), out=o)


def _torch_linear_fwd(x, wv, wl, nv, bv, bl, residual):
    T = x.shape[0]
    out = _out(x, T, wv.shape[0])
    _torch_linear_into(out, x, wv, bv, residual, slice(0, nv))
    _torch_linear_into(out, x, wl, bl, residual, slice(nv, T))
    return out


def _torch_linear_bwd(dy, x, wv, wl, nv, need_dx, need_dw, need_dbv, need_dbl):
    T = x.shape[0]
    dx = dwv = dwl = dbv = dbl = None
    parts = ((slice(0, nv), wv), (slice(nv, T), wl))
    if need_dx:
        dx = _out(x, x.shape)
        for sl, w in parts:
            if dy[sl].shape[0]:
                torch.matmul(dy[sl], w, out=dx[sl])
    if need_dw:
        # fp32 accumulate, then cast: matches the Triton path's numerics on 16-bit inputs
        dwv, dwl = [(dy[sl].t().float() @ x[sl].float()).to(w.dtype) for sl, w in parts]
    if need_dbv:
        dbv = dy[:nv].float().sum(0)
    if need_dbl:
        dbl = dy[nv:].float().sum(0)
    return dx, dwv, dwl, dbv, dbl


def _torch_swiglu_fwd(x, gv, uv, gl, ul, nv):
    T = x.shape[0]
    out = _out(x, T, gv.shape[0])
    for sl, g_w, u_w in ((slice(0, nv), gv, uv), (slice(nv, T), gl, ul)):
        xs = x[sl]
        if xs.shape[0]:
            torch.mul(torch.nn.functional.silu(xs @ g_w.t()), xs @ u_w.t(), out=out[sl])
    return out


def _swiglu_grads(g, u, dh):
    g, u, dh = g.float(), u.float(), dh.float()
    sig = torch.sigmoid(g)
    return dh * u * sig * (1 + g * (1 - sig)), dh * g * sig



def _grouped_mm_available(device) -> bool:
    if not hasattr(torch, "_grouped_mm") or device.type != "cuda":
        return False
    return torch.cuda.get_device_capability(device)[0] >= 9


def _grouped_mm_fwd(x, wv, wl, offsets, bv, bl, residual):
    # torch._grouped_mm wants ONE [2, K, N] weight: this stacks (a weight copy per call) -> a baseline only.
    if not _grouped_mm_available(x.device):
        raise RuntimeError("backend='grouped_mm' needs torch._grouped_mm on a CUDA device with compute capability >= 9")
    w = torch.stack([wv, wl]).transpose(-2, -1)
    out = torch._grouped_mm(x, w, offs=offsets[1:].contiguous())
    nv_mask = (torch.arange(x.shape[0], device=x.device) < offsets[1])[:, None]
    if bv is not None or bl is not None:
        zero = out.new_zeros(out.shape[1])
        out = out + torch.where(nv_mask, bv if bv is not None else zero, bl if bl is not None else zero)
    if residual is not None:
        out = out + residual
    return out

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
        # in the input dtype: cuBLAS accumulates 16-bit GEMMs in fp32 (like the Triton wgrad kernel); an fp32 upcast
        # would run a true-fp32 GEMM (~10x slower on tensor-core GPUs). An expert with no rows gets exact zeros.
        dwv, dwl = [torch.matmul(dy[sl].t(), x[sl]) for sl, _ in parts]
    if need_dbv:
        dbv = dy[:nv].sum(0, dtype=torch.float32)
    if need_dbl:
        dbl = dy[nv:].sum(0, dtype=torch.float32)
    return dx, dwv, dwl, dbv, dbl


def _torch_swiglu_fwd(x, gv, uv, gl, ul, nv, save_gu=False):
    """h [T, I] = silu(x Wg^T) * (x Wu^T); with save_gu also gu [T, 2I] = [g | u] (else None)."""
    T, I = x.shape[0], gv.shape[0]
    out = _out(x, T, I)
    gu = _out(x, T, 2 * I) if save_gu else None
    for sl, g_w, u_w in ((slice(0, nv), gv, uv), (slice(nv, T), gl, ul)):
        xs = x[sl]
        if xs.shape[0]:
            if gu is not None:
                g = torch.matmul(xs, g_w.t(), out=gu[sl, :I])
                u = torch.matmul(xs, u_w.t(), out=gu[sl, I:])
            else:
                g, u = xs @ g_w.t(), xs @ u_w.t()
            torch.mul(torch.nn.functional.silu(g), u, out=out[sl])
    return out, gu


def _torch_swiglu_bwd(dgu, x, gv, uv, gl, ul, nv, need_dx, need_dw):
    """From dgu [T, 2I] = [dgate | dup]: dX = dgate Wg + dup Wu (two cuBLAS GEMMs per expert, the second
    accumulating with beta = 1: no concatenated weight copy), dW in the input dtype."""
    T, I = x.shape[0], gv.shape[0]
    parts = ((slice(0, nv), gv, uv), (slice(nv, T), gl, ul))
    dx = dws = None
    if need_dx:
        dx = _out(x, x.shape)
        for sl, g_w, u_w in parts:
            if x[sl].shape[0]:
                torch.matmul(dgu[sl, :I], g_w, out=dx[sl])
                dx[sl].addmm_(dgu[sl, I:], u_w)
            # (an expert without rows writes nothing: its rows do not exist)
    if need_dw:
        dws = [torch.matmul(dgu[sl, cols].t(), x[sl]) for sl, _, _ in parts for cols in (slice(0, I), slice(I, 2 * I))]
    return dx, dws  # dws: [dWg_v, dWu_v, dWg_l, dWu_l]


def _swiglu_grads(g, u, dh):
    g, u, dh = g.float(), u.float(), dh.float()
    sig = torch.sigmoid(g)
    return dh * u * sig * (1 + g * (1 - sig)), dh * g * sig


def _torch_dswiglu(dy, dv, dl, gu, nv):
    """dgu [T, 2I] = [dh*u*silu'(g) | dh*silu(g)] with dh = dY_e W_down_e (cuBLAS per expert, in the input dtype)
    and g, u from the saved gu [T, 2I]: the plain-PyTorch form of the fused EPI_DSWIGLU GEMM (its autotune
    reference and the torch backend)."""
    T, I = dy.shape[0], dv.shape[1]
    dgu = _out(dy, T, 2 * I)
    for sl, w in ((slice(0, nv), dv), (slice(nv, T), dl)):
        if dy[sl].shape[0]:
            dgu[sl, :I], dgu[sl, I:] = _swiglu_grads(gu[sl, :I], gu[sl, I:], dy[sl] @ w)
    return dgu



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

"""The fused routed SwiGLU MLP ``y = residual + down_e(silu(gate_e(x)) * up_e(x))`` as one ``vexpert::`` op.

Forward: the SwiGLU grouped GEMM (two accumulators; its epilogue writes h [T, I] and the pre-activations
gu = [g | u] [T, 2I]), then the down projection with the residual epilogue. Saved: x, the weights, h and gu.

Backward with the saved gu (the default):

(a) ONE grouped GEMM dh = dY_e W_down_e whose epilogue (``EPI_DSWIGLU``; the sm_90 TMA variant when tuned in) loads
    the g, u tiles and writes dgu = [dh*u*silu'(g) | dh*silu(g)] [T, 2I]: dh never goes to memory;
(b) dW_down_e = dY_e^T h_e (the routed wgrad);
(c) dX = dgu [Wg ; Wu] (one grouped GEMM, K = 2I) and dWg, dWu on column views of dgu.

``recompute=True`` saves x and h only; the backward is the two-op path (dh GEMM to memory, then the EPI_SWIGLU_BWD
GEMM recomputes g, u). The residual's gradient is dY.

``backend="auto"`` (CUDA): step (a) is tuned by ``autotune.select`` ("routed_swiglu_mlp_dx": torch reference
= dY @ W then the elementwise formula, our Triton configs, registered launchers such as sm_90), static = torch;
(b) tunes like a routed_linear dW; (c) follows the SwiGLU forward's choice (like ``routed_swiglu``).
"""
from __future__ import annotations

from typing import Optional

import torch

from ..._triton_compat import triton_usable_for
from .custom_ops import (_linear_bwd_impl, _linear_fwd_impl, _none_to_empty, _swiglu_bwd_impl, _swiglu_dgu_bwd,
                         _swiglu_fwd_impl)
from .kernels import EPI_DSWIGLU
from .launch import _launch_gemm, _out
from .torch_impl import _torch_dswiglu
from .tuning import _extra_candidates, extra_launcher, make_key, parse_backend, triton_configs
from .tuning import select as tune_select

DX_OP = "routed_swiglu_mlp_dx"  # autotune op name of step (a)


def _dswiglu_dx_run(name, dy, dv, dl, gu, offsets, nv):
    """dgu [T, 2I] from dy [T, D], the down weights dv/dl [D, I] and gu [T, 2I] with backend ``name``
    (torch | triton[:cfg] | a registered launcher's "<prefix>:<cfg>")."""
    kind, cfg, _ = parse_backend(name)
    if kind == "torch":
        return _torch_dswiglu(dy, dv, dl, gu, nv)
    if kind != "triton":
        ln, cname = extra_launcher(f"{kind}:{cfg}")
        return ln.run(DX_OP, ln.configs(DX_OP, dy, dv)[cname], dy=dy, wv=dv, wl=dl, gu=gu, offsets=offsets)
    dgu = _out(dy, dy.shape[0], 2 * dv.shape[1])
    # the transposed [I, D] weight views (no copies); gu rides in the kernel's dh operand (row stride 2I)
    _launch_gemm(dy, dv.t(), dl.t(), offsets, dgu, epilogue=EPI_DSWIGLU, dh=gu, config=cfg)
    return dgu


def _tune_dswiglu(dy, dv, dl, gu, offsets, nv) -> str:
    T, D = dy.shape
    I = dv.shape[1]
    names = ["torch"] + (list(triton_configs(DX_OP, dy.device, dy.dtype)) if triton_usable_for(dy) else [])
    names += [f"{ln.prefix}:{c}" for ln in _extra_candidates for c in ln.configs(DX_OP, dy, dv)]
    cands = {n: (lambda n=n: _dswiglu_dx_run(n, dy, dv, dl, gu, offsets, nv)) for n in names}
    return tune_select(DX_OP, make_key(dy.dtype, I, D, "dswiglu", False, False, T), cands, cands["torch"], dy.dtype)


def _mlp_fwd_impl(x, gv, uv, gl, ul, dv, dl, offsets, nv, residual, recompute, backend_up, backend_down):
    """-> (y [T, D], h [T, I], gu [T, 2I], or an empty tensor when recompute)."""
    h, gu = _swiglu_fwd_impl(x, gv, uv, gl, ul, offsets, nv, not recompute, backend_up)
    y = _linear_fwd_impl(h, dv, dl, offsets, nv, None, None, residual, backend_down)
    return y, h, gu


def _mlp_bwd_impl(dy, x, gv, uv, gl, ul, dv, dl, offsets, nv, h, gu, need_dx, need_dw_up, need_dw_down,
                  backend_up, backend_down):
    """-> (dx, dWg_v, dWu_v, dWg_l, dWu_l, dWd_v, dWd_l), None where not needed. gu None: recompute path."""
    dy = dy.contiguous()
    if gu is None:  # recompute: dh to memory, then the SwiGLU backward that recomputes g, u in its GEMM
        dh, ddv, ddl = _linear_bwd_impl(dy, h, dv, dl, offsets, nv, True, need_dw_down, False, False,
                                        backend_down)[:3]
        return _swiglu_bwd_impl(dh, None, x, gv, uv, gl, ul, offsets, nv, need_dx, need_dw_up, backend_up) + \
            (ddv, ddl)
    kind, _, tune = parse_backend(backend_down)
    if tune:
        name = _tune_dswiglu(dy, dv, dl, gu, offsets, nv)
    else:
        name = "triton" if kind == "triton" else "torch"
    ddv = ddl = None
    if need_dx or need_dw_up:
        dgu = _dswiglu_dx_run(name, dy, dv, dl, gu, offsets, nv)       # (a) [T, 2I]
        up = _swiglu_dgu_bwd(dgu, x, gv, uv, gl, ul, offsets, nv, need_dx, need_dw_up, backend_up)  # (c)
    else:
        up = (None,) * 5
    if need_dw_down:                                                     # (b)
        ddv, ddl = _linear_bwd_impl(dy, h, dv, dl, offsets, nv, False, True, False, False, backend_down)[1:3]
    return tuple(up) + (ddv, ddl)


# ============================================================================================== custom ops
@torch.library.custom_op("vexpert::routed_swiglu_mlp", mutates_args=())
def _routed_swiglu_mlp_op(x: torch.Tensor, gate_vision: torch.Tensor, up_vision: torch.Tensor,
                          gate_language: torch.Tensor, up_language: torch.Tensor, down_vision: torch.Tensor,
                          down_language: torch.Tensor, offsets: torch.Tensor, num_vision: int,
                          residual: Optional[torch.Tensor], recompute: bool, backend_up: str,
                          backend_down: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (y [T, D], h [T, I] saved, gu [T, 2I] saved pre-activations; an empty tensor when recompute)."""
    return _mlp_fwd_impl(x, gate_vision, up_vision, gate_language, up_language, down_vision, down_language, offsets,
                         num_vision, residual, recompute, backend_up, backend_down)


@_routed_swiglu_mlp_op.register_fake
def _(x, gate_vision, up_vision, gate_language, up_language, down_vision, down_language, offsets, num_vision,
      residual, recompute, backend_up, backend_down):
    T, I = x.shape[0], gate_vision.shape[0]
    return (x.new_empty(T, down_vision.shape[0]), x.new_empty(T, I),
            x.new_empty(0) if recompute else x.new_empty(T, 2 * I))


_WEIGHTS = ("gate_vision", "up_vision", "gate_language", "up_language", "down_vision", "down_language")


@torch.library.custom_op("vexpert::routed_swiglu_mlp_backward", mutates_args=())
def _routed_swiglu_mlp_bwd_op(dy: torch.Tensor, x: torch.Tensor, gate_vision: torch.Tensor, up_vision: torch.Tensor,
                              gate_language: torch.Tensor, up_language: torch.Tensor, down_vision: torch.Tensor,
                              down_language: torch.Tensor, offsets: torch.Tensor, num_vision: int, h: torch.Tensor,
                              gu: torch.Tensor, need_dx: bool, need_dw_up: bool, need_dw_down: bool, recompute: bool,
                              backend_up: str, backend_down: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                          torch.Tensor, torch.Tensor, torch.Tensor,
                                                                          torch.Tensor]:
    res = _mlp_bwd_impl(dy, x, gate_vision, up_vision, gate_language, up_language, down_vision, down_language,
                        offsets, num_vision, h, None if recompute else gu, need_dx, need_dw_up, need_dw_down,
                        backend_up, backend_down)
    return _none_to_empty(res, x)


@_routed_swiglu_mlp_bwd_op.register_fake
def _(dy, x, gate_vision, up_vision, gate_language, up_language, down_vision, down_language, offsets, num_vision, h,
      gu, need_dx, need_dw_up, need_dw_down, recompute, backend_up, backend_down):
    e = x.new_empty(0)
    ws = (gate_vision, up_vision, gate_language, up_language)
    return ((x.new_empty(x.shape) if need_dx else e,) + tuple(w.new_empty(w.shape) if need_dw_up else e for w in ws)
            + tuple(w.new_empty(w.shape) if need_dw_down else e for w in (down_vision, down_language)))


def _mlp_setup(ctx, inputs, output):
    x, gv, uv, gl, ul, dv, dl, offsets, nv, residual, recompute, be_up, be_down = inputs
    _, h, gu = output
    ctx.save_for_backward(x, gv, uv, gl, ul, dv, dl, offsets, h, gu)  # gu: empty when recompute
    ctx.nv, ctx.recompute, ctx.be_up, ctx.be_down = nv, recompute, be_up, be_down
    ctx.has_res = residual is not None
    ctx.mark_non_differentiable(h, gu)


def _mlp_backward(ctx, dy, _dh, _dgu):
    x, gv, uv, gl, ul, dv, dl, offsets, h, gu = ctx.saved_tensors
    ni = ctx.needs_input_grad
    grads = _routed_swiglu_mlp_bwd_op(dy, x, gv, uv, gl, ul, dv, dl, offsets, ctx.nv, h, gu, bool(ni[0]),
                                      bool(any(ni[1:5])), bool(ni[5] or ni[6]), ctx.recompute, ctx.be_up,
                                      ctx.be_down)
    out = tuple(g if ni[i] else None for i, g in enumerate(grads))  # x, 4 up-half weights, 2 down weights
    return out + (None, None, dy if (ctx.has_res and ni[9]) else None, None, None, None)


_routed_swiglu_mlp_op.register_autograd(_mlp_backward, setup_context=_mlp_setup)

"""Op bodies per backend, the ``vexpert::`` torch.library ops with fake impls, and their autograd."""
from __future__ import annotations

from typing import Optional

import torch

from ..._triton_compat import triton_usable_for
from .kernels import EPI_QKV_ROPE, EPI_SWIGLU, EPI_SWIGLU_BWD
from .launch import _launch_gemm, _launch_qkv_bwd_gather, _launch_swiglu_bwd_elementwise, _launch_wgrad, _out
from .rope import _qkv_heads_to_routed, _qkv_routed_to_heads, _rope_rows
from .tuning import (_extra_candidates, extra_launcher, make_key, parse_backend, triton_configs, wgrad_configs)
from .tuning import select as tune_select
from .torch_impl import (_grouped_mm_fwd, _swiglu_grads, _torch_linear_bwd, _torch_linear_fwd, _torch_swiglu_bwd,
                         _torch_swiglu_fwd)


def _linear_fwd_impl(x, wv, wl, offsets, nv, bv, bl, residual, backend):
    kind, cfg, _ = parse_backend(backend)
    if kind == "torch":
        return _torch_linear_fwd(x, wv, wl, nv, bv, bl, residual)
    if kind == "grouped_mm":
        return _grouped_mm_fwd(x, wv, wl, offsets, bv, bl, residual)
    if kind != "triton":
        ln, name = extra_launcher(f"{kind}:{cfg}")
        return ln.run("routed_linear", ln.configs("routed_linear", x, wv)[name], x=x, wv=wv, wl=wl, offsets=offsets,
                      bv=bv, bl=bl, residual=residual)
    out = _out(x, x.shape[0], wv.shape[0])
    _launch_gemm(x, wv, wl, offsets, out, bv=bv, bl=bl, residual=residual, config=cfg)
    return out


def _dx_run(name, dy, wv, wl, offsets, nv):
    """dX = dY W_e with backend ``name`` (torch | triton[:cfg] | extra)."""
    kind, cfg, _ = parse_backend(name)
    T, K = dy.shape[0], wv.shape[1]
    if kind == "torch":
        dx = _out(dy, T, K)
        for sl, w in ((slice(0, nv), wv), (slice(nv, T), wl)):
            if dy[sl].shape[0]:
                torch.matmul(dy[sl], w, out=dx[sl])
        return dx
    if kind != "triton":
        ln, cname = extra_launcher(f"{kind}:{cfg}")
        return ln.run("routed_linear_dx", ln.configs("routed_linear_dx", dy, wv)[cname], dy=dy, wv=wv, wl=wl,
                      offsets=offsets)
    dx = _out(dy, T, K)
    _launch_gemm(dy, wv.t(), wl.t(), offsets, dx, config=cfg)  # the [K, N] transposed views, no copies
    return dx


def _dw_run(name, dy, x, wv, wl, offsets, nv, dbv=None, dbl=None):
    """(dWv, dWl) = per-expert dY^T X with backend ``name``; a Triton run also fills dbv/dbl when given."""
    kind, cfg, _ = parse_backend(name)
    T = x.shape[0]
    if kind == "torch":
        return tuple(torch.matmul(dy[sl].t(), x[sl]) for sl in (slice(0, nv), slice(nv, T)))
    if kind != "triton":
        ln, cname = extra_launcher(f"{kind}:{cfg}")
        db = dict(dbv=dbv, dbl=dbl) if ln.dbias and (dbv is not None or dbl is not None) else {}
        return tuple(ln.run("routed_linear_dw", ln.configs("routed_linear_dw", x, wv)[cname], dy=dy, x=x,
                            offsets=offsets, **db))
    dwv, dwl = _out(wv, wv.shape), _out(wl, wl.shape)
    _launch_wgrad(dy, x, offsets, dwv, dwl, dbv, dbl, config=cfg)
    return dwv, dwl


def _tune_linear_bwd(dy, x, wv, wl, offsets, nv, need_dx, need_dw, need_dbv, need_dbl, bias_dtype):
    """Names of the dX and dW paths for this key (``autotune.select`` per GEMM, reference = the torch path)."""
    T, K = x.shape
    N = wv.shape[0]
    dxn = dwn = "torch"
    use_triton = triton_usable_for(x)
    if need_dx:
        names = ["torch"] + (list(triton_configs("routed_linear_dx", x.device, x.dtype)) if use_triton else [])
        names += [f"{ln.prefix}:{c}" for ln in _extra_candidates for c in ln.configs("routed_linear_dx", dy, wv)]
        cands = {n: (lambda n=n: _dx_run(n, dy, wv, wl, offsets, nv)) for n in names}
        dxn = tune_select("routed_linear_dx", make_key(x.dtype, K, N, "dx", False, False, T), cands, cands["torch"],
                          x.dtype)
    if need_dw:
        names = ["torch"] + (list(wgrad_configs(x.device)) if use_triton else [])
        names += [f"{ln.prefix}:{c}" for ln in _extra_candidates for c in ln.configs("routed_linear_dw", x, wv)]
        cands = {n: (lambda n=n: _dw_tuned_run(n, dy, x, wv, wl, offsets, nv, need_dbv, need_dbl, bias_dtype))
                 for n in names}
        dwn = tune_select("routed_linear_dw", make_key(x.dtype, N, K, "dw", need_dbv or need_dbl, False, T), cands,
                          cands["torch"], x.dtype)
    return dxn, dwn


def _kernel_dbias(name, need_dw=True) -> bool:
    """Does dW path ``name`` produce the bias gradients itself (Triton wgrad; a registered launcher that fuses
    them, e.g. sm_90) instead of a separate ``dy.sum``?"""
    kind, cfg, _ = parse_backend(name)
    if kind == "triton":
        return True
    if kind in ("torch", "grouped_mm") or not need_dw:
        return False
    return extra_launcher(f"{kind}:{cfg}")[0].dbias


def _dw_tuned_run(name, dy, x, wv, wl, offsets, nv, need_dbv, need_dbl, bias_dtype):
    """A dW candidate exactly as the backward will run it: with bias gradients, when the key has a bias, produced
    by the same kernel variant (so the check on the user's GPU covers the fused dbias code too)."""
    N = wv.shape[0]
    fused = _kernel_dbias(name)
    bd = bias_dtype or torch.float32
    dbv = _out(x, N, dtype=bd) if (fused and need_dbv) else None
    dbl = _out(x, N, dtype=bd) if (fused and need_dbl) else None
    dw = tuple(_dw_run(name, dy, x, wv, wl, offsets, nv, dbv, dbl))
    if not fused:
        dbv = dy[:nv].sum(0, dtype=torch.float32) if need_dbv else None
        dbl = dy[nv:].sum(0, dtype=torch.float32) if need_dbl else None
    return dw + tuple(t.float() for t in (dbv, dbl) if t is not None)


def _linear_bwd_impl(dy, x, wv, wl, offsets, nv, need_dx, need_dw, need_dbv, need_dbl, backend,
                     bias_dtype=None):
    dy = dy.contiguous()
    kind, _, tune = parse_backend(backend)
    if not tune and kind != "triton":
        return _torch_linear_bwd(dy, x, wv, wl, nv, need_dx, need_dw, need_dbv, need_dbl)
    if tune:
        dxn, dwn = _tune_linear_bwd(dy, x, wv, wl, offsets, nv, need_dx, need_dw, need_dbv, need_dbl, bias_dtype)
    else:
        dxn = dwn = "triton"  # explicit backend="triton": the table's configs
    N = wv.shape[0]
    dx = _dx_run(dxn, dy, wv, wl, offsets, nv) if need_dx else None
    dwv = dwl = dbv = dbl = None
    triton_db = parse_backend(dwn)[0] == "triton"
    # a registered dW launcher that fuses dbias (sm_90: column sums of the dY tiles it loads) fills dbv / dbl
    kernel_db = _kernel_dbias(dwn, need_dw)
    if kernel_db:
        dbv = _out(x, N, dtype=bias_dtype or torch.float32) if need_dbv else None
        dbl = _out(x, N, dtype=bias_dtype or torch.float32) if need_dbl else None
    if need_dw:
        dwv, dwl = _dw_run(dwn, dy, x, wv, wl, offsets, nv, dbv, dbl)
    elif triton_db:
        _launch_wgrad(dy, x, offsets, None, None, dbv, dbl)
    if not kernel_db:
        dbv = dy[:nv].sum(0, dtype=torch.float32) if need_dbv else None
        dbl = dy[nv:].sum(0, dtype=torch.float32) if need_dbl else None
    return dx, dwv, dwl, dbv, dbl


def _swiglu_fwd_impl(x, gv, uv, gl, ul, offsets, nv, save_gu, backend):
    """-> (h [T, I], gu [T, 2I] = [gate | up] pre-activations, or an empty tensor when not saved)."""
    kind, cfg, _ = parse_backend(backend)
    if kind != "triton":
        h, gu = _torch_swiglu_fwd(x, gv, uv, gl, ul, nv, save_gu)
        return h, gu if gu is not None else x.new_empty(0)
    T, I = x.shape[0], gv.shape[0]
    out = _out(x, T, I)
    gu = _out(x, T, 2 * I) if save_gu else x.new_empty(0)
    _launch_gemm(x, gv, gl, offsets, out, epilogue=EPI_SWIGLU, w2v=uv, w2l=ul, out2=gu if save_gu else None,
                 save_gu=save_gu, config=cfg)
    return out, gu


def _swiglu_bwd_impl(dh, gu, x, gv, uv, gl, ul, offsets, nv, need_dx, need_dw, backend):
    """dgu = [dgate | dup] (dgate = dh*u*silu'(g), dup = dh*silu(g)) from the saved gu (one elementwise pass) or,
    when gu is None, recomputed by the GEMM (EPI_SWIGLU_BWD); then dX = dgu [Wg ; Wu] as ONE grouped GEMM with
    K = 2I (two weight pointers), and dWg = dgate^T x, dWu = dup^T x on column views of dgu (no copies)."""
    dh = dh.contiguous()
    T, K = x.shape
    I = gv.shape[0]
    dgu = _out(x, T, 2 * I)  # [T, 2I]
    if parse_backend(backend)[0] != "triton":
        for sl, g_w, u_w in ((slice(0, nv), gv, uv), (slice(nv, T), gl, ul)):
            if x[sl].shape[0]:
                g, u = (x[sl] @ g_w.t(), x[sl] @ u_w.t()) if gu is None else (gu[sl, :I], gu[sl, I:])
                dgu[sl, :I], dgu[sl, I:] = _swiglu_grads(g, u, dh[sl])
    elif gu is None:  # recompute: the GEMM epilogue turns dh into dgate, dup (row stride 2I for both halves)
        _launch_gemm(x, gv, gl, offsets, dgu[:, :I], epilogue=EPI_SWIGLU_BWD, w2v=uv, w2l=ul, out2=dgu[:, I:],
                     dh=dh)
    else:
        _launch_swiglu_bwd_elementwise(gu, dh, dgu)
    return _swiglu_dgu_bwd(dgu, x, gv, uv, gl, ul, offsets, nv, need_dx, need_dw, backend)


def _swiglu_dgu_bwd(dgu, x, gv, uv, gl, ul, offsets, nv, need_dx, need_dw, backend):
    """From dgu [T, 2I] = [dgate | dup]: dX = dgu [Wg ; Wu] (ONE grouped GEMM, K = 2I, two weight pointers) and
    dWg = dgate^T x, dWu = dup^T x on column views of dgu. -> (dx, dWg_v, dWu_v, dWg_l, dWu_l), None where not
    needed. backend: the SwiGLU forward's (its kind picks torch or Triton)."""
    T, K = x.shape
    I = gv.shape[0]
    if parse_backend(backend)[0] != "triton":
        dx, dws = _torch_swiglu_bwd(dgu, x, gv, uv, gl, ul, nv, need_dx, need_dw)
        return (dx,) + (tuple(dws) if dws is not None else (None,) * 4)
    dx = dgv = duv = dgl = dul = None
    if need_dx:
        dx = _out(x, T, K)
        _launch_gemm(dgu, gv.t(), gl.t(), offsets, dx, w2v=uv.t(), w2l=ul.t(), k_split=I)
    if need_dw:
        dgv, duv, dgl, dul = (_out(w, I, K) for w in (gv, uv, gl, ul))
        _launch_wgrad(dgu[:, :I], x, offsets, dgv, dgl, None, None)
        _launch_wgrad(dgu[:, I:], x, offsets, duv, dul, None, None)
    return dx, dgv, duv, dgl, dul


def _qkv_fwd_impl(x, wv, wl, offsets, nv, bv, bl, perm, cos, sin, B, L, H, KV, backend):
    hd = wv.shape[0] // (H + 2 * KV)
    kind, cfg, _ = parse_backend(backend)
    ext = extra_launcher(f"{kind}:{cfg}") if kind not in ("triton", "torch", "grouped_mm") else None
    if ext is not None:  # a registered launcher ("<prefix>:<config>"), e.g. the sm_90 TMA kernel
        ln, name = ext
        c = ln.configs("routed_qkv_rope", x, wv, num_heads=H, num_kv_heads=KV)[name]
        return tuple(ln.run("routed_qkv_rope", c, x=x, wv=wv, wl=wl, offsets=offsets, bv=bv, bl=bl, perm=perm,
                            cos=cos.contiguous(), sin=sin.contiguous(), B=B, L=L, H=H, KV=KV))
    if kind != "triton":
        qkv = _torch_linear_fwd(x, wv, wl, nv, bv, bl, None)
        qkv = _rope_rows(qkv, cos, sin, H + KV, hd)
        return _qkv_routed_to_heads(qkv, perm, B, L, H, KV, hd)
    q = _out(x, B, H, L, hd)
    k = _out(x, B, KV, L, hd)
    v = _out(x, B, KV, L, hd)
    # cos, sin: [T, hd/2] fp32 each in routed order, read by the epilogue (see the kernel)
    _launch_gemm(x, wv, wl, offsets, q, epilogue=EPI_QKV_ROPE, bv=bv, bl=bl, perm=perm, cos=cos.contiguous(),
                 sin=sin.contiguous(), k_out=k, v_out=v, seq_len=L, num_heads=H, num_kv_heads=KV, head_dim=hd,
                 n_cols=wv.shape[0], config=cfg)
    return q, k, v


def _qkv_bwd_impl(dq, dk, dv, x, wv, wl, offsets, nv, perm, cos, sin, need_dx, need_dw, need_dbv, need_dbl,
                  backend, bias_dtype):
    H, KV, hd = dq.shape[1], dk.shape[1], dq.shape[3]
    if parse_backend(backend)[0] != "torch" and triton_usable_for(x):
        # one pass: gather to routed rows + inverse rotation into one [T, N] buffer (Triton, sm_90 and tuned paths)
        dqkv = _out(x, x.shape[0], wv.shape[0])
        _launch_qkv_bwd_gather(dq, dk, dv, perm, cos, sin, dqkv)
    else:
        dqkv = _qkv_heads_to_routed(dq.to(x.dtype), dk.to(x.dtype), dv.to(x.dtype), perm)
        dqkv = _rope_rows(dqkv, cos, sin, H + KV, hd, inverse=True)  # RoPE is a rotation: its adjoint is R(-theta)
    return _linear_bwd_impl(dqkv, x, wv, wl, offsets, nv, need_dx, need_dw, need_dbv, need_dbl, backend,
                            bias_dtype)



def _opt(t):
    return t if t is not None and t.numel() > 0 else None


def _none_to_empty(ts, like):
    return tuple(t if t is not None else like.new_empty(0) for t in ts)


@torch.library.custom_op("vexpert::routed_linear", mutates_args=())
def _routed_linear_op(x: torch.Tensor, weight_vision: torch.Tensor, weight_language: torch.Tensor,
                      offsets: torch.Tensor, num_vision: int, bias_vision: Optional[torch.Tensor],
                      bias_language: Optional[torch.Tensor], residual: Optional[torch.Tensor],
                      backend: str) -> torch.Tensor:
    return _linear_fwd_impl(x, weight_vision, weight_language, offsets, num_vision, bias_vision, bias_language,
                            residual, backend)


@_routed_linear_op.register_fake
def _(x, weight_vision, weight_language, offsets, num_vision, bias_vision, bias_language, residual, backend):
    return x.new_empty(x.shape[0], weight_vision.shape[0])


@torch.library.custom_op("vexpert::routed_linear_backward", mutates_args=())
def _routed_linear_bwd_op(dy: torch.Tensor, x: torch.Tensor, weight_vision: torch.Tensor,
                          weight_language: torch.Tensor, offsets: torch.Tensor, num_vision: int, need_dx: bool,
                          need_dw: bool, need_dbv: bool, need_dbl: bool, backend: str,
                          bias_dtype: Optional[torch.dtype]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                     torch.Tensor, torch.Tensor]:
    res = _linear_bwd_impl(dy, x, weight_vision, weight_language, offsets, num_vision, need_dx, need_dw, need_dbv,
                           need_dbl, backend, bias_dtype)
    dbv, dbl = [(t.to(bias_dtype) if t is not None and bias_dtype is not None else t) for t in res[3:]]
    return _none_to_empty((res[0], res[1], res[2], dbv, dbl), x)


@_routed_linear_bwd_op.register_fake
def _(dy, x, weight_vision, weight_language, offsets, num_vision, need_dx, need_dw, need_dbv, need_dbl, backend,
      bias_dtype):
    return _linear_bwd_fake(x, weight_vision, weight_language, need_dx, need_dw, need_dbv, need_dbl, bias_dtype)


def _routed_linear_setup(ctx, inputs, output):
    x, wv, wl, offsets, nv, bv, bl, residual, backend = inputs
    ctx.save_for_backward(x, wv, wl, offsets)
    ctx.nv, ctx.backend = nv, backend
    ctx.bias_dtype = bv.dtype if bv is not None else (bl.dtype if bl is not None else None)
    ctx.has_res = residual is not None


def _routed_linear_backward(ctx, dy):
    x, wv, wl, offsets = ctx.saved_tensors
    ni = ctx.needs_input_grad
    need_dw = bool(ni[1] or ni[2])
    dx, dwv, dwl, dbv, dbl = _routed_linear_bwd_op(dy, x, wv, wl, offsets, ctx.nv, bool(ni[0]), need_dw,
                                                   bool(ni[5]), bool(ni[6]), ctx.backend, ctx.bias_dtype)
    return (dx if ni[0] else None, dwv if ni[1] else None, dwl if ni[2] else None, None, None,
            dbv if ni[5] else None, dbl if ni[6] else None, dy if (ctx.has_res and ni[7]) else None, None)


_routed_linear_op.register_autograd(_routed_linear_backward, setup_context=_routed_linear_setup)


@torch.library.custom_op("vexpert::routed_swiglu", mutates_args=())
def _routed_swiglu_op(x: torch.Tensor, gate_vision: torch.Tensor, up_vision: torch.Tensor,
                      gate_language: torch.Tensor, up_language: torch.Tensor, offsets: torch.Tensor, num_vision: int,
                      recompute: bool, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (h [T, I], gu [T, 2I] saved pre-activations; an empty tensor when recompute)."""
    return _swiglu_fwd_impl(x, gate_vision, up_vision, gate_language, up_language, offsets, num_vision,
                            not recompute, backend)


@_routed_swiglu_op.register_fake
def _(x, gate_vision, up_vision, gate_language, up_language, offsets, num_vision, recompute, backend):
    I = gate_vision.shape[0]
    return x.new_empty(x.shape[0], I), (x.new_empty(0) if recompute else x.new_empty(x.shape[0], 2 * I))


@torch.library.custom_op("vexpert::routed_swiglu_backward", mutates_args=())
def _routed_swiglu_bwd_op(dh: torch.Tensor, gu: torch.Tensor, x: torch.Tensor, gate_vision: torch.Tensor,
                          up_vision: torch.Tensor, gate_language: torch.Tensor, up_language: torch.Tensor,
                          offsets: torch.Tensor, num_vision: int, need_dx: bool, need_dw: bool, recompute: bool,
                          backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    res = _swiglu_bwd_impl(dh, None if recompute else gu, x, gate_vision, up_vision, gate_language, up_language,
                           offsets, num_vision, need_dx, need_dw, backend)
    return _none_to_empty(res, x)


@_routed_swiglu_bwd_op.register_fake
def _(dh, gu, x, gate_vision, up_vision, gate_language, up_language, offsets, num_vision, need_dx, need_dw,
      recompute, backend):
    e = x.new_empty(0)
    return (x.new_empty(x.shape) if need_dx else e,) + tuple(
        w.new_empty(w.shape) if need_dw else e for w in (gate_vision, up_vision, gate_language, up_language))


def _routed_swiglu_setup(ctx, inputs, output):
    x, gv, uv, gl, ul, offsets, nv, recompute, backend = inputs
    ctx.save_for_backward(x, gv, uv, gl, ul, offsets, output[1])  # gu: empty when recompute
    ctx.nv, ctx.recompute, ctx.backend = nv, recompute, backend
    ctx.mark_non_differentiable(output[1])


def _routed_swiglu_backward(ctx, dh, _dgu):
    x, gv, uv, gl, ul, offsets, gu = ctx.saved_tensors
    ni = ctx.needs_input_grad
    need_dw = bool(any(ni[1:5]))
    dx, dgv, duv, dgl, dul = _routed_swiglu_bwd_op(dh, gu, x, gv, uv, gl, ul, offsets, ctx.nv, bool(ni[0]), need_dw,
                                                   ctx.recompute, ctx.backend)
    pick = lambda t, i: t if ni[i] else None  # noqa: E731
    return pick(dx, 0), pick(dgv, 1), pick(duv, 2), pick(dgl, 3), pick(dul, 4), None, None, None, None


_routed_swiglu_op.register_autograd(_routed_swiglu_backward, setup_context=_routed_swiglu_setup)


@torch.library.custom_op("vexpert::routed_qkv_rope", mutates_args=())
def _routed_qkv_rope_op(x: torch.Tensor, weight_vision: torch.Tensor, weight_language: torch.Tensor,
                        offsets: torch.Tensor, num_vision: int, bias_vision: Optional[torch.Tensor],
                        bias_language: Optional[torch.Tensor], perm: torch.Tensor, rope_cos: torch.Tensor,
                        rope_sin: torch.Tensor, batch_size: int, seq_len: int, num_heads: int, num_kv_heads: int,
                        backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _qkv_fwd_impl(x, weight_vision, weight_language, offsets, num_vision, bias_vision, bias_language, perm,
                         rope_cos, rope_sin, batch_size, seq_len, num_heads, num_kv_heads, backend)


@_routed_qkv_rope_op.register_fake
def _(x, weight_vision, weight_language, offsets, num_vision, bias_vision, bias_language, perm, rope_cos, rope_sin,
      batch_size, seq_len, num_heads, num_kv_heads, backend):
    hd = weight_vision.shape[0] // (num_heads + 2 * num_kv_heads)
    return (x.new_empty(batch_size, num_heads, seq_len, hd), x.new_empty(batch_size, num_kv_heads, seq_len, hd),
            x.new_empty(batch_size, num_kv_heads, seq_len, hd))


@torch.library.custom_op("vexpert::routed_qkv_rope_backward", mutates_args=())
def _routed_qkv_rope_bwd_op(dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, x: torch.Tensor,
                            weight_vision: torch.Tensor, weight_language: torch.Tensor, offsets: torch.Tensor,
                            num_vision: int, perm: torch.Tensor, rope_cos: torch.Tensor, rope_sin: torch.Tensor,
                            need_dx: bool, need_dw: bool, need_dbv: bool, need_dbl: bool, backend: str,
                            bias_dtype: Optional[torch.dtype]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                       torch.Tensor, torch.Tensor]:
    res = _qkv_bwd_impl(dq, dk, dv, x, weight_vision, weight_language, offsets, num_vision, perm, rope_cos,
                        rope_sin, need_dx, need_dw, need_dbv, need_dbl, backend, bias_dtype)
    dbv, dbl = [(t.to(bias_dtype) if t is not None and bias_dtype is not None else t) for t in res[3:]]
    return _none_to_empty((res[0], res[1], res[2], dbv, dbl), x)


@_routed_qkv_rope_bwd_op.register_fake
def _(dq, dk, dv, x, weight_vision, weight_language, offsets, num_vision, perm, rope_cos, rope_sin, need_dx,
      need_dw, need_dbv, need_dbl, backend, bias_dtype):
    return _linear_bwd_fake(x, weight_vision, weight_language, need_dx, need_dw, need_dbv, need_dbl, bias_dtype)


def _linear_bwd_fake(x, wv, wl, need_dx, need_dw, need_dbv, need_dbl, bias_dtype):
    N, K = wv.shape
    e = x.new_empty(0)
    bd = bias_dtype or torch.float32
    return (x.new_empty(x.shape) if need_dx else e, wv.new_empty(N, K) if need_dw else e,
            wl.new_empty(N, K) if need_dw else e,
            x.new_empty(N, dtype=bd) if need_dbv else e, x.new_empty(N, dtype=bd) if need_dbl else e)


def _routed_qkv_setup(ctx, inputs, output):
    (x, wv, wl, offsets, nv, bv, bl, perm, cos, sin, B, L, H, KV, backend) = inputs
    ctx.save_for_backward(x, wv, wl, offsets, perm, cos, sin)
    ctx.nv, ctx.backend = nv, backend
    ctx.bias_dtype = bv.dtype if bv is not None else (bl.dtype if bl is not None else None)


def _routed_qkv_backward(ctx, dq, dk, dv):
    x, wv, wl, offsets, perm, cos, sin = ctx.saved_tensors
    ni = ctx.needs_input_grad
    dx, dwv, dwl, dbv, dbl = _routed_qkv_rope_bwd_op(dq, dk, dv, x, wv, wl, offsets, ctx.nv, perm, cos, sin,
                                                     bool(ni[0]), bool(ni[1] or ni[2]), bool(ni[5]), bool(ni[6]),
                                                     ctx.backend, ctx.bias_dtype)
    return (dx if ni[0] else None, dwv if ni[1] else None, dwl if ni[2] else None, None, None,
            dbv if ni[5] else None, dbl if ni[6] else None) + (None,) * 8


_routed_qkv_rope_op.register_autograd(_routed_qkv_backward, setup_context=_routed_qkv_setup)

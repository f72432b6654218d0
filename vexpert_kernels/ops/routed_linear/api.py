"""Public functions: argument checks, backend selection, then the custom ops."""
from __future__ import annotations

import os
from typing import Optional

import torch

from ..._triton_compat import require_triton, triton_usable_for
from ...validation import check_choice, check_positive_finite, check_positive_int, check_tensor
from .custom_ops import (_linear_fwd_impl, _qkv_fwd_impl, _routed_linear_op, _routed_qkv_rope_op, _routed_swiglu_op,
                         _swiglu_fwd_impl)
from .rope import _rope_cos_sin, _rope_inv_freq
from .torch_impl import _grouped_mm_available, _grouped_mm_fwd
from .mlp import _routed_swiglu_mlp_op
from .tuning import TUNE_PREFIX, _extra_candidates, make_key, triton_configs
from .tuning import select as tune_select

BACKENDS = ("auto", "triton", "torch", "grouped_mm")
ENV_BACKEND = "VEXPERT_GEMM_BACKEND"

# Path actually used by the last call of each public op (observable for users and tests; see last_backend()).
_LAST_BACKEND: dict = {}


def last_backend(op: str = "routed_linear") -> Optional[str]:
    """The backend name the last call of ``op`` ("routed_linear" | "routed_swiglu" | "routed_qkv_rope" |
    "routed_swiglu_mlp": "<up-half backend>+<down backend>" when they differ) ran:
    "torch", "grouped_mm", "triton", "triton:<config>" or a registered launcher's "<prefix>:<config>"; a leading
    "auto/" means the forward was tuned and the backward tunes its dX / dW GEMMs. None before the first call."""
    check_choice("op", op, ("routed_linear", "routed_swiglu", "routed_qkv_rope", "routed_swiglu_mlp"))
    return _LAST_BACKEND.get(op)


def select_backend(backend: str, x: torch.Tensor, op: str = "linear", N: int = 0, K: int = 0) -> str:
    """Resolve ``backend`` for one call.

    Explicit names win. ``"auto"`` first honours the environment variable ``VEXPERT_GEMM_BACKEND`` (one of
    BACKENDS; anything else raises), then: on CUDA returns ``"auto"`` (the caller tunes: ``autotune.select`` over
    torch / grouped_mm / Triton configs / registered launchers, static choice torch); on CPU our Triton kernels
    through the interpreter when it is on (how CI tests them), else torch.
    """
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, one of {list(BACKENDS)}, got {type(backend).__name__}")
    check_choice("backend", backend, BACKENDS)
    if backend == "auto":
        env = os.environ.get(ENV_BACKEND, "").strip().lower()
        if env and env != "auto":
            check_choice(ENV_BACKEND, env, BACKENDS)
            backend = env
    if backend == "auto":
        if x.is_cuda:
            return "auto"
        return "triton" if triton_usable_for(x) else "torch"
    if backend == "triton":
        require_triton("backend='triton'")
        if not triton_usable_for(x):
            raise ValueError(f"backend='triton' needs a CUDA tensor (or TRITON_INTERPRET=1 for CPU), x is on {x.device}")
    if backend == "grouped_mm":
        if op != "linear":
            raise ValueError(f"backend='grouped_mm' only implements routed_linear, not {op}")
        if not _grouped_mm_available(x.device):
            raise ValueError("backend='grouped_mm' needs torch._grouped_mm and a CUDA device with compute "
                             "capability >= 9.0")
    return backend


# ---------------------------------------------------------------------------------------------- auto: tuning
def _candidates(names, run):
    return {n: (lambda n=n: run(n)) for n in names}


def _tune_linear(x, wv, wl, plan, bv, bl, residual, run_x=None) -> str:
    """run_x: the input is produced lazily by ``run_x()`` (x then only gives shape, dtype and device): the fused
    MLP tunes its down projection before its SwiGLU output exists."""
    T, K = x.shape
    N = wv.shape[0]
    nv, offs = plan.num_vision, plan.expert_offsets
    names = ["torch"]
    if _grouped_mm_available(x.device) and x.dtype == torch.bfloat16:
        names.append("grouped_mm")
    if triton_usable_for(x):
        names += list(triton_configs("routed_linear_residual" if residual is not None else "routed_linear",
                                     x.device, x.dtype))
    names += [f"{ln.prefix}:{c}" for ln in _extra_candidates for c in ln.configs("routed_linear", x, wv)]
    cands = _candidates(names, lambda n: _linear_fwd_impl(x if run_x is None else run_x(), wv, wl, offs, nv, bv, bl,
                                                          residual, n))
    key = make_key(x.dtype, N, K, "residual" if residual is not None else "linear",
                   bv is not None or bl is not None, residual is not None, T)
    return tune_select("routed_linear", key, cands, cands["torch"], x.dtype)


def _tune_swiglu(x, gv, uv, gl, ul, plan, recompute) -> str:
    T, K = x.shape
    names = ["torch"] + (list(triton_configs("routed_swiglu", x.device, x.dtype)) if triton_usable_for(x) else [])
    cands = _candidates(names, lambda n: _swiglu_fwd_impl(x, gv, uv, gl, ul, plan.expert_offsets, plan.num_vision,
                                                          not recompute, n))
    key = make_key(x.dtype, gv.shape[0], K, "swiglu" if recompute else "swiglu_save", False, False, T)
    return tune_select("routed_swiglu", key, cands, cands["torch"], x.dtype)


def _qkv_extra_configs(ln, x, wv, H, KV) -> dict:
    """A registered launcher's QKV configs for this head layout; {} for a launcher without a QKV kernel."""
    try:
        return ln.configs("routed_qkv_rope", x, wv, num_heads=H, num_kv_heads=KV)
    except TypeError:  # configs(op, x, w) without the head keywords: no QKV kernel there
        return {}


def _tune_qkv(x, wv, wl, plan, bv, bl, cos, sin, H, KV) -> str:
    T, K = x.shape
    N = wv.shape[0]
    names = ["torch"] + (list(triton_configs("routed_qkv_rope", x.device, x.dtype)) if triton_usable_for(x) else [])
    # registered launchers (sm_90 TMA kernel: only where gemm_reason allows and its tiles fit the head layout)
    names += [f"{ln.prefix}:{c}" for ln in _extra_candidates for c in _qkv_extra_configs(ln, x, wv, H, KV)]
    cands = _candidates(names, lambda n: _qkv_fwd_impl(x, wv, wl, plan.expert_offsets, plan.num_vision, bv, bl,
                                                       plan.perm, cos, sin, plan.batch_size, plan.seq_len, H, KV, n))
    key = make_key(x.dtype, N, K, f"qkv_rope_hd{N // (H + 2 * KV)}_h{H}_kv{KV}", bv is not None or bl is not None,
                   False, T)
    return tune_select("routed_qkv_rope", key, cands, cands["torch"], x.dtype)


_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_tensor(t, name, shape, dtype, device, allow_none=False):
    """validation.check_tensor with x's dtype and device; any strides are accepted (see _dense)."""
    return check_tensor(name, t, shape=shape, dtypes=(dtype,), device=device, allow_none=allow_none)


def _dense(t):
    """Unit column stride (kernels take row strides only): a copy only for column-strided views."""
    return t if t is None or t.stride(-1) == 1 or t.numel() <= 1 else t.contiguous()


def _check_gate_up(x, gate_vision, up_vision, gate_language, up_language):
    """-> (I, K, (gv, uv, gl, ul)): the four SwiGLU [I, K] weights checked against x [T, K] and each other."""
    I, K = _weight_shape(gate_vision, "gate_vision")
    if K != x.shape[1]:
        raise ValueError(f"gate_vision must have shape [I, K={x.shape[1]}] to match x, got {tuple(gate_vision.shape)}")
    return I, K, _check_weights([("gate_vision", gate_vision), ("up_vision", up_vision),
                                 ("gate_language", gate_language), ("up_language", up_language)], I, K, x)


def _check_x_plan(x, plan):
    check_tensor("x", x, dims=(2,), dtypes=_DTYPES)
    if not hasattr(plan, "expert_offsets") or not hasattr(plan, "perm"):
        raise TypeError(f"plan must be a vexpert_kernels.RoutingPlan, got {type(plan).__name__}")
    if x.shape[0] != plan.perm.shape[0]:
        raise ValueError(f"x must have T={plan.perm.shape[0]} rows (the plan's B*L, routed order), "
                         f"got {x.shape[0]}")
    if plan.expert_offsets.device != x.device:
        raise ValueError(f"plan is on {plan.expert_offsets.device} but x is on {x.device}")
    return _dense(x)


def _check_weights(pairs, N, K, x):
    for name, w in pairs:
        _check_tensor(w, name, (N, K), x.dtype, x.device)
    return [_dense(w) for _, w in pairs]


def _weight_shape(w, name):
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor [N, K], got {type(w).__name__}")
    if w.dim() != 2:
        raise ValueError(f"{name} must be 2-D [N, K] (nn.Linear layout), got shape {tuple(w.shape)}")
    return w.shape


def _nv_for(backend, plan) -> int:
    # the torch path (also a candidate of every tuned call) slices on the host: one cached sync per plan
    return plan.num_vision if backend == "torch" or backend.startswith(TUNE_PREFIX) else -1


# ============================================================================================== public API
def routed_linear(x, weight_vision, weight_language, plan, *, bias_vision=None, bias_language=None, residual=None,
                  backend: str = "auto") -> torch.Tensor:
    """Routed linear: ``out[r] = residual[r] + x[r] @ W_e^T + b_e`` with e the expert of routed row r.

    Args:
        x: [T, K] rows in routed order (``plan.perm``), float32/float16/bfloat16.
        weight_vision, weight_language: [N, K] each (nn.Linear layout; separate tensors, never stacked).
        plan: the RoutingPlan (uses ``plan.expert_offsets`` on device; the torch backend uses ``plan.num_vision``).
        bias_vision, bias_language: [N] or None, per expert.
        residual: [T, N] or None, added in the epilogue (fp32 add). Gradient = dY.
        backend: "auto" | "triton" | "torch" | "grouped_mm".
    Returns: [T, N] in x.dtype, routed order.
    """
    x = _check_x_plan(x, plan)
    N, K = _weight_shape(weight_vision, "weight_vision")
    if K != x.shape[1]:
        raise ValueError(f"weight_vision must have shape [N, K={x.shape[1]}] to match x, got {tuple(weight_vision.shape)}")
    wv, wl = _check_weights([("weight_vision", weight_vision), ("weight_language", weight_language)], N, K, x)
    _check_tensor(bias_vision, "bias_vision", (N,), x.dtype, x.device, allow_none=True)
    _check_tensor(bias_language, "bias_language", (N,), x.dtype, x.device, allow_none=True)
    _check_tensor(residual, "residual", (x.shape[0], N), x.dtype, x.device, allow_none=True)
    bv, bl, residual = _dense(bias_vision), _dense(bias_language), _dense(residual)  # strided views: copies
    be = select_backend(backend, x, "linear", N, K)
    if be == "auto":
        be = _tune_linear(x, wv, wl, plan, bv, bl, residual)
        be = be if be == "grouped_mm" else TUNE_PREFIX + be
    _LAST_BACKEND["routed_linear"] = be
    if be == "grouped_mm":  # differentiable through torch's own grouped_mm autograd
        return _grouped_mm_fwd(x, wv, wl, plan.expert_offsets, bv, bl, residual)
    return _routed_linear_op(x, wv, wl, plan.expert_offsets, _nv_for(be, plan), bv, bl, residual, be)


def routed_swiglu(x, gate_vision, up_vision, gate_language, up_language, plan, *, recompute: bool = False,
                  backend: str = "auto"):
    """Routed SwiGLU MLP input half: ``silu(x @ Wg_e^T) * (x @ Wu_e^T)``.

    Args:
        x: [T, K] routed order; gate_*/up_*: [I, K] each per expert (HF gate_proj / up_proj weights, no bias).
        recompute: memory/compute trade of the backward.
            False (default): the forward kernel also writes the gate and up pre-activations ``[T, 2I]`` (saved for
            backward, x.dtype); the backward is one elementwise pass (dgate, dup) + ONE grouped GEMM
            dX = [dgate | dup] [Wg ; Wu] with K = 2I + the two weight gradients. No GEMM is recomputed.
            True: saves only x and the weights (2*T*I fewer elements kept alive per layer); the backward recomputes
            gate/up in one two-accumulator GEMM whose epilogue writes dgate, dup (+2*T*I*K FLOPs, ~a third more
            backward GEMM work).
        backend: "auto" | "triton" | "torch" (see ``routed_linear``).
    Returns: [T, I] in x.dtype. The Triton kernel computes gate and up tiles from the same X tile (two accumulators).
    """
    x = _check_x_plan(x, plan)
    I, K, (gv, uv, gl, ul) = _check_gate_up(x, gate_vision, up_vision, gate_language, up_language)
    if not isinstance(recompute, bool):
        raise TypeError(f"recompute must be a bool, got {type(recompute).__name__}")
    be = select_backend(backend, x, "swiglu", I, K)
    if be == "auto":
        be = TUNE_PREFIX + _tune_swiglu(x, gv, uv, gl, ul, plan, recompute)
    _LAST_BACKEND["routed_swiglu"] = be
    return _routed_swiglu_op(x, gv, uv, gl, ul, plan.expert_offsets, _nv_for(be, plan), recompute, be)[0]


def routed_qkv_rope(x, weight_vision, weight_language, plan, *, num_heads: int, num_kv_heads: int,
                    rope_theta: Optional[float] = None, bias_vision=None, bias_language=None, positions=None,
                    position_dtype=None, rope_cos_sin=None, backend: str = "auto"):
    """Routed QKV projection + RoPE + split + un-permute, fused.

    Args:
        x: [T, D] routed order. weight_*: [(H + 2*KV) * hd, D] (HF column order q | k | v). bias_*: [N] or None.
        num_heads (H), num_kv_heads (KV, GQA), rope_theta: RoPE base; head_dim hd = N / (H + 2*KV).
        positions: [T] position of each routed row (default ``plan.routed_position_ids``).
        position_dtype: e.g. torch.bfloat16 rounds positions through that dtype first (HF's bf16 table quirk).
        rope_cos_sin: optional precomputed table ``(cos, sin)``, each fp32 [T, hd/2] in routed order (row i holds
            cos/sin of the angles of routed row i) — e.g. built once per forward from an HF rotary module's own
            ``inv_freq`` (see ``RoutingPlan``). When given, ``rope_theta``, ``positions`` and ``position_dtype`` are
            not used. Exactly one of ``rope_theta`` / ``rope_cos_sin`` must be given.
    Returns: q [B, H, L, hd], k [B, KV, L, hd], v [B, KV, L, hd] in sequence order (row i of x lands at sequence
    position ``plan.perm[i]``), RoPE (GPT-NeoX half rotation, fp32 cos/sin) applied to q and k.
    """
    x = _check_x_plan(x, plan)
    check_positive_int("num_heads", num_heads)
    check_positive_int("num_kv_heads", num_kv_heads)
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    if (rope_theta is None) == (rope_cos_sin is None):
        raise ValueError("routed_qkv_rope needs exactly one of rope_theta= (RoPE base) or rope_cos_sin= (a "
                         f"precomputed (cos, sin) table), got rope_theta={rope_theta!r} and rope_cos_sin="
                         f"{'None' if rope_cos_sin is None else 'a table'}")
    if rope_theta is not None:
        check_positive_finite("rope_theta", rope_theta)
    N, K = _weight_shape(weight_vision, "weight_vision")
    if K != x.shape[1]:
        raise ValueError(f"weight_vision must have shape [N, K={x.shape[1]}] to match x, got {tuple(weight_vision.shape)}")
    heads = num_heads + 2 * num_kv_heads
    if N % heads or (N // heads) % 2:
        raise ValueError(f"weight_vision has N={N} rows, which is not (num_heads + 2*num_kv_heads)={heads} times an "
                         "even head_dim")
    hd = N // heads
    wv, wl = _check_weights([("weight_vision", weight_vision), ("weight_language", weight_language)], N, K, x)
    _check_tensor(bias_vision, "bias_vision", (N,), x.dtype, x.device, allow_none=True)
    _check_tensor(bias_language, "bias_language", (N,), x.dtype, x.device, allow_none=True)
    bv, bl = _dense(bias_vision), _dense(bias_language)
    if rope_cos_sin is not None:
        if not isinstance(rope_cos_sin, (tuple, list)) or len(rope_cos_sin) != 2:
            raise TypeError(f"rope_cos_sin must be a (cos, sin) pair, got {type(rope_cos_sin).__name__}")
        cos, sin = (check_tensor(n, t, shape=(x.shape[0], hd // 2), dtypes=(torch.float32,), device=x.device)
                    for n, t in zip(("rope_cos_sin[0] (cos)", "rope_cos_sin[1] (sin)"), rope_cos_sin))
    else:
        if positions is None:
            positions = plan.routed_position_ids
        if not isinstance(positions, torch.Tensor) or tuple(positions.shape) != (x.shape[0],):
            raise ValueError(f"positions must be a tensor [T={x.shape[0]}] in routed order, got "
                             f"{getattr(positions, 'shape', type(positions).__name__)}")
        if positions.dtype == torch.bool or positions.is_complex():
            raise TypeError(f"positions must be an integer or floating tensor, got {positions.dtype}")
        if positions.device != x.device:
            raise ValueError(f"positions is on {positions.device} but x is on {x.device}")
        if position_dtype is not None:
            if not isinstance(position_dtype, torch.dtype) or not position_dtype.is_floating_point:
                raise TypeError(f"position_dtype must be a floating torch.dtype or None, got {position_dtype!r}")
            positions = positions.to(position_dtype)
        cos, sin = _rope_cos_sin(positions.to(torch.float32), _rope_inv_freq(hd, float(rope_theta), x.device))
    cos, sin = cos.contiguous(), sin.contiguous()
    be = select_backend(backend, x, "qkv_rope", N, K)
    if be == "auto":
        be = TUNE_PREFIX + _tune_qkv(x, wv, wl, plan, bv, bl, cos, sin, num_heads, num_kv_heads)
    _LAST_BACKEND["routed_qkv_rope"] = be
    B, L = plan.batch_size, plan.seq_len
    return _routed_qkv_rope_op(x, wv, wl, plan.expert_offsets, _nv_for(be, plan), bv, bl, plan.perm, cos, sin, B, L,
                               num_heads, num_kv_heads, be)


def routed_swiglu_mlp(x, gate_vision, up_vision, down_vision, gate_language, up_language, down_language, plan, *,
                      residual=None, recompute: bool = False, backend: str = "auto"):
    """The routed SwiGLU MLP in one op: ``residual + down_e(silu(x Wg_e^T) * (x Wu_e^T))``.

    Same result as ``routed_linear(routed_swiglu(x, ...), down_vision, down_language, plan, residual=residual)``;
    the difference is the backward: the SwiGLU backward runs in the epilogue of the down projection's dX GEMM
    (it writes [dgate | dup] straight from the dh tile, so dh [T, I] never goes to memory), then ONE dX GEMM over
    K = 2I and the weight gradients follow.

    Args:
        x: [T, K] rows in routed order, float32/float16/bfloat16.
        gate_vision, up_vision, gate_language, up_language: [I, K] each (HF gate_proj / up_proj, no bias).
        down_vision, down_language: [D, I] each (HF down_proj, no bias).
        plan: the RoutingPlan.
        residual: [T, D] or None, added in the down projection's epilogue. Gradient = dY.
        recompute: False (default) saves h [T, I] and the gate/up pre-activations [T, 2I] (x.dtype) and fuses the
            SwiGLU backward as above; True saves h but not gate/up, and the backward recomputes them in a GEMM
            (the two-op path: dh goes to memory).
        backend: "auto" | "triton" | "torch" (see ``routed_linear``; no "grouped_mm").
    Returns: [T, D] in x.dtype, routed order. Raises TypeError/ValueError naming the argument on bad input.
    """
    x = _check_x_plan(x, plan)
    I, K, (gv, uv, gl, ul) = _check_gate_up(x, gate_vision, up_vision, gate_language, up_language)
    D, I2 = _weight_shape(down_vision, "down_vision")
    if I2 != I:
        raise ValueError(f"down_vision must have shape [D, I={I}] (I = gate_vision's rows), got "
                         f"{tuple(down_vision.shape)}")
    dv, dl = _check_weights([("down_vision", down_vision), ("down_language", down_language)], D, I, x)
    _check_tensor(residual, "residual", (x.shape[0], D), x.dtype, x.device, allow_none=True)
    residual = _dense(residual)
    if not isinstance(recompute, bool):
        raise TypeError(f"recompute must be a bool, got {type(recompute).__name__}")
    be_up = be_down = select_backend(backend, x, "swiglu", I, K)
    nv, offs = plan.num_vision if be_up == "auto" else None, plan.expert_offsets
    if be_up == "auto":
        be_up = _tune_swiglu(x, gv, uv, gl, ul, plan, recompute)
        memo = []

        def h_now():  # the down projection's input, computed only if its key is tuned now
            if not memo:
                memo.append(_swiglu_fwd_impl(x, gv, uv, gl, ul, offs, nv, False, be_up)[0])
            return memo[0]
        be_down = _tune_linear(x.new_empty(x.shape[0], I), dv, dl, plan, None, None, residual, run_x=h_now)
        be_up, be_down = TUNE_PREFIX + be_up, TUNE_PREFIX + be_down
    _LAST_BACKEND["routed_swiglu_mlp"] = be_up if be_up == be_down else f"{be_up}+{be_down}"
    return _routed_swiglu_mlp_op(x, gv, uv, gl, ul, dv, dl, offs, _nv_for(be_up, plan), residual, recompute, be_up,
                                 be_down)[0]

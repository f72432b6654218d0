"""Public functions: argument checks, backend selection, then the custom ops."""
from __future__ import annotations

import os
from typing import Optional

import torch

from ..._triton_compat import require_triton, triton_usable_for
from ...validation import check_positive_finite, check_tensor
from .custom_ops import _routed_linear_op, _routed_qkv_rope_op, _routed_swiglu_op
from .rope import _rope_cos_sin, _rope_inv_freq
from .torch_impl import _grouped_mm_available, _grouped_mm_fwd

BACKENDS = ("auto", "triton", "torch", "grouped_mm")

# Measured dispatch table for backend="auto": (op, shape class) -> backend. Empty until GPU measurements
# (benchmarks/) fill it; an entry "torch" makes auto skip Triton where Triton was measured slower.
# Keys: ("linear" | "linear_bias" | "linear_residual" | "swiglu" | "qkv_rope", _shape_class(T, N, K), device cc major).
_MEASURED_BACKEND: dict = {}


def _shape_class(T: int, N: int, K: int) -> str:
    def b(v):
        return "s" if v < 1024 else ("m" if v < 8192 else "l")
    return f"T{b(T)}N{b(N)}K{b(K)}"


def select_backend(backend: str, x: torch.Tensor, op: str, N: int, K: int, *, triton_ok: bool = True) -> str:
    """Resolve ``backend`` for one call. Explicit names win; "auto" honours VEXPERT_GEMM_BACKEND, then the measured
    table (never a backend measured slower), then Triton where usable, else torch."""
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        env = os.environ.get("VEXPERT_GEMM_BACKEND", "").strip().lower()
        if env and env != "auto":
            if env not in BACKENDS:
                raise ValueError(f"VEXPERT_GEMM_BACKEND must be one of {BACKENDS}, got {env!r}")
            backend = env
    if backend == "auto":
        if not (triton_ok and triton_usable_for(x)):
            return "torch"
        cc = torch.cuda.get_device_capability(x.device)[0] if x.is_cuda else 0
        measured = _MEASURED_BACKEND.get((op, _shape_class(x.shape[0], N, K), cc))
        return measured or "triton"
    if backend == "triton":
        require_triton("backend='triton'")
        if not triton_usable_for(x):
            raise ValueError(f"backend='triton' needs a CUDA tensor (or TRITON_INTERPRET=1 for CPU), x is on {x.device}")
        if not triton_ok:
            raise ValueError(f"backend='triton' does not support this {op} call (see the docstring), use 'torch'")
    if backend == "grouped_mm":
        if op != "linear":
            raise ValueError(f"backend='grouped_mm' only implements routed_linear, not {op}")
        if not _grouped_mm_available(x.device):
            raise ValueError("backend='grouped_mm' needs torch._grouped_mm and a CUDA device with compute "
                             "capability >= 9.0")
    return backend


_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_tensor(t, name, shape, dtype, device, allow_none=False):
    if t is None:
        if allow_none:
            return
        raise TypeError(f"{name} must be a torch.Tensor, got None")
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor{' or None' if allow_none else ''}, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype} (same as x), got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but x is on {device}")


def _check_x_plan(x, plan):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor [T, K], got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [T, K] in routed order, got shape {tuple(x.shape)}")
    if x.dtype not in _DTYPES:
        raise TypeError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    if not hasattr(plan, "expert_offsets") or not hasattr(plan, "perm"):
        raise TypeError(f"plan must be a vexpert_kernels.RoutingPlan, got {type(plan).__name__}")
    if x.shape[0] != plan.perm.shape[0]:
        raise ValueError(f"x must have T={plan.perm.shape[0]} rows (the plan's B*L, routed order), "
                         f"got {x.shape[0]}")
    if plan.expert_offsets.device != x.device:
        raise ValueError(f"plan is on {plan.expert_offsets.device} but x is on {x.device}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    return x


def _check_weights(pairs, N, K, x):
    for name, w in pairs:
        _check_tensor(w, name, (N, K), x.dtype, x.device)
    return [w if w.stride(-1) == 1 else w.contiguous() for _, w in pairs]


def _weight_shape(w, name):
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor [N, K], got {type(w).__name__}")
    if w.dim() != 2:
        raise ValueError(f"{name} must be 2-D [N, K] (nn.Linear layout), got shape {tuple(w.shape)}")
    return w.shape


def _nv_for(backend, plan) -> int:
    return plan.num_vision if backend == "torch" else -1  # the torch path slices on the host (one cached sync)


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
    if residual is not None and residual.stride(-1) != 1:
        residual = residual.contiguous()
    op = "linear_residual" if residual is not None else (
        "linear_bias" if (bias_vision is not None or bias_language is not None) else "linear")
    be = select_backend(backend, x, "linear" if backend == "grouped_mm" else op, N, K)
    if be == "grouped_mm":  # differentiable through torch's own grouped_mm autograd
        return _grouped_mm_fwd(x, wv, wl, plan.expert_offsets, bias_vision, bias_language, residual)
    return _routed_linear_op(x, wv, wl, plan.expert_offsets, _nv_for(be, plan), bias_vision, bias_language,
                             residual, be)


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
    I, K = _weight_shape(gate_vision, "gate_vision")
    if K != x.shape[1]:
        raise ValueError(f"gate_vision must have shape [I, K={x.shape[1]}] to match x, got {tuple(gate_vision.shape)}")
    gv, uv, gl, ul = _check_weights([("gate_vision", gate_vision), ("up_vision", up_vision),
                                     ("gate_language", gate_language), ("up_language", up_language)], I, K, x)
    if not isinstance(recompute, bool):
        raise TypeError(f"recompute must be a bool, got {type(recompute).__name__}")
    be = select_backend(backend, x, "swiglu", I, K)
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
    for name, v in (("num_heads", num_heads), ("num_kv_heads", num_kv_heads)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
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
        if positions.device != x.device:
            raise ValueError(f"positions is on {positions.device} but x is on {x.device}")
        if position_dtype is not None:
            if not isinstance(position_dtype, torch.dtype) or not position_dtype.is_floating_point:
                raise TypeError(f"position_dtype must be a floating torch.dtype or None, got {position_dtype!r}")
            positions = positions.to(position_dtype)
        cos, sin = _rope_cos_sin(positions.to(torch.float32), _rope_inv_freq(hd, float(rope_theta), x.device))
    be = select_backend(backend, x, "qkv_rope", N, K)
    B, L = plan.batch_size, plan.seq_len
    return _routed_qkv_rope_op(x, wv, wl, plan.expert_offsets, _nv_for(be, plan), bias_vision, bias_language,
                               plan.perm, cos.contiguous(), sin.contiguous(), B, L, num_heads, num_kv_heads, be)

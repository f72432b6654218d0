"""RMSNorm with the HF casting, optionally fused with the permute into routed order.

    y = (w * (x32 * rsqrt(mean(x32^2) + eps))).to(x.dtype)        (COGVLM_SPEC: fp32 math, one rounding)

Backends: ``"cuda"`` (csrc/rmsnorm_permute.cu via ctypes), ``"triton"`` (the kernels below; CPU tensors run them
through the interpreter), ``"torch"`` (plain PyTorch, also the reference). ``"auto"`` picks cuda -> triton -> torch
for CUDA tensors and torch on CPU. All backends have autograd; dW is deterministic (per-program fp32 partial sums
reduced in a fixed order, no atomics). rstd (fp32, one per input row) is the only extra tensor saved.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .._triton_compat import HAS_TRITON, interpret_mode, tl, triton, triton_usable_for

_BACKENDS = ("auto", "cuda", "triton", "torch")
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# ---------------------------------------------------------------------------------------------------- kernels
if HAS_TRITON:
    @triton.jit
    def _rmsnorm_fwd_kernel(X, W, Y, RSTD, DST, D, eps, HAS_DST: tl.constexpr, BLOCK_D: tl.constexpr):
        # one program per row: a row of D <= 16K fits in registers, so x is read once
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK_D)
        mask = cols < D
        x = tl.load(X + row * D + cols, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.math.rsqrt(tl.sum(x * x, axis=0) / D + eps)
        y = w * (x * rstd)  # HF: weight * (x32 * rstd) in fp32, then one cast
        if HAS_DST:
            out_row = tl.load(DST + row).to(tl.int64)
        else:
            out_row = row
        tl.store(Y + out_row * D + cols, y.to(Y.dtype.element_ty), mask=mask)
        tl.store(RSTD + row, rstd)

    @triton.jit
    def _rmsnorm_bwd_kernel(DY, X, W, RSTD, DST, DX, DW_PART, R, D, rows_per_prog,
                            HAS_DST: tl.constexpr, BLOCK_D: tl.constexpr):
        # program p owns rows [p*rpp, (p+1)*rpp): dX per row, dW summed in fp32 registers then stored as a partial
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK_D)
        mask = cols < D
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        r0 = pid.to(tl.int64) * rows_per_prog  # int64 offsets: R * D may exceed 2^31
        for i in range(0, rows_per_prog):
            row = r0 + i
            ok = row < R  # the last program may own fewer rows
            m = mask & ((cols * 0 + row) < R)  # full-width mask (the interpreter rejects a broadcast scalar)
            if HAS_DST:
                src = tl.load(DST + row, mask=ok, other=0).to(tl.int64)
            else:
                src = row
            rstd = tl.load(RSTD + row, mask=ok, other=0.0)
            xh = tl.load(X + row * D + cols, mask=m, other=0.0).to(tl.float32) * rstd
            dy = tl.load(DY + src * D + cols, mask=m, other=0.0).to(tl.float32)
            g = dy * w
            c = tl.sum(g * xh, axis=0) / D
            tl.store(DX + row * D + cols, (rstd * (g - xh * c)).to(DX.dtype.element_ty), mask=m)
            acc += dy * xh
        tl.store(DW_PART + pid.to(tl.int64) * D + cols, acc, mask=mask)


def _block_d(D: int) -> int:
    return triton.next_power_of_2(D)


def _fwd_warps(block_d: int) -> int:
    # ~8 fp32 values per thread on H100/H200: 4096 columns -> 16 warps would be too many schedulers per row; 8 is
    # the usual sweet spot for memory-bound row kernels (Liger / Unsloth pick the same)
    return 4 if block_d <= 2048 else (8 if block_d <= 8192 else 16)


def _bwd_warps(block_d: int) -> int:
    # backward keeps dy, x, w and the dW partial live per column: past 4096 columns 8 warps spill (measured with
    # compile_report: 255 registers + stack at D=5120 on sm_80/sm_90a), so spread the row over 16 warps
    return 4 if block_d <= 1024 else (8 if block_d <= 4096 else 16)


def _triton_fwd(x, weight, eps, dst):
    R, D = x.shape
    y = torch.empty_like(x)
    rstd = torch.empty(R, dtype=torch.float32, device=x.device)
    bd = _block_d(D)
    _rmsnorm_fwd_kernel[(R,)](x, weight, y, rstd, dst if dst is not None else x, D, float(eps),
                              HAS_DST=dst is not None, BLOCK_D=bd, num_warps=_fwd_warps(bd))
    return y, rstd


def _triton_bwd(dy, x, weight, rstd, dst):
    R, D = x.shape
    if x.is_cuda:
        nprog = min(R, 4 * torch.cuda.get_device_properties(x.device).multi_processor_count)
    else:
        nprog = min(R, 4)  # interpreter: few programs, each loops over rows
    rpp = triton.cdiv(R, nprog)
    nprog = triton.cdiv(R, rpp)
    dx = torch.empty_like(x)
    part = torch.empty(nprog, D, dtype=torch.float32, device=x.device)
    bd = _block_d(D)
    _rmsnorm_bwd_kernel[(nprog,)](dy, x, weight, rstd, dst if dst is not None else x, dx, part, R, D, rpp,
                                  HAS_DST=dst is not None, BLOCK_D=bd, num_warps=_bwd_warps(bd))
    # fixed-shape sum over programs: deterministic
    return dx, part.sum(0).to(weight.dtype)


def aot_compile_specs():
    """CompileSpec for every config the Triton dispatcher may pick (auto uses Triton only up to D = 4096)."""
    from .._aot import CompileSpec

    if not HAS_TRITON:
        return []
    specs = []
    ty = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
    for D in (1024, _TRITON_AUTO_MAX_D):  # the widths auto may send to Triton on a GPU (see _pick_backend)
        bd = _block_d(D)
        for xd, wd in ((torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32)):
            for has_dst in (True, False):
                tag = f"D{D},{ty[xd]}x{ty[wd]},{'perm' if has_dst else 'noperm'}"
                specs.append(CompileSpec(
                    name=f"rmsnorm_fwd[{tag}]", fn=_rmsnorm_fwd_kernel,
                    signature={"X": f"*{ty[xd]}", "W": f"*{ty[wd]}", "Y": f"*{ty[xd]}", "RSTD": "*fp32",
                               "DST": "*i64", "D": "i32", "eps": "fp32", "HAS_DST": "constexpr",
                               "BLOCK_D": "constexpr"},
                    constexprs={"HAS_DST": has_dst, "BLOCK_D": bd}, num_warps=_fwd_warps(bd), num_stages=1))
                specs.append(CompileSpec(
                    name=f"rmsnorm_bwd[{tag}]", fn=_rmsnorm_bwd_kernel,
                    signature={"DY": f"*{ty[xd]}", "X": f"*{ty[xd]}", "W": f"*{ty[wd]}", "RSTD": "*fp32",
                               "DST": "*i64", "DX": f"*{ty[xd]}", "DW_PART": "*fp32", "R": "i32", "D": "i32",
                               "rows_per_prog": "i32", "HAS_DST": "constexpr", "BLOCK_D": "constexpr"},
                    constexprs={"HAS_DST": has_dst, "BLOCK_D": bd}, num_warps=_bwd_warps(bd), num_stages=1))
    return specs


# ---------------------------------------------------------------------------------------------------- torch path
def rmsnorm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Plain PyTorch HF RMSNorm (the "torch" backend): fp32 math (float64 stays float64), one cast at the end."""
    dtype = x.dtype
    x32 = x if dtype == torch.float64 else x.to(torch.float32)
    xn = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (weight * xn).to(dtype)


# ---------------------------------------------------------------------------------------------------- custom ops
@torch.library.custom_op("vexpert::rmsnorm_fwd", mutates_args=())
def _rmsnorm_fwd_op(x: torch.Tensor, weight: torch.Tensor, eps: float, dst_index: Optional[torch.Tensor],
                    backend: str) -> Tuple[torch.Tensor, torch.Tensor]:
    if backend == "cuda":
        from .._cuda import rmsnorm_fwd_cuda
        return rmsnorm_fwd_cuda(x, weight, eps, dst_index)
    return _triton_fwd(x, weight, eps, dst_index)


@_rmsnorm_fwd_op.register_fake
def _(x, weight, eps, dst_index, backend):
    return torch.empty_like(x), x.new_empty((x.shape[0],), dtype=torch.float32)


@torch.library.custom_op("vexpert::rmsnorm_bwd", mutates_args=())
def _rmsnorm_bwd_op(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
                    dst_index: Optional[torch.Tensor], backend: str) -> Tuple[torch.Tensor, torch.Tensor]:
    if backend == "cuda":
        from .._cuda import rmsnorm_bwd_cuda
        return rmsnorm_bwd_cuda(dy, x, weight, rstd, dst_index)
    return _triton_bwd(dy, x, weight, rstd, dst_index)


@_rmsnorm_bwd_op.register_fake
def _(dy, x, weight, rstd, dst_index, backend):
    return torch.empty_like(x), torch.empty_like(weight)


def _setup_context(ctx, inputs, output):
    x, weight, eps, dst_index, backend = inputs
    ctx.save_for_backward(x, weight, output[1], dst_index)
    ctx.backend = backend


def _backward(ctx, dy, _drstd):
    x, weight, rstd, dst_index = ctx.saved_tensors
    dx, dw = torch.ops.vexpert.rmsnorm_bwd(dy.contiguous(), x, weight, rstd, dst_index, ctx.backend)
    return dx, dw, None, None, None


_rmsnorm_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------------- dispatch
def _validate(x, weight, eps, name="x"):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if not weight.is_floating_point():
        raise TypeError(f"weight must be a floating-point tensor, got {weight.dtype}")
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"{name} must have a non-empty last dimension, got shape {tuple(x.shape)}")
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"weight must have shape [{x.shape[-1]}] (the last dim of {name}), got {tuple(weight.shape)}")
    if weight.device != x.device:
        raise ValueError(f"weight is on {weight.device} but {name} is on {x.device}")
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not (eps >= 0) or eps == float("inf"):
        raise ValueError(f"eps must be a finite non-negative float, got {eps!r}")


_TRITON_AUTO_MAX_D = 4096


def _kernel_ok(x, weight) -> bool:
    return x.dtype in _KERNEL_DTYPES and (weight.dtype == x.dtype or weight.dtype == torch.float32)


def _pick_backend(backend: str, x: torch.Tensor, weight: torch.Tensor) -> str:
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    D = x.shape[-1]
    if backend == "auto":
        if not x.is_cuda or not _kernel_ok(x, weight) or x.numel() == 0:
            return "torch"
        from .._cuda import cuda_extension_available, rmsnorm_max_dim
        if D <= rmsnorm_max_dim(x.dtype, aligned=False) and cuda_extension_available():
            return "cuda"
        # Triton's backward spills past 4096 columns (compile_report: 128 regs + 80-160 B stack at D=5120 with
        # 16 warps), so auto only picks it where it was checked spill-free
        return "triton" if HAS_TRITON and D <= _TRITON_AUTO_MAX_D else "torch"
    if backend in ("cuda", "triton") and not _kernel_ok(x, weight):
        raise TypeError(f"backend={backend!r} supports x in fp32/fp16/bf16 with weight of x's dtype or fp32, got "
                        f"x {x.dtype}, weight {weight.dtype}")
    if backend == "cuda":
        if not x.is_cuda:
            raise ValueError(f"backend='cuda' needs CUDA tensors, x is on {x.device}")
        from .._cuda import _require_lib, rmsnorm_max_dim
        _require_lib()
        if D > rmsnorm_max_dim(x.dtype, aligned=(D * x.element_size()) % 16 == 0):
            raise ValueError(f"backend='cuda' takes rows up to {rmsnorm_max_dim(x.dtype)} wide, got D={D}")
    if backend == "triton":
        if not triton_usable_for(x):
            raise ValueError(f"backend='triton' cannot run on {x.device} (Triton missing, or a CPU tensor without "
                             "TRITON_INTERPRET=1)")
        if D > 65536:
            raise ValueError(f"backend='triton' takes rows up to 65536 wide, got D={D}")
    return backend


def _run(x2d, weight, eps, dst, backend):
    if x2d.shape[0] == 0:
        return x2d.new_empty(x2d.shape)
    return torch.ops.vexpert.rmsnorm_fwd(x2d.contiguous(), weight.contiguous(), float(eps), dst, backend)[0]


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5, *, backend: str = "auto") -> torch.Tensor:
    """HF RMSNorm. x [..., D], weight [D] -> [..., D] in x's dtype."""
    _validate(x, weight, eps)
    be = _pick_backend(backend, x, weight)
    if be == "torch":
        return rmsnorm_reference(x, weight, eps)
    D = x.shape[-1]
    return _run(x.reshape(-1, D), weight, eps, None, be).reshape(x.shape)


def rmsnorm_routed(x_routed: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5, *,
                   backend: str = "auto") -> torch.Tensor:
    """RMSNorm of rows already in routed order. x_routed [T, D] -> [T, D] (same order)."""
    _validate(x_routed, weight, eps, "x_routed")
    if x_routed.dim() != 2:
        raise ValueError(f"x_routed must have shape [T, D], got {tuple(x_routed.shape)}")
    return rmsnorm(x_routed, weight, eps, backend=backend)


def rmsnorm_permute(x: torch.Tensor, weight: torch.Tensor, eps: float, plan, *, backend: str = "auto") -> torch.Tensor:
    """Fused RMSNorm + permute. x [B, L, D] (or [T, D]) in sequence order -> [T, D] in the plan's routed order
    (row ``plan.inv_perm[s]`` holds norm(x[s])). Backward writes dX in sequence order."""
    _validate(x, weight, eps)
    for attr in ("perm", "inv_perm", "num_tokens"):
        if not hasattr(plan, attr):
            raise TypeError(f"plan must be a RoutingPlan, got {type(plan).__name__}")
    T, D = plan.num_tokens, x.shape[-1]
    if x.dim() == 3 and x.shape[0] * x.shape[1] == T:
        x2d = x.reshape(T, D)
    elif x.dim() == 2 and x.shape[0] == T:
        x2d = x
    else:
        raise ValueError(f"x must have shape [B, L, D] or [T, D] with B*L = T = {T} (the plan's tokens), "
                         f"got {tuple(x.shape)}")
    if plan.inv_perm.device != x.device:
        raise ValueError(f"x is on {x.device} but the plan is on {plan.inv_perm.device}")
    be = _pick_backend(backend, x, weight)
    if be == "torch":
        return rmsnorm_reference(x2d, weight, eps).index_select(0, plan.perm)
    return _run(x2d, weight, eps, plan.inv_perm.contiguous(), be)

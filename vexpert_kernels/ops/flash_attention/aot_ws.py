"""AOT compile specs of the warp-specialised sm_90 forward: every ``_WS_FWD_CONFIGS`` tile (at its head dim 64 /
128) x bf16 (fp16 once) x mask variant. The compile report finds them through ``kernels_ws.aot_compile_specs`` (the
module that owns the kernel; ``python -m vexpert_kernels.compile_report --module vexpert_kernels.ops.flash_attention.kernels_ws
--arch 90``). ``WARP_SPEC=True`` makes the report flag a spec that is not split on sm_90."""
from __future__ import annotations

import torch

from vexpert_kernels._aot import CompileSpec
from vexpert_kernels._triton_compat import HAS_TRITON

from .configs import _block_d
from .configs_ws import _WS_FWD_CONFIGS

if HAS_TRITON:  # the package imports (and uses the PyTorch backends) without Triton
    from .kernels_ws import _attn_fwd_ws_kernel

_STRIDES = ("stride_qb", "stride_qh", "stride_ql", "stride_kb", "stride_kh", "stride_kl", "stride_vb", "stride_vh",
            "stride_vl", "stride_ob", "stride_oh", "stride_ol", "stride_lb", "stride_lh", "stride_ll", "stride_mb",
            "stride_sb", "stride_ib")
# (name, GQA group, varlen, key padding, bidirectional, routed order out); masked = padding, spans or varlen
WS_VARIANTS = {
    False: (("causal", 1, False, False, False, False), ("causal_gqa4_routed", 4, False, False, False, True)),
    True: (("padded_bidir", 1, False, True, True, False), ("varlen_bidir_routed", 1, True, False, True, True)),
}


def ws_fwd_spec(tile, dname: str, hd: int, variant: tuple) -> CompileSpec:
    """The sm_90a compile spec of one warp-specialised forward launch."""
    bm, bn, nw, ns, _kind = tile
    name, group, varlen, kpm, bidir, routed = variant
    sig = {n: "*" + dname for n in ("Q", "K", "V", "O")}
    sig["LSE"] = "*fp32"
    sig.update({n: "*i32" for n in ("CU_Q", "CU_K", "KV_LO", "KV_HI", "SPAN", "SPAN_END", "OIDX")})
    sig["KPM"] = "*i8"
    sig["SPAN"] = "*fp16"  # the ws kernel's span-bound bytes (launch_ws._span_rows)
    sig.update({n: "i32" for n in _STRIDES + ("H", "LQ", "LK", "T_OUT")})
    sig["qk_scale"] = "fp32"
    consts = dict(GROUP=group, HEAD_DIM=hd, BLOCK_D=_block_d(hd), BLOCK_M=bm, BLOCK_N=bn, IS_VARLEN=varlen,
                  HAS_KPM=kpm, BIDIR=bidir, UPCAST=False, PREC="tf32", HAS_OIDX=routed, USE_TMA=True,
                  WARP_SPEC=True)
    sig.update({n: "constexpr" for n in consts})
    sig = {n: sig[n] for n in _attn_fwd_ws_kernel.arg_names}  # ASTSource wants the kernel's argument order
    return CompileSpec(name=f"flash_attn_fwd_ws[sm90x,{name},{dname},hd{hd},{bm}x{bn},w{nw}s{ns},tma,ws]",
                       fn=_attn_fwd_ws_kernel, signature=sig, constexprs=consts, num_warps=nw, num_stages=ns,
                       targets=(90,), expects_tma=True,
                       # row/head/batch strides of q/k/v/o are multiples of 16 elements at head dims 64/128 (the
                       # JIT specialises on that at run time)
                       extra={"divisible_by_16": list(_STRIDES[:12])})


def build_ws_aot_specs() -> list:
    """Every warp-specialised forward config x dtype x head dim x mask variant the tuner may offer (sm_90 only)."""
    if not HAS_TRITON:
        return []
    specs = []
    for (hd, masked), tiles in sorted(_WS_FWD_CONFIGS.items()):
        for tile in tiles:
            for variant in WS_VARIANTS[masked]:
                specs.append(ws_fwd_spec(tile, "bf16", hd, variant))
            if hd == 128:  # fp16 compiles like bf16: once per tile
                specs.append(ws_fwd_spec(tile, "fp16", hd, WS_VARIANTS[masked][0]))
    return specs

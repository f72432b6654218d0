"""Every (kernel, GPU config, epilogue, dtype) the launchers may pick, as compile specs for ``compile_report``.

``aot_compile_specs`` is defined here only (the package ``__init__`` does not re-export it, so the report's module
walk counts each spec once).
"""
from __future__ import annotations

import torch

from ..._triton_compat import HAS_TRITON
from .configs import _GEMM_CONFIGS, _WGRAD_CONFIGS, _qkv_block_n
from .launch import _ELEMENTWISE_BLOCK, _QKV_GATHER_BLOCK_M
from .kernels import EPI_DSWIGLU, EPI_LINEAR, EPI_QKV_ROPE, EPI_SWIGLU, EPI_SWIGLU_BWD

if HAS_TRITON:
    from .kernels import (_qkv_bwd_gather_kernel, _routed_gemm_kernel, _routed_wgrad_kernel,
                          _swiglu_bwd_elementwise_kernel)

_TL_DTYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}

# (epilogue, HAS_BIAS_V, HAS_BIAS_L, HAS_RESIDUAL, HEAD_DIM) variants the launchers produce.
_LINEAR_VARIANTS = (
    ("linear", EPI_LINEAR, False, False, False, 0),          # plain GEMM and every dX GEMM
    ("bias", EPI_LINEAR, True, True, False, 0),
    ("bias_v", EPI_LINEAR, True, False, False, 0),            # CogVLM2: only the vision QKV has a bias
    ("residual", EPI_LINEAR, False, False, True, 0),          # o / down projections, SwiGLU dX second GEMM
)
_QKV_VARIANTS = (  # HEAD_DIM is a constexpr: hd 128 (CogVLM/CogVLM2) in every dtype, other head dims in bf16
    ("qkv_hd128", EPI_QKV_ROPE, False, False, False, 128),
    ("qkv_bias_v_hd128", EPI_QKV_ROPE, True, False, False, 128),
)
_QKV_EXTRA_HD = (  # (bf16 only: the 16-bit kernels differ only in the MMA dtype)
    ("qkv_bias_hd64", EPI_QKV_ROPE, True, True, False, 64),
    ("qkv_bias_v_hd80", EPI_QKV_ROPE, True, False, False, 80),    # hd/2 = 40: padded 64-wide chunk, masked
    ("qkv_bias_v_hd96", EPI_QKV_ROPE, True, False, False, 96),
    ("qkv_hd256", EPI_QKV_ROPE, False, False, False, 256),        # two 64-wide chunks per head half
)
_DUAL_VARIANTS = (("swiglu", EPI_SWIGLU, False, False, False, 0), ("swiglu_bwd", EPI_SWIGLU_BWD, False, False, False, 0),
                  ("swiglu_save", EPI_SWIGLU, False, False, False, 0))   # SAVE_GU: + gate|up stores (default path)
# the down projection's dX with the SwiGLU backward epilogue (transposed weight view): its own table rows
_DSWIGLU_VARIANT = ("dswiglu", EPI_DSWIGLU, False, False, False, 0, "nn")
_FLAGS = {"swiglu_save": {"SAVE_GU": True}, "dx_swiglu": {"SPLIT_K": True}}  # extra constexprs per variant name


def _gemm_signature(dt: str) -> dict:
    p = "*" + dt
    sig = {"x_ptr": p, "wv_ptr": p, "wl_ptr": p, "w2v_ptr": p, "w2l_ptr": p, "bv_ptr": p, "bl_ptr": p,
           "res_ptr": p, "out_ptr": p, "out2_ptr": p, "dh_ptr": p, "offsets_ptr": "*i32", "perm_ptr": "*i64",
           "cos_ptr": "*fp32", "sin_ptr": "*fp32", "k_out_ptr": p, "v_out_ptr": p}
    for name in ("N", "K", "K1", "stride_xm", "stride_xk", "stride_wn", "stride_wk", "stride_om", "stride_rm",
                 "stride_dm", "seq_len", "num_heads", "num_kv_heads", "num_n_tiles", "max_tiles"):
        sig[name] = "i32"
    for name in ("EPILOGUE", "HAS_BIAS_V", "HAS_BIAS_L", "HAS_RESIDUAL", "HEAD_DIM", "BLOCK_M", "BLOCK_N", "BLOCK_K",
                 "GROUP_M", "UPCAST_DOT", "INPUT_PRECISION", "SAVE_GU", "SPLIT_K"):
        sig[name] = "constexpr"
    return sig


def _wgrad_signature(dt: str) -> dict:
    p = "*" + dt
    sig = {"dy_ptr": p, "x_ptr": p, "dwv_ptr": p, "dwl_ptr": p, "dbv_ptr": p, "dbl_ptr": p, "offsets_ptr": "*i32",
           "N": "i32", "K": "i32", "stride_dym": "i32", "stride_xm": "i32"}
    for name in ("HAS_DW", "HAS_DB_V", "HAS_DB_L", "BLOCK_M", "BLOCK_N", "BLOCK_K", "UPCAST_DOT", "INPUT_PRECISION"):
        sig[name] = "constexpr"
    return sig


def aot_compile_specs():
    """Every (kernel, GPU config, epilogue, dtype) the launchers may pick on sm_90 / sm_80, for the compile report."""
    if not HAS_TRITON:
        return []
    from ..._aot import CompileSpec
    specs = []
    for cc, tables in _GEMM_CONFIGS.items():
        for dtype, dt in _TL_DTYPE.items():
            prec = "tf32"
            table = tables["fp32" if dtype == torch.float32 else "16bit"]
            for key, (BM, BN, BK, GM, nw, ns) in table.items():
                dual = key.startswith("dual") or key == "qkv"
                variants = {"qkv": _QKV_VARIANTS + (_QKV_EXTRA_HD if dtype == torch.bfloat16 else ()),
                            "dual_bwd": _DUAL_VARIANTS[1:2]}.get(key, (_DUAL_VARIANTS[0], _DUAL_VARIANTS[2]) if dual
                                                                  else _LINEAR_VARIANTS)
                if key == "large":  # dispatcher: plain forward only (see _gemm_config)
                    variants = tuple(v for v in variants if not v[4])
                if key.startswith("dswiglu"):
                    variants = (_DSWIGLU_VARIANT,)
                elif not dual and key != "large":  # dX = dY W_e: the transposed weight view (stride_wn == 1)
                    variants = variants + (("dx", EPI_LINEAR, False, False, False, 0, "nn"),
                                           ("dx_residual", EPI_LINEAR, False, False, True, 0, "nn"),
                                           ("dx_swiglu", EPI_LINEAR, False, False, False, 0, "nn"))
                for vname, epi, hbv, hbl, hres, hd, *layout in variants:
                    bn = _qkv_block_n(hd, BN) if epi == EPI_QKV_ROPE else BN  # what _launch_gemm passes
                    cfg = dict(EPILOGUE=epi, HAS_BIAS_V=hbv, HAS_BIAS_L=hbl, HAS_RESIDUAL=hres, HEAD_DIM=hd,
                               BLOCK_M=BM, BLOCK_N=bn, BLOCK_K=BK, GROUP_M=GM, UPCAST_DOT=False,
                               INPUT_PRECISION=prec, stride_xk=1, SAVE_GU=False, SPLIT_K=False)
                    cfg.update(_FLAGS.get(vname, {}))
                    # the JIT turns unit strides into constants; mirror it or the AOT code is not what runs
                    cfg["stride_wn" if layout else "stride_wk"] = 1
                    div16 = ["N", "K", "K1", "stride_xm", "stride_om", "stride_rm", "stride_dm",
                             "stride_wk" if layout else "stride_wn"]
                    specs.append(CompileSpec(
                        name=f"routed_gemm[{vname},{dt},{BM}x{bn}x{BK},w{nw}s{ns},sm{cc}]",
                        fn=_routed_gemm_kernel, signature=_gemm_signature(dt), constexprs=cfg, num_warps=nw,
                        num_stages=ns, targets=(cc,), extra={"config": key, "divisible_by_16": div16}))
        for dtype, dt in _TL_DTYPE.items():
            prec = "tf32"
            for key, (BM, BN, BK, nw, ns) in _WGRAD_CONFIGS[cc].items():
                for vname, hdw, hdbv, hdbl in (("dw", True, False, False), ("dw_db", True, True, True),
                                               ("dw_db_v", True, True, False), ("db", False, True, True)):
                    cfg = dict(HAS_DW=hdw, HAS_DB_V=hdbv, HAS_DB_L=hdbl, BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK,
                               UPCAST_DOT=False, INPUT_PRECISION=prec)
                    specs.append(CompileSpec(
                        name=f"routed_wgrad[{vname},{dt},{BM}x{BN}x{BK},w{nw}s{ns},sm{cc}]",
                        fn=_routed_wgrad_kernel, signature=_wgrad_signature(dt), constexprs=cfg, num_warps=nw,
                        num_stages=ns, targets=(cc,),
                        extra={"config": key, "divisible_by_16": ["N", "K", "stride_dym", "stride_xm"]}))
        for dtype, dt in _TL_DTYPE.items():  # SwiGLU backward elementwise pass (saved gate/up)
            BM, BN, nw = _ELEMENTWISE_BLOCK
            sig = {"gu_ptr": "*" + dt, "dh_ptr": "*" + dt, "dgu_ptr": "*" + dt, "T": "i32", "I": "i32",
                   "stride_gm": "i32", "stride_hm": "i32", "stride_om": "i32", "BLOCK_M": "constexpr",
                   "BLOCK_N": "constexpr"}
            specs.append(CompileSpec(
                name=f"swiglu_bwd_elementwise[{dt},{BM}x{BN},w{nw},sm{cc}]", fn=_swiglu_bwd_elementwise_kernel,
                signature=sig, constexprs=dict(BLOCK_M=BM, BLOCK_N=BN), num_warps=nw, num_stages=1, targets=(cc,),
                extra={"divisible_by_16": ["I", "stride_gm", "stride_hm", "stride_om"]}))
        for dtype, dt in _TL_DTYPE.items():  # QKV backward gather + inverse RoPE (hd 128 everywhere, others bf16)
            for hd in (128,) + ((64, 80, 96, 256) if dtype == torch.bfloat16 else ()):
                p = "*" + dt
                sig = {"dq_ptr": p, "dk_ptr": p, "dv_ptr": p, "perm_ptr": "*i64", "cos_ptr": "*fp32",
                       "sin_ptr": "*fp32", "out_ptr": p, "T": "i32", "seq_len": "i32", "num_heads": "i32",
                       "num_kv_heads": "i32", "stride_om": "i32", "HEAD_DIM": "constexpr", "BLOCK_M": "constexpr",
                       "BLOCK_H": "constexpr"}
                bh = 1 << (hd // 2 - 1).bit_length()
                specs.append(CompileSpec(
                    name=f"qkv_bwd_gather[{dt},hd{hd},{_QKV_GATHER_BLOCK_M}x{bh},w4,sm{cc}]", fn=_qkv_bwd_gather_kernel,
                    signature=sig, constexprs=dict(HEAD_DIM=hd, BLOCK_M=_QKV_GATHER_BLOCK_M, BLOCK_H=bh), num_warps=4,
                    num_stages=1, targets=(cc,), extra={"divisible_by_16": ["stride_om"]}))
    # table entries that share a config (e.g. fp32 large/medium/small) compile once
    unique = {}
    for sp in specs:
        unique.setdefault(sp.name, sp)
    return list(unique.values())

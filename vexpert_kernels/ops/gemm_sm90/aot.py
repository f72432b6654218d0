"""AOT compile specs of the sm_90 grouped GEMMs (every GPU config x every variant the launchers produce), for
``python -m vexpert_kernels.compile_report`` and ``tests/test_gemm_sm90.py``. sm_90a only: the kernels are built
on TMA descriptors and wgmma."""
from __future__ import annotations

from ..._triton_compat import HAS_TRITON
from .configs import SM90_CONFIGS, SM90_SWIGLU_CONFIGS, SM90_WGRAD_CONFIGS, SM90Config
from .configs import SM90_DSWIGLU_CONFIGS

# (variant name, B_KMAJOR, HAS_BIAS_V, HAS_BIAS_L, HAS_RESIDUAL). Biases are per-pass constexprs, so "bias" (both
# experts) compiles the same per-pass code as the one-expert variants.
GEMM_VARIANTS = (
    ("fwd", True, False, False, False),
    ("fwd_bias", True, True, True, False),
    ("fwd_bias_v", True, True, False, False),     # CogVLM2: only the vision QKV has a bias
    ("fwd_residual", True, False, False, True),   # o / down projections
    ("dx", False, False, False, False),
)
DTYPES = ("bf16", "fp16")


def gemm_signature(dt: str) -> dict:
    p = "*" + dt
    sig = {"x_ptr": p, "wv_ptr": p, "wl_ptr": p, "bv_ptr": p, "bl_ptr": p, "res_ptr": p, "y_ptr": p,
           "offsets_ptr": "*i32", "C": "i32", "R": "i32", "stride_xm": "i32", "stride_rm": "i32",
           "stride_ym": "i32", "NUM_PROGS": "i32"}
    for name in ("B_KMAJOR", "HAS_BIAS_V", "HAS_BIAS_L", "HAS_RESIDUAL", "BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M",
                 "EPI_SPLIT", "FLATTEN", "WARP_SPEC", "UPCAST_DOT"):
        sig[name] = "constexpr"
    return sig


def wgrad_signature(dt: str) -> dict:
    p = "*" + dt
    sig = {"dy_ptr": p, "x_ptr": p, "dwv_ptr": p, "dwl_ptr": p, "dbv_ptr": "*fp32", "dbl_ptr": "*fp32",
           "offsets_ptr": "*i32", "N": "i32", "K": "i32", "stride_dym": "i32", "stride_xm": "i32", "NUM_PROGS": "i32"}
    for name in ("HAS_DB", "BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "EPI_SPLIT", "FLATTEN", "WARP_SPEC",
                 "UPCAST_DOT"):
        sig[name] = "constexpr"
    return sig


def _tile_constexprs(cfg: SM90Config) -> dict:
    return dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
                EPI_SPLIT=cfg.epi_split, FLATTEN=cfg.flatten, WARP_SPEC=cfg.warp_specialize, UPCAST_DOT=False)


def gemm_spec(cfg: SM90Config, variant: tuple, dt: str = "bf16"):
    from ..._aot import CompileSpec
    from .kernels import _grouped_gemm_sm90_kernel
    vname, kmajor, hbv, hbl, hres = variant
    cx = dict(B_KMAJOR=kmajor, HAS_BIAS_V=hbv, HAS_BIAS_L=hbl, HAS_RESIDUAL=hres, **_tile_constexprs(cfg))
    return CompileSpec(name=f"gemm_sm90[{vname},{dt},{cfg.name}]", fn=_grouped_gemm_sm90_kernel,
                       signature=gemm_signature(dt), constexprs=cx, num_warps=cfg.num_warps,
                       num_stages=cfg.num_stages, targets=(90,), expects_tma=True,
                       extra={"config": cfg.name, "divisible_by_16": ["C", "R", "stride_xm", "stride_rm",
                                                                       "stride_ym"]})


def wgrad_spec(cfg: SM90Config, dt: str = "bf16", dbias: bool = False):
    from ..._aot import CompileSpec
    from .kernels import _grouped_wgrad_sm90_kernel
    cx = dict(HAS_DB=dbias, **_tile_constexprs(cfg))
    if dbias:  # as the launcher: the dbias variant is never warp-specialised (Triton 3.6 / 3.9 drop the split)
        cx["WARP_SPEC"] = False
    return CompileSpec(name=f"wgrad_sm90[{'dbias,' if dbias else ''}{dt},{cfg.name}]", fn=_grouped_wgrad_sm90_kernel,
                       signature=wgrad_signature(dt), constexprs=cx,
                       num_warps=cfg.num_warps,
                       num_stages=cfg.num_stages, targets=(90,), expects_tma=True,
                       extra={"config": cfg.name, "divisible_by_16": ["N", "K", "stride_dym", "stride_xm"]})


def swiglu_signature(dt: str) -> dict:
    p = "*" + dt
    sig = {"x_ptr": p, "gv_ptr": p, "uv_ptr": p, "gl_ptr": p, "ul_ptr": p, "h_ptr": p, "gu_ptr": p,
           "offsets_ptr": "*i32", "I": "i32", "K": "i32", "stride_xm": "i32", "stride_hm": "i32", "stride_gm": "i32",
           "NUM_PROGS": "i32"}
    for name in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "EPI_SPLIT", "FLATTEN", "WARP_SPEC", "UPCAST_DOT"):
        sig[name] = "constexpr"
    return sig


def swiglu_spec(cfg: SM90Config, dt: str = "bf16"):
    from ..._aot import CompileSpec
    from .kernels import _grouped_swiglu_sm90_kernel
    return CompileSpec(name=f"swiglu_sm90[{dt},{cfg.name}]", fn=_grouped_swiglu_sm90_kernel,
                       signature=swiglu_signature(dt), constexprs=_tile_constexprs(cfg), num_warps=cfg.num_warps,
                       num_stages=cfg.num_stages, targets=(90,), expects_tma=True,
                       extra={"config": cfg.name, "divisible_by_16": ["I", "K", "stride_xm", "stride_hm",
                                                                       "stride_gm"]})


def dswiglu_signature(dt: str) -> dict:
    p = "*" + dt
    sig = {"dy_ptr": p, "wv_ptr": p, "wl_ptr": p, "gu_ptr": p, "dgu_ptr": p, "offsets_ptr": "*i32", "I": "i32",
           "D": "i32", "stride_dym": "i32", "stride_gm": "i32", "stride_om": "i32", "NUM_PROGS": "i32"}
    for name in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "EPI_SPLIT", "FLATTEN", "WARP_SPEC", "UPCAST_DOT"):
        sig[name] = "constexpr"
    return sig


def dswiglu_spec(cfg: SM90Config, dt: str = "bf16"):
    """The down projection's dX with the SwiGLU backward epilogue (grouped_dx_dswiglu_sm90)."""
    from ..._aot import CompileSpec
    from .kernels import _grouped_dx_dswiglu_sm90_kernel
    return CompileSpec(name=f"dx_dswiglu_sm90[{dt},{cfg.name}]", fn=_grouped_dx_dswiglu_sm90_kernel,
                       signature=dswiglu_signature(dt), constexprs=_tile_constexprs(cfg), num_warps=cfg.num_warps,
                       num_stages=cfg.num_stages, targets=(90,), expects_tma=True,
                       extra={"config": cfg.name, "divisible_by_16": ["I", "D", "stride_dym", "stride_gm",
                                                                       "stride_om"]})


def aot_compile_specs():
    """bf16: every config x every variant; fp16: the plain forward and dX per config (fp16 differs from bf16 only
    in the wgmma operand type)."""
    if not HAS_TRITON:
        return []
    specs = []
    for cfg in SM90_CONFIGS:
        for v in GEMM_VARIANTS:
            specs.append(gemm_spec(cfg, v, "bf16"))
        for v in (GEMM_VARIANTS[0], GEMM_VARIANTS[-1]):
            specs.append(gemm_spec(cfg, v, "fp16"))
    for cfg in SM90_WGRAD_CONFIGS:
        for dt in DTYPES:
            specs.append(wgrad_spec(cfg, dt))
        specs.append(wgrad_spec(cfg, "bf16", dbias=True))
    for cfg in SM90_SWIGLU_CONFIGS:
        specs.append(swiglu_spec(cfg, "bf16"))
    for cfg in SM90_DSWIGLU_CONFIGS:
        specs.append(dswiglu_spec(cfg, "bf16"))
    specs += qkv_specs()
    return specs


# QKV + RoPE (qkv.py): head_dim 128 (CogVLM-17B / CogVLM2-19B); "bias_v" is CogVLM2's vision-only QKV bias.
QKV_HEAD_DIM = 128
QKV_VARIANTS = (("plain", False, False), ("bias_v", True, False), ("bias", True, True))


def qkv_signature(dt: str) -> dict:
    p = "*" + dt
    sig = {"x_ptr": p, "wv_ptr": p, "wl_ptr": p, "bv_ptr": p, "bl_ptr": p, "offsets_ptr": "*i32",
           "perm_ptr": "*i64", "cos_ptr": "*fp32", "sin_ptr": "*fp32", "q_ptr": p, "k_ptr": p, "v_ptr": p,
           "N": "i32", "K": "i32", "stride_xm": "i32", "seq_len": "i32", "num_heads": "i32", "num_kv_heads": "i32",
           "NUM_PROGS": "i32"}
    for name in ("HAS_BIAS_V", "HAS_BIAS_L", "HEAD_DIM", "HEADS_PER_TILE", "BLOCK_M", "BLOCK_K", "GROUP_M", "FLATTEN",
                 "WARP_SPEC", "UPCAST_DOT"):
        sig[name] = "constexpr"
    return sig


def qkv_spec(cfg: SM90Config, variant: tuple = QKV_VARIANTS[1], dt: str = "bf16", head_dim: int = QKV_HEAD_DIM):
    from ..._aot import CompileSpec
    from .qkv import _grouped_qkv_rope_sm90_kernel
    vname, hbv, hbl = variant
    cx = dict(HAS_BIAS_V=hbv, HAS_BIAS_L=hbl, HEAD_DIM=head_dim, HEADS_PER_TILE=cfg.block_n // head_dim,
              BLOCK_M=cfg.block_m, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m, FLATTEN=cfg.flatten,
              WARP_SPEC=cfg.warp_specialize, UPCAST_DOT=False)
    return CompileSpec(name=f"qkv_rope_sm90[{vname},{dt},hd{head_dim},{cfg.name}]", fn=_grouped_qkv_rope_sm90_kernel,
                       signature=qkv_signature(dt), constexprs=cx, num_warps=cfg.num_warps,
                       num_stages=cfg.num_stages, targets=(90,), expects_tma=True,
                       extra={"config": cfg.name, "divisible_by_16": ["N", "K", "stride_xm"]})


def qkv_specs():
    """bf16: every QKV config x every bias variant; fp16 (differs only in the wgmma operand type): the first
    config's vision-bias variant."""
    from .configs import SM90_QKV_CONFIGS
    specs = [qkv_spec(cfg, v, "bf16") for cfg in SM90_QKV_CONFIGS for v in QKV_VARIANTS]
    specs.append(qkv_spec(SM90_QKV_CONFIGS[0], QKV_VARIANTS[1], "fp16"))
    return specs


# ----------------------------------------------------------------------------------------------- SASS check
SASS_OPS = ("HGMMA", "UTMALDG", "UTMASTG", "LDL", "STL", "USETMAXREG")


def sass_features(spec, arch: int = 90) -> dict:
    """Compile ``spec`` for sm_90a (needs TRITON_INTERPRET unset) and count, in the SASS, the instructions the
    kernel relies on: HGMMA (wgmma), UTMALDG / UTMASTG (TMA loads / stores), LDL / STL (local memory = spills),
    USETMAXREG (warp-specialised register split); plus registers and stack bytes from cuobjdump."""
    import os
    import re
    import subprocess
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from ... import compile_report as cr
    sig = cr._full_signature(spec.fn, spec)
    div16 = spec.extra.get("divisible_by_16", ())
    attrs = {(i,): [["tt.divisibility", 16]] for i, (n, t) in enumerate(sig.items())
             if t.startswith("*") or n in div16}
    kernel = triton.compile(ASTSource(fn=spec.fn, signature=sig, constexprs=dict(spec.constexprs), attrs=attrs),
                            target=GPUTarget("cuda", arch, 32),
                            options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(kernel.asm["cubin"])
        path = f.name
    try:
        sass = subprocess.run([cr._cuobjdump_path(), "--dump-sass", path], capture_output=True, text=True,
                              timeout=120, check=True).stdout
        usage = subprocess.run([cr._cuobjdump_path(), "--dump-resource-usage", path], capture_output=True,
                               text=True, timeout=120, check=True).stdout
    finally:
        os.unlink(path)
    res = cr.parse_resource_usage(usage, getattr(kernel.metadata, "name", None))
    counts = {op: len(re.findall(r"\b" + op + r"\b", sass)) for op in SASS_OPS}
    return {"name": spec.name, "triton": triton.__version__, "registers": res["registers"], "stack": res["stack"],
            "local": res["local"], "shared": int(getattr(kernel.metadata, "shared", 0) or 0), **counts}


def sass_check_specs():
    """One spec per GPU config, the heaviest variant (bf16; forward + residual: most registers and shared
    memory), the dX layout on the first config, and every dW config: what ``tests/test_gemm_sm90.py``
    disassembles (``--all``: every spec; ``compile_report`` checks every spec's PTX)."""
    specs = [gemm_spec(cfg, GEMM_VARIANTS[3], "bf16") for cfg in SM90_CONFIGS]
    specs.append(gemm_spec(SM90_CONFIGS[0], GEMM_VARIANTS[4], "bf16"))
    for cfg in SM90_WGRAD_CONFIGS:
        specs.append(wgrad_spec(cfg, "bf16"))
        specs.append(wgrad_spec(cfg, "bf16", dbias=True))
    for cfg in SM90_SWIGLU_CONFIGS:
        specs.append(swiglu_spec(cfg, "bf16"))
    for cfg in SM90_DSWIGLU_CONFIGS:
        specs.append(dswiglu_spec(cfg, "bf16"))
    return specs


def qkv_sass_check_specs():
    """The QKV kernel's SASS checks (``--qkv``; ``tests/test_gemm_sm90_qkv.py``): every QKV config with both biases
    (the heaviest variant). Its store is a pointer scatter (rows go to positions perm[row]): HGMMA and TMA loads
    are expected, TMA stores are not."""
    from .configs import SM90_QKV_CONFIGS
    return [qkv_spec(cfg, QKV_VARIANTS[2], "bf16") for cfg in SM90_QKV_CONFIGS]


if __name__ == "__main__":  # python -m vexpert_kernels.ops.gemm_sm90.aot [--all | --qkv]: JSON lines of SASS features
    import json
    import sys
    for sp in (aot_compile_specs() if "--all" in sys.argv else
               qkv_sass_check_specs() if "--qkv" in sys.argv else sass_check_specs()):
        try:
            print(json.dumps(sass_features(sp)), flush=True)
        except Exception as exc:  # one line per spec, never a crash
            print(json.dumps({"name": sp.name, "error": f"{type(exc).__name__}: {exc}"[:800]}), flush=True)

"""``backend="auto"`` on CUDA: candidate sets for :func:`vexpert_kernels.autotune.select`, and backend names.

A backend name travels inside the custom ops as a string (cached on disk by the tuner, so names are stable):

* ``"torch"``: two cuBLAS GEMMs on row slices (the static choice: correct everywhere, never unverified);
* ``"grouped_mm"``: ``torch._grouped_mm`` (bf16, sm_90+, plain linear);
* ``"triton"``: our kernel with the table's config; ``"triton:<BMxBNxBK>:g<GM>:w<warps>:s<stages>"`` a given config;
* ``"<prefix>:<config>"``: a launcher registered in ``_extra_candidates`` (e.g. the Hopper TMA kernels);
* ``"auto/<one of the above>"``: the forward ran that path and the backward tunes its dX ("routed_linear_dx") and
  dW ("routed_linear_dw") GEMMs separately.

Key: (op, dtype, N, K, epilogue, has_bias, has_residual, token bucket = next power of two of T); the tuner adds the
GPU name and library versions.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from ... import autotune
from .configs import _GEMM_CONFIGS, _WGRAD_CONFIGS, _cc

TUNE_PREFIX = "auto/"
DSWIGLU_DX = "routed_swiglu_mlp_dx"  # the fused MLP's dX + SwiGLU backward step (ops/routed_linear/mlp.py)


@dataclass(frozen=True)
class ExtraLauncher:
    """Another grouped-GEMM implementation whose configs join the candidates.

    prefix: name prefix (``"sm90"``). configs(op, x, w) -> {config_name: config} (empty when unsupported for these
    tensors). run(op, config, **inputs) -> output, the same contract as our launcher for that op: op
    ``"routed_linear"`` gets (x, wv, wl, offsets, bv, bl, residual) and returns [T, N]; ``"routed_linear_dx"`` gets
    (dy, wv, wl, offsets) and returns [T, K]; ``"routed_linear_dw"`` gets (dy, x, offsets) and returns (dWv, dWl);
    ``"routed_swiglu_mlp_dx"`` gets (dy [T, D], wv/wl [D, I] down weights, gu [T, 2I], offsets) and returns
    dgu [T, 2I] (the SwiGLU backward in the down projection's dX epilogue).
    ``"routed_qkv_rope"``: configs(op, x, w, num_heads=, num_kv_heads=); run gets (x, wv, wl, offsets, bv, bl,
    perm, cos, sin, B, L, H, KV) and returns (q, k, v) (see ``custom_ops._qkv_fwd_impl``).
    dbias: run("routed_linear_dw") also takes ``dbv`` / ``dbl`` ([N] buffers or None) and fills them with the
    per-expert column sums of dY (the caller then skips its own ``dy.sum``).
    """
    prefix: str
    configs: Callable[..., dict]
    run: Callable[..., Any]
    dbias: bool = False


# Registered launchers whose configs join the candidates of every tuned GEMM (the sm_90 TMA kernels register below).
_extra_candidates: list = []


def _register_sm90() -> None:
    try:
        from .. import gemm_sm90 as m
    except Exception:  # not merged yet / not importable here: nothing to add
        return

    def configs(op, x, w, **heads):
        # dX ops get (dy [T, N], w [N, K]): the reason check wants the [T, N] @ [K, N]^T view
        if m.sm90_unsupported_reason(x, w.t() if op in ("routed_linear_dx", DSWIGLU_DX) else w) is not None:
            return {}
        if op == "routed_qkv_rope":  # the configs whose tiles fit this head layout (1 or 2 whole heads)
            from ..gemm_sm90.qkv import qkv_sm90_configs, qkv_sm90_reason
            return {c.name: c for c in qkv_sm90_configs(x.device)
                    if qkv_sm90_reason(x, w, heads["num_heads"], heads["num_kv_heads"], c) is None}
        cuda = x.device.type == "cuda"  # CPU (interpreter): its tiny tiles
        if op == "routed_linear_dw":
            cfgs = m.SM90_WGRAD_CONFIGS if cuda else m.INTERP_WGRAD_CONFIGS
        elif op == DSWIGLU_DX:
            cfgs = m.configs.SM90_DSWIGLU_CONFIGS if cuda else m.INTERP_CONFIGS
        else:
            cfgs = m.SM90_CONFIGS if cuda else m.INTERP_CONFIGS
        return {c.name: c for c in cfgs}

    def run(op, config, **t):
        if op == "routed_linear":
            return m.grouped_gemm_sm90(t["x"], t["wv"], t["wl"], t["offsets"], bias_v=t["bv"], bias_l=t["bl"],
                                       residual=t["residual"], config=config)
        if op == "routed_linear_dx":
            return m.grouped_gemm_dx_sm90(t["dy"], t["wv"], t["wl"], t["offsets"], config=config)
        if op == "routed_linear_dw":
            dbias = (t.get("dbv"), t.get("dbl"))
            return m.grouped_wgrad_sm90(t["dy"], t["x"], t["offsets"], config=config,
                                        dbias=dbias if any(b is not None for b in dbias) else None)
        if op == DSWIGLU_DX:  # down projection's dX + SwiGLU backward epilogue -> dgu [T, 2I]
            return m.launch.grouped_dx_dswiglu_sm90(t["dy"], t["wv"], t["wl"], t["gu"], t["offsets"], config=config)
        if op == "routed_qkv_rope":
            from ..gemm_sm90.qkv import grouped_qkv_rope_sm90
            return grouped_qkv_rope_sm90(t["x"], t["wv"], t["wl"], t["offsets"], t["perm"], t["cos"], t["sin"],
                                         batch_size=t["B"], seq_len=t["L"], num_heads=t["H"], num_kv_heads=t["KV"],
                                         bias_v=t["bv"], bias_l=t["bl"], config=config)
        raise ValueError(f"sm90 launcher has no {op}")

    _extra_candidates.append(ExtraLauncher("sm90", configs, run, dbias=True))


_register_sm90()


def extra_launcher(name: str) -> Optional[tuple]:
    """(launcher, config) for a name ``"<prefix>:<config name>"`` of a registered launcher, else None."""
    prefix, _, cfg_name = name.partition(":")
    for ln in _extra_candidates:
        if ln.prefix == prefix:
            return ln, cfg_name
    return None


def extra_config(launcher, op, x, w, cfg_name):
    return launcher.configs(op, x, w)[cfg_name]


# ------------------------------------------------------------------------------------------------------ names
def config_name(cfg) -> str:
    BM, BN, BK, GM, nw, ns = cfg
    return f"triton:{BM}x{BN}x{BK}:g{GM}:w{nw}:s{ns}"


def wgrad_config_name(cfg) -> str:
    BM, BN, BK, nw, ns = cfg
    return f"triton:{BM}x{BN}x{BK}:w{nw}:s{ns}"


def parse_backend(name: str):
    """-> (kind, config or None, tune_backward). kind: "torch" | "grouped_mm" | "triton" | an extra prefix."""
    tune = name.startswith(TUNE_PREFIX)
    if tune:
        name = name[len(TUNE_PREFIX):]
    kind, _, rest = name.partition(":")
    if kind != "triton" or not rest:
        return kind, (rest or None), tune
    tiles, *parts = rest.split(":")
    vals = {p[0]: int(p[1:]) for p in parts}
    t = tuple(int(v) for v in tiles.split("x"))
    if "g" in vals:
        return "triton", t + (vals["g"], vals["w"], vals["s"]), tune
    return "triton", t + (vals["w"], vals["s"]), tune


# ------------------------------------------------------------------------------------------------------ candidates
_TABLE_KEYS = {  # which rows of the config table are worth timing per op (2-4 per shape class)
    "routed_linear": ("large", "medium", "small"),
    "routed_linear_residual": ("medium", "small"),   # 128x256 spills once a residual tile joins (configs.py)
    "routed_swiglu": ("dual", "dual_small"),
    "routed_qkv_rope": ("qkv",),
    "routed_linear_dx": ("medium", "small"),
    "routed_swiglu_mlp_dx": ("dswiglu", "dswiglu_small"),  # dX + SwiGLU backward epilogue (transposed weights)
}


def triton_configs(op: str, device, dtype) -> dict:
    """{name: config} of our kernel's GPU configs for ``op`` (deduplicated)."""
    table = _GEMM_CONFIGS[_cc(device)]["fp32" if dtype == torch.float32 else "16bit"]
    out = {}
    for k in _TABLE_KEYS[op]:
        out.setdefault(config_name(table[k]), table[k])
    return out


def wgrad_configs(device) -> dict:
    out = {}
    for cfg in _WGRAD_CONFIGS[_cc(device)].values():
        out.setdefault(wgrad_config_name(cfg), cfg)
    return out


def token_bucket(T: int) -> int:
    return 1 << max(0, int(T) - 1).bit_length()


def make_key(dtype, N, K, epilogue, has_bias, has_residual, T) -> tuple:
    return (str(dtype).replace("torch.", ""), int(N), int(K), epilogue, bool(has_bias), bool(has_residual),
            token_bucket(T))


def select(op: str, key: tuple, candidates: dict, reference, dtype) -> str:
    """The one call into the tuner (static choice: the torch path, correct on every GPU). Candidates run the op
    bodies on the caller's tensors outside autograd (the chosen path then runs inside the custom op)."""
    with torch.no_grad():
        return autotune.select(op, key, candidates, reference, static="torch", dtype=dtype)

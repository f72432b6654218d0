"""AOT compile specs: every (kernel x GPU config x dtype x head dim x mask variant) the launchers may pick."""
from __future__ import annotations

import torch

from vexpert_kernels._aot import CompileSpec
from vexpert_kernels._triton_compat import HAS_TRITON

from .configs import (_BWD64_CONFIGS, _BWD64_DET_OK, _BWD64_NOT_ROUTED, _DECODE_CONFIG, _FWD_TUNE_ALTERNATIVES,
                      _GPU_CONFIGS, _PREPROCESS_CONFIG, _TMA_FWD_CONFIGS, _block_d, _pick)
if HAS_TRITON:  # the package imports (and uses the PyTorch backends) without Triton
    from .kernels import _attn_bwd_dkdv_kernel, _attn_bwd_dq_kernel, _attn_bwd_preprocess_kernel, _attn_fwd_kernel


# ----------------------------------------------------------------------------------------------------------- AOT specs
def build_aot_specs() -> list:
    """Every (kernel x GPU config x dtype x head dim x mask variant) the dispatcher may launch, for the compile report."""
    if not HAS_TRITON:
        return []
    specs = []
    tdt = {torch.float16: "fp16", torch.bfloat16: "bf16"}
    strides = ["stride_qb", "stride_qh", "stride_ql", "stride_kb", "stride_kh", "stride_kl", "stride_vb", "stride_vh",
               "stride_vl", "stride_ob", "stride_oh", "stride_ol", "stride_lb", "stride_lh", "stride_ll", "stride_mb",
               "stride_sb", "stride_ib"]
    # (name, varlen, key padding, bidirectional, routed order out); routed variants for bf16 at hd 64/128 only
    variants = {False: (("causal", False, False, False, False), ("causal_routed", False, False, False, True)),
                True: (("padded_bidir", False, True, True, False), ("varlen_bidir", True, False, True, False),
                       ("padded_bidir_routed", False, True, True, True))}
    for (cc, dbucket, masked), cfgs in sorted(_GPU_CONFIGS.items()):
        target_hds = {64: (64,), 128: (80, 96, 128)}[dbucket]
        for hd in target_hds:
            for dtype, dname in tdt.items():
                for variant, is_varlen, has_kpm, bidir, routed in variants[masked]:
                    if routed and (dname != "bf16" or hd not in (64, 128)):
                        continue
                    ce = dict(GROUP=1, HEAD_DIM=hd, BLOCK_D=_block_d(hd), IS_VARLEN=is_varlen, HAS_KPM=has_kpm,
                              BIDIR=bidir, UPCAST=False, PREC="tf32", HAS_OIDX=routed)
                    for kname, fn, ptrs, scalars in (
                        ("fwd", _attn_fwd_kernel, [("Q", dname), ("K", dname), ("V", dname), ("O", dname),
                                                    ("LSE", "fp32")], ["H", "LQ", "LK", "T_OUT", "qk_scale"]),
                        ("dq", _attn_bwd_dq_kernel, [("Q", dname), ("K", dname), ("V", dname), ("DO", dname),
                                                     ("DQ", dname), ("LSE", "fp32"), ("DELTA", "fp32")],
                         ["H", "LQ", "LK", "T_OUT", "qk_scale", "sm_scale"]),
                        ("dkdv", _attn_bwd_dkdv_kernel, [("Q", dname), ("K", dname), ("V", dname), ("DO", dname),
                                                         ("DK", dname), ("DV", dname), ("DQ", "fp32"), ("LSE", "fp32"),
                                                         ("DELTA", "fp32")],
                         ["KVH", "LQ", "LK", "T_OUT", "qk_scale", "sm_scale"]),
                    ):
                        tiles = [_pick(cfgs, kname, is_varlen)]
                        if kname == "fwd" and dname == "bf16" and hd in (64, 128) and not routed:
                            # the tuner's extra tiles and the decode tile (Lq <= DECODE_MAX_LQ)
                            alts = (*_FWD_TUNE_ALTERNATIVES[dbucket], _DECODE_CONFIG[cc])
                            tiles += [t for i, t in enumerate(alts) if t != tiles[0] and t not in alts[:i]]
                            if cc == 9:  # the TMA forward (tuning candidates on sm_90)
                                tiles += list(_TMA_FWD_CONFIGS[masked])
                        # dK/dV: the one-pass kernel (fused dQ, the default) always; the deterministic two-kernel
                        # split's dK/dV for bf16 at hd 64/128
                        fused_opts = (True, False) if kname == "dkdv" and dname == "bf16" and hd in (64, 128) else (
                            (True,) if kname == "dkdv" else (None,))
                        tile_of = {None: tiles, False: tiles, True: [cfgs.get("dkdv_fused", tiles[0])]}
                        if kname == "dkdv" and cc == 9 and dname == "bf16" and hd in (64, 128):
                            # the backward's 64-query tuning tiles (sm_90; TMA ones need a power-of-two head dim)
                            skip = {det: _BWD64_NOT_ROUTED.get((dbucket, masked, det), ()) if routed else ()
                                    for det in (False, True)}
                            tile_of = {False: tiles + [t for t in _BWD64_DET_OK[(dbucket, masked)]
                                                       if t not in tiles and t not in skip[True]],
                                       True: tile_of[True] + [t for t in _BWD64_CONFIGS[(dbucket, masked)]
                                                              if t not in tile_of[True] and t not in skip[False]]}
                        for (bm, bn, nw, ns, *tma), fused in [(t, f) for f in fused_opts for t in tile_of[f]]:
                            use_tma = bool(tma and tma[0])
                            last = "SPAN_START" if kname == "dkdv" else "SPAN_END"
                            sig = {n: "*" + t for n, t in ptrs}
                            for n in ("CU_Q", "CU_K", "KV_LO", "KV_HI"):
                                sig[n] = "*i32"
                            sig["KPM"] = "*i8"
                            sig["SPAN"] = "*i32"
                            sig["OIDX"] = "*i32"
                            sig[last] = "*i32"
                            for n in strides:
                                sig[n] = "i32"
                            for n in scalars:
                                sig[n] = "fp32" if n in ("qk_scale", "sm_scale") else "i32"
                            consts = dict(ce, BLOCK_M=bm, BLOCK_N=bn)
                            if fused is not None:
                                consts["FUSED_DQ"] = fused
                            if kname in ("fwd", "dkdv"):
                                consts["USE_TMA"] = use_tma
                            if kname == "dkdv":
                                consts["DQ_REDUCE"] = use_tma and bool(fused)
                            for n in consts:
                                sig[n] = "constexpr"
                            sig = {n: sig[n] for n in fn.arg_names}  # ASTSource wants the kernel's argument order
                            specs.append(CompileSpec(
                                name=f"flash_attn_{kname}{'_det' if fused is False else ''}[sm{cc}x,{variant},{dname},"
                                     f"hd{hd},{bm}x{bn},w{nw}s{ns}{',tma' if use_tma else ''}]", fn=fn,
                                expects_tma=use_tma,
                                signature=sig, constexprs=consts, num_warps=nw, num_stages=ns, targets=(cc * 10,),
                                # row/head/batch strides of q/k/v/o are multiples of 16 elements for head dims 64..128:
                                # the JIT specialises on that at run time (vectorised 16-byte loads), so the AOT build must
                                extra={"divisible_by_16": list(strides[:12])}))
    for cc in (9, 8):
        for hd in (64, 80, 96, 128):
            for dtype, dname in tdt.items():
                for is_varlen, has_dlse, routed in ((False, False, False), (True, True, False), (False, False, True)):
                    if routed and (dname != "bf16" or hd not in (64, 128)):
                        continue
                    bm, nw = _PREPROCESS_CONFIG
                    consts = dict(HEAD_DIM=hd, BLOCK_D=_block_d(hd), BLOCK_M=bm, IS_VARLEN=is_varlen, HAS_DLSE=has_dlse,
                                  HAS_OIDX=routed)
                    sig = {"O": "*" + dname, "DO": "*" + dname, "DLSE": "*fp32", "DELTA": "*fp32", "CU_Q": "*i32",
                           "OIDX": "*i32"}
                    for n in ("stride_ob", "stride_oh", "stride_ol", "stride_db", "stride_dh", "stride_dl",
                              "stride_lb", "stride_lh", "stride_ll", "stride_ib", "H", "LQ", "T_OUT"):
                        sig[n] = "i32"
                    sig.update({n: "constexpr" for n in consts})
                    specs.append(CompileSpec(
                        name=f"flash_attn_bwd_pre[sm{cc}x,{'varlen' if is_varlen else 'padded'}"
                             f"{'_routed' if routed else ''},{dname},hd{hd},"
                             f"{bm},w{nw}]",
                        fn=_attn_bwd_preprocess_kernel, signature=sig, constexprs=consts, num_warps=nw,
                        num_stages=1, targets=(cc * 10,),
                        extra={"divisible_by_16": ["stride_ob", "stride_oh", "stride_ol", "stride_db", "stride_dh",
                                                   "stride_dl"]}))
    return specs


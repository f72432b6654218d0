"""Ahead-of-time compile specs: every Triton kernel of the package, with every config its dispatcher may pick.

Each module under ``vexpert_kernels.ops`` that owns Triton kernels exposes ``aot_compile_specs() -> list[CompileSpec]``.
``python -m vexpert_kernels.compile_report`` compiles them for sm_90a and sm_80 without a GPU and reports registers,
spills, shared memory and the matrix/TMA instructions used; a CI test fails on compile errors and spills.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class CompileSpec:
    name: str                 # readable id, e.g. "grouped_gemm[swiglu,bf16,128x256x64,w8s3]"
    fn: object                # the @triton.jit function
    signature: dict           # every argument name -> Triton type string ("*bf16", "*fp32", "i32", "fp32", "constexpr")
    constexprs: dict          # constexpr argument name -> value
    num_warps: int = 4
    num_stages: int = 3
    targets: tuple = (80, 90)  # compute capabilities on which the dispatcher may pick this config
    expects_tma: bool = False  # the kernel means to use TMA (bulk tensor copies) on sm_90
    extra: dict = field(default_factory=dict)

"""setuptools hook. Pure-Python install by default; CUDA kernels in csrc/ are JIT-built on first use on a CUDA
machine. Set VEXPERT_BUILD_CUDA=1 to build them ahead of time (needs nvcc; archs from TORCH_CUDA_ARCH_LIST,
default "8.0;9.0a"): the library lands in vexpert_kernels/_prebuilt/ and is loaded instead of a JIT build."""
import importlib.util
import json
import os
from pathlib import Path

from setuptools import setup

kwargs = {}
if os.environ.get("VEXPERT_BUILD_CUDA", "0") not in ("", "0"):
    here = Path(__file__).resolve().parent
    # load the stdlib-only builder by path: importing the package would import torch
    spec = importlib.util.spec_from_file_location("_vx_cuda_build", here / "vexpert_kernels" / "_cuda_build.py")
    builder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(builder)
    archs = builder.aot_archs_from_env()
    out = here / "vexpert_kernels" / "_prebuilt"
    for stale in (out / builder.LIB_NAME, out / "build.json"):
        stale.unlink(missing_ok=True)
    lib = builder.build_library(archs, out_dir=out)
    (out / "build.json").write_text(json.dumps({"archs": archs}))
    print(f"vexpert_kernels: built {lib} for {archs}")
    kwargs["package_data"] = {"vexpert_kernels": ["_prebuilt/*.so", "_prebuilt/build.json"]}

setup(**kwargs)

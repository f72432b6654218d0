"""setuptools hook: ship the CUDA sources inside the package, optionally a prebuilt library.

The .cu/.cuh sources live in the repository's ``csrc/`` (next to the package, where an editable install and the tests
find them). ``build_py`` copies them into the built package as ``vexpert_kernels/csrc/``, so a wheel or a
non-editable ``pip install .`` carries them and the ninja/nvcc JIT (``vexpert_kernels/_cuda_build.py``, which looks in
``vexpert_kernels/csrc`` first, then ``<repo>/csrc``) can build them on first use on a CUDA machine.

``VEXPERT_BUILD_CUDA=1`` additionally builds the library ahead of time (needs nvcc; archs from TORCH_CUDA_ARCH_LIST,
default "8.0;9.0a") into ``vexpert_kernels/_prebuilt/`` of the build (the source tree for an editable install), where
``vexpert_kernels._cuda`` loads it instead of a JIT build; the wheel is then tagged for this platform.
"""
import importlib.util
import json
import os
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.dist import Distribution

HERE = Path(__file__).resolve().parent
BUILD_CUDA = os.environ.get("VEXPERT_BUILD_CUDA", "0") not in ("", "0")


def _builder():
    # load the stdlib-only builder by path: importing the package would import torch
    spec = importlib.util.spec_from_file_location("_vx_cuda_build", HERE / "vexpert_kernels" / "_cuda_build.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class BuildPyWithCsrc(build_py):
    def run(self):
        super().run()
        builder = _builder()
        editable = getattr(self, "editable_mode", False)
        pkg_build = Path(self.build_lib) / "vexpert_kernels"
        if not editable:  # editable installs read <repo>/csrc directly
            src, dst = HERE / "csrc", pkg_build / "csrc"
            missing = [n for n in builder.SOURCES + builder.HEADERS if not (src / n).is_file()]
            if missing:
                raise RuntimeError(f"CUDA sources {missing} missing from {src}: the package would ship without them")
            shutil.rmtree(dst, ignore_errors=True)  # build/ is reused between builds: no stale sources
            dst.mkdir(parents=True)
            for f in sorted(src.iterdir()):
                if f.suffix in (".cu", ".cuh", ".h"):
                    shutil.copy2(f, dst / f.name)
            if not BUILD_CUDA:  # a library left in build/ by an earlier VEXPERT_BUILD_CUDA=1 build must not ship
                shutil.rmtree(pkg_build / "_prebuilt", ignore_errors=True)
        if BUILD_CUDA:
            pkg = HERE / "vexpert_kernels" if editable else pkg_build
            out = pkg / "_prebuilt"
            for stale in (out / builder.LIB_NAME, out / "build.json"):
                stale.unlink(missing_ok=True)
            archs = builder.aot_archs_from_env()
            lib = builder.build_library(archs, out_dir=out)
            (out / "build.json").write_text(json.dumps({"archs": archs}))
            for junk in out.iterdir():  # keep the lock file and any build leftovers out of the wheel
                if junk.name not in (builder.LIB_NAME, "build.json"):
                    shutil.rmtree(junk) if junk.is_dir() else junk.unlink()
            print(f"vexpert_kernels: built {lib} for {archs}")


class VexpertDistribution(Distribution):
    def has_ext_modules(self):  # a prebuilt .so makes the wheel platform-specific
        return BUILD_CUDA or super().has_ext_modules()


setup(cmdclass={"build_py": BuildPyWithCsrc}, distclass=VexpertDistribution)

"""Build the csrc/ CUDA kernels into one shared library (stdlib only, so setup.py can use it without torch).

nvcc compiles each .cu into an object and links them with ``-shared`` (cudart linked statically, nvcc's default, so
the library needs only the driver). With ninja on PATH the steps go through a generated build.ninja (parallel,
incremental), else through plain subprocess calls. Results are cached per hash of (sources, arch list, nvcc version,
flags) in ``$VEXPERT_CACHE_DIR`` or ``~/.cache/vexpert_kernels``; concurrent processes serialise on a file lock.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

LIB_NAME = "libvexpert_csrc.so"
SOURCES = ("routing_plan.cu", "rmsnorm_permute.cu")
HEADERS = ("vexpert_common.cuh",)
NVCC_FLAGS = ("-O3", "-std=c++17", "-Xcompiler", "-fPIC", "-Xcompiler", "-fvisibility=hidden", "--expt-relaxed-constexpr")


def csrc_dir() -> Path | None:
    """The folder with the .cu sources: ``vexpert_kernels/csrc`` in an installed wheel, else the repo's ``csrc``."""
    here = Path(__file__).resolve().parent
    for cand in (here / "csrc", here.parent / "csrc"):
        if all((cand / f).is_file() for f in SOURCES + HEADERS):
            return cand
    return None


def find_nvcc() -> str | None:
    cands = [os.environ.get("CUDACXX")]
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            cands.append(os.path.join(os.environ[var], "bin", "nvcc"))
    cands += [shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"]
    for c in cands:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


def gencode_flags(archs) -> list:
    """archs: iterable of strings like "80", "90a". SASS for each, plus PTX of the newest for forward compatibility."""
    archs = sorted(set(archs), key=lambda a: (int(a.rstrip("a")), a))
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    newest = archs[-1]
    flags.append(f"-gencode=arch=compute_{newest},code=compute_{newest}")
    return flags


def _nvcc_version(nvcc: str) -> str:
    try:
        return subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout.strip()
    except Exception as exc:  # noqa: BLE001
        return f"unknown ({exc!r})"


def cache_root() -> Path:
    return Path(os.environ.get("VEXPERT_CACHE_DIR") or Path.home() / ".cache" / "vexpert_kernels")


def build_key(src: Path, archs, nvcc: str) -> str:
    h = hashlib.sha256()
    for f in SOURCES + HEADERS:
        h.update(f.encode())
        h.update((src / f).read_bytes())
    h.update(repr(sorted(archs)).encode())
    h.update(repr(NVCC_FLAGS).encode())
    h.update(_nvcc_version(nvcc).encode())
    return h.hexdigest()[:20]


def _write_ninja(build_dir: Path, src: Path, nvcc: str, flags: list) -> None:
    q = lambda s: str(s).replace("$", "$$").replace(" ", "$ ")  # noqa: E731 - ninja escaping
    lines = [
        "ninja_required_version = 1.3",
        f"nvcc = {q(nvcc)}",
        f"flags = {' '.join(flags)} -I{q(src)}",
        "rule cu",
        "  command = $nvcc $flags -c $in -o $out",
        "  description = nvcc $in",
        "rule link",
        "  command = $nvcc -shared $in -o $out",
        "  description = link $out",
    ]
    objs = []
    deps = " ".join(q(src / h) for h in HEADERS)
    for f in SOURCES:
        o = f.replace(".cu", ".o")
        objs.append(o)
        lines.append(f"build {o}: cu {q(src / f)} | {deps}")
    lines.append(f"build {LIB_NAME}: link {' '.join(objs)}")
    lines.append(f"default {LIB_NAME}")
    (build_dir / "build.ninja").write_text("\n".join(lines) + "\n")


def build_library(archs, out_dir: Path | None = None, *, verbose: bool = False) -> Path:
    """Compile (or reuse the cached) library for the given archs; returns its path. Raises RuntimeError with the
    compiler's output on failure."""
    src = csrc_dir()
    if src is None:
        raise RuntimeError("CUDA sources not found (expected vexpert_kernels/csrc or <repo>/csrc)")
    nvcc = find_nvcc()
    if nvcc is None:
        raise RuntimeError("nvcc not found (set CUDA_HOME or put nvcc on PATH)")
    archs = list(archs)
    key = build_key(src, archs, nvcc)
    out_dir = Path(out_dir) if out_dir is not None else cache_root() / f"csrc-{key}"
    lib = out_dir / LIB_NAME
    if lib.is_file():
        return lib
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building the same key
        if lib.is_file():
            return lib
        tmp = out_dir / f"build-{os.getpid()}"
        tmp.mkdir(exist_ok=True)
        flags = list(NVCC_FLAGS) + gencode_flags(archs)
        ninja = shutil.which("ninja")
        if ninja:
            _write_ninja(tmp, src, nvcc, flags)
            cmds = [[ninja, "-C", str(tmp)] + (["-v"] if verbose else [])]
        else:
            objs = [str(tmp / f.replace(".cu", ".o")) for f in SOURCES]
            cmds = [[nvcc, *flags, f"-I{src}", "-c", str(src / f), "-o", o] for f, o in zip(SOURCES, objs)]
            cmds.append([nvcc, "-shared", *objs, "-o", str(tmp / LIB_NAME)])
        for cmd in cmds:
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                log = out_dir / "build.log"
                log.write_text(" ".join(cmd) + "\n" + r.stdout + r.stderr)
                tail = (r.stdout + r.stderr).strip().splitlines()[-5:]
                raise RuntimeError(f"nvcc build failed (log: {log}): " + " | ".join(tail))
        os.replace(tmp / LIB_NAME, lib)  # atomic: readers never see a half-written library
        shutil.rmtree(tmp, ignore_errors=True)
    return lib


def aot_archs_from_env() -> list:
    """TORCH_CUDA_ARCH_LIST ("8.0;9.0a" / "8.0 9.0") -> ["80", "90a"]; default sm_80 + sm_90a."""
    spec = os.environ.get("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")
    out = []
    for tok in spec.replace(";", " ").split():
        tok = tok.replace("+PTX", "")
        out.append(tok.replace(".", ""))
    return out or ["80", "90a"]

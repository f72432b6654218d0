"""csrc/ CUDA sources: compile with nvcc for sm_80 and sm_90a, loader degrades gracefully without a GPU, the
per-token routing logic (host twin compiled from routing_plan.cu) equals RoutingPlan; on a GPU (marked gpu) the
kernels equal the torch plan exactly and the graph capture / benchmark hook work."""
import subprocess

import pytest
import torch

from vexpert_kernels import _cuda, _cuda_build
from vexpert_kernels.routing import RoutingPlan
from vexpert_kernels.testing import random_token_types

NVCC = _cuda_build.find_nvcc()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found (set CUDA_HOME or put nvcc on PATH)")
SRC = _cuda_build.csrc_dir()


def test_sources_found():
    assert SRC is not None, "csrc/ sources not found next to the package"


@needs_nvcc
@pytest.mark.parametrize("cu", _cuda_build.SOURCES)
@pytest.mark.parametrize("arch", ["-arch=sm_80", "-gencode=arch=compute_90a,code=sm_90a"])
def test_cu_compiles(cu, arch, tmp_path):
    cmd = [NVCC, "-c", arch, *_cuda_build.NVCC_FLAGS, f"-I{SRC}", str(SRC / cu), "-o", str(tmp_path / "k.o"),
           "-Xptxas", "-warn-spills"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "error" not in r.stderr.lower()


def test_loader_degrades_without_gpu():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: covered by the gpu tests")
    ok, why = _cuda.cuda_extension_status()
    assert ok is False and "CUDA" in why
    assert _cuda.get_library() is None
    assert _cuda.cuda_extension_available() is False
    with pytest.raises(ValueError, match="CUDA"):
        _cuda.build_plan_cuda(torch.zeros(1, 4, dtype=torch.long))


def test_disable_env(monkeypatch):
    monkeypatch.setattr(_cuda, "_state", {"lib": None, "tried": False, "reason": ""})
    monkeypatch.setenv("VEXPERT_DISABLE_CSRC", "1")
    ok, why = _cuda.cuda_extension_status()
    assert not ok and ("VEXPERT_DISABLE_CSRC" in why or "CUDA" in why)


def test_build_error_reported(monkeypatch, tmp_path):
    monkeypatch.setattr(_cuda_build, "find_nvcc", lambda: None)
    monkeypatch.setenv("VEXPERT_CACHE_DIR", str(tmp_path))
    with pytest.raises(RuntimeError, match="nvcc not found"):
        _cuda_build.build_library(["80"])


def test_ninja_file(tmp_path):
    _cuda_build._write_ninja(tmp_path, SRC, "/usr/bin/nvcc", ["-O3"])
    text = (tmp_path / "build.ninja").read_text()
    for f in _cuda_build.SOURCES:
        assert f in text
    assert f"build {_cuda_build.LIB_NAME}: link" in text


@pytest.fixture(scope="module")
def host_lib():
    if NVCC is None:
        pytest.skip("nvcc not found (set CUDA_HOME or put nvcc on PATH)")
    return _cuda.load_library(["80"])  # builds the real library (through ninja when present); no GPU needed


def _layouts():
    g = torch.Generator().manual_seed(0)
    out = []
    for B, L in [(1, 1), (1, 2), (2, 7), (3, 40), (4, 33)]:
        tt = random_token_types(B, L, images_per_row=(0, 3), image_len=(1, 12), generator=g)
        out.append((tt, None))
        keep = torch.ones(B, L, dtype=torch.bool)
        for b in range(B):
            n = int(torch.randint(0, L, (1,), generator=g))
            if b % 2:
                keep[b, :n] = False  # left padding
            else:
                keep[b, L - n:] = False  # right padding
        out.append((tt, keep))
    # images touching both ends and padding cutting through an image
    tt = torch.tensor([[1, 1, 1, 0, 0, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1, 0, 1, 1], [1, 0, 1, 1, 0, 1, 0, 0, 1]])
    keep = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0, 0, 0, 0], [1] * 9]).bool()
    out += [(tt, None), (tt, keep)]
    return out


@pytest.mark.parametrize("case", range(len(_layouts())))
def test_routing_host_twin_matches_plan(host_lib, case):
    tt, keep = _layouts()[case]
    got = _cuda.routing_plan_host(tt, keep, lib=host_lib)
    plan = RoutingPlan.build(tt, keep)
    for k, v in got.items():
        assert torch.equal(v, getattr(plan, k)), k


# ------------------------------------------------------------------------------------------------ GPU
def _gpu_lib():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    ok, why = _cuda.cuda_extension_status()
    assert ok, f"CUDA device present but the csrc library is unavailable: {why}"


@pytest.mark.gpu
@pytest.mark.parametrize("B,L,padded", [(1, 1, False), (2, 7, True), (3, 2049, True), (8, 4096, True),
                                        (1, 5000, False), (5, 333, True)])
def test_gpu_routing_plan_equals_torch(B, L, padded):
    _gpu_lib()
    g = torch.Generator().manual_seed(B * 1000 + L)
    tt = random_token_types(B, L, images_per_row=(0, 4), image_len=(1, max(2, L // 3)), generator=g)
    keep = None
    if padded:
        keep = torch.ones(B, L, dtype=torch.bool)
        for b in range(B):
            n = int(torch.randint(0, L, (1,), generator=g))
            keep[b, :n] = False if b % 2 else keep[b, :n]
            if b % 2 == 0:
                keep[b, L - n:] = False
    ref = RoutingPlan.build(tt, keep)  # torch path, on the CPU
    got = _cuda.build_plan_cuda(tt.cuda(), keep.cuda() if keep is not None else None)
    for k, v in got.items():
        assert v.is_cuda
        assert torch.equal(v.cpu(), getattr(ref, k).cpu()), k


@pytest.mark.gpu
def test_gpu_benchmark_and_graph_capture():
    _gpu_lib()
    res = _cuda.benchmark_cuda_kernels("cuda")
    print(res)
    assert res["graph_capture_ok"], res.get("graph_error")
    assert res["graph_matches_eager"]
    assert res["bandwidth_ratio"] > 0.5

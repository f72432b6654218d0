"""AOT compile check: every Triton kernel config the package may pick compiles for its targets and never spills.

Two parts:
* a self-test on a test-local kernel module (written to a tmp dir) proves the machinery: a good config compiles with
  wgmma on sm_90a / mma on sm_80 and no spill; a too-large tile is flagged as spilling; TMA is detected where it is
  used and flagged where a spec expects it but the PTX lacks it; a compile error is reported, not raised.
* one test per (op module, spec) discovered under ``vexpert_kernels.ops``: fails on a compile error, a spill, or
  missing TMA for every target the spec lists. All specs are compiled once per session in 2 worker processes.
"""
import importlib
import json
import os
import subprocess
import sys
import textwrap

import pytest

from vexpert_kernels._triton_compat import HAS_TRITON

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="the AOT compile check needs Triton")

if HAS_TRITON:
    from vexpert_kernels import compile_report as cr

SELFTEST_MODULE = "vexpert_selftest_kernels"
SELFTEST_SRC = textwrap.dedent('''
    import triton
    import triton.language as tl
    from vexpert_kernels._aot import CompileSpec


    @triton.jit
    def _tile_gemm(a_ptr, b_ptr, c_ptr, M, N, K, stride_am, stride_bk, stride_cm,
                   BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        rm = pid_m * BM + tl.arange(0, BM)
        rn = pid_n * BN + tl.arange(0, BN)
        rk = tl.arange(0, BK)
        acc = tl.zeros((BM, BN), tl.float32)
        for k0 in range(0, K, BK):
            a = tl.load(a_ptr + rm[:, None] * stride_am + (k0 + rk)[None, :],
                        mask=(rm[:, None] < M) & ((k0 + rk)[None, :] < K), other=0.0)
            b = tl.load(b_ptr + (k0 + rk)[:, None] * stride_bk + rn[None, :],
                        mask=((k0 + rk)[:, None] < K) & (rn[None, :] < N), other=0.0)
            acc += tl.dot(a, b)
        tl.store(c_ptr + rm[:, None] * stride_cm + rn[None, :], acc.to(c_ptr.dtype.element_ty),
                 mask=(rm[:, None] < M) & (rn[None, :] < N))


    @triton.jit
    def _tma_scale(x_ptr, y_ptr, M, N, BM: tl.constexpr, BN: tl.constexpr):
        xd = tl.make_tensor_descriptor(x_ptr, shape=[M, N], strides=[N, 1], block_shape=[BM, BN])
        yd = tl.make_tensor_descriptor(y_ptr, shape=[M, N], strides=[N, 1], block_shape=[BM, BN])
        pm = tl.program_id(0) * BM
        pn = tl.program_id(1) * BN
        yd.store([pm, pn], xd.load([pm, pn]) * 2)


    @triton.jit
    def _bad(x_ptr, N, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)  # BLOCK=48 is not a power of two -> compile error
        tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=offs < N), mask=offs < N)


    SIG = {"a_ptr": "*bf16", "b_ptr": "*bf16", "c_ptr": "*bf16", "M": "i32", "N": "i32", "K": "i32",
           "stride_am": "i32", "stride_bk": "i32", "stride_cm": "i32"}


    def aot_compile_specs():
        return [
            CompileSpec("good[64x64x32,w4s3]", _tile_gemm, SIG, {"BM": 64, "BN": 64, "BK": 32}, 4, 3,
                        extra={"divisible_by_16": ["stride_am", "stride_bk", "stride_cm"]}),
            # fp32 accumulator of 128x256 over 128 threads = 256 registers/thread of accumulator alone -> spills
            CompileSpec("spill[128x256x32,w4s2]", _tile_gemm, SIG, {"BM": 128, "BN": 256, "BK": 32}, 4, 2,
                        targets=(90,)),
            CompileSpec("tma[64x64]", _tma_scale, {"x_ptr": "*bf16", "y_ptr": "*bf16", "M": "i32", "N": "i32"},
                        {"BM": 64, "BN": 64}, 4, 1, targets=(90,), expects_tma=True),
            CompileSpec("no_tma[64x64x32,w4s3]", _tile_gemm, SIG, {"BM": 64, "BN": 64, "BK": 32}, 4, 3,
                        targets=(90,), expects_tma=True),
            CompileSpec("bad[48]", _bad, {"x_ptr": "*fp32", "N": "i32"}, {"BLOCK": 48}, 4, 1, targets=(80,)),
        ]
''')


# ------------------------------------------------------------------------------------------------ pure parsing
def test_parse_resource_usage_picks_the_named_function():
    text = ("Resource usage:\n Common:\n  GLOBAL:0\n Function other:\n  REG:10 STACK:0 SHARED:0 LOCAL:0 CONSTANT[0]:1\n"
            " Function kern:\n  REG:168 STACK:24 SHARED:1024 LOCAL:8 CONSTANT[0]:584 TEXTURE:0\n")
    assert cr.parse_resource_usage(text, "kern") == {"registers": 168, "stack": 24, "shared": 1024, "local": 8}
    assert cr.parse_resource_usage(text, "missing")["registers"] == 10
    with pytest.raises(ValueError, match="no function resource line"):
        cr.parse_resource_usage("garbage", "kern")


def test_ptx_features():
    assert cr.ptx_features("wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16") == \
        {"wgmma": True, "mma": False, "tma": False}
    assert cr.ptx_features("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32")["mma"]
    assert cr.ptx_features("cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes")["tma"]


def test_problems_of_results():
    base = dict(module="m", index=0, name="k", arch=90, num_warps=4, num_stages=3)
    assert cr.CompileResult(**base, ok=True, stack_bytes=0, local_bytes=0).problems() == []
    assert "spills" in cr.CompileResult(**base, ok=True, stack_bytes=8, local_bytes=0).problems()[0]
    assert "TMA" in cr.CompileResult(**base, ok=True, stack_bytes=0, local_bytes=0, expects_tma=True,
                                     tma=False).problems()[0]
    assert cr.CompileResult(**{**base, "arch": 80}, ok=True, stack_bytes=0, local_bytes=0, expects_tma=True,
                            tma=False).problems() == []  # no TMA before sm_90
    assert "compile error" in cr.CompileResult(**base, ok=False, error="boom").problems()[0]


# ------------------------------------------------------------------------------------------------ self-test
@pytest.fixture(scope="module")
def selftest_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("aot_selftest")
    (d / f"{SELFTEST_MODULE}.py").write_text(SELFTEST_SRC)
    return d


@pytest.fixture(scope="module")
def selftest_results(selftest_dir):
    results = cr.build_report([SELFTEST_MODULE], archs=(90, 80), sys_path=[str(selftest_dir)])
    return {(r.name, r.arch): r for r in results}


def test_selftest_plans_only_listed_targets(selftest_results):
    assert set(selftest_results) == {("good[64x64x32,w4s3]", 90), ("good[64x64x32,w4s3]", 80),
                                     ("spill[128x256x32,w4s2]", 90), ("tma[64x64]", 90),
                                     ("no_tma[64x64x32,w4s3]", 90), ("bad[48]", 80)}


def test_selftest_good_config(selftest_results):
    for arch in (90, 80):
        r = selftest_results[("good[64x64x32,w4s3]", arch)]
        assert r.ok, r.error
        assert r.problems() == []
        assert 0 < r.registers <= 255 and r.stack_bytes == 0 and r.shared_bytes > 0
    assert selftest_results[("good[64x64x32,w4s3]", 90)].wgmma  # Hopper path uses warpgroup MMA
    assert selftest_results[("good[64x64x32,w4s3]", 80)].mma and not selftest_results[("good[64x64x32,w4s3]", 80)].wgmma


def test_selftest_spill_is_flagged(selftest_results):
    r = selftest_results[("spill[128x256x32,w4s2]", 90)]
    assert r.ok and r.stack_bytes > 0 and r.spills
    assert any("spills" in p for p in r.problems())


def test_selftest_tma_detection(selftest_results):
    good = selftest_results[("tma[64x64]", 90)]
    assert good.ok and good.tma and good.problems() == []
    missing = selftest_results[("no_tma[64x64x32,w4s3]", 90)]
    assert missing.ok and not missing.tma and any("TMA" in p for p in missing.problems())


def test_selftest_compile_error_is_reported(selftest_results):
    r = selftest_results[("bad[48]", 80)]
    assert not r.ok and "power of 2" in r.error


def test_cli_markdown_and_json(selftest_dir, tmp_path):
    out_json = tmp_path / "report.json"
    env = dict(os.environ)
    proc = subprocess.run([sys.executable, "-m", "vexpert_kernels.compile_report", "--module", SELFTEST_MODULE,
                           "--path", str(selftest_dir), "--arch", "90", "--markdown", "--json", str(out_json)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 1, proc.stderr  # the self-test module holds a spill and a missing TMA
    assert "| good[64x64x32,w4s3] | sm_90a | 4/3 |" in proc.stdout
    data = json.loads(out_json.read_text())
    assert data["archs"] == [90]
    assert {r["name"] for r in data["results"]} == {"good[64x64x32,w4s3]", "spill[128x256x32,w4s2]", "tma[64x64]",
                                                    "no_tma[64x64x32,w4s3]"}


def test_spec_naming_an_unknown_argument_is_an_error(selftest_dir):
    sys.path.insert(0, str(selftest_dir))
    try:
        mod = importlib.import_module(SELFTEST_MODULE)
    finally:
        sys.path.remove(str(selftest_dir))
    from vexpert_kernels._aot import CompileSpec
    spec = CompileSpec("typo", mod._bad, {"x_ptr": "*fp32", "N": "i32", "nope": "i32"}, {"BLOCK": 64})
    with pytest.raises(ValueError, match="nope"):
        cr._full_signature(type("F", (), {"arg_names": ["x_ptr", "N", "BLOCK"]})(), spec)
    spec = CompileSpec("missing", mod._bad, {"x_ptr": "*fp32"}, {"BLOCK": 64})
    with pytest.raises(ValueError, match="'N'"):
        cr._full_signature(type("F", (), {"arg_names": ["x_ptr", "N", "BLOCK"]})(), spec)


# ------------------------------------------------------------------------------------------------ the package's kernels
def _package_specs():
    """(module, index, name, targets) for every spec of every op module, collected at import time."""
    if not HAS_TRITON:
        return []
    out = []
    for module, err in cr.discover_modules():
        if err:
            out.append(pytest.param(module, -1, err, (), id=f"{module}:IMPORT-ERROR"))
            continue
        try:
            specs = cr.load_specs(module)
        except Exception as exc:
            out.append(pytest.param(module, -1, repr(exc), (), id=f"{module}:SPECS-ERROR"))
            continue
        for i, s in enumerate(specs):
            out.append(pytest.param(module, i, s.name, tuple(s.targets), id=f"{module.rsplit('.', 1)[-1]}:{s.name}"))
    return out


PACKAGE_SPECS = _package_specs()


@pytest.fixture(scope="session")
def package_results():
    jobs = [(p.values[0], p.values[1], a) for p in PACKAGE_SPECS if p.values[1] >= 0
            for a in (90, 80) if a in p.values[3]]
    return {(r.module, r.index, r.arch): r for r in cr.run_jobs(jobs, n_procs=min(2, os.cpu_count() or 1))}


def test_every_op_module_lists_specs():
    """A module that owns @triton.jit kernels must expose aot_compile_specs() so the check sees them."""
    import pkgutil

    import vexpert_kernels.ops as ops
    listed = {m for m, _ in cr.discover_modules()}
    missing = []
    for info in pkgutil.walk_packages(ops.__path__, prefix="vexpert_kernels.ops."):
        mod = importlib.import_module(info.name)
        owns = [n for n, v in vars(mod).items()
                if type(v).__name__ in ("JITFunction", "InterpretedFunction") and getattr(v, "__module__", None) in
                (info.name, None) and getattr(getattr(v, "fn", None), "__module__", info.name) == info.name]
        if owns and info.name not in listed:
            missing.append(f"{info.name} ({', '.join(owns[:3])})")
    assert not missing, f"op modules with Triton kernels but no aot_compile_specs(): {missing}"


@pytest.mark.parametrize("module,index,name,targets", PACKAGE_SPECS)
def test_package_kernel_compiles_without_spills(module, index, name, targets, package_results):
    assert index >= 0, f"{module}: {name}"
    assert targets, f"{module}:{name} lists no target"
    problems = []
    for arch in (90, 80):
        if arch not in targets:
            continue
        r = package_results[(module, index, arch)]
        problems += [f"sm_{arch}: {p}" for p in r.problems()]
    assert not problems, f"{module}:{name}: " + "; ".join(problems)

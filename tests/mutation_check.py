"""Mutation check: plant known, plausible bugs in a copy of the library and assert the test suite catches each.

Each mutant is data -- (name, file, old, new, tests): ``old`` must occur EXACTLY once in ``file`` (a refactor that
moves or rewrites the code fails this check loudly: retarget the row, do not delete it), is replaced by ``new`` in
a temporary copy of the repository (package + tests), and ``tests`` (pytest node ids: the smallest subset that
should catch that bug) run there with ``PYTHONPATH`` pointing at the copy. A mutant is caught when pytest reports
failing tests (exit code 1); it survives when they all pass (exit code 0); anything else (collection error, crash)
is reported as an error. The unmutated copy runs the union of the tests first: they must pass, or a "caught"
would mean nothing.

    python tests/mutation_check.py                 # all mutants (~3-5 min on 2 CPU cores)
    python tests/mutation_check.py rope_sign eoi   # a subset, by name
    python tests/mutation_check.py --list

``file`` may list several candidate paths (the op modules are being split into packages: ``ops/routed_linear.py`` ->
``ops/routed_linear/kernels.py``, ``ops/flash_attention.py`` -> ``ops/flash_attention/kernels.py``); the first one
holding ``old`` exactly once is mutated. When the code is rewritten, update ``file``/``old``/``new`` so each row
plants the same bug again.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COPY = ("vexpert_kernels", "tests", "csrc", "pyproject.toml", "setup.py")

BLOCK = "tests/test_block.py::"
FAST_TRITON = BLOCK + "test_block_matches_reference[gqa_vbias-auto]"     # L = 13, one tile, Triton path
FAST_TORCH = BLOCK + "test_block_matches_reference[gqa_vbias-torch]"     # torch path (shares RoutingPlan)
MULTI_TILE = BLOCK + "test_block_multi_tile_branches_fp32"               # L = 48, left padding mid-tile, branches
MULTI_TILE_BF16 = BLOCK + "test_block_multi_tile_branches_bf16_bidirectional"


GEMM = ("vexpert_kernels/ops/routed_linear/kernels.py", "vexpert_kernels/ops/routed_linear.py")
ATTN = ("vexpert_kernels/ops/flash_attention/kernels.py", "vexpert_kernels/ops/flash_attention.py")


@dataclass(frozen=True)
class Mutant:
    name: str
    file: tuple  # candidate paths, first match wins
    old: str
    new: str
    tests: tuple
    why: str = ""


MUTANTS = (
    Mutant("expert_boundary", GEMM,
           "row_end = tl.where(is_l, n_t, n_v)",
           "row_end = tl.where(is_l, n_t, n_v - 1)",
           (FAST_TRITON,), "grouped GEMM: the last vision row is never computed (off by one at the expert boundary)"),
    Mutant("vision_bias", GEMM,
           "acc += bias.to(tl.float32)[None, :]",
           "acc += tl.where(is_l, bias.to(tl.float32), 0.0)[None, :]",
           (MULTI_TILE_BF16,), "QKV epilogue drops the vision bias on half of each head (caught in bf16 per branch)"),
    Mutant("rope_sign", GEMM,
           "o1 = acc * c - acc2 * s",
           "o1 = acc * c + acc2 * s",
           (MULTI_TILE_BF16,), "RoPE rotation sign flipped in the QKV epilogue (caught in bf16 per branch)"),
    Mutant("causal_edge", ATTN,
           "ok = (offs_n[None, :] <= qpos[:, None]) & n_valid[None, :] & m_valid[:, None]",
           "ok = (offs_n[None, :] < qpos[:, None]) & n_valid[None, :] & m_valid[:, None]",
           (FAST_TRITON,), "forward attention: a query no longer sees its own key (causal diagonal)"),
    Mutant("key_padding_bwd", ATTN,
           "        elif HAS_KPM:\n            pT = tl.where(kkeep[:, None], pT, 0.0)",
           "        elif HAS_KPM:\n            pT = pT",
           (MULTI_TILE,), "dK/dV: interior (unmasked) tiles drop the key padding mask (needs left padding, L > tile)"),
    Mutant("eoi_routing", ("vexpert_kernels/routing.py",),
           "vision[:, :-1] = (tt[:, :-1] == VISION_TOKEN_TYPE) & (tt[:, 1:] == VISION_TOKEN_TYPE)",
           "vision[:, :-1] = (tt[:, :-1] == VISION_TOKEN_TYPE)",
           (FAST_TORCH,), "RoutingPlan routes eoi to the vision expert (the reference has its own rule)"),
    Mutant("dw_last_k_tile", GEMM,
           "        k_mask = ks < K\n",
           "        k_mask = ks < K - BLOCK_K\n",
           (FAST_TRITON,), "weight-gradient kernel never stores the last K tile of dW"),
)


def _copy_repo(dst: str) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".hypothesis", "*.so", "build")
    for name in COPY:
        src = os.path.join(ROOT, name)
        if os.path.isdir(src):
            shutil.copytree(src, os.path.join(dst, name), ignore=ignore)
        elif os.path.exists(src):
            shutil.copy2(src, os.path.join(dst, name))


def target(root: str, m: Mutant) -> str:
    """The path (under root) this mutant applies to; raises, naming the row to retarget, when no candidate holds its
    pattern exactly once."""
    seen = []
    for rel in m.file:
        path = os.path.join(root, rel)
        if not os.path.exists(path):
            seen.append(f"{rel}: missing")
            continue
        with open(path) as f:
            n = f.read().count(m.old)
        if n == 1:
            return path
        seen.append(f"{rel}: {n} occurrences")
    raise AssertionError(f"mutant {m.name}: {m.old!r} is not in any candidate file exactly once ({'; '.join(seen)}): "
                         "the code changed -- retarget this row of MUTANTS so it plants the same bug")


def apply(root: str, m: Mutant) -> None:
    path = target(root, m)
    with open(path) as f:
        text = f.read()
    with open(path, "w") as f:
        f.write(text.replace(m.old, m.new))


def run_tests(root: str, tests, timeout: float = 900) -> tuple:
    env = dict(os.environ, PYTHONPATH=root, TRITON_INTERPRET="1", PYTHONDONTWRITEBYTECODE="1")
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-p", "no:randomly", *tests]
    t0 = time.time()
    p = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    return p.returncode, time.time() - t0, (p.stdout + p.stderr)[-3000:]


def check(names=None, verbose=True) -> dict:
    """Run the selected mutants -> {name: "caught" | "SURVIVED" | "error: ..."}; raises if the baseline fails."""
    chosen = [m for m in MUTANTS if not names or m.name in names]
    unknown = set(names or ()) - {m.name for m in MUTANTS}
    if unknown:
        raise ValueError(f"unknown mutants {sorted(unknown)}; known: {[m.name for m in MUTANTS]}")
    results = {}
    with tempfile.TemporaryDirectory(prefix="vexpert-mutants-") as tmp:
        base = os.path.join(tmp, "base")
        os.makedirs(base)
        _copy_repo(base)
        for m in chosen:  # every pattern must match before anything runs
            target(base, m)
        union = sorted({t for m in chosen for t in m.tests})
        rc, secs, out = run_tests(base, union)
        if verbose:
            print(f"baseline (unmutated): rc={rc} in {secs:.0f}s: {' '.join(union)}", flush=True)
        if rc != 0:
            raise AssertionError(f"the unmutated copy fails the selected tests (rc={rc}); fix them first:\n{out}")
        for m in chosen:
            root = os.path.join(tmp, m.name)
            shutil.copytree(base, root)
            apply(root, m)
            rc, secs, out = run_tests(root, m.tests)
            results[m.name] = "caught" if rc == 1 else "SURVIVED" if rc == 0 else f"error: pytest rc={rc}\n{out}"
            if verbose:
                print(f"{m.name:18s} {results[m.name].splitlines()[0]:10s} {secs:5.0f}s  ({m.why})", flush=True)
            shutil.rmtree(root, ignore_errors=True)
    return results


def main(argv) -> int:
    if "--list" in argv:
        for m in MUTANTS:
            print(f"{m.name:18s} {' | '.join(m.file)}: {m.why}\n{'':18s} tests: {', '.join(m.tests)}")
        return 0
    results = check([a for a in argv if not a.startswith("-")] or None)
    bad = {k: v for k, v in results.items() if v != "caught"}
    for k, v in bad.items():
        print(f"NOT CAUGHT: {k}: {v}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""The tuner's logic on CPU with a fake timer, fake clock and fake candidates (no GPU needed).

Covers: fastest *correct* candidate wins; wrong / raising / NaN candidates are dropped and logged once; the time
budget; the on-disk cache (reuse, two processes writing at once, version change = new key, corrupt file); never an
unverified choice; no tuning while compiling/capturing; ``VEXPERT_AUTOTUNE=0``; the tune CLI's CPU path.
"""
import json
import logging
import multiprocessing as mp
import os
import random
import subprocess
import sys

import pytest
import torch

from vexpert_kernels import autotune
from vexpert_kernels.autotune import Tuner, tolerance, token_bucket
from vexpert_kernels.autotune import tuner as tuner_mod
from vexpert_kernels.autotune.cache import DiskCache

FP = {"gpu": "Fake GPU 9000", "capability": "9.0", "torch": "2.11.0", "triton": "3.6.0"}
REF = torch.linspace(-2.0, 3.0, 64).reshape(8, 8)


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


class Cand:
    """A fake candidate: returns ``out`` (or raises), takes ``ms`` per timed call and ``warm_s`` of clock to warm up."""

    def __init__(self, clock, ms=1.0, out=None, exc=None, warm_s=0.0):
        self.clock, self.ms, self.out, self.exc, self.warm_s, self.calls = clock, ms, out, exc, warm_s, 0

    def __call__(self):
        self.calls += 1
        if self.calls == 1:
            self.clock.t += self.warm_s
        if self.exc is not None:
            raise self.exc
        return (REF.clone() if self.out is None else self.out)


def make_tuner(tmp_path, clock=None, fp=FP, budget_s=2.0, **kw):
    clock = clock or Clock()

    def timer(fn):
        clock.t += 5 * fn.ms / 1e3
        return fn.ms
    return Tuner(cache_dir=str(tmp_path), timer=timer, clock=clock, can_tune=lambda out: None,
                 fingerprint=lambda device: dict(fp), device_available=lambda: True, budget_s=budget_s, **kw)


class Ref:
    def __init__(self, value=REF):
        self.value, self.calls = value, 0

    def __call__(self):
        self.calls += 1
        return self.value.clone()


def test_fastest_correct_wins_and_bad_ones_are_dropped_and_logged_once(tmp_path, caplog):
    c = Clock()
    cands = {"torch": Cand(c, ms=5.0), "triton:fast_wrong": Cand(c, ms=0.5, out=REF + 0.5),
             "triton:raises": Cand(c, ms=0.1, exc=RuntimeError("out of shared memory")),
             "triton:nan": Cand(c, ms=0.2, out=torch.where(REF > 2.9, float("nan"), REF)),
             "triton:good": Cand(c, ms=2.0, out=REF * (1 + 1e-3)), "cublas": Cand(c, ms=3.0)}
    t = make_tuner(tmp_path, c)
    with caplog.at_level(logging.WARNING, logger="vexpert_kernels.autotune"):
        for _ in range(3):
            assert t.select("linear", ("bf16", 64, 32), cands, Ref(), static="torch", dtype=torch.bfloat16) == \
                "triton:good"
    assert cands["triton:fast_wrong"].calls == 1 and cands["triton:raises"].calls == 1  # verified once, never timed
    (row,) = t.decisions()
    v = row["candidates"]
    assert v["triton:fast_wrong"]["verdict"].startswith("wrong") and v["triton:fast_wrong"]["ms"] is None
    assert "out of shared memory" in v["triton:raises"]["verdict"] and v["triton:nan"]["verdict"].startswith("wrong")
    assert "NaN" in v["triton:nan"]["verdict"]
    assert v["torch"]["ms"] == 5.0 and v["triton:good"]["ms"] == 2.0 and row["status"] == "tuned"
    drops = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
    assert len(drops) == 3 and any("triton:fast_wrong" in d for d in drops)


def test_no_correct_candidate_gives_static(tmp_path):
    c = Clock()
    cands = {"torch": Cand(c, out=REF + 1), "triton": Cand(c, exc=ValueError("boom"))}
    t = make_tuner(tmp_path, c)
    assert t.select("op", (1,), cands, Ref(), static="torch", dtype=torch.float32) == "torch"
    assert t.decisions()[0]["reason"].startswith("no candidate verified")


def test_static_must_be_a_candidate(tmp_path):
    with pytest.raises(ValueError, match="static choice 'torch'"):
        make_tuner(tmp_path).select("op", (1,), {"triton": lambda: REF}, Ref(), static="torch", dtype=torch.float32)


def test_budget_stops_timing_and_chooses_among_measured(tmp_path, caplog, monkeypatch):
    c = Clock()
    cands = {"torch": Cand(c, ms=4.0), "triton:slow_compile": Cand(c, ms=3.0, warm_s=2.5),
             "triton:never_reached": Cand(c, ms=0.1)}
    monkeypatch.setenv("VEXPERT_AUTOTUNE_BUDGET_S", "2")
    t = make_tuner(tmp_path, c, budget_s=None)
    assert t.budget_s == 2.0
    with caplog.at_level(logging.WARNING, logger="vexpert_kernels.autotune"):
        assert t.select("op", (1,), cands, Ref(), static="torch", dtype=torch.float32) == "triton:slow_compile"
    assert cands["triton:never_reached"].calls == 0
    row = t.decisions()[0]
    assert row["budget_hit"] and row["candidates"]["triton:never_reached"]["verdict"].startswith("unmeasured")
    assert any("time budget" in r.getMessage() for r in caplog.records)
    monkeypatch.setenv("VEXPERT_AUTOTUNE_BUDGET_S", "-1")
    with pytest.raises(ValueError, match="VEXPERT_AUTOTUNE_BUDGET_S"):
        tuner_mod.budget_s()


def test_disk_cache_is_reused_by_a_new_process(tmp_path):
    c = Clock()
    cands = {"torch": Cand(c, ms=2.0), "triton": Cand(c, ms=1.0)}
    assert make_tuner(tmp_path, c).select("op", (7, "x"), cands, Ref(), static="torch", dtype=torch.float32) == "triton"
    (f,) = [n for n in os.listdir(tmp_path) if n.endswith(".json")]
    data = json.load(open(tmp_path / f))
    assert data["fingerprint"] == FP and len(data["decisions"]) == 1
    fresh = {"torch": Cand(c, ms=2.0), "triton": Cand(c, ms=1.0)}
    t2 = make_tuner(tmp_path, c)
    assert t2.select("op", (7, "x"), fresh, Ref(), static="torch", dtype=torch.float32) == "triton"
    assert fresh["torch"].calls == 0 and fresh["triton"].calls == 0
    assert t2.decisions()[0]["status"] == "cached"
    # a cached name the caller no longer offers is not returned: tune again
    other = {"torch": Cand(c, ms=2.0), "triton:v2": Cand(c, ms=1.5)}
    assert make_tuner(tmp_path, c).select("op", (7, "x"), other, Ref(), static="torch", dtype=torch.float32) == \
        "triton:v2"
    # force retunes even when cached
    t4 = make_tuner(tmp_path, c)
    t4.force = True
    again = {"torch": Cand(c, ms=0.5), "triton:v2": Cand(c, ms=1.5)}
    assert t4.select("op", (7, "x"), again, Ref(), static="torch", dtype=torch.float32) == "torch"
    n = again["torch"].calls
    assert t4.select("op", (7, "x"), again, Ref(), static="torch", dtype=torch.float32) == "torch"
    assert again["torch"].calls == n  # forced once per process, then the fresh decision is reused


def test_version_change_is_a_new_key_and_corrupt_file_is_tolerated(tmp_path, caplog):
    c = Clock()
    make_tuner(tmp_path, c).select("op", (1,), {"torch": Cand(c, ms=2.0), "triton": Cand(c, ms=1.0)}, Ref(),
                                   static="torch", dtype=torch.float32)
    newer = dict(FP, triton="3.7.0")
    cands = {"torch": Cand(c, ms=1.0), "triton": Cand(c, ms=2.0)}
    assert make_tuner(tmp_path, c, fp=newer).select("op", (1,), cands, Ref(), static="torch",
                                                    dtype=torch.float32) == "torch"
    assert cands["triton"].calls == 1  # re-measured under the new version
    assert len([n for n in os.listdir(tmp_path) if n.endswith(".json")]) == 2
    path = DiskCache(str(tmp_path), FP).path
    with open(path, "w") as f:
        f.write('{"format": 1, "decisions": {tru')
    cands = {"torch": Cand(c, ms=1.0), "triton": Cand(c, ms=2.0)}
    with caplog.at_level(logging.WARNING, logger="vexpert_kernels.autotune"):
        assert make_tuner(tmp_path, c).select("op", (1,), cands, Ref(), static="torch", dtype=torch.float32) == "torch"
    assert any("unreadable" in r.getMessage() for r in caplog.records)
    assert len(json.load(open(path))["decisions"]) == 1  # rewritten, valid again


def _writer(args):
    cache_dir, worker, n = args
    cache = DiskCache(cache_dir, FP)
    for j in range(n):
        cache.put({f"w{worker}-{j}": {"chosen": f"c{j}", "op": "op"}})
    return worker


def test_two_processes_writing_concurrently_lose_nothing(tmp_path):
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    with ctx.Pool(2) as pool:
        assert sorted(pool.map(_writer, [(str(tmp_path), 0, 25), (str(tmp_path), 1, 25)])) == [0, 1]
    got = DiskCache(str(tmp_path), FP).load()
    assert len(got) == 50 and got["w1-24"]["chosen"] == "c24"
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp-")]  # no leftover temp files


def test_never_returns_an_unverified_candidate(tmp_path):
    rng = random.Random(0)
    for trial in range(40):
        c = Clock()
        cands, good = {}, {"torch"}
        cands["torch"] = Cand(c, ms=rng.uniform(0.5, 5))
        for i in range(rng.randint(1, 5)):
            kind = rng.choice(["ok", "wrong", "raise", "nan", "slow"])
            name = f"k{i}:{kind}"
            if kind == "ok":
                cands[name] = Cand(c, ms=rng.uniform(0.1, 5))
                good.add(name)
            elif kind == "wrong":
                cands[name] = Cand(c, ms=0.01, out=REF * 1.5)
            elif kind == "raise":
                cands[name] = Cand(c, ms=0.01, exc=RuntimeError("x"))
            elif kind == "nan":
                cands[name] = Cand(c, ms=0.01, out=REF * float("nan"))
            else:
                cands[name] = Cand(c, ms=0.05, warm_s=3.0)  # correct, but blows the budget
                good.add(name)
        t = make_tuner(tmp_path / str(trial), c)
        chosen = t.select("op", (trial,), cands, Ref(), static="torch", dtype=torch.float32)
        row = t.decisions()[0]
        assert chosen in good and (chosen == "torch" or row["candidates"][chosen]["verdict"] == "ok")


def test_no_tuning_while_compiling_or_capturing(tmp_path, monkeypatch):
    c = Clock()
    ref = Ref()
    cands = {"torch": Cand(c, ms=2.0), "triton": Cand(c, ms=1.0)}
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert "torch.compile" in tuner_mod.tracing_reason()
    t = make_tuner(tmp_path, c)
    assert t.select("op", (1,), cands, ref, static="torch", dtype=torch.float32) == "torch"
    assert ref.calls == 0 and cands["triton"].calls == 0  # nothing ran under tracing
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: False)
    assert t.select("op", (1,), cands, ref, static="torch", dtype=torch.float32) == "triton"  # eager call tunes
    # a new process tracing first reuses the disk decision
    monkeypatch.setattr(tuner_mod, "tracing_reason", lambda: "a CUDA graph is being captured")
    fresh = {"torch": Cand(c), "triton": Cand(c)}
    assert make_tuner(tmp_path, c).select("op", (1,), fresh, Ref(), static="torch", dtype=torch.float32) == "triton"
    assert fresh["triton"].calls == 0


def test_torch_compile_fullgraph_uses_the_decision_as_a_constant(tmp_path):
    c = Clock()
    cands = {"torch": Cand(c, ms=2.0), "alt": Cand(c, ms=1.0)}
    ref = Ref()

    def f(x):
        name = autotune.select("op", ("fp32", x.shape[0]), cands, ref, static="torch", dtype=x.dtype)
        return x * (2.0 if name == "torch" else 3.0)

    torch._dynamo.reset()
    with autotune.using(make_tuner(tmp_path / "a", c)):  # nothing tuned yet: static, and nothing runs while tracing
        assert float(torch.compile(f, fullgraph=True, backend="eager")(torch.ones(4))[0]) == 2.0
        assert cands["alt"].calls == 0 and ref.calls == 0
    torch._dynamo.reset()
    with autotune.using(make_tuner(tmp_path / "b", c)):
        f(torch.ones(5))  # an eager step tunes: "alt" wins
        assert float(torch.compile(f, fullgraph=True, backend="eager")(torch.ones(5))[0]) == 3.0
    torch._dynamo.reset()


def test_autotune_off_means_static_always(tmp_path, monkeypatch):
    c = Clock()
    t = make_tuner(tmp_path, c)
    cands = {"torch": Cand(c, ms=2.0), "triton": Cand(c, ms=1.0)}
    assert t.select("op", (1,), cands, Ref(), static="torch", dtype=torch.float32) == "triton"
    monkeypatch.setenv("VEXPERT_AUTOTUNE", "0")
    ref = Ref()
    assert t.select("op", (1,), cands, ref, static="torch", dtype=torch.float32) == "torch"  # even if tuned before
    assert make_tuner(tmp_path, c).select("op", (1,), cands, ref, static="torch", dtype=torch.float32) == "torch"
    assert ref.calls == 0
    monkeypatch.delenv("VEXPERT_AUTOTUNE")
    assert t.select("op", (1,), cands, Ref(), static="torch", dtype=torch.float32) == "triton"


def test_untunable_tensors_and_tuner_errors_fall_back_to_static(tmp_path, caplog):
    c = Clock()
    ref = Ref()
    t = Tuner(cache_dir=str(tmp_path), device_available=lambda: True, fingerprint=lambda d: FP)  # default can_tune
    cands = {"torch": Cand(c), "triton": Cand(c, ms=0.1)}
    for _ in range(3):  # CPU tensors on a "CUDA machine": static, and the reference runs once only
        assert t.select("op", (1,), cands, ref, static="torch", dtype=torch.float32) == "torch"
    assert ref.calls == 1 and cands["triton"].calls == 0 and "cpu" in t.decisions()[0]["reason"]

    def broken():
        raise RuntimeError("reference exploded")
    with caplog.at_level(logging.WARNING, logger="vexpert_kernels.autotune"):
        assert make_tuner(tmp_path, c).select("op", (2,), cands, broken, static="torch",
                                              dtype=torch.float32) == "torch"
    assert any("reference exploded" in r.getMessage() for r in caplog.records)


def test_default_select_without_cuda_is_static_and_listed(monkeypatch, tmp_path):
    monkeypatch.delenv("VEXPERT_AUTOTUNE_CACHE_DIR", raising=False)
    monkeypatch.setenv("VEXPERT_CACHE_DIR", str(tmp_path))
    assert autotune.default_cache_dir() == str(tmp_path / "autotune")
    monkeypatch.setenv("VEXPERT_AUTOTUNE_CACHE_DIR", str(tmp_path / "tuned"))
    with autotune.using(Tuner(device_available=lambda: False)) as t:
        ref = Ref()
        assert autotune.select("op", (3,), {"torch": lambda: REF, "triton": lambda: REF}, ref, static="triton",
                               dtype=torch.float32) == "triton"
        assert ref.calls == 0 and t.cache_dir == str(tmp_path / "tuned")
        assert autotune.decisions() == [dict(op="op", key=[3], chosen="triton", status="static",
                                             reason="no CUDA device")]
        autotune.clear_cache()
        assert autotune.decisions() == []


def test_tolerance_mismatch_and_token_bucket():
    assert tolerance(torch.bfloat16) > tolerance(torch.float16) > tolerance(torch.float64)
    with pytest.raises(ValueError):
        tolerance(torch.int32)
    mm = autotune.mismatch
    inf_ref = torch.tensor([1.0, float("inf"), float("nan")])
    assert mm(inf_ref.clone(), inf_ref, torch.float32) is None
    assert "non-finite" in mm(torch.tensor([1.0, float("nan"), float("nan")]), inf_ref, torch.float32)
    assert "shape" in mm(REF[:4], REF, torch.float32)
    assert "outputs" in mm((REF,), (REF, REF), torch.float32)
    assert mm((REF, None), (REF * (1 + 1e-2), None), torch.bfloat16) is None
    assert mm((REF, None), (REF * (1 + 1e-2), None), torch.float16) is not None
    assert [token_bucket(n) for n in (0, 1, 2, 3, 8192, 8193)] == [0, 1, 2, 4, 8192, 16384]
    with pytest.raises(ValueError):
        token_bucket(-1)


def test_tune_cli_dry_run_lists_shapes_and_static_choice(capsys, tmp_path):
    from vexpert_kernels import tune
    out = tmp_path / "t.json"
    assert tune.main(["--preset", "cogvlm_chat_17b", "--tokens", "8192", "--dry-run", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "qkv" in text and "T=8192 N=12288 K=4096" in text and "static" in text
    assert json.load(open(out))["batch"] == 4
    with pytest.raises(SystemExit):
        tune.main(["--tokens", "100", "--seq-len", "64"])


def test_tune_cli_runs_the_layer_ops_without_cuda(tmp_path):
    # plain-PyTorch CPU path (no interpreter: fast); proves the op calls (fwd + bwd of every op) are well-formed
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", TRITON_INTERPRET="0")
    out = tmp_path / "tune.json"
    r = subprocess.run([sys.executable, "-m", "vexpert_kernels.tune", "--preset", "tiny", "--tokens", "64",
                        "--seq-len", "32", "--dtype", "fp32", "--device", "cpu", "--json", str(out)],
                       capture_output=True, text=True,
                       env=env, timeout=300, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "autotune decisions" in r.stdout and "ERROR" not in r.stdout
    rep = json.load(open(out))
    assert rep["ops_done"] == ["qkv", "attention", "o", "mlp"] and rep["errors"] == {}

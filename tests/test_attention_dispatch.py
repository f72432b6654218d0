"""Attention entry points: bad input (issue 12), backend selection and the autotune hook (issue 13).

Every case is small; the Triton kernel runs through the interpreter on CPU tensors when there is no GPU, on CUDA
tensors (bf16: our CUDA attention takes fp16/bf16) when there is one (tests/conftest.py). Host-side value checks and
the interpreter-only cases stay on CPU tensors."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from vexpert_kernels.ops.attention import api as att_api
from vexpert_kernels.ops.attention import dispatch as att
from vexpert_kernels.ops.attention import last_backend, mixed_attention, mixed_attention_varlen
from vexpert_kernels.ops.flash_attention import launch as fa_launch
from vexpert_kernels.testing import rel_err
from conftest import DEVICE, HAS_CUDA

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRITON_DTYPE = torch.bfloat16 if HAS_CUDA else torch.float32  # our Triton attention: fp32 only in the interpreter
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    monkeypatch.delenv(att.ENV_VAR, raising=False)
    monkeypatch.setattr(fa_launch, "_POISON_OUTPUTS", True)


def _packed(lq=(3, 5), lk=(4, 6), H=2, KV=1, hd=16, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(sum(lq), H, hd, generator=g, dtype=dtype).to(device)
    k = torch.randn(sum(lk), KV, hd, generator=g, dtype=dtype).to(device)
    v = torch.randn(sum(lk), KV, hd, generator=g, dtype=dtype).to(device)
    cq = torch.tensor([0, *torch.tensor(lq).cumsum(0).tolist()], device=device)
    ck = torch.tensor([0, *torch.tensor(lk).cumsum(0).tolist()], device=device)
    return q, k, v, cq, ck


# ------------------------------------------------------------------------------------------------- bad input table
# (what is wrong, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, exception, phrase); rows: 8 q, 10 k
BAD_VARLEN = [
    ("decreasing", [0, 5, 3, 8], [0, 4, 6, 10], 5, 6, ValueError, "non-decreasing"),
    ("last < rows", [0, 3, 7], [0, 4, 10], 5, 6, ValueError, "number of rows"),
    ("last > rows", [0, 3, 9], [0, 4, 10], 6, 6, ValueError, "number of rows"),
    ("k last > rows", [0, 3, 8], [0, 4, 12], 5, 8, ValueError, "cu_seqlens_k"),
    ("first != 0", [1, 3, 8], [0, 4, 10], 5, 6, ValueError, "from 0"),
    ("max_seqlen_q too small", [0, 3, 8], [0, 4, 10], 4, 6, ValueError, "max_seqlen"),
    ("max_seqlen_k too small", [0, 3, 8], [0, 4, 10], 5, 5, ValueError, "max_seqlen"),
    ("2-D", [[0, 3, 8]], [0, 4, 10], 5, 6, ValueError, "cu_seqlens_q"),
    ("one entry", [0], [0], 5, 6, ValueError, "at least 2"),
    ("float", [0.0, 3.0, 8.0], [0, 4, 10], 5, 6, TypeError, "integer"),
    ("negative max_seqlen", [0, 3, 8], [0, 4, 10], -1, 6, ValueError, "max_seqlen_q"),
]


@pytest.mark.parametrize("backend", ["triton", "sdpa", "math"])
@pytest.mark.parametrize("case", BAD_VARLEN, ids=[c[0] for c in BAD_VARLEN])
def test_varlen_rejects_bad_cu_seqlens(case, backend):
    _, cq, ck, mq, mk, exc, phrase = case
    q, k, v, _, _ = _packed((3, 5), (4, 6))
    with pytest.raises(exc, match=phrase):
        mixed_attention_varlen(q, k, v, torch.tensor(cq), torch.tensor(ck), mq, mk, backend=backend)


@pytest.mark.parametrize("scale", [float("inf"), float("nan"), 0.0, -0.5])
def test_softmax_scale_must_be_finite_positive(scale):
    q, k, v, cq, ck = _packed()
    with pytest.raises(ValueError, match="softmax_scale"):
        mixed_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                        softmax_scale=scale)
    with pytest.raises(ValueError, match="softmax_scale"):
        mixed_attention_varlen(q, k, v, cq, ck, 5, 6, softmax_scale=scale)
    with pytest.raises(TypeError, match="softmax_scale"):
        mixed_attention_varlen(q, k, v, cq, ck, 5, 6, softmax_scale="0.1")


def test_unknown_backend_and_env_are_rejected_with_the_list(monkeypatch):
    q = torch.randn(1, 2, 4, 16)
    with pytest.raises(ValueError, match=r"sdpa.*'auto'.*got 'cudnn'"):
        mixed_attention(q, q, q, backend="cudnn")
    with pytest.raises(TypeError, match="backend"):
        mixed_attention(q, q, q, backend=None)
    monkeypatch.setenv(att.ENV_VAR, "fast")
    with pytest.raises(ValueError, match=att.ENV_VAR):
        mixed_attention(q, q, q)


def test_env_backend_is_honoured_and_observable(monkeypatch):
    q = torch.randn(1, 2, 4, 16).to(DEVICE, TRITON_DTYPE)
    for name in ("math", "sdpa", "triton"):
        monkeypatch.setenv(att.ENV_VAR, name)
        mixed_attention(q, q, q)
        assert last_backend() == name
    if DEVICE == "cpu":  # CPU + interpreter: auto runs our kernel (on CUDA auto tunes; test_autotune covers that)
        monkeypatch.setenv(att.ENV_VAR, "auto")
        mixed_attention(q, q, q)
        assert last_backend() == "triton"


def test_large_head_dim_auto_picks_a_serving_backend():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 5, 160, generator=g) for _ in range(3))
    out = mixed_attention(q, k, v)
    assert last_backend() == "sdpa"
    ref = mixed_attention(q.double(), k.double(), v.double(), backend="math")
    assert rel_err(out, ref) < 1e-5
    out, lse = mixed_attention(q, k, v, return_lse=True)
    assert last_backend() == "math" and lse.shape == (1, 2, 5)
    with pytest.raises(ValueError, match="head dims up to 128"):  # on the device where triton otherwise runs
        mixed_attention(*(t.to(DEVICE, TRITON_DTYPE) for t in (q, k, v)), backend="triton")


def _run_child(code: str, interpret: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, TRITON_INTERPRET="1" if interpret else "0",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def test_cu_seqlens_past_the_rows_gives_a_clean_error_not_a_crash():
    """Used to SIGSEGV the interpreter (out-of-bounds reads): run it in a child so a crash fails this test.
    Interpreter-specific on purpose (CPU tensors, host-side cu_seqlens check), so it also runs on GPU machines."""
    r = _run_child("""
        import torch
        from vexpert_kernels.ops import mixed_attention_varlen
        q = torch.randn(8, 2, 16); k = torch.randn(10, 1, 16); v = torch.randn(10, 1, 16)
        try:
            mixed_attention_varlen(q, k, v, torch.tensor([0, 3, 40]), torch.tensor([0, 4, 60]), 40, 60,
                                   backend="triton")
        except ValueError as e:
            print("VALUEERROR", e)
    """)
    assert r.returncode == 0, f"child died ({r.returncode}): {r.stderr[-2000:]}"
    assert "VALUEERROR" in r.stdout and "cu_seqlens_q" in r.stdout


def test_kernel_is_bound_safe_for_unchecked_cu_seqlens():
    """The kernel itself (what a CUDA call without VEXPERT_DEBUG reaches): out-of-range, decreasing and too-long
    sequences must never read or write outside the rows, and valid rows stay right. On a GPU machine the child
    launches the compiled kernels on CUDA tensors (bf16), where an out-of-bounds access kills it."""
    r = _run_child("""
        import torch
        from vexpert_kernels.ops.flash_attention import flash_attention
        torch.manual_seed(0)
        dev, dt = "%s", torch.%s
        def leaf(*shape):
            return torch.randn(*shape).to(dev, dt).requires_grad_()
        q = leaf(8, 2, 16); k = leaf(10, 1, 16)
        v = leaf(10, 1, 16)
        for cq, ck, mq, mk in (([0, 3, 40], [0, 4, 60], 40, 60), ([0, 5, 3, 8], [0, 6, 2, 10], 5, 6),
                               ([0, 3, 8], [0, 4, 10], 2, 3), ([-4, 3, 8], [0, 4, 99], 8, 10)):
            out, lse = flash_attention(q, k, v, cu_seqlens_q=torch.tensor(cq, device=dev),
                                       cu_seqlens_k=torch.tensor(ck, device=dev), max_seqlen_q=mq, max_seqlen_k=mk)
            (out.float().nan_to_num().sum() + lse.nan_to_num(0, 0, 0).sum()).backward()
        if dev == "cuda":
            torch.cuda.synchronize()
        print("SURVIVED")
    """ % (DEVICE, str(TRITON_DTYPE).split(".")[1]), interpret=not HAS_CUDA)
    assert r.returncode == 0, f"child died ({r.returncode}): {r.stderr[-2000:]}"
    assert "SURVIVED" in r.stdout


def test_debug_mode_checks_device_values(monkeypatch):
    from vexpert_kernels import validation

    monkeypatch.setenv("VEXPERT_DEBUG", "1")
    assert validation.debug_checks_enabled()
    q, k, v, cq, ck = _packed(dtype=TRITON_DTYPE, device=DEVICE)  # on CUDA: the values are on the device
    with pytest.raises(ValueError, match="cu_seqlens_k"):
        mixed_attention_varlen(q, k, v, cq, ck + 1, 5, 6)


# ------------------------------------------------------------------------------------------------- autotune hook
@pytest.mark.parametrize("kind", ["causal", "padded_bidir", "varlen", "lse"])
@pytest.mark.skipif(HAS_CUDA, reason="simulates the CUDA branch of auto on CPU tensors under the interpreter")
def test_auto_on_cuda_builds_candidates_and_every_runnable_one_matches(monkeypatch, kind):
    """Force the CUDA branch of auto on CPU tensors: the candidate set is every serving backend (our kernel once per
    tuning tile), the static choice is torch's path, and every candidate agrees with the reference."""
    seen = {}

    def fake_select(op, key, candidates, reference, *, static, dtype):
        ref = reference()
        results = {n: fn() for n, fn in candidates.items()}
        seen.update(op=op, key=key, names=set(candidates), static=static, dtype=dtype, ref=ref, results=results)
        return sorted(n for n in candidates if n.startswith("triton:"))[-1]

    from vexpert_kernels import autotune

    monkeypatch.setattr(autotune, "select", fake_select)
    monkeypatch.setattr(att_api, "_select_backend", lambda backend, r: "auto")
    tiles = [(16, 16, 4, 1), (32, 16, 4, 1)]
    monkeypatch.setattr(att_api, "fwd_tune_configs", lambda *a, **kw: list(tiles))
    g = torch.Generator().manual_seed(0)
    B, H, KV, Lq, Lk, hd = 2, 4, 2, 9, 13, 16
    q = torch.randn(B, H, Lq, hd, generator=g)
    k = torch.randn(B, KV, Lk, hd, generator=g)
    v = torch.randn(B, KV, Lk, hd, generator=g)
    kw, lse = {}, False
    if kind == "padded_bidir":
        kpm = torch.ones(B, Lk, dtype=torch.bool)
        kpm[0, :3] = False
        span = torch.zeros(B, Lq, dtype=torch.int32)
        span[1, 2:7] = 1
        kw = dict(key_padding_mask=kpm, image_span_ids=span, image_attention="bidirectional")
    if kind == "lse":
        kw, lse = dict(return_lse=True), True
    if kind == "varlen":
        qp, kp, vp, cq, ck = _packed((3, 6), (5, 8), H=H, KV=KV, hd=hd)
        out = mixed_attention_varlen(qp, kp, vp, cq, ck, 6, 8)
    else:
        out = mixed_attention(q, k, v, **kw)
    triton_names = {att_api.triton_name(t) for t in tiles}
    req = att_api._Request(device="cpu", dtype=torch.float32, head_dim=hd, gqa=True, kv_offset=True,
                           padding=kind == "padded_bidir", bidir=kind == "padded_bidir", bias=False, need_lse=lse,
                           varlen=kind == "varlen")
    serving = set(att.serving_backends(req, att.TUNE_CANDIDATES))
    assert "triton" in serving
    expected = triton_names | (serving - {"triton"}) | {seen["static"]}
    assert seen["names"] == expected
    assert seen["op"] == "attention_fwd" and seen["dtype"] == torch.float32
    # torch's own path, never an unverified kernel: sdpa, or flex/math where sdpa cannot serve (lse)
    assert seen["static"] == att.static_backend(req) == ("sdpa" if not lse else seen["static"])
    assert seen["static"] in att.STATIC_ORDER
    assert seen["key"][:7] == ("float32", hd, H // KV, "padded" if kind == "padded_bidir" else "causal",
                               "bidirectional" if kind == "padded_bidir" else "causal",
                               "varlen" if kind == "varlen" else "padded", "lse" if lse else "out")
    ref = seen["ref"]
    for name, res in seen["results"].items():
        for a, b in zip(res if lse else (res,), ref if lse else (ref,)):
            fin = torch.isfinite(b)
            assert rel_err(a[fin], b[fin]) < 1e-5, name
    assert last_backend() == att_api.triton_name(tiles[1])
    got = out[0] if lse else out
    want = ref[0] if lse else ref
    assert rel_err(got, want) < 1e-5


def test_triton_candidate_names_round_trip():
    for t in [(128, 64, 8, 3), (16, 16, 4, 1)]:
        assert att_api.parse_triton_name(att_api.triton_name(t)) == t
    assert att_api.parse_triton_name("triton") is None


def test_tune_key_buckets():
    assert [att.length_bucket(n) for n in (0, 1, 2, 3, 4, 5, 2048, 2049)] == [1, 1, 2, 4, 4, 8, 2048, 4096]


# ------------------------------------------------------------------------------------------------- decode tiles
def test_decode_uses_a_16_query_tile(monkeypatch):
    from vexpert_kernels.ops.flash_attention import configs as fa_configs

    for major, want in ((9, (16, 64, 8, 2)), (8, (16, 64, 8, 3))):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, m=major: (m, 0))
        dev = torch.device("cuda")
        assert fa_configs._configs_for(dev, 128, False, False, lq=1)["fwd"] == want
        assert fa_configs._configs_for(dev, 128, True, True, lq=16)["fwd"] == want
        assert fa_configs._configs_for(dev, 128, False, False, lq=17)["fwd"][0] == 128
        assert fa_configs.fwd_tune_configs(dev, 128, False, False, lq=1) == [want]
        assert len(fa_configs.fwd_tune_configs(dev, 128, False, False, lq=2048)) >= 2


@pytest.mark.parametrize("tile", [(16, 64, 8, 3), (16, 128, 4, 3)])
def test_decode_tile_numerics(tile):
    """The decode tiles (run through the interpreter): a few queries against a long, padded GQA KV cache."""
    from vexpert_kernels.ops.flash_attention import flash_attention

    g = torch.Generator().manual_seed(5)
    B, H, KV, Lq, Lk, hd = 2, 2, 1, 3, 150, 16
    q, k, v = (torch.randn(B, h, n, hd, generator=g).to(DEVICE, TRITON_DTYPE).requires_grad_()
               for h, n in ((H, Lq), (KV, Lk), (KV, Lk)))
    tol = TOL[TRITON_DTYPE]
    kpm = torch.ones(B, Lk, dtype=torch.bool, device=DEVICE)
    kpm[0, :40] = False
    kpm[1, 100:120] = False
    out, lse = flash_attention(q, k, v, key_padding_mask=kpm, fwd_config=tile)
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, rlse = mixed_attention(qd, kd, vd, key_padding_mask=kpm, backend="math", return_lse=True)
    assert rel_err(out, ref) < tol and rel_err(lse, rlse) < tol
    w = torch.randn(out.shape, generator=g, dtype=torch.float64).to(DEVICE)
    got = torch.autograd.grad((out.double() * w).sum(), (q, k, v))
    want = torch.autograd.grad((ref * w).sum(), (qd, kd, vd))
    for a, b in zip(got, want):
        assert rel_err(a, b) < (tol if TRITON_DTYPE == torch.float32 else 4 * tol)

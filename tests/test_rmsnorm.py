"""RMSNorm (+ permute into routed order): torch and Triton (interpreter) backends vs a float64 reference, forward
and gradients; CUDA backend vs torch on a GPU (marked gpu)."""
import pytest
import torch

from vexpert_kernels.ops.rmsnorm import rmsnorm, rmsnorm_permute, rmsnorm_reference, rmsnorm_routed
from vexpert_kernels.routing import RoutingPlan
from vexpert_kernels.testing import random_token_types, rel_err
from vexpert_kernels._triton_compat import HAS_TRITON
from conftest import DEVICE

EPS = 1e-5
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton not importable")


def ref64(x, w, eps=EPS):
    """float64 oracle: w * x * rsqrt(mean(x^2) + eps)."""
    x, w = x.double(), w.double()
    return w * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def grads64(x, w, dy, eps=EPS):
    x64 = x.detach().double().requires_grad_()
    w64 = w.detach().double().requires_grad_()
    y = ref64(x64, w64, eps)
    return (y,) + torch.autograd.grad(y, (x64, w64), dy.double())


def _inputs(shape, dtype, wdtype=None, device=DEVICE):
    D = shape[-1]
    x = (torch.randn(*shape) * 2 + 0.3).to(dtype).to(device).requires_grad_()
    w = (1 + 0.2 * torch.randn(D)).to(wdtype or dtype).to(device).requires_grad_()
    return x, w


TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


pytestmark = pytest.mark.usefixtures("fp32_highest")  # conftest: no TF32 in fp32 comparisons on CUDA


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("dtype,wdtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                          (torch.bfloat16, torch.float32), (torch.float16, torch.float16)])
@pytest.mark.parametrize("D", [72, 100, 128])
def test_rmsnorm_permute_matches_float64(backend, dtype, wdtype, D):
    g = torch.Generator().manual_seed(D)
    tt = random_token_types(3, 11, images_per_row=(1, 2), image_len=(2, 6), generator=g)
    keep = torch.ones(3, 11, dtype=torch.bool)
    keep[0, :3] = False
    plan = RoutingPlan.build(tt.to(DEVICE), keep.to(DEVICE))
    x, w = _inputs((3, 11, D), dtype, wdtype)
    y = rmsnorm_permute(x, w, EPS, plan, backend=backend)
    assert y.shape == (33, D) and y.dtype == dtype
    dy = torch.randn(33, D).to(dtype).to(DEVICE)
    dx, dw = torch.autograd.grad(y, (x, w), dy)
    assert dx.dtype == dtype and dw.dtype == wdtype
    # oracle: norm in sequence order, then permute; the gradient flows back through the gather
    y64, dx64, dw64 = grads64(x.reshape(33, D), w, dy.double().index_select(0, plan.inv_perm))
    tol = TOL[dtype]
    assert rel_err(y, y64.index_select(0, plan.perm)) < tol
    assert rel_err(dx.reshape(33, D), dx64) < tol
    assert rel_err(dw, dw64) < tol


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_and_routed(backend, dtype):
    x, w = _inputs((2, 5, 96), dtype)
    y = rmsnorm(x, w, EPS, backend=backend)
    assert y.shape == x.shape
    dy = torch.randn_like(y)
    dx, dw = torch.autograd.grad(y, (x, w), dy)
    y64, dx64, dw64 = grads64(x, w, dy)
    for a, b in ((y, y64), (dx, dx64), (dw, dw64)):
        assert rel_err(a, b) < TOL[dtype]
    xr, wr = _inputs((7, 40), dtype)
    assert rel_err(rmsnorm_routed(xr, wr, EPS, backend=backend), ref64(xr, wr)) < TOL[dtype]


def test_torch_backend_is_hf_exact():
    """Forward of the torch backend equals the HF formula bit for bit (fp32 math, one cast)."""
    x, w = _inputs((4, 64), torch.bfloat16)
    hf = (w * (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + EPS))).to(torch.bfloat16)
    assert torch.equal(rmsnorm(x, w, EPS, backend="torch"), hf)


@needs_triton
def test_triton_bf16_within_one_ulp_of_torch():
    x, w = _inputs((9, 100), torch.bfloat16)
    a = rmsnorm(x, w, EPS, backend="triton").float()
    b = rmsnorm(x, w, EPS, backend="torch").float()
    # the interpreter truncates fp32->bf16 (GPU rounds): allow one bf16 ulp
    assert ((a - b).abs() <= b.abs() * 2 ** -7 + 1e-6).all()


@needs_triton
def test_triton_writes_every_row_and_grad_deterministic(monkeypatch):
    """Poisoned outputs: every routed row and every dx row must be written."""
    tt = torch.tensor([[0, 1, 1, 1, 0, 0, 1, 1, 0]], device=DEVICE)
    plan = RoutingPlan.build(tt)
    real_empty_like = torch.empty_like

    def poisoned(t, **kw):
        out = real_empty_like(t, **kw)
        return out.fill_(float("nan")) if out.is_floating_point() else out

    monkeypatch.setattr(torch, "empty_like", poisoned)  # the launchers allocate y / dx with empty_like
    x, w = _inputs((1, 9, 24), torch.float32)
    y = rmsnorm_permute(x, w, EPS, plan, backend="triton")
    assert torch.isfinite(y).all()
    dy = torch.randn_like(y)
    dx1, dw1 = torch.autograd.grad(y, (x, w), dy, retain_graph=True)
    dx2, dw2 = torch.autograd.grad(y, (x, w), dy)
    assert torch.isfinite(dx1).all() and torch.isfinite(dw1).all()
    assert torch.equal(dw1, dw2) and torch.equal(dx1, dx2)


@needs_triton
@pytest.mark.parametrize("rows", [1, 5])
def test_triton_one_row_and_all_language(rows):
    tt = torch.zeros(1, rows, dtype=torch.long, device=DEVICE)  # no vision token: an expert with 0 tokens
    plan = RoutingPlan.build(tt)
    x, w = _inputs((1, rows, 40), torch.float32)
    y = rmsnorm_permute(x, w, EPS, plan, backend="triton")
    dy = torch.randn_like(y)
    dx, dw = torch.autograd.grad(y, (x, w), dy)
    y64, dx64, dw64 = grads64(x.reshape(rows, 40), w, dy)
    assert rel_err(y, y64) < 1e-5 and rel_err(dx.reshape(rows, 40), dx64) < 1e-5 and rel_err(dw, dw64) < 1e-5


def test_bad_inputs():
    x, w = _inputs((2, 3, 16), torch.float32)
    plan = RoutingPlan.build(torch.zeros(2, 3, dtype=torch.long, device=DEVICE))
    with pytest.raises(ValueError, match="weight"):
        rmsnorm(x, torch.ones(15, device=DEVICE), EPS)
    with pytest.raises(TypeError, match="x"):
        rmsnorm(x.long(), w, EPS)
    with pytest.raises(TypeError, match="weight"):
        rmsnorm(x, [1.0] * 16, EPS)
    with pytest.raises(ValueError, match="eps"):
        rmsnorm(x, w, -1.0)
    with pytest.raises(ValueError, match="backend"):
        rmsnorm(x, w, EPS, backend="bogus")
    with pytest.raises(ValueError, match="cuda"):  # the csrc backend refuses CPU tensors
        rmsnorm(x.detach().cpu(), w.detach().cpu(), EPS, backend="cuda")
    with pytest.raises(ValueError, match="x must have shape"):
        rmsnorm_permute(torch.randn(3, 3, 16, device=DEVICE), w, EPS, plan)
    with pytest.raises(TypeError, match="plan"):
        rmsnorm_permute(x, w, EPS, object())
    with pytest.raises(ValueError, match="x_routed"):
        rmsnorm_routed(x, w, EPS)
    if HAS_TRITON:
        with pytest.raises(TypeError, match="triton"):
            rmsnorm(x.double(), w.double(), EPS, backend="triton")


def test_torch_compile_fullgraph_traces_custom_op():
    """The custom op's fake impl lets torch.compile trace the Triton path without a graph break."""
    pytest.importorskip("triton")
    x, w = _inputs((3, 32), torch.float32)
    f = torch.compile(lambda a, b: rmsnorm(a, b, EPS, backend="triton"), fullgraph=True, backend="eager")
    assert rel_err(f(x, w), ref64(x, w)) < 1e-5


def test_aot_compile_specs_listed():
    from vexpert_kernels.ops.rmsnorm import aot_compile_specs
    specs = aot_compile_specs()
    if not HAS_TRITON:
        assert specs == []
        return
    names = {s.name for s in specs}
    assert any(n.startswith("rmsnorm_fwd") for n in names) and any(n.startswith("rmsnorm_bwd") for n in names)
    for s in specs:
        assert set(s.signature) >= set(s.constexprs)


# ------------------------------------------------------------------------------------------------ GPU
def _cuda_ready():
    if not torch.cuda.is_available():
        return False
    from vexpert_kernels._cuda import cuda_extension_available
    return cuda_extension_available()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,wdtype", [(torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32),
                                          (torch.float32, torch.float32), (torch.float16, torch.float16)])
@pytest.mark.parametrize("D", [72, 100, 4096])
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_rmsnorm_permute_vs_torch(backend, dtype, wdtype, D):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if backend == "cuda" and not _cuda_ready():
        pytest.fail("CUDA device present but the csrc library did not build/load")
    g = torch.Generator().manual_seed(D)
    B, L = 3, 257
    tt = random_token_types(B, L, images_per_row=(1, 3), image_len=(5, 60), generator=g).cuda()
    keep = torch.ones(B, L, dtype=torch.bool, device="cuda")
    keep[1, :20] = False
    keep[2, -33:] = False
    plan = RoutingPlan.build(tt, keep)
    x, w = _inputs((B, L, D), dtype, wdtype, device="cuda")
    y = rmsnorm_permute(x, w, EPS, plan, backend=backend)
    yt = rmsnorm_permute(x, w, EPS, plan, backend="torch")
    # values within one rounding of the output dtype
    ulp = {torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10, torch.float32: 2 ** -20}[dtype]
    assert ((y.float() - yt.float()).abs() <= yt.float().abs() * ulp + 1e-5).all()
    dy = torch.randn_like(y)
    dx, dw = torch.autograd.grad(y, (x, w), dy)
    dxt, dwt = torch.autograd.grad(yt, (x, w), dy)
    y64, dx64, dw64 = grads64(x.reshape(-1, D), w, dy.double().index_select(0, plan.inv_perm))
    assert rel_err(dx.reshape(-1, D), dx64) < TOL[dtype]
    assert rel_err(dw, dw64) < TOL[dtype]
    dx2, dw2 = torch.autograd.grad(rmsnorm_permute(x, w, EPS, plan, backend=backend), (x, w), dy)
    assert torch.equal(dw, dw2) and torch.equal(dx, dx2), "backward must be deterministic"

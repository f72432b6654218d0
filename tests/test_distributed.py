"""DDP and FSDP2 (fully_shard) with 2 CPU ranks over gloo: loss and gradients equal to one process."""
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from vexpert_kernels import VisualExpertConfig
from vexpert_kernels.model import VisualExpertLM
from vexpert_kernels.testing import synthetic_batch

VOCAB, B, L = 24, 4, 10


def make_model():
    torch.manual_seed(0)
    return VisualExpertLM(VisualExpertConfig.tiny(), 2, VOCAB, backend="fused")


def make_batch():
    return synthetic_batch(B, L, VOCAB, 64, 3, torch.Generator().manual_seed(1), "cpu")


def full_grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _worker(rank, world, init_file, mode, out_dir):
    os.environ.setdefault("TRITON_INTERPRET", "1")
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = make_model()
        ids, tt, feats, labels = make_batch()
        per = B // world
        n_img = int((tt[: per * rank] == 1).sum())
        n_mine = int((tt[per * rank: per * (rank + 1)] == 1).sum())
        sl = slice(per * rank, per * (rank + 1))
        if mode == "ddp":
            wrapped = torch.nn.parallel.DistributedDataParallel(model)
        else:
            from torch.distributed.fsdp import fully_shard
            for layer in model.layers:
                fully_shard(layer)
            wrapped = fully_shard(model)
        loss, _ = wrapped(ids[sl], tt[sl], image_features=feats[n_img:n_img + n_mine], labels=labels[sl])
        loss.backward()
        loss_avg = loss.detach().clone()
        dist.all_reduce(loss_avg)
        loss_avg /= world
        if mode == "fsdp":  # gradients are sharded DTensors: gather them to compare, FSDP already averaged them
            grads = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
        else:
            grads = full_grads(model)
        if rank == 0:
            torch.save({"loss": loss_avg, "grads": grads}, os.path.join(out_dir, f"{mode}.pt"))
        # both ranks are past every collective here
        dist.barrier()
    except BaseException:
        dist.destroy_process_group()
        raise
    # Success: leave without the C++ teardown of gloo / FSDP threads. Under CI load that teardown aborted a rank
    # twice ("terminate called without an active exception", SIGABRT), even with the barrier above. The results
    # are on disk and every collective has completed, so nothing is lost by skipping it.
    os._exit(0)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_ranks_equal_one_process(mode):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available in this build")
    if mode == "fsdp":
        pytest.importorskip("torch.distributed.fsdp", reason="FSDP2 needs torch.distributed.fsdp.fully_shard")
        from torch.distributed import fsdp
        if not hasattr(fsdp, "fully_shard"):
            pytest.skip("this torch has no FSDP2 fully_shard")
    model = make_model()
    ids, tt, feats, labels = make_batch()
    # one process: the mean of the two half-batch losses (what data parallelism computes)
    total = 0
    for r in range(2):
        sl = slice(r * B // 2, (r + 1) * B // 2)
        n0, n1 = int((tt[: r * B // 2] == 1).sum()), int((tt[sl] == 1).sum())
        loss, _ = model(ids[sl], tt[sl], image_features=feats[n0:n0 + n1], labels=labels[sl])
        total = total + loss / 2
    total.backward()
    ref = full_grads(model)
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(2, os.path.join(tmp, "init"), mode, tmp), nprocs=2, join=True)
        got = torch.load(os.path.join(tmp, f"{mode}.pt"))
    assert abs(got["loss"].item() - total.item()) < 1e-5
    assert got["grads"].keys() == ref.keys()
    for name, g in ref.items():
        assert torch.allclose(got["grads"][name], g, rtol=1e-4, atol=1e-6), name

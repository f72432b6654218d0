"""One torch.profiler forward+backward of the fused block per preset: device time per CUDA kernel -> JSON.

    python benchmarks/profile_block.py --out prof.json [--presets cogvlm_chat_17b,cogvlm2_19b] [--batch 4 --seq-len 2048]

The block runs with ``backend="auto"`` after two warm-up steps (compile, autotune), then one profiled step. Each kernel
row: name, calls, total device microseconds (CUDA kernel time from CUPTI, not host time), share of the step's kernel
time, and whether it is one of our Triton kernels. The JSON is rewritten after every preset (a timeout keeps what
was done). Needs CUDA; without it writes ``{"available": false}`` and exits 0.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import pkgutil
import sys
import time

import torch


def our_kernel_names() -> set:
    try:
        from triton.runtime.jit import KernelInterface
    except Exception:
        return set()
    import vexpert_kernels.ops as ops
    names = set()
    for m in [ops] + [importlib.import_module(i.name) for i in pkgutil.walk_packages(ops.__path__, "vexpert_kernels.ops.")]:
        for obj in vars(m).values():
            if isinstance(obj, KernelInterface):
                while hasattr(obj, "fn"):
                    obj = obj.fn
                names.add(obj.__name__)
    return names


def profile_preset(preset: str, batch: int, seq_len: int, image_tokens: int, device: str = "cuda") -> dict:
    from torch.profiler import ProfilerActivity, profile
    from vexpert_kernels.bench.shapes import Case, token_type_ids
    from vexpert_kernels.block import VisualExpertBlock
    from vexpert_kernels.tune import PRESETS

    cfg = PRESETS[preset]()
    dev = torch.device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    block = VisualExpertBlock(cfg, backend="auto").to(dev, dtype)
    tt = token_type_ids(Case(preset, batch, seq_len, image_tokens), dev)
    x = (torch.randn(batch, seq_len, cfg.hidden_size, device=dev) * 0.5).to(dtype).requires_grad_(True)
    dy = torch.randn(batch, seq_len, cfg.hidden_size, device=dev, dtype=dtype)
    cuda = dev.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def step():
        block.zero_grad(set_to_none=True)
        x.grad = None
        out = block(x, tt)[0]
        out.backward(dy)

    for _ in range(2):
        step()
    sync()
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        step()
        sync()
    ours = our_kernel_names()
    rows = {}
    # CUDA: device-side kernel events; CPU smoke runs (--device cpu): the CPU events, to exercise this code only
    kind = torch.autograd.DeviceType.CUDA if cuda else torch.autograd.DeviceType.CPU
    for e in prof.events():
        if e.device_type != kind:
            continue
        r = rows.setdefault(e.name, {"name": e.name, "calls": 0, "device_us": 0.0, "ours": e.name in ours})
        r["calls"] += 1
        r["device_us"] += e.time_range.elapsed_us()
    total = sum(r["device_us"] for r in rows.values())
    table = sorted(rows.values(), key=lambda r: -r["device_us"])
    for r in table:
        r["share"] = r["device_us"] / total if total else None
    return {"preset": preset, "batch": batch, "seq_len": seq_len, "image_tokens": image_tokens,
            "block_backend": getattr(block, "backend", None), "kernel_device_ms": total / 1e3,
            "ours_device_ms": sum(r["device_us"] for r in table if r["ours"]) / 1e3, "kernels": table}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--presets", default="cogvlm_chat_17b,cogvlm2_19b")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--image-tokens", type=int, default=1227)
    ap.add_argument("--device", default="cuda", help="cpu: smoke-run this script (tiny preset), no kernel times")
    a = ap.parse_args(argv)
    result = {"available": torch.cuda.is_available(), "profiles": [], "errors": {}}

    def save():
        tmp = a.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(result, f, indent=1, default=str)
        os.replace(tmp, a.out)

    if not torch.cuda.is_available() and a.device == "cuda":
        result["reason"] = "no CUDA device"
        save()
        print("no CUDA device: nothing profiled")
        return 0
    result.update(gpu=torch.cuda.get_device_name(0) if a.device == "cuda" else None, torch=torch.__version__,
                  device=a.device)
    for preset in a.presets.split(","):
        t0 = time.perf_counter()
        try:
            p = profile_preset(preset, a.batch, a.seq_len, min(a.image_tokens, a.seq_len - 1), a.device)
            p["wall_s"] = round(time.perf_counter() - t0, 1)
            result["profiles"].append(p)
            print(f"{preset}: {p['kernel_device_ms']:.2f} ms of kernels per fwd+bwd "
                  f"({p['ours_device_ms']:.2f} ms in our Triton kernels)")
            for r in p["kernels"][:15]:
                print(f"   {r['device_us'] / 1e3:8.3f} ms {r['share'] * 100:5.1f}% x{r['calls']:<3d} "
                      f"{'*' if r['ours'] else ' '} {r['name'][:100]}")
        except Exception as exc:
            result["errors"][preset] = f"{type(exc).__name__}: {exc}"[:800]
            print(f"{preset}: ERROR {result['errors'][preset]}")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        save()
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.exit(main())

"""Train a tiny VisualExpertLM on synthetic mixed image/text sequences and print the loss curve.

    python examples/train_tiny.py --steps 200 --backend fused
Runs on CUDA if present, else CPU (set TRITON_INTERPRET=1 to run the Triton kernels on CPU; slow but real).
The synthetic task is learnable: each text token is (previous token + 1) mod V after an image whose mean feature
sign picks an offset, so the loss falls well below log(V) only if attention reads across the image.
"""
from __future__ import annotations

import argparse
import math
import sys
import time

import torch

from vexpert_kernels import VisualExpertConfig
from vexpert_kernels.model import VisualExpertLM
from vexpert_kernels.testing import synthetic_batch


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--backend", choices=["fused", "reference"], default="fused")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--length", type=int, default=32)
    p.add_argument("--vocab", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(args.seed)
    cfg = VisualExpertConfig.tiny()
    model = VisualExpertLM(cfg, args.layers, args.vocab, backend=args.backend).to(device=device, dtype=dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    g = torch.Generator().manual_seed(args.seed)
    print(f"training {args.layers}-layer VisualExpertLM ({args.backend}, {device}, {dtype}), "
          f"log(V) = {math.log(args.vocab):.2f}")
    t0 = time.time()
    losses = []
    for step in range(1, args.steps + 1):
        ids, tt, feats, labels = synthetic_batch(args.batch, args.length, args.vocab, cfg.hidden_size, 6, g, device)
        loss, _ = model(ids, tt, image_features=feats, labels=labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        bar = "#" * int(30 * step / args.steps)
        sys.stdout.write(f"\r[{bar:<30}] step {step}/{args.steps} loss {losses[-1]:.4f} ({time.time() - t0:.0f}s)")
        sys.stdout.flush()
        if step % max(1, args.steps // 10) == 0 or step == args.steps:
            sys.stdout.write("\n")
    print("loss curve (every 10%):", " ".join(f"{l:.3f}" for l in losses[:: max(1, args.steps // 10)]))
    return losses


if __name__ == "__main__":
    main()

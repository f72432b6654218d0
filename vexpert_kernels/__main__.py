"""`python -m vexpert_kernels`: print the environment and run a real check of the layers usable on this machine."""
from __future__ import annotations

import time

import torch

from . import VisualExpertConfig, __version__
from ._triton_compat import HAS_TRITON, TRITON_IMPORT_ERROR, TRITON_VERSION, interpret_mode
from .testing import random_token_types, rel_err


def environment() -> dict:
    env = {
        "vexpert_kernels": __version__,
        "torch": torch.__version__,
        "triton": TRITON_VERSION or f"missing: {TRITON_IMPORT_ERROR}",
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (no CUDA device)",
        "TRITON_INTERPRET": interpret_mode(),
    }
    try:
        from .ops.attention import available_attention_backends
        env["attention backends"] = {k: (v or "available") for k, v in available_attention_backends().items()}
    except Exception as exc:  # noqa: BLE001
        env["attention backends"] = f"unavailable ({exc!r})"
    try:
        from ._cuda import cuda_extension_status
        ok, why = cuda_extension_status()
        env["csrc CUDA kernels"] = "available" if ok else f"not used: {why}"
    except Exception as exc:  # noqa: BLE001
        env["csrc CUDA kernels"] = f"not used: {exc!r}"
    return env


def check_layers(cfg: VisualExpertConfig, batch=2, length=24, device="cpu") -> list:
    """Run each available layer on random mixed input; report error vs the float64 reference and time."""
    from .reference import VisualExpertBlock as ReferenceBlock

    torch.manual_seed(0)
    ref = ReferenceBlock(cfg).double().to(device)
    tt = random_token_types(batch, length, images_per_row=(1, 2), image_len=(3, 8)).to(device)
    x = torch.randn(batch, length, cfg.hidden_size, dtype=torch.float64, device=device)
    (gold,) = ref(x, tt)
    rows = []
    dtypes = [torch.float32] + ([torch.bfloat16] if device != "cpu" or interpret_mode() else [])
    layers = [("reference", ReferenceBlock)]
    try:
        from .block import VisualExpertBlock as FusedBlock
        layers.append(("fused", FusedBlock))
    except Exception as exc:  # noqa: BLE001
        rows.append(dict(layer="fused", dtype="-", error=f"unavailable: {exc!r}"))
    for name, cls in layers:
        for dtype in dtypes:
            layer = cls(cfg).to(device=device, dtype=dtype)
            layer.load_state_dict(ref.state_dict())
            t0 = time.perf_counter()
            (y,) = layer(x.to(dtype), tt)
            if device != "cpu":
                torch.cuda.synchronize()
            ms = (time.perf_counter() - t0) * 1e3
            rows.append(dict(layer=name, backend=getattr(layer, "backend", name), dtype=str(dtype).split(".")[-1],
                             rel_err=rel_err(y, gold), ms=ms))
    return rows


def main() -> int:
    print("vexpert_kernels environment")
    for k, v in environment().items():
        if isinstance(v, dict):
            print(f"  {k}:")
            for kk, vv in v.items():
                print(f"    {kk:<12} {vv}")
        else:
            print(f"  {k:<18} {v}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = VisualExpertConfig.tiny()
    print(f"\nlayer check on {device}, tiny config (hidden {cfg.hidden_size}, GQA {cfg.num_attention_heads}/"
          f"{cfg.num_key_value_heads}), 2 x 24 tokens with images; error vs float64 reference, first-call time")
    if device == "cpu" and not interpret_mode():
        print("  (set TRITON_INTERPRET=1 to run the Triton kernels through the CPU interpreter)")
    failed = False
    for row in check_layers(cfg, device=device):
        if "error" in row:
            print(f"  {row['layer']:<10} {row['error']}")
            continue
        tol = 1e-5 if row["dtype"] == "float32" else 2e-2
        ok = row["rel_err"] <= tol
        failed |= not ok
        print(f"  {row['layer']:<10} {row['backend']:<22} {row['dtype']:<9} rel_err {row['rel_err']:.2e} "
              f"({'ok' if ok else 'FAIL'} <= {tol:g})  {row['ms']:8.1f} ms")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())

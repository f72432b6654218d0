"""The package must import and run its PyTorch paths on a machine without Triton (a plain `pip install` on CPU)."""
import subprocess
import sys
import textwrap


def test_package_runs_without_triton():
    code = textwrap.dedent("""
        import sys
        sys.modules["triton"] = None  # `import triton` raises ImportError, as in an environment without it
        import torch
        import vexpert_kernels.ops, vexpert_kernels.integrations.transformers, vexpert_kernels.autotune
        from vexpert_kernels import VisualExpertBlock, VisualExpertConfig
        from vexpert_kernels._triton_compat import HAS_TRITON
        assert not HAS_TRITON
        cfg = VisualExpertConfig.tiny()
        block = VisualExpertBlock(cfg)
        tt = torch.tensor([[0, 1, 1, 1, 0, 0]])
        (y,) = block(torch.randn(1, 6, cfg.hidden_size), tt)
        assert block.backend == "torch" and torch.isfinite(y).all()
        print("ok")
    """)
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-3000:]

"""Benchmark support shared by ``benchmarks/`` (pytest-benchmark suite) and ``python -m vexpert_kernels.bench report``.

Modules:
  shapes     -- benchmark cases (CogVLM-17B / CogVLM2-19B at realistic image/text mixes, token sweep, decode; tiny
                CPU cases) and CogVLM-like token types for them.
  flops      -- FLOP counting (documented there): what TFLOP/s figures mean.
  baselines  -- plain-PyTorch baselines on a parameter dict with HF names: HF-style mask routing, permuted slices,
                a dense Llama layer; per-op baselines.
  providers  -- builds every provider's callable for a case (vexpert per backend, hf_eager, slices_eager,
                slices_compiled, dense, hf_reference), with a clear skip when something is not available.
  timing     -- median timing (triton.testing.do_bench on CUDA, a perf_counter loop on CPU), peak extra memory,
                environment description.
  results    -- the JSON results writer (one file per run, named by card and date).
  report     -- results JSON -> markdown tables + PNG plot inside benchmarks/README.md; compile report table too.
"""

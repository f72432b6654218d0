"""The benchmark report generator on a synthetic results file (tmp dir): tables, ratios, plot, README markers."""
import json
import os

import pytest

from vexpert_kernels.bench import report
from vexpert_kernels.bench.results import ResultsWriter, load_results


def _synthetic(tmp_path):
    w = ResultsWriter(str(tmp_path / "results"), {"card": "h100-80gb-hbm3", "gpu": "NVIDIA H100 80GB HBM3",
                                                  "torch": "2.11.0", "triton": "3.6.0", "date": "2026-01-01T00:00",
                                                  "shapes": "real", "dtype": "bfloat16"}, stamp="2026-01-01_000000")
    base = dict(case="cogvlm-17b-4x2048-img1227", label="cogvlm-17b 4x2048", suite="layer", mode="fwd")
    for prov, ms in (("hf_eager", 9.0), ("slices_compiled", 6.0), ("vexpert[triton]", 4.5), ("dense", 7.0)):
        w.add(dict(base, provider=prov, status="ok", median_ms=ms, tflops=3453.0 / ms, peak_extra_mib=100.0,
                   rel_err=1e-3))
    w.add(dict(base, provider="vexpert[torch]", status="skipped", reason="skipped: not available"))
    w.add(dict(base, mode="fwd+bwd", provider="vexpert[triton]", status="ok", median_ms=20.0))  # no baseline here
    w.add(dict(base, suite="op", op="linear_o", provider="copy", status="ok", median_ms=0.1, gbps=1300.0,
               bad=float("nan")))
    return w.path


def test_writer_names_by_card_and_date_and_cleans_nan(tmp_path):
    path = _synthetic(tmp_path)
    assert os.path.basename(path) == "h100-80gb-hbm3_2026-01-01_000000.json"
    data = load_results(path)
    assert data["records"][-1]["bad"] is None  # NaN -> null, valid JSON
    with pytest.raises(ValueError, match="not a benchmark results file"):
        bad = tmp_path / "x.json"
        bad.write_text(json.dumps([1, 2]))
        load_results(str(bad))


def test_speedups_only_within_same_case_and_mode(tmp_path):
    recs = report.speedups(load_results(_synthetic(tmp_path))["records"])
    by = {(r["mode"], r["provider"], r.get("op")): r for r in recs}
    assert by[("fwd", "vexpert[triton]", None)]["speedup_vs_hf"] == pytest.approx(2.0)
    assert by[("fwd", "vexpert[triton]", None)]["speedup_vs_compiled"] == pytest.approx(6.0 / 4.5)
    assert by[("fwd", "hf_eager", None)]["speedup_vs_hf"] == pytest.approx(1.0)
    assert by[("fwd+bwd", "vexpert[triton]", None)]["speedup_vs_hf"] is None  # no hf record in that mode
    assert by[("fwd", "vexpert[torch]", None)]["speedup_vs_hf"] is None  # skipped


def test_report_writes_tables_plot_and_is_idempotent(tmp_path):
    _synthetic(tmp_path)
    readme = tmp_path / "bench" / "README.md"
    readme.parent.mkdir()
    readme.write_text("# Benchmarks\n\nhand-written intro\n\n<!-- BEGIN bench-results -->\nstale\n"
                      "<!-- END bench-results -->\n\nhand-written outro\n")
    args = ["report", "--results", str(tmp_path / "results"), "--readme", str(readme)]
    assert report.main(args) == 0
    text = readme.read_text()
    assert "stale" not in text and "hand-written intro" in text and "hand-written outro" in text
    assert "| cogvlm-17b 4x2048 | fwd | vexpert[triton] | 4.500 |" in text
    assert "| 2.00 | 1.33 | ok |" in text  # x hf_eager, x slices_compiled
    assert "skipped: skipped: not available" in text
    png = tmp_path / "bench" / "speedup_h100-80gb-hbm3_2026-01-01_000000.png"
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "](speedup_h100-80gb-hbm3_2026-01-01_000000.png)" in text
    assert report.main(args) == 0
    assert readme.read_text() == text  # regenerated, not appended


def test_report_without_results_says_so(tmp_path):
    readme = tmp_path / "README.md"
    assert report.main(["report", "--results", str(tmp_path / "none"), "--readme", str(readme)]) == 0
    assert "No GPU results yet" in readme.read_text()


def test_compile_report_section_from_json(tmp_path):
    data = {"triton": "3.6.0", "archs": [90], "results": [
        dict(module="m", index=0, name="gemm[128x128]", arch=90, num_warps=8, num_stages=3, ok=True, registers=168,
             stack_bytes=0, local_bytes=0, shared_bytes=65536, static_shared_bytes=0, wgmma=True, mma=False,
             tma=True, expects_tma=True)]}
    js = tmp_path / "cr.json"
    js.write_text(json.dumps(data))
    readme = tmp_path / "README.md"
    assert report.main(["report", "--no-results", "--readme", str(readme), "--compile-report", str(js)]) == 0
    text = readme.read_text()
    assert "<!-- BEGIN compile-report -->" in text and "bench-results" not in text
    assert "| gemm[128x128] | sm_90a | 8/3 | 168 | 0 | 64.0 | yes | no | yes (expected) | - | ok |" in text

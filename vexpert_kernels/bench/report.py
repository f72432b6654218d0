"""``python -m vexpert_kernels.bench report``: results JSON -> markdown tables + PNG plot in benchmarks/README.md.

    python -m vexpert_kernels.bench report [--results benchmarks/results] [--readme benchmarks/README.md]
                                           [--plot-dir benchmarks] [--compile-report [JSON]]

For every results file (one benchmark run), a table per suite with median ms, TFLOP/s, peak extra MiB and the
speed-up vs ``hf_eager`` and vs ``slices_compiled`` — each ratio computed only from records of that same file (same
run, same card). A PNG per file plots those two speed-ups per case for the layer cases. The text is written between
``<!-- BEGIN bench-results -->`` / ``<!-- END bench-results -->`` in the README; ``--compile-report`` runs (or loads,
given a JSON from ``python -m vexpert_kernels.compile_report --json``) the AOT compile report and writes its table
between ``<!-- BEGIN compile-report -->`` / ``<!-- END compile-report -->``. Everything between markers is regenerated.
"""
from __future__ import annotations

import argparse
import glob
import os
import re
import sys
from collections import OrderedDict
from typing import Optional

from .results import load_results

BEGIN, END = "<!-- BEGIN {} -->", "<!-- END {} -->"


def _fmt(v, nd=2):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}" if abs(v) < 1e4 else f"{v:.3g}"
    return str(v)


def speedups(records: list) -> list:
    """Add ``speedup_vs_hf`` and ``speedup_vs_compiled`` (baseline ms / provider ms) within (case, op, mode)."""
    groups = {}
    for r in records:
        if r.get("status") == "ok" and r.get("median_ms"):
            groups.setdefault((r.get("case"), r.get("op"), r.get("mode")), {})[r["provider"]] = r["median_ms"]
    out = []
    for r in records:
        r = dict(r)
        g = groups.get((r.get("case"), r.get("op"), r.get("mode")), {})
        ms = r.get("median_ms") if r.get("status") == "ok" else None
        r["speedup_vs_hf"] = g["hf_eager"] / ms if ms and "hf_eager" in g else None
        r["speedup_vs_compiled"] = g["slices_compiled"] / ms if ms and "slices_compiled" in g else None
        out.append(r)
    return out


def markdown_for_run(data: dict, plot_rel: Optional[str] = None) -> str:
    meta = data["meta"]
    recs = speedups(data["records"])
    title = meta.get("gpu") or meta.get("device_name") or meta.get("card")
    lines = [f"### {title} — {meta.get('date', '?')}",
             "",
             f"torch {meta.get('torch')}, triton {meta.get('triton')}, CUDA {meta.get('cuda')}, "
             f"{meta.get('shapes', '?')} shapes, {meta.get('dtype', '?')}."
             + (f" **{meta['note']}**" if meta.get("note") else ""),
             ""]
    if plot_rel:
        lines += [f"![speed-ups]({plot_rel})", ""]
    by_suite = OrderedDict()
    for r in recs:
        by_suite.setdefault(r.get("suite", "?"), []).append(r)
    for suite, rs in by_suite.items():
        lines += [f"**{suite}**", ""]
        is_op = suite == "op"
        head = ["case", "op"] if is_op else ["case"]
        head += ["mode", "provider", "median ms", "TFLOP/s", "GB/s" if is_op else "peak extra MiB", "rel err",
                 "× hf_eager", "× slices_compiled", "status"]
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "---|" * len(head))
        for r in rs:
            row = [r.get("label") or r.get("case", "?")] + ([r.get("op", "")] if is_op else [])
            status = "ok" if r.get("status") == "ok" else f"{r.get('status')}: {(r.get('reason') or '')[:80]}"
            row += [r.get("mode", ""), r.get("provider", ""), _fmt(r.get("median_ms"), 3), _fmt(r.get("tflops"), 1),
                    _fmt(r.get("gbps") if is_op else r.get("peak_extra_mib"), 0), _fmt(r.get("rel_err"), 6)
                    if r.get("rel_err") is not None else "-",
                    _fmt(r.get("speedup_vs_hf")), _fmt(r.get("speedup_vs_compiled")), status]
            lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |")
        lines.append("")
    return "\n".join(lines)


def plot_run(data: dict, path: str) -> Optional[str]:
    """Bar chart of speed-up vs hf_eager and vs slices_compiled per (case, mode) for every provider -> PNG path."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [r for r in speedups(data["records"]) if r.get("suite") in ("layer", "sweep", "decode")
            and r.get("status") == "ok"]
    if not recs:
        return None
    keys = list(OrderedDict.fromkeys(f"{r.get('case')}\n{r.get('mode')}" for r in recs))
    provs = list(OrderedDict.fromkeys(r["provider"] for r in recs))
    fig, axes = plt.subplots(2, 1, figsize=(max(8, 0.9 * len(keys) + 3), 8), squeeze=False)
    width = 0.8 / max(len(provs), 1)
    for ax, field, ttl in ((axes[0][0], "speedup_vs_hf", "speed-up vs hf_eager"),
                           (axes[1][0], "speedup_vs_compiled", "speed-up vs slices_compiled")):
        for j, p in enumerate(provs):
            vals = []
            for k in keys:
                v = [r.get(field) for r in recs if r["provider"] == p and f"{r.get('case')}\n{r.get('mode')}" == k]
                vals.append(v[0] if v and v[0] is not None else 0.0)
            ax.bar([i + j * width for i in range(len(keys))], vals, width, label=p)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_title(ttl)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(keys))])
        ax.set_xticklabels(keys, fontsize=7, rotation=30, ha="right")
        ax.set_ylabel("× (higher is faster)")
    axes[0][0].legend(fontsize=7, ncol=4)
    meta = data["meta"]
    fig.suptitle(f"{meta.get('gpu') or meta.get('device_name')} — torch {meta.get('torch')}, triton {meta.get('triton')}")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def replace_between(text: str, name: str, body: str) -> str:
    """Replace the text between the named markers (appending the marked block when absent)."""
    b, e = BEGIN.format(name), END.format(name)
    block = f"{b}\n<!-- generated by python -m vexpert_kernels.bench report; do not edit by hand -->\n{body.rstrip()}\n{e}"
    pat = re.compile(re.escape(b) + r".*?" + re.escape(e), re.S)
    if pat.search(text):
        return pat.sub(lambda m: block, text)
    return text.rstrip() + "\n\n" + block + "\n"


def results_markdown(results_dir: str, plot_dir: str, readme_dir: str) -> str:
    files = sorted(glob.glob(os.path.join(results_dir, "*.json")), reverse=True)  # newest first (date in name)
    if not files:
        return ("_No GPU results yet: run `bash benchmarks/gpu_check.sh` on a GPU machine and commit "
                "`benchmarks/results/*.json`._\n")
    parts = []
    for f in files:
        data = load_results(f)
        stem = os.path.splitext(os.path.basename(f))[0]
        png = plot_run(data, os.path.join(plot_dir, f"speedup_{stem}.png"))
        rel = os.path.relpath(png, readme_dir) if png else None
        parts.append(f"Source: `{os.path.relpath(f, readme_dir)}`\n\n" + markdown_for_run(data, rel))
    return "\n".join(parts)


def compile_report_markdown(json_path: Optional[str]) -> str:
    from .. import compile_report as cr
    if json_path:
        import json
        with open(json_path) as f:
            data = json.load(f)
        results = [cr._result_from_dict(r) for r in data["results"]]
        version = data.get("triton")
    else:
        import triton
        results = cr.build_report()
        version = triton.__version__
    cmd = "`python -m vexpert_kernels.compile_report --markdown`"
    if not results:
        return f"_No kernel exposes `aot_compile_specs()` yet ({cmd})._\n"
    mods = ", ".join(sorted({r.module.rsplit(".", 1)[-1] for r in results}))
    return (f"Generated by {cmd} (sm_90a and sm_80, no GPU needed). Modules in this table: {mods}.\n\n"
            + cr.format_markdown(results, version))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vexpert_kernels.bench")
    sub = ap.add_subparsers(dest="cmd", required=True)
    rp = sub.add_parser("report", help="results JSON -> tables + plots in benchmarks/README.md")
    root = os.getcwd()
    rp.add_argument("--results", default=os.path.join(root, "benchmarks", "results"))
    rp.add_argument("--readme", default=os.path.join(root, "benchmarks", "README.md"))
    rp.add_argument("--plot-dir", default=None, help="where PNGs go (default: the README's folder)")
    rp.add_argument("--compile-report", nargs="?", const="", default=None, metavar="JSON",
                    help="also (re)write the compile report table; from JSON if given, else compile now")
    rp.add_argument("--no-results", action="store_true", help="leave the results section alone")
    args = ap.parse_args(argv)
    readme_dir = os.path.dirname(os.path.abspath(args.readme))
    text = open(args.readme).read() if os.path.exists(args.readme) else "# Benchmarks\n"
    if not args.no_results:
        text = replace_between(text, "bench-results",
                               results_markdown(args.results, args.plot_dir or readme_dir, readme_dir))
    if args.compile_report is not None:
        text = replace_between(text, "compile-report", compile_report_markdown(args.compile_report or None))
    os.makedirs(readme_dir, exist_ok=True)
    with open(args.readme, "w") as f:
        f.write(text)
    print(f"wrote {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

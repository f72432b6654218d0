#!/usr/bin/env bash
# One command for a GPU machine (torch + triton preinstalled, offline): install, GPU tests, full test set without the
# interpreter, benchmark suite at real shapes, CUDA kernel timings; JSON + logs under $OUT (<= 8 files, flat), a short
# summary table last. Each stage has its own time budget so the whole script ends in < 6 minutes on an H100.
#
#   bash benchmarks/gpu_check.sh            # OUT defaults to ./gpu_out
# Stage budgets (s): install 30, gpu tests 60, full tests 70, benchmarks 150, cuda timings 20 (+ summary) = 5.5 min.
# torch.compile (slices_compiled) runs on the first layer case only here (VEXPERT_BENCH_COMPILE=first): ~30 s a graph.
# Files in $OUT (8): install.log env.json gpu_tests.log full_tests.log bench.log <card>_<date>.json cuda_timings.log summary.txt
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 TRITON_DEFAULT_FP_FUSION=1
unset TRITON_INTERPRET
PY="${PYTHON:-python3}"
T0=$(date +%s)
declare -A RC

stage() {  # stage NAME BUDGET_S LOGFILE CMD...
  local name=$1 budget=$2 log=$3; shift 3
  local t=$(date +%s)
  echo "== $name (budget ${budget}s)"
  timeout --signal=TERM --kill-after=10 "$budget" "$@" >"$log" 2>&1
  RC[$name]=$?
  echo "   rc=${RC[$name]} in $(( $(date +%s) - t ))s; last lines:"
  tail -n 3 "$log" | sed 's/^/   | /'
}

stage install 30 "$OUT/install.log" $PY -m pip install --no-deps --no-build-isolation -e .
$PY - >"$OUT/env.json" 2>&1 <<'EOF'
import json, torch, triton
p = torch.cuda.get_device_properties(0) if torch.cuda.is_available() else None
print(json.dumps({"torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
                  "gpu": torch.cuda.get_device_name(0) if p else None, "sm": f"{p.major}.{p.minor}" if p else None,
                  "sms": p.multi_processor_count if p else None}))
EOF
cat "$OUT/env.json"

# GPU-marked tests first (they only exist to run here), then everything else without the interpreter.
stage gpu_tests 60 "$OUT/gpu_tests.log" $PY -m pytest -m gpu tests/ -q -p no:cacheprovider -x
stage full_tests 70 "$OUT/full_tests.log" $PY -m pytest tests/ -q -p no:cacheprovider -m "not gpu and not slow" \
  --deselect tests/test_compile_report.py
# Benchmarks: results JSON straight into $OUT (copy into benchmarks/results/ and commit; never edit it).
stage benchmarks 150 "$OUT/bench.log" env VEXPERT_BENCH_RESULTS="$OUT" VEXPERT_BENCH_COMPILE="${VEXPERT_BENCH_COMPILE:-first}" VEXPERT_BENCH_REP_MS="${VEXPERT_BENCH_REP_MS:-60}" \
  $PY -m pytest benchmarks/ --benchmark-only -q -p no:cacheprovider --benchmark-disable-gc --benchmark-columns=median
stage cuda_timings 20 "$OUT/cuda_timings.log" $PY -c "
import json, sys
try:
    from vexpert_kernels._cuda import benchmark_cuda_kernels
except Exception as e:
    print(json.dumps({'available': False, 'reason': repr(e)})); sys.exit(0)
print(json.dumps(benchmark_cuda_kernels(), default=str))
"

echo
echo "== summary ($(( $(date +%s) - T0 ))s total)"
$PY - "$OUT" <<'EOF' | tee "$OUT/summary.txt"
import glob, json, os, sys
out = sys.argv[1]
files = sorted(glob.glob(os.path.join(out, "*_20*.json")))
if not files:
    print("no benchmark results file written"); sys.exit(0)
data = json.load(open(files[-1]))
recs = data["records"]
ok = [r for r in recs if r["status"] == "ok"]
print(f"{data['meta'].get('gpu')} | torch {data['meta'].get('torch')} | triton {data['meta'].get('triton')} | "
      f"{len(ok)} ok, {sum(r['status'] == 'error' for r in recs)} errors, {sum(r['status'] == 'skipped' for r in recs)} skipped")
groups = {}
for r in ok:
    if r.get("suite") in ("layer", "decode"):
        groups.setdefault((r["case"], r["mode"]), {})[r["provider"]] = r["median_ms"]
print(f"{'case':34s} {'mode':8s} {'provider':17s} {'ms':>8s} {'x hf':>6s} {'x comp':>6s}")
for (case, mode), g in groups.items():
    for p, ms in sorted(g.items(), key=lambda kv: kv[1]):
        hf = g.get("hf_eager"); comp = g.get("slices_compiled")
        print(f"{case:34s} {mode:8s} {p:17s} {ms:8.3f} {hf / ms if hf else float('nan'):6.2f} "
              f"{comp / ms if comp else float('nan'):6.2f}")
for r in recs:
    if r["status"] == "error":
        print(f"ERROR {r['case']} {r.get('op', '')} {r['mode']} {r['provider']}: {(r.get('reason') or '')[:120]}")
EOF
echo "stages: $(for k in install gpu_tests full_tests benchmarks cuda_timings; do printf '%s=%s ' "$k" "${RC[$k]:-?}"; done)"

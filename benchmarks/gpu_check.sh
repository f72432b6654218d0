#!/usr/bin/env bash
# One command for a GPU machine (torch + triton preinstalled, offline). Everything lands under $OUT as it is produced
# (JSON lines / JSON files written per test, per tuning decision, per preset), so a timeout still leaves results.
#
#   OUT=/some/dir bash benchmarks/gpu_check.sh          # OUT defaults to ./gpu_out
#
# Stages (hard time budgets, s; total <= ~520 s = 9 min on an H200):
#   install 30 | (a) gpu_tests 75: `-m gpu` tests (our kernels really launch, real ragged shapes fwd+bwd vs torch,
#   > 2^31-element tensors) | (a) op_tests 70: the op test files on CUDA (no interpreter) | (b) tune 2 x 60:
#   python -m vexpert_kernels.tune for cogvlm_chat_17b and cogvlm2_19b (every candidate incl. cuBLAS/SDPA, verdicts)
#   | sm90_selfcheck 40 | qkv_selfcheck 25 | (c) benchmarks 105: pytest benchmarks/ --benchmark-only (pytest-benchmark columns = CUDA-event device time per
#   call) | (d) profile 45: one torch.profiler fwd+bwd per preset, device time per kernel | cuda_timings 15 | summary.
# Files in $OUT: install.log env.json gpu_tests.{log,jsonl} op_tests.{log,jsonl} tune_<preset>.{log,json}
#   autotune_cache/autotune-*.json (decisions as they are made) bench.log bench_pytest.json <card>_<date>.json
#   profile.{log,json} cuda_timings.log summary.txt
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
unset TRITON_INTERPRET
export VEXPERT_AUTOTUNE_CACHE_DIR="$OUT/autotune_cache"   # tuning decisions of every stage land in $OUT, one JSON per GPU+versions
export PYTHONPATH="$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}"  # the pytest_jsonl plugin
PY="${PYTHON:-python3}"
T0=$(date +%s)
declare -A RC
STAGES=()

stage() {  # stage NAME BUDGET_S LOGFILE CMD...
  local name=$1 budget=$2 log=$3; shift 3
  local t=$(date +%s)
  STAGES+=("$name")
  echo "== $name (budget ${budget}s, at $(( t - T0 ))s)"
  timeout --signal=TERM --kill-after=5 "$budget" "$@" >"$log" 2>&1
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

# (a) correctness on CUDA: gpu-marked tests first (they only exist to run here), then the op test files, which now
# run on CUDA tensors (tests/conftest.py sets TRITON_INTERPRET only without CUDA).
stage gpu_tests 75 "$OUT/gpu_tests.log" env VEXPERT_JSONL="$OUT/gpu_tests.jsonl" \
  $PY -m pytest -m gpu tests/ -q -p no:cacheprovider -p pytest_jsonl -rfEs
stage op_tests 70 "$OUT/op_tests.log" env VEXPERT_JSONL="$OUT/op_tests.jsonl" \
  $PY -m pytest tests/test_routed_linear.py tests/test_attention.py tests/test_attention_routed.py tests/test_rmsnorm.py \
  tests/test_gemm_sm90.py tests/test_swiglu_mlp.py tests/test_gemm_sm90_qkv.py tests/test_attention_bwd64.py \
  tests/test_attention_tma.py tests/test_warp_specialize.py tests/test_block.py -q -p no:cacheprovider \
  -p pytest_jsonl -m "not gpu and not slow" -rfE
# (a') Hopper TMA grouped GEMMs vs cuBLAS (correctness + ratio to one dense GEMM per config; JSON as it goes)
stage sm90_selfcheck 40 "$OUT/sm90_selfcheck.log" $PY -m vexpert_kernels.ops.gemm_sm90.selfcheck --quick \
  --json "$OUT/sm90_selfcheck.json"
# (a'') sm_90 QKV + RoPE kernel vs our plain sm_90 GEMM at the same N x K (target >= 0.97x), dW + fused dbias vs dW
stage qkv_selfcheck 25 "$OUT/qkv_selfcheck.log" $PY -m vexpert_kernels.ops.gemm_sm90.qkv_selfcheck --quick --json "$OUT/qkv_selfcheck.json"
# (b) autotune tables at the real shapes (decisions also persist in $VEXPERT_AUTOTUNE_CACHE_DIR as they are made)
for preset in cogvlm_chat_17b cogvlm2_19b; do
  stage "tune_$preset" 60 "$OUT/tune_$preset.log" $PY -m vexpert_kernels.tune --preset "$preset" --tokens 8192 \
    --budget-s "${VEXPERT_TUNE_BUDGET_S:-4}" --json "$OUT/tune_$preset.json"
done
# (c) benchmark suite: records JSON straight into $OUT (copy into benchmarks/results/ and commit; never edit it)
stage benchmarks 105 "$OUT/bench.log" env VEXPERT_BENCH_RESULTS="$OUT" VEXPERT_BENCH_COMPILE="${VEXPERT_BENCH_COMPILE:-first}" VEXPERT_BENCH_REP_MS="${VEXPERT_BENCH_REP_MS:-60}" \
  $PY -m pytest benchmarks/ --benchmark-only -q -p no:cacheprovider --benchmark-disable-gc --benchmark-columns=min,median,rounds \
  --benchmark-json="$OUT/bench_pytest.json"
# (d) one profiled fwd+bwd of the block per preset: device time per kernel
stage profile 45 "$OUT/profile.log" $PY benchmarks/profile_block.py --out "$OUT/profile.json"
stage cuda_timings 15 "$OUT/cuda_timings.log" $PY -c "
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

def jsonl(name):
    p = os.path.join(out, name)
    if not os.path.exists(p):
        return None
    rows = [json.loads(l) for l in open(p) if l.strip()]
    return [r for r in rows if "nodeid" in r], any(r.get("event") == "finish" for r in rows)

for name in ("gpu_tests.jsonl", "op_tests.jsonl"):
    got = jsonl(name)
    if got is None:
        print(f"{name}: not written"); continue
    rows, finished = got
    counts = {}
    for r in rows:
        counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
    print(f"{name}: {counts}{'' if finished else ' (run did not finish: timeout?)'}")
    for r in rows:
        if r["outcome"] in ("failed", "error"):
            print(f"  FAIL {r['nodeid']}: {(r.get('detail') or '').strip().splitlines()[-1][:160] if r.get('detail') else ''}")

for p in sorted(glob.glob(os.path.join(out, "tune_*.json"))):
    d = json.load(open(p))
    print(f"{os.path.basename(p)}: {len(d.get('decisions', []))} decisions, errors {d.get('errors') or {}}")
    for r in d.get("decisions", []):
        c = r.get("candidates") or {}
        ok = {n: v["ms"] for n, v in c.items() if v.get("ms") is not None}
        st = ok.get(r.get("static"))
        ratio = f"x{st / ok[r['chosen']]:.2f} vs static" if st and r["chosen"] in ok else ""
        bad = [n for n, v in c.items() if str(v.get("verdict", "")).startswith(("wrong", "error"))]
        print(f"  {r['op']:<20s} {json.dumps(r.get('key'))[:60]:<60s} -> {r['chosen']:<24s} {ratio}"
              f"{'  dropped: ' + ','.join(bad) if bad else ''}")

files = sorted(glob.glob(os.path.join(out, "*_20*.json")))
if not files:
    print("no benchmark results file written")
else:
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

p = os.path.join(out, "profile.json")
if os.path.exists(p):
    d = json.load(open(p))
    for prof in d.get("profiles", []):
        print(f"profile {prof['preset']}: {prof['kernel_device_ms']:.2f} ms kernels/fwd+bwd, "
              f"{prof['ours_device_ms']:.2f} ms ours; top: " +
              ", ".join(f"{k['name'][:40]} {k['device_us'] / 1e3:.2f}ms" for k in prof["kernels"][:4]))
    for k, v in (d.get("errors") or {}).items():
        print(f"profile {k}: ERROR {v[:160]}")
EOF
echo "stages: $(for k in "${STAGES[@]}"; do printf '%s=%s ' "$k" "${RC[$k]:-?}"; done)"

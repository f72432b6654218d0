"""benchmarks/gpu_check.sh runs only on a lent GPU machine (minutes of device time, no second try): check here that
it parses, that every test file and module it names exists, and that its stage budgets stay inside the device time."""
import importlib.util
import os
import re
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_check.sh")


def _text():
    return open(SCRIPT).read()


def test_script_parses():
    r = subprocess.run(["bash", "-n", SCRIPT], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_named_test_files_exist():
    files = set(re.findall(r"tests/test_\w+\.py", _text()))
    assert len(files) >= 10
    missing = sorted(f for f in files if not os.path.exists(os.path.join(ROOT, f)))
    assert not missing, missing


def test_named_modules_exist():
    mods = set(re.findall(r"-m (vexpert_kernels[\w.]*)", _text()))
    assert "vexpert_kernels.ops.gemm_sm90.qkv_selfcheck" in mods and "vexpert_kernels.tune" in mods
    missing = sorted(m for m in mods if importlib.util.find_spec(m) is None)
    assert not missing, missing
    for script in re.findall(r"\$PY (benchmarks/\w+\.py)", _text()):
        assert os.path.exists(os.path.join(ROOT, script)), script


def test_stage_budgets_fit_the_device_time():
    budgets = [int(b) for b in re.findall(r"^\s*stage \S+ (\d+) ", _text(), flags=re.M)]
    # the tune stage is one line in a loop over two presets
    n_tune = len(re.findall(r"for preset in (\w+ ?)+; do", _text()))
    total = sum(budgets) + 60 * n_tune
    assert 8 <= len(budgets) and total <= 600, (budgets, total)  # 15 min of device time incl. start and a rerun

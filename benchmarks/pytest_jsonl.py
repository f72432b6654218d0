"""pytest plugin: one JSON line per test outcome, appended as it happens (a killed run keeps what finished).

    VEXPERT_JSONL=out.jsonl python -m pytest -p pytest_jsonl ...   (with benchmarks/ on PYTHONPATH)

Each line: nodeid, outcome (passed/failed/skipped/error), when (setup/call/teardown), duration_s, and for failures and
skips the first 3000 characters of the report.
"""
import json
import os
import time


def _write(rec):
    path = os.environ.get("VEXPERT_JSONL")
    if not path:
        return
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(rec, default=str) + "\n")
        f.flush()


def pytest_sessionstart(session):
    _write({"event": "start", "time": time.time(), "args": list(session.config.invocation_params.args)})


def pytest_runtest_logreport(report):
    if report.when != "call" and report.outcome == "passed":
        return
    outcome = report.outcome if report.when == "call" or report.outcome == "skipped" else "error"
    rec = {"nodeid": report.nodeid, "outcome": outcome, "when": report.when,
           "duration_s": round(report.duration, 3)}
    if report.outcome != "passed":
        rec["detail"] = str(report.longrepr)[-3000:]
    _write(rec)


def pytest_sessionfinish(session, exitstatus):
    _write({"event": "finish", "time": time.time(), "exitstatus": int(exitstatus)})

"""Results writer: one JSON file per benchmark run, named by card and date, rewritten after every record (so a run
killed by a time limit still leaves its numbers). Never edit these files by hand; regenerate them.

File: ``<dir>/<card>_<YYYY-MM-DD>_<HHMMSS>.json`` = ``{"meta": environment + suite settings, "records": [...]}``.
A record: ``suite`` (layer | sweep | decode | op), ``case`` (id), ``label``, ``mode`` (fwd | fwd+bwd | decode),
``provider``, ``status`` (ok | skipped | error), ``reason``, ``median_ms``, ``flops``, ``tflops``,
``peak_extra_mib`` (None where unmeasured), ``rel_err`` (vs the reference output, where checked), plus shape fields.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
from typing import Optional


class ResultsWriter:
    def __init__(self, directory: str, meta: dict, stamp: Optional[str] = None):
        os.makedirs(directory, exist_ok=True)
        stamp = stamp or _dt.datetime.now().strftime("%Y-%m-%d_%H%M%S")
        self.path = os.path.join(directory, f"{meta.get('card', 'unknown')}_{stamp}.json")
        self.meta = dict(meta)
        self.records = []

    def add(self, record: dict) -> dict:
        self.records.append(_clean(record))
        self.flush()
        return record

    def flush(self) -> None:
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"meta": self.meta, "records": self.records}, f, indent=1, sort_keys=False)
        os.replace(tmp, self.path)


def _clean(v):
    if isinstance(v, dict):
        return {str(k): _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    if isinstance(v, float) and (v != v or v in (float("inf"), float("-inf"))):
        return None
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    return str(v)


def load_results(path: str) -> dict:
    with open(path) as f:
        data = json.load(f)
    if not isinstance(data, dict) or "records" not in data or "meta" not in data:
        raise ValueError(f"{path}: not a benchmark results file (needs 'meta' and 'records')")
    return data

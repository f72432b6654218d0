"""On-disk decisions: one JSON file per machine fingerprint (GPU name, compute capability, torch, triton versions).

Directory: ``$VEXPERT_AUTOTUNE_CACHE_DIR`` if set, else ``$VEXPERT_CACHE_DIR/autotune`` (the package's cache root, shared
with the CUDA extension build), else ``~/.cache/vexpert_kernels/autotune``. A file is named after a short
hash of the fingerprint (plus a readable slug) and holds ``{"fingerprint": {...}, "decisions": {entry_key: record}}``.
A version change gives another file, so stale decisions are never read; a file whose stored fingerprint does not match
is ignored too.

Writes are merge-on-write under an exclusive ``flock`` on ``<file>.lock`` (where ``fcntl`` exists): read the file,
add the new records, write a temporary file in the same directory and ``os.replace`` it over the old one, so readers
never see a half-written file and concurrent writers never lose each other's decisions. An unreadable or corrupt
file is treated as empty (and overwritten by the next write).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
from typing import Optional

try:  # POSIX advisory locks; elsewhere merge-on-write + atomic replace still never corrupts the file
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

log = logging.getLogger("vexpert_kernels.autotune")

FORMAT = 1
PREFIX = "autotune-"


def default_cache_dir() -> str:
    d = os.environ.get("VEXPERT_AUTOTUNE_CACHE_DIR")
    if d:
        return os.path.abspath(os.path.expanduser(d))
    root = os.environ.get("VEXPERT_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "vexpert_kernels")
    return os.path.join(os.path.abspath(os.path.expanduser(root)), "autotune")


def _slug(fingerprint: dict) -> str:
    gpu = str(fingerprint.get("gpu", "none")).lower().replace("nvidia", "")
    gpu = "".join(c if c.isalnum() else "-" for c in gpu).strip("-")
    while "--" in gpu:
        gpu = gpu.replace("--", "-")
    digest = hashlib.sha1(json.dumps(fingerprint, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return f"{PREFIX}{gpu or 'gpu'}-{digest}.json"


class DiskCache:
    """The decisions file of one fingerprint inside ``cache_dir``."""

    def __init__(self, cache_dir: str, fingerprint: dict):
        self.dir = cache_dir
        self.fingerprint = dict(fingerprint)
        self.path = os.path.join(cache_dir, _slug(self.fingerprint))

    # ------------------------------------------------------------------------------------------- reading
    def load(self) -> dict:
        """All decisions in the file ({} when missing, unreadable, corrupt or of another fingerprint)."""
        try:
            with open(self.path, "r", encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.warning("autotune cache %s is unreadable (%s); ignoring it", self.path, exc)
            return {}
        if not isinstance(data, dict) or data.get("format") != FORMAT or \
                data.get("fingerprint") != json.loads(json.dumps(self.fingerprint, default=str)):
            log.warning("autotune cache %s has another format or fingerprint; ignoring it", self.path)
            return {}
        dec = data.get("decisions")
        return {k: v for k, v in dec.items() if isinstance(v, dict) and isinstance(v.get("chosen"), str)} \
            if isinstance(dec, dict) else {}

    def get(self, entry: str) -> Optional[dict]:
        return self.load().get(entry)

    # ------------------------------------------------------------------------------------------- writing
    @contextlib.contextmanager
    def _locked(self):
        os.makedirs(self.dir, exist_ok=True)
        if fcntl is None:  # pragma: no cover
            yield
            return
        with open(self.path + ".lock", "a+") as lk:
            fcntl.flock(lk.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lk.fileno(), fcntl.LOCK_UN)

    def put(self, entries: dict) -> None:
        """Merge ``{entry_key: record}`` into the file (atomic, under the lock)."""
        with self._locked():
            merged = self.load()
            merged.update(entries)
            data = {"format": FORMAT, "fingerprint": self.fingerprint, "decisions": merged}
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=self.dir)
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    json.dump(data, f, indent=1, sort_keys=True, default=str)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, self.path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise


def clear_dir(cache_dir: str) -> int:
    """Delete every decisions file (and lock file) of ours in ``cache_dir``; returns how many files went."""
    n = 0
    try:
        names = os.listdir(cache_dir)
    except FileNotFoundError:
        return 0
    for name in names:
        if name.startswith(PREFIX) and (name.endswith(".json") or name.endswith(".json.lock")):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(cache_dir, name))
                n += 1
    return n

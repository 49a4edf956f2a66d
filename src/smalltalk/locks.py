"""One writer per directory: an exclusive lock on a run, stage or model directory.

    with DirLock(run_dir, "smalltalk run"):
        ...   # a second process on the same directory gets a one-line error naming this one

The lock is an OS file lock (`filelock`, flock on POSIX) on ``<dir>/.smalltalk.lock``: the kernel
drops it when its process dies, so a run killed with kill -9 never blocks its own resume. Who holds
it (pid, host, since when, command) is written beside it in ``.smalltalk.lock.json``, read only to
word the error. Locks are per directory, so the E experts of one run (each its own directory) still
train in parallel while `smalltalk run` holds the run directory.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import socket
import sys
from pathlib import Path

from filelock import FileLock, Timeout

from .errors import SmallTalkError

LOCK_FILE = ".smalltalk.lock"
HOLDER_FILE = ".smalltalk.lock.json"


def ensure_dir(path: str | os.PathLike, what: str = "--out") -> Path:
    """Create directory `path` (and parents), or say clearly why it cannot be one."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise SmallTalkError(f"{what} {path}: is a file, not a directory; give a directory path")
    for parent in path.parents:
        if parent.exists() and not parent.is_dir():
            raise SmallTalkError(f"{what} {path}: {parent} is a file, not a directory; give a directory path")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SmallTalkError(f"{what} {path}: cannot create the directory ({e.strerror})") from None
    return path


class DirLock:
    def __init__(self, directory: str | os.PathLike, what: str, *, enabled: bool = True):
        self.dir = Path(directory)
        self.what = what
        self.enabled = enabled
        self._lock: FileLock | None = None

    def __enter__(self) -> "DirLock":
        if not self.enabled:
            return self
        ensure_dir(self.dir)
        self._lock = FileLock(str(self.dir / LOCK_FILE), timeout=0, is_singleton=False)
        try:
            self._lock.acquire()
        except Timeout:
            raise SmallTalkError(f"{self.dir} is in use by {self._holder()}; wait for it to finish or stop it, "
                                 "then re-run to resume") from None
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "what": self.what,
                  "since": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
                  "command": " ".join(sys.argv)[:300]}
        tmp = self.dir / f"{HOLDER_FILE}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(holder))
        os.replace(tmp, self.dir / HOLDER_FILE)
        return self

    def _holder(self) -> str:
        try:
            h = json.loads((self.dir / HOLDER_FILE).read_text())
            return f"{h['what']} (pid {h['pid']} on {h['host']}, since {h['since']})"
        except (OSError, ValueError, KeyError):
            return "another process"

    def __exit__(self, *exc) -> None:
        if self._lock is not None:
            try:
                (self.dir / HOLDER_FILE).unlink(missing_ok=True)
            finally:
                self._lock.release()
                self._lock = None

"""Atomic file writes: write to a temporary name in the same directory, fsync, then rename.

A reader (or a resumed job) therefore sees either the old complete file or the new complete
file, never a half-written one. Temporary names end in ``.tmp`` and are ignored everywhere.
Whole directories (model directories, exports) are written the same way by `atomic_dir`, in a
``.<name>.<random>.partial`` sibling.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import IO, Any, Iterator


def current_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def temp_dir(prefix: str, parent: Path) -> Path:
    """A new temporary directory in `parent`, with the usual permissions (0777 & ~umask) rather than mkdtemp's
    0700, so the directory it becomes is readable by whoever the umask allows (shared file systems)."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix, suffix=".partial", dir=parent))
    os.chmod(tmp, 0o777 & ~current_umask())
    return tmp


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temp file beside `path`; on clean exit fsync and rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp creates 0600 files; give the final file the usual permissions (0666 & ~umask).
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def fsync_dir(path: Path) -> None:
    """Make the directory entries durable before the rename publishes them (no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def replace_dir(src: Path, dst: Path) -> None:
    """Rename directory `src` to `dst`; an existing `dst` is moved aside first and deleted after."""
    if not dst.exists():
        os.replace(src, dst)
        return
    old = temp_dir(f".{dst.name}.old.", dst.parent)
    os.replace(dst, old / dst.name)
    os.replace(src, dst)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary sibling directory of `path` to fill; on clean exit it is fsynced and renamed over `path`
    (replacing any previous directory whole), on error deleted."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir(f".{path.name}.", path.parent)
    try:
        yield tmp
        fsync_dir(tmp)
        replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    from .errors import SmallTalkError

    path = Path(path)
    if not path.exists():
        raise SmallTalkError(f"{path}: file not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SmallTalkError(f"{path}: not valid JSON ({e}); delete it and re-run the stage that writes it")


def remove_stale_temps(directory: str | os.PathLike) -> int:
    """Delete leftover ``*.tmp`` files from an interrupted run; returns how many."""
    n = 0
    for p in Path(directory).rglob("*.tmp"):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
            n += 1
    return n


def sha256_file(path: str | os.PathLike, chunk_bytes: int = 1 << 22) -> str:
    """Hex sha256 of a file's bytes (how tokenizers and checkpoint files are identified)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            h.update(chunk)
    return h.hexdigest()


def read_manifest(path: Path, fmt: str, what: str, fix: str, missing: str) -> dict:
    """The JSON object at `path`, checked to be a manifest of format `fmt`; a missing file raises `missing`, a file
    of another format names what it is not (`what`) and what to do (`fix`)."""
    from .errors import SmallTalkError

    if not path.is_file():
        raise SmallTalkError(missing)
    raw = read_json(path)
    found = raw.get("format") if isinstance(raw, dict) else None
    if found != fmt:
        raise SmallTalkError(f"{path}: not {what} (format {found!r}); {fix}")
    return raw

"""Atomic writes to local files: the store's `file` protocol and its node-local staging dir."""

from __future__ import annotations

import os
import tempfile


def _tmp_write(path: str, data: bytes, fsync: bool) -> str:
    """Write `data` to a fresh temp file next to `path`; return the temp file's name."""
    d = os.path.dirname(path)
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
    except BaseException:
        os.unlink(tmp)
        raise
    return tmp


def replace_file(path: str, data: bytes, fsync: bool) -> None:
    """Atomically replace `path` (readers see the old or the new file, never a partial one)."""
    tmp = _tmp_write(path, data, fsync)
    try:
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def link_new(path: str, data: bytes) -> bool:
    """Create `path` with `data` atomically unless it exists (a hard link never replaces)."""
    tmp = _tmp_write(path, data, fsync=True)
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        os.unlink(tmp)

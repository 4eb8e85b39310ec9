"""What an artifact key and a side-file path may be: checked before either names an object.

Its own module so that `artifact` (the object format) and `signing` (which checks the keys of
signed manifest rows) both use it without importing each other.
"""

from __future__ import annotations

import re

KEY_RE = re.compile(r"[0-9a-f]{64}")
_RELPATH_RE = re.compile(r"[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*")


def check_key(key: str) -> str:
    """Return `key` if it is a lowercase hex sha256 string; raise ValueError naming it otherwise."""
    if not isinstance(key, str) or not KEY_RE.fullmatch(key):
        raise ValueError(f"invalid artifact key {key!r}: expected 64 lowercase hex characters")
    return key


def check_relpath(relpath: str) -> str:
    """Return `relpath` if it stays under the root: [A-Za-z0-9._/-], no '..', not absolute."""
    ok = isinstance(relpath, str) and _RELPATH_RE.fullmatch(relpath)
    parts = relpath.split("/") if ok else []
    if not ok or parts[0] == "artifacts" or any(p in (".", "..") for p in parts):
        raise ValueError(f"invalid relative path {relpath!r}: use [A-Za-z0-9._-] segments "
                         "joined by '/', no '.', '..', leading '/' or 'artifacts/'")
    return relpath

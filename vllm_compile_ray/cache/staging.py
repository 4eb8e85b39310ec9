"""`SharedStaging`: ranks on one node download each artifact once.

Wraps an `ArtifactStore`. Before fetching a key, a process takes an exclusive `flock` on
`<staging>/<key[:2]>/<key>.lock`; whoever holds it downloads (the store verifies sha256 and
stages through a temp file + `os.replace`), the others wait on the lock and then read the staged
copy. The kernel drops a flock when its process dies, and a half-written temp file is never at the
staged path, so a crashed download leaves nothing that looks valid: the next rank downloads again.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from ..compiling.counters import CompilationCounter
from ..errors import ArtifactCorruptError
from .store import Artifact, ArtifactStore

logger = logging.getLogger(__name__)

_POLL_S = 0.02


@dataclass
class StagingStats:
    """What this process's fetches did: keys downloaded from the store, keys found already staged
    on this node (staged by an earlier start or by another rank), keys it waited for."""

    downloaded: int = 0
    staged: int = 0
    waited: int = 0
    rejected: int = 0
    bytes_downloaded: int = 0
    bytes_staged: int = 0


class SharedStaging:
    """The store calls `CompilerManager` makes (`fetch_many`, `fetch`), made node-cooperative with
    per-key file locks; every other attribute (publish, check_access, ...) is the store's own.

    wait_timeout_s bounds how long a rank waits for another's download before fetching itself.
    """

    def __init__(self, store: ArtifactStore, counter: CompilationCounter | None = None,
                 wait_timeout_s: float = 120.0):
        self.store = store
        self.counter = counter
        self.wait_timeout_s = wait_timeout_s
        self.stats = StagingStats()
        self._prefetched: dict[str, Artifact] = {}
        self._prefetch_thread: threading.Thread | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)

    def lock_path(self, key: str) -> str:
        return os.path.join(self.store.staging_dir, key[:2], key + ".lock")

    def prefetch_in_background(self, list_keys: Callable[[], list[str]]) -> None:
        """Fetch the keys `list_keys()` names (the warm job's manifest) on a thread while the
        caller traces; `fetch_many` then takes them from memory."""
        def run() -> None:
            try:
                self._prefetched.update(self._fetch_many(list_keys(), {}))
            except Exception as exc:  # noqa: BLE001 (the foreground fetch retries every key)
                logger.warning("background prefetch failed, fetching on demand: %s: %s",
                               type(exc).__name__, exc)

        self._prefetch_thread = threading.Thread(target=run, name="vcr-prefetch", daemon=True)
        self._prefetch_thread.start()

    def unused_prefetched(self) -> int:
        return len(self._prefetched)

    def fetch_many(self, keys: Iterable[str],
                   rejected: dict[str, ArtifactCorruptError] | None = None) -> dict[str, Artifact]:
        """Verified artifacts of `keys` (missing and corrupt ones absent: corrupt ones are
        recorded in `rejected` when given), downloading each at most once per node: keys no
        other process is fetching go out in one batched request; keys another process holds are
        read from staging once it is done (or fetched here if it failed)."""
        if self._prefetch_thread is not None:
            self._prefetch_thread.join()
        keys = sorted(set(keys))
        out = {k: self._prefetched.pop(k) for k in keys if k in self._prefetched}
        out.update(self._fetch_many([k for k in keys if k not in out],
                                    {} if rejected is None else rejected))
        return out

    def _fetch_many(self, keys: list[str], rejected: dict[str, ArtifactCorruptError]
                    ) -> dict[str, Artifact]:
        keys = sorted(set(keys))
        out: dict[str, Artifact] = {}
        with _locks(self, keys, wait=False) as mine:
            out.update(self._fetch_held(mine, rejected))
        busy = [k for k in keys if k not in mine]
        if busy:
            self.stats.waited += len(busy)
            with _locks(self, busy, wait=True):  # sorted order: no lock cycle between ranks
                out.update(self._fetch_held(busy, rejected))
        return out

    def fetch(self, key: str) -> Artifact:
        """One artifact, same protocol; ArtifactNotFoundError / ArtifactCorruptError as the store."""
        if self._prefetch_thread is not None:
            self._prefetch_thread.join()
        if key in self._prefetched:
            return self._prefetched.pop(key)
        with _locks(self, [key], wait=True):
            before = self._staged_stat(key)
            artifact = self.store.fetch(key)
            self._count(key, artifact, before)
            return artifact

    def _staged_stat(self, key: str) -> tuple[int, int] | None:
        """(inode, mtime) of the staged copy, or None. The store replaces a corrupt staged copy
        by a fresh download, which changes both: that counts as a download, not a staged hit."""
        # The store owns the staging layout; `_staged_path` is its one definition of it.
        try:
            st = os.stat(self.store._staged_path(key))
        except FileNotFoundError:
            return None
        return st.st_ino, st.st_mtime_ns

    def _fetch_held(self, keys: list[str], rejected: dict[str, ArtifactCorruptError]
                    ) -> dict[str, Artifact]:
        if not keys:
            return {}
        before = {k: self._staged_stat(k) for k in keys}
        bad: dict[str, ArtifactCorruptError] = {}
        found = self.store.fetch_many(keys, rejected=bad)
        rejected.update(bad)
        # A corrupt object is a miss, not a failed batch; the caller (CompilerManager.prefetch)
        # counts and logs it, once, however many fetches saw it.
        self.stats.rejected += len(bad)
        for key, artifact in found.items():
            self._count(key, artifact, before[key])
        return found

    def _count(self, key: str, artifact: Artifact, before: tuple[int, int] | None) -> None:
        size = len(artifact.payload)
        if before is not None and before == self._staged_stat(key):
            self.stats.staged += 1
            self.stats.bytes_staged += size
            if self.counter is not None:
                self.counter.num_cache_hits_staging += 1
        else:
            self.stats.downloaded += 1
            self.stats.bytes_downloaded += size


@contextlib.contextmanager
def _locks(staging: SharedStaging, keys: list[str], wait: bool) -> Iterator[set[str]]:
    """Hold the flock of each key that can be had (wait=False: at once; wait=True: within the
    wait timeout, else go on without it); yields the keys held."""
    held: dict[str, int] = {}
    deadline = time.monotonic() + staging.wait_timeout_s
    try:
        for key in keys:
            path = staging.lock_path(key)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            if _acquire(fd, deadline if wait else None):
                held[key] = fd
            else:
                os.close(fd)
                if wait:
                    logger.warning("waited %.0f s for another process to stage %s; fetching it "
                                   "here", staging.wait_timeout_s, key)
        yield set(held) if not wait else set(keys)
    finally:
        for fd in held.values():
            os.close(fd)  # closing the last descriptor releases the flock


def _acquire(fd: int, deadline: float | None) -> bool:
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if deadline is None or time.monotonic() >= deadline:
                return False
            time.sleep(_POLL_S)

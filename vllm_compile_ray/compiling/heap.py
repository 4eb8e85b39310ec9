"""Python's cyclic garbage collector in compile processes.

A piece compile allocates millions of short- and long-lived objects (FX nodes, IR, template
choices, generated source), so the collector runs full collections during it, and each full
collection walks every tracked object of the process: the hundreds of thousands that torch,
Triton, Inductor and Ray leave alive after their imports, again and again. While it walks, it
holds the GIL, so a compile's template-precompile and kernel threads wait too.

A compile worker freezes its heap once its start-up is done (`freeze`: what is alive then stays
alive for the process's life and leaves the collector's view), so a full collection during a
compile walks only what the compiles made. `collections` measures what the collector costs.
"""

from __future__ import annotations

import gc
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

_lock = threading.Lock()
_recorders: list[dict[str, Any]] = []  # open `collections` blocks (the gc callback feeds them)
_started: dict[int, float] = {}  # thread id -> start of the collection it runs


def freeze() -> int:
    """Collect once, then move every object alive into the collector's permanent generation
    (`gc.freeze`); returns how many objects are frozen. Call it where a process has done its
    imports and set-up and is about to allocate what it will free again."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def _callback(phase: str, info: dict[str, Any]) -> None:
    now = time.perf_counter()
    if phase == "start":
        _started[threading.get_ident()] = now
        return
    began = _started.pop(threading.get_ident(), now)
    with _lock:
        for rec in _recorders:
            rec["collections"][info["generation"]] += 1
            rec["seconds"] += now - began


@contextmanager
def collections() -> Iterator[dict[str, Any]]:
    """Yields {"collections": [by generation 0, 1, 2], "seconds": total} filled in as the
    collector runs (in any thread) until the block ends; "frozen": objects out of its view."""
    rec: dict[str, Any] = {"collections": [0, 0, 0], "seconds": 0.0,
                           "frozen": gc.get_freeze_count()}
    with _lock:
        if not _recorders:
            gc.callbacks.append(_callback)
        _recorders.append(rec)
    try:
        yield rec
    finally:
        with _lock:
            _recorders.remove(rec)
            if not _recorders:
                gc.callbacks.remove(_callback)
        rec["seconds"] = round(rec["seconds"], 4)

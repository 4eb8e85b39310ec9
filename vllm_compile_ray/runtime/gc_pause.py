"""No cyclic garbage collection during a rank's startup, except while it compiles.

A startup allocates hundreds of thousands of objects (dynamo, the traced model's guards, the
store's client), so the collector's full passes come due inside it, and each walks every
object of the process: on the 2-core machine 0.14 s of a 1.9 s start from local disk and 0.32 s
of a 2.2 s start from S3, whose client adds ~50,000 objects (benchmarks/RESULTS.md). Garbage
made meanwhile is left to the first collection after it; a serving engine that freezes its heap
once started (vLLM's `gc.freeze()`) never walks it again. A compile inside (a miss under
`on_miss="compile"`) makes garbage by the gigabyte over minutes: collection is back on for it.
"""

from __future__ import annotations

import contextlib
import gc
import threading
from collections.abc import Iterator

_lock = threading.Lock()
_depth = 0  # pauses open, all threads
_was_enabled = False  # the collector's state when the outermost pause began


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Automatic collection off inside, back as it was after (also as a decorator)."""
    global _depth, _was_enabled
    with _lock:
        if _depth == 0:
            _was_enabled = gc.isenabled()
        _depth += 1
        gc.disable()
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _was_enabled:
                gc.enable()


@contextlib.contextmanager
def gc_resumed() -> Iterator[None]:
    """Inside a pause, collection back on (as it was before the pause) until the block ends."""
    with _lock:
        resume = _depth > 0 and _was_enabled
        if resume:
            gc.enable()
    try:
        yield
    finally:
        with _lock:
            if resume and _depth > 0:
                gc.disable()

"""No cyclic garbage collection during a rank's startup.

A startup allocates hundreds of thousands of objects (dynamo, the traced model's guards, the
store's client), so the collector's full passes come due inside it, and each walks every
object of the process: on the 2-core machine 0.14 s of a 1.9 s start from local disk and 0.32 s
of a 2.2 s start from S3, whose client adds ~50,000 objects (benchmarks/RESULTS.md). Garbage
made meanwhile is left to the first collection after it; a serving engine that freezes its heap
once started (vLLM's `gc.freeze()`) never walks it again.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Automatic collection off inside, back as it was after (also as a decorator)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()

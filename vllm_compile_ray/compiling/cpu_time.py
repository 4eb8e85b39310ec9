"""Where a compile's CPU time goes while many compiles share a node's cores.

`measure` reports, over a block: the process's CPU seconds (all its threads: the compile, its
kernel and template-precompile threads, CUDA's waits when they spin), its child processes' (ptxas,
the C++ compiler) and, for the calling thread (the compile's own Python), the seconds it ran and
the seconds it was ready to run but waited for a core (Linux's /proc/thread-self/schedstat). The
rest of the block's wall time that thread slept: on a lock (the GIL), a future, a GPU that
blocks, a child process. Together they tell whether a slow compile lacked cores, a lock or its
GPU (measured on 4xH200, 33 compiles at once: benchmarks/RESULTS.md, session 13).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

_SCHEDSTAT = "/proc/thread-self/schedstat"


def _thread_ns() -> tuple[int, int] | None:
    """(ns on a CPU, ns waiting in the run queue) of the calling thread, or None off Linux."""
    try:
        with open(_SCHEDSTAT) as f:
            run, wait, _ = f.read().split()
    except (OSError, ValueError):
        return None
    return int(run), int(wait)


@contextmanager
def measure() -> Iterator[dict[str, Any]]:
    """Yields a dict filled in when the block ends: "cpu_s" (the process), "child_cpu_s" (its
    child processes that ended and were waited for), and where Linux keeps scheduler statistics
    "run_s" and "runq_s" (the calling thread), all rounded to ms."""
    rec: dict[str, Any] = {}
    times, thread = os.times(), _thread_ns()
    try:
        yield rec
    finally:
        end, thread_end = os.times(), _thread_ns()
        rec["cpu_s"] = round(max(0.0, end.user + end.system - times.user - times.system), 3)
        rec["child_cpu_s"] = round(max(0.0, end.children_user + end.children_system
                                       - times.children_user - times.children_system), 3)
        if thread is not None and thread_end is not None:
            rec["run_s"] = round((thread_end[0] - thread[0]) / 1e9, 3)
            rec["runq_s"] = round((thread_end[1] - thread[1]) / 1e9, 3)


"""`cpu_time.measure`: the process's, its children's and the calling thread's CPU seconds."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest

from vllm_compile_ray.compiling import cpu_time

BUSY = "import time\nend = time.thread_time() + {s}\nwhile time.thread_time() < end: pass\n"


def _busy(seconds: float) -> None:
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def test_thread_on_a_core_and_asleep() -> None:
    with cpu_time.measure() as busy:
        _busy(0.3)
    with cpu_time.measure() as asleep:
        time.sleep(0.3)
    assert busy["run_s"] >= 0.28 and busy["cpu_s"] >= 0.25, busy
    assert asleep["run_s"] < 0.05 and asleep["cpu_s"] < 0.05, asleep


def test_process_counts_other_threads_and_children_apart() -> None:
    """Another thread's CPU counts for the process, not the calling thread; a child's (waited
    for) counts as the children's."""
    worker = threading.Thread(target=_busy, args=(0.3,))
    with cpu_time.measure() as threads:
        worker.start()
        worker.join()
    assert threads["cpu_s"] >= 0.25 and threads["run_s"] < 0.1, threads
    with cpu_time.measure() as child:
        subprocess.run([sys.executable, "-c", BUSY.format(s=0.3)], check=True)
    assert child["child_cpu_s"] >= 0.25 and child["cpu_s"] < 0.2, child


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs Linux CPU affinity")
def test_waiting_for_a_core() -> None:
    """Sharing one core with a busy process, the thread waits in the run queue about as long as
    it runs."""
    core = min(os.sched_getaffinity(0))
    before = os.sched_getaffinity(0)
    rival = subprocess.Popen([sys.executable, "-c", BUSY.format(s=5)])
    try:
        os.sched_setaffinity(rival.pid, {core})
        os.sched_setaffinity(0, {core})  # this thread only (Linux: pid 0 is the calling thread)
        time.sleep(0.2)  # the rival is past its start-up and spinning
        with cpu_time.measure() as shared:
            _busy(0.3)
    finally:
        os.sched_setaffinity(0, before)
        rival.kill()
        rival.wait()
    assert shared["run_s"] >= 0.28 and shared["runq_s"] >= 0.1, shared

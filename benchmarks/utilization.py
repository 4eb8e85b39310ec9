"""How busy the host's CPUs and GPUs were over a window of a benchmark run.

A background thread samples /proc/stat (the share of all cores not idle) and, where NVIDIA's
management library loads, each GPU's utilization (the share of time a kernel was running) every
`interval` seconds; `mean(t0, t1)` averages the samples taken between two `time.time()` stamps.
NVML is called in-process (an nvidia-smi process per sample slowed the compiles it measured).
"""

from __future__ import annotations

import ctypes
import threading
import time


def _cpu_times() -> tuple[int, int]:
    """(busy, total) jiffies of all cores since boot."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields) - idle, sum(fields)


class _Utilization(ctypes.Structure):
    _fields_ = [("gpu", ctypes.c_uint), ("memory", ctypes.c_uint)]


def _open_nvml() -> tuple[ctypes.CDLL | None, list[ctypes.c_void_p]]:
    """(the library, one handle per GPU), or (None, []) without NVIDIA's driver."""
    try:
        nvml = ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        return None, []
    count = ctypes.c_uint()
    if nvml.nvmlInit_v2() != 0 or nvml.nvmlDeviceGetCount_v2(ctypes.byref(count)) != 0:
        return None, []
    handles = []
    for i in range(count.value):
        handle = ctypes.c_void_p()
        if nvml.nvmlDeviceGetHandleByIndex_v2(i, ctypes.byref(handle)) != 0:
            return None, []
        handles.append(handle)
    return nvml, handles


class Sampler:
    def __init__(self, interval: float = 0.5):
        self.interval = interval
        self.samples: list[tuple[float, float, list[float]]] = []  # (time, cpu share, GPU shares)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="utilization", daemon=True)
        self._nvml, self._handles = _open_nvml()

    def start(self) -> Sampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _gpus(self) -> list[float]:
        if self._nvml is None:
            return []
        shares = []
        for handle in self._handles:
            rates = _Utilization()
            if self._nvml.nvmlDeviceGetUtilizationRates(handle, ctypes.byref(rates)) != 0:
                return []
            shares.append(rates.gpu / 100)
        return shares

    def _run(self) -> None:
        busy, total = _cpu_times()
        while True:
            stopped = self._stop.wait(self.interval)  # a last sample when stopped
            gpus = self._gpus()
            now_busy, now_total = _cpu_times()
            share = (now_busy - busy) / max(1, now_total - total)
            busy, total = now_busy, now_total
            self.samples.append((time.time(), share, gpus))
            if stopped:
                return

    def mean(self, t0: float, t1: float) -> dict[str, float | list[float]]:
        """{"cpu": mean share of all cores busy, "gpus": mean utilization per GPU} over the
        samples whose interval (each covers the `interval` before it) overlaps [t0, t1]."""
        inside = [s for s in self.samples if t0 < s[0] < t1 + self.interval]
        if not inside:
            return {}
        gpus = [s[2] for s in inside if s[2]]
        per_gpu = [round(sum(g[i] for g in gpus) / len(gpus), 3)
                   for i in range(min(map(len, gpus)))] if gpus else []
        return {"cpu": round(sum(s[1] for s in inside) / len(inside), 3), "gpus": per_gpu}

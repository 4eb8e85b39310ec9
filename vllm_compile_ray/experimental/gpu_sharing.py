"""How the compile workers on one GPU share it: time slices (CUDA's default) or NVIDIA MPS.

Without MPS a GPU runs one process's CUDA context at a time, in time slices, so the short
kernels and synchronizations of max-autotune's benchmarks (GEMM choices, epilogue fusions) in
one compile wait through the other compiles' slices. With MPS (Multi-Process Service) the
processes' work goes through one server per GPU and runs side by side. Measured: nine compiles of
a llama-3-8b layer piece at 512 on one H100, each 38-39 s in time slices, 30-31 s through MPS; a
warm run of 33 compiles on 2xH200 (benchmarks/RESULTS.md, session 12), 26.3-27.9 s -> 21.1-23.2 s.
On 4xH200 (64 cores) the autotuning seconds fell 40 % but the phase stayed (15.0 -> 15.1 s): there
the CPUs hold 33 compiles back once the GPUs do not.

`join("mps")` runs in a compile worker before CUDA starts. It uses the node's MPS daemon where
the node runs one (CUDA_MPS_PIPE_DIRECTORY set for the worker, or the default pipe directory),
else this node's `MpsDaemon` actor (named `vcr-mps-<node id>`, started on first use), which runs
`nvidia-cuda-mps-control -f` with a pipe directory of its own, points the worker there, and
stops the daemon once none of the processes that joined it has lived for `idle_s`.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from ..errors import ConfigError, VcrError

logger = logging.getLogger(__name__)

MODES = ("time-slice", "mps")
NAMESPACE = "vllm_compile_ray"
PREFIX = "vcr-mps-"
CONTROL = "nvidia-cuda-mps-control"
DEFAULT_PIPE_DIR = "/tmp/nvidia-mps"  # where CUDA looks when CUDA_MPS_PIPE_DIRECTORY is unset
IDLE_S = 60.0  # a daemon whose processes have all exited stops after this long
_START_TIMEOUT_S = 20.0
_WATCH_S = 2.0
_JOIN_ATTEMPTS = 10


def check(mode: str, device_type: str) -> str:
    """`mode` if valid for `device_type`, else a ConfigError naming what is allowed."""
    if mode not in MODES:
        raise ConfigError(f"gpu_sharing={mode!r} is invalid: allowed {', '.join(map(repr, MODES))}")
    if mode == "mps" and device_type != "cuda":
        raise ConfigError(f"gpu_sharing='mps' shares CUDA GPUs, but device_type={device_type!r}: "
                          "use gpu_sharing='time-slice' or device_type='cuda'")
    return mode


@functools.cache
def join(mode: str) -> dict[str, Any]:
    """Share this process's GPU as `mode` says; call before CUDA starts (once per process: a
    process's CUDA context joins MPS, or not, when it is created). Returns what it joined:
    {"gpu_sharing", "mps_pipe", "mps_daemon": "node" (the node's own daemon) or "vcr"}."""
    if mode == "time-slice":
        return {"gpu_sharing": mode}
    check(mode, "cuda")
    if _cuda_started():
        raise VcrError("gpu_sharing='mps' must join before CUDA starts in the process, but CUDA "
                       "already started here (a worker of a time-slice run reused?)")
    pipe = os.environ.get("CUDA_MPS_PIPE_DIRECTORY") or DEFAULT_PIPE_DIR
    if (Path(pipe) / "control").exists():
        return {"gpu_sharing": mode, "mps_pipe": pipe, "mps_daemon": "node"}
    pipe = _node_daemon(os.getpid())
    # CUDA reads the pipe directory from the environment when it starts; there is no other way in.
    os.environ["CUDA_MPS_PIPE_DIRECTORY"] = pipe
    return {"gpu_sharing": mode, "mps_pipe": pipe, "mps_daemon": "vcr"}


def _cuda_started() -> bool:
    import torch

    return torch.cuda.is_initialized()


def _node_daemon(pid: int) -> str:
    """The pipe directory of this node's daemon actor, after it counted `pid` among its
    processes; the actor is created if missing (or gone: one that just stopped is replaced)."""
    node_id = ray.get_runtime_context().get_node_id()
    for attempt in range(_JOIN_ATTEMPTS):
        actor = MpsDaemon.options(
            name=f"{PREFIX}{node_id[:16]}", namespace=NAMESPACE, lifetime="detached",
            get_if_exists=True, num_cpus=0,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False)).remote(IDLE_S)
        try:
            return ray.get(actor.join.remote(pid))
        except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as exc:
            stopping = isinstance(exc, ray.exceptions.RayActorError) or isinstance(
                exc.as_instanceof_cause(), DaemonStopping)
            if not stopping or attempt == _JOIN_ATTEMPTS - 1:
                raise
            time.sleep(0.5)  # until the name is free for a new actor
    raise AssertionError("unreachable")


class DaemonStopping(VcrError):
    """The node's daemon actor is stopping (unused): join a new one."""


def _die_with_parent() -> None:
    """In the daemon's process before exec: SIGTERM when the actor's process dies (even killed),
    so no daemon outlives the actor that owns it."""
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Daemon:
    """One `nvidia-cuda-mps-control -f` with a pipe directory of its own, and the pids that use
    it. Plain class: `MpsDaemon` wraps it as the node's actor."""

    def __init__(self, binary: str | None = None, root: str | None = None):
        binary = binary or shutil.which(CONTROL)
        if binary is None:
            raise ConfigError(f"gpu_sharing='mps' needs {CONTROL} (NVIDIA's driver utilities) on "
                              f"PATH on every compile node; not found on {os.uname().nodename}: "
                              "install them there, or use gpu_sharing='time-slice'")
        self.binary = binary
        self.root = Path(tempfile.mkdtemp(prefix="vcr-mps-", dir=root))
        self.pipe, self.logs = self.root / "pipe", self.root / "log"
        self.pipe.mkdir()
        self.logs.mkdir()
        env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}  # every GPU
        env.update(CUDA_MPS_PIPE_DIRECTORY=str(self.pipe), CUDA_MPS_LOG_DIRECTORY=str(self.logs))
        self.env = env
        self.proc = subprocess.Popen([binary, "-f"], env=env, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     preexec_fn=_die_with_parent)
        deadline = time.monotonic() + _START_TIMEOUT_S
        while not (self.pipe / "control").exists():
            code = self.proc.poll()
            if code is not None or time.monotonic() > deadline:
                why = (f"exit {code}" if code is not None
                       else f"no control socket after {_START_TIMEOUT_S:.0f} s")
                tail = self.log_tail()
                self.stop()
                raise VcrError(f"{CONTROL} did not start on {os.uname().nodename} ({why}): {tail}")
            time.sleep(0.05)
        self.pids: set[int] = set()
        self.last_seen = time.monotonic()

    def log_tail(self, lines: int = 5) -> str:
        path = self.logs / "control.log"
        text = path.read_text(errors="replace") if path.exists() else "(no control.log)"
        return " | ".join(text.strip().splitlines()[-lines:])

    def add(self, pid: int) -> str:
        self.pids.add(pid)
        self.last_seen = time.monotonic()
        return str(self.pipe)

    def idle_for(self) -> float:
        """Seconds since the last process that joined was seen alive (0 while one lives)."""
        self.pids = {p for p in self.pids if _alive(p)}
        if self.pids:
            self.last_seen = time.monotonic()
        return time.monotonic() - self.last_seen

    def stop(self) -> None:
        """Ask the daemon to quit (it stops its servers), then make sure; remove its directory."""
        if self.proc.poll() is None:
            try:
                subprocess.run([self.binary], input=b"quit\n", env=self.env, timeout=10,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.root, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


@ray.remote
class MpsDaemon:
    """This node's MPS daemon (`Daemon`) as a detached actor: compile workers `join` it; it stops
    the daemon and exits once they have all been gone for `idle_s`, or on `stop`."""

    def __init__(self, idle_s: float = IDLE_S):
        self.daemon = Daemon()
        self.idle_s = idle_s
        self.lock = threading.Lock()
        self.stopped = False
        threading.Thread(target=self._watch, name="vcr-mps-idle", daemon=True).start()

    def join(self, pid: int) -> str:
        with self.lock:
            if self.stopped:  # between the daemon's stop and the actor's exit
                raise DaemonStopping("this node's MPS daemon stopped: join a new one")
            return self.daemon.add(pid)

    def describe(self) -> dict[str, Any]:
        with self.lock:
            return {"pipe": str(self.daemon.pipe), "daemon_pid": self.daemon.proc.pid,
                    "pids": sorted(self.daemon.pids), "idle_s": round(self.daemon.idle_for(), 1)}

    def stop(self) -> None:
        with self.lock:
            self.stopped = True
            self.daemon.stop()
        ray.actor.exit_actor()

    def _watch(self) -> None:
        while True:
            time.sleep(_WATCH_S)
            with self.lock:
                if self.daemon.idle_for() < self.idle_s:
                    continue
                logger.info("MPS daemon unused for %.0f s: stopping", self.idle_s)
                self.stopped = True
                self.daemon.stop()
            ray.kill(ray.get_runtime_context().current_actor, no_restart=True)
            return


def names() -> list[str]:
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a.get("namespace") == NAMESPACE and a["name"].startswith(PREFIX))


def stop_all(timeout_s: float = 30.0) -> list[str]:
    """Stop every node's daemon actor (its daemon first); returns their names."""
    gone = names()
    refs = []
    for n in gone:
        try:
            refs.append(ray.get_actor(n, namespace=NAMESPACE).stop.remote())
        except ValueError:  # stopped meanwhile
            pass
    for ref in refs:
        try:
            ray.get(ref, timeout=timeout_s)
        except ray.exceptions.RayActorError:  # exit_actor ends the call this way too
            pass
    return gone

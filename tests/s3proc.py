"""A moto S3 server in its own process, for fault tests that kill (SIGKILL) or freeze (SIGSTOP) it.

    server = MotoProcess().start()
    server.create_bucket("vcr-faults")
    server.freeze(); ...; server.thaw()
    server.kill(); server.start()       # same port, empty state (moto keeps everything in memory)

The in-thread `ThreadedMotoServer` of conftest.py cannot be killed or frozen without taking the
test process with it; this one can.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

_START_TIMEOUT_S = 60.0  # importing moto takes 1-3 s, more on 2 busy cores


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class MotoProcess:
    """`python -m moto.server -H 127.0.0.1 -p PORT` as a child process; `env` adds variables
    (e.g. INITIAL_NO_AUTH_ACTION_COUNT=0 turns on moto's IAM checks)."""

    def __init__(self, port: int | None = None, env: dict[str, str] | None = None,
                 log_path: str | None = None):
        self.port = port or free_port()
        self.env = {**os.environ, **(env or {})}
        self.log_path = log_path or os.devnull
        self.proc: subprocess.Popen | None = None
        self.frozen = False

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def storage_options(self, **config_kwargs: object) -> dict:
        opts: dict = {"key": "testing", "secret": "testing",
                      "client_kwargs": {"endpoint_url": self.endpoint, "region_name": "us-east-1"}}
        if config_kwargs:
            opts["config_kwargs"] = dict(config_kwargs)
        return opts

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> MotoProcess:
        if self.alive:
            return self
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                start_new_session=True)  # a Ctrl-C of the test run does not reach it first
        self.frozen = False
        deadline = time.monotonic() + _START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto server exited with {self.proc.returncode} "
                                   f"(port {self.port}; log {self.log_path})")
            try:
                with urllib.request.urlopen(f"{self.endpoint}/moto-api/data.json", timeout=2):
                    return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"moto server did not answer on port {self.port} "
                           f"within {_START_TIMEOUT_S:.0f} s")

    def freeze(self) -> None:
        """SIGSTOP: the kernel still accepts connections and buffers requests; nobody answers."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)
        self.frozen = True

    def thaw(self) -> None:
        if self.alive and self.frozen:
            os.kill(self.proc.pid, signal.SIGCONT)
        self.frozen = False

    def kill(self) -> None:
        """SIGKILL (works on a frozen process too); open connections are reset."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        self.frozen = False

    def stop(self) -> None:
        """Teardown: thaw (a stopped process would keep its port) and kill."""
        self.thaw()
        self.kill()

    def reset(self) -> None:
        req = urllib.request.Request(f"{self.endpoint}/moto-api/reset", method="POST")
        with urllib.request.urlopen(req, timeout=10):
            pass

    def client(self):  # boto3 S3 client (boto3 comes with moto[server])
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id="testing", aws_secret_access_key="testing")

    def create_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    def objects(self, bucket: str) -> dict[str, bytes]:
        """Every object in `bucket`: key -> body (for 'nothing half-written' checks)."""
        client = self.client()
        keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket).get("Contents", [])]
        return {k: client.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys}


def leftover_files(root: str | Path) -> list[str]:
    """Files under `root` (relative paths), skipping lock files; [] if root does not exist."""
    root = Path(root)
    if not root.exists():
        return []
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                  if p.is_file() and not p.name.endswith(".lock"))

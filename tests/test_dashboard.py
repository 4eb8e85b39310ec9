"""The Ray dashboard makes a warm run readable.

A real Ray head with dashboard (`ray start --head --block` in its own session, stopped by pid),
`jobs/warm_cache.py` submitted through the Jobs API, then checked the way a person would see it:
the dashboard's HTTP API (job status, compile tasks by name, the stats actor, the job's log) and
a headless Chromium screenshot of the job page.

Token auth is disabled for this head: a browser without the token gets 401 (shared NOTES, "Ray
2.60"). The screenshot goes to pytest's tmp dir (path printed) and, when VCR_ARTIFACTS_DIR is
set, is copied there (`VCR_ARTIFACTS_DIR=docs` refreshes docs/dashboard-job.png).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from vllm_compile_ray import ArtifactStore
from vllm_compile_ray.cache import manifest

pytest.importorskip("ray.job_submission")
from ray.job_submission import JobStatus, JobSubmissionClient  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
SIZES = ("1", "2")
SHAPES = ("dynamic", *SIZES)
COMPILE_NAME = re.compile(r"^compile\[([0-9a-f]+)/(dynamic|\d+)\]$")
PROGRESS = re.compile(r"^compiled (\d+)/(\d+) (compile\[[0-9a-f]+/(?:dynamic|\d+)\]) ")
JOB_TIMEOUT_S = 240


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class Head:
    url: str  # dashboard
    proc: subprocess.Popen
    log: Path

    def get(self, path: str, **query: Any) -> Any:
        """GET a dashboard JSON endpoint."""
        url = self.url + path + ("?" + urllib.parse.urlencode(query, doseq=True) if query else "")
        with urllib.request.urlopen(url, timeout=30) as resp:
            return json.loads(resp.read())

    def state(self, resource: str, **filters: str) -> list[dict[str, Any]]:
        """State API rows (`/api/v0/<resource>`), filtered by equality on each keyword."""
        reply = self.get(f"/api/v0/{resource}", limit=10000, detail="true",
                         filter_keys=list(filters), filter_predicates=["="] * len(filters),
                         filter_values=list(filters.values()))
        assert reply["result"], reply["msg"]
        return reply["data"]["result"]["result"]


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the `ray start --block` process: it stops the processes of its node (and only
    those; `ray stop` would kill every Ray instance on the machine). SIGKILL its process group if
    it hangs."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


@pytest.fixture(scope="module")
def head() -> Iterator[Head]:
    # Short temp dir: Ray's socket paths below it must stay under 107 characters.
    temp_dir = Path(tempfile.mkdtemp(prefix="vcr-dash-", dir="/tmp"))
    dashboard_port = _free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}  # SIGTERM otherwise drains for 30 s
    cmd = ["ray", "start", "--head", "--block", "--disable-usage-stats",
           "--node-ip-address=127.0.0.1", f"--port={_free_port()}",
           "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
           "--num-cpus=2", "--num-gpus=1", f"--temp-dir={temp_dir}",
           # Every port of its own: other Ray instances may run on this machine at the same time.
           f"--ray-client-server-port={_free_port()}", f"--dashboard-agent-listen-port={_free_port()}",
           f"--dashboard-agent-grpc-port={_free_port()}", f"--runtime-env-agent-port={_free_port()}",
           f"--metrics-export-port={_free_port()}", f"--node-manager-port={_free_port()}",
           f"--object-manager-port={_free_port()}"]
    log = temp_dir / "ray-start.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    node = Head(f"http://127.0.0.1:{dashboard_port}", proc, log)
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"ray start exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                node.get("/api/version")
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"the dashboard did not come up in 120 s:\n{log.read_text()[-3000:]}")
                time.sleep(0.5)
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("RAY_AUTH_MODE", "disabled")  # for the Jobs SDK in this process
            yield node
    finally:
        _stop(proc)
        shutil.rmtree(temp_dir, ignore_errors=True)


@dataclass(frozen=True)
class Job:
    submission_id: str
    job_id: str
    status: str
    logs: str
    cache: Path


@pytest.fixture(scope="module")
def job(head: Head, tmp_path_factory) -> Job:
    """`jobs/warm_cache.py` for llama-tiny (eager, CPU compiles in fake-GPU slots), waited for."""
    cache = tmp_path_factory.mktemp("dashboard-cache")
    client = JobSubmissionClient(head.url)
    entrypoint = ("python jobs/warm_cache.py --model llama-tiny --device cpu --backend eager "
                  f"--sizes {','.join(SIZES)} --gpus-per-compile 0.5 --cpus-per-compile 0.5 "
                  f"--cache file://{cache}")
    submission_id = client.submit_job(entrypoint=entrypoint, runtime_env={
        "working_dir": str(REPO),
        "excludes": ["tests", "docs", "notebooks", "benchmarks", "cluster", ".benchmarks"]})
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not (status := client.get_job_status(submission_id)).is_terminal():
        if time.monotonic() > deadline:
            client.stop_job(submission_id)
            pytest.fail(f"job still {status} after {JOB_TIMEOUT_S} s:\n{client.get_job_logs(submission_id)}")
        time.sleep(1.0)
    info = client.get_job_info(submission_id)
    return Job(submission_id, info.job_id, str(status), client.get_job_logs(submission_id), cache)


def test_job_succeeded(head: Head, job: Job) -> None:
    info = head.get(f"/api/jobs/{job.submission_id}")
    assert info["status"] == JobStatus.SUCCEEDED == job.status, job.logs
    assert info["job_id"] == job.job_id
    assert info["entrypoint"].startswith("python jobs/warm_cache.py --model llama-tiny")


def test_job_log_has_plain_progress_lines(head: Head, job: Job) -> None:
    logs = head.get(f"/api/jobs/{job.submission_id}/logs")["logs"]
    lines = logs.splitlines()
    progress = [m for m in map(PROGRESS.match, lines) if m]
    total = 3 * len(SHAPES)  # llama-tiny: 3 unique pieces
    assert [int(m.group(1)) for m in progress] == list(range(1, total + 1)), logs
    assert {int(m.group(2)) for m in progress} == {total}
    assert any(line.startswith(f"planned llama-tiny tp=1: 3 unique pieces x {len(SHAPES)} shapes") for line in lines)
    assert any(line.startswith(f"warm llama-tiny tp=1: {total} compiled, 0 cached, 0 failed")
               for line in lines), logs
    assert not [line for line in lines if "\x1b" in line and PROGRESS.match(line)]  # no tqdm escapes


def test_compile_tasks_are_listed_by_name(head: Head, job: Job) -> None:
    tasks = [t for t in head.state("tasks", job_id=job.job_id) if COMPILE_NAME.match(t["name"])]
    store = ArtifactStore(f"file://{job.cache}")
    [entry] = manifest.list_manifests(store)
    rows = manifest.read_manifest(store, "llama-tiny", entry["fingerprint_id"]).to_pylist()
    expected = {f"compile[{r['piece']}/{r['shape']}]" for r in rows}
    assert len(expected) == 3 * len(SHAPES)
    assert {t["name"] for t in tasks} == expected  # one task per manifest row, named for it
    assert all(t["state"] == "FINISHED" and t["func_or_class_name"] == "compile_piece" for t in tasks)
    assert all(t["required_resources"] == {"CPU": 0.5, "GPU": 0.5} for t in tasks)
    assert {COMPILE_NAME.match(t["name"]).group(2) for t in tasks} == set(SHAPES)


def test_stats_actor_is_listed(head: Head, job: Job) -> None:
    [actor] = head.state("actors", name="vcr_stats")
    assert actor["ray_namespace"] == "vllm_compile_ray"
    assert actor["class_name"] == "StatsActor" and actor["state"] == "ALIVE"
    assert actor["job_id"] == job.job_id  # created by the warm job, detached: outlives it


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _chromium_run(browser: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--no-first-run", "--hide-scrollbars", f"--user-data-dir={profile}",
           "--window-size=1400,1300", "--virtual-time-budget=15000", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)


def test_screenshot_of_the_job_page(head: Head, job: Job, tmp_path: Path) -> None:
    browser = _chromium()
    if browser is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing in CI: scripts/setup.sh installs it")
        pytest.skip("chromium is not installed: `apt-get install chromium` (scripts/setup.sh does it)")
    page = f"{head.url}/#/jobs/{job.submission_id}"
    # What the page shows once the React app has rendered it (same page, same virtual time).
    dom = _chromium_run(browser, tmp_path / "profile-dom", "--dump-dom", page)
    assert dom.returncode == 0, dom.stderr[-2000:]
    text = re.sub(r"<[^>]*>", "", dom.stdout)  # the log panel highlights numbers in spans
    assert "SUCCEEDED" in text and job.submission_id in text, text[-2000:]
    assert f"compiled 1/{3 * len(SHAPES)} compile[" in text, text[-2000:]  # the progress lines

    shot = tmp_path / "dashboard-job.png"
    run = _chromium_run(browser, tmp_path / "profile-shot", f"--screenshot={shot}", page)
    assert run.returncode == 0 and shot.exists(), run.stderr[-2000:]
    import matplotlib.image
    pixels = matplotlib.image.imread(shot)
    assert pixels.shape[:2] == (1300, 1400)
    assert pixels.std() > 0.05  # not a blank page
    print(f"\ndashboard screenshot: {shot}")
    if os.environ.get("VCR_ARTIFACTS_DIR"):
        target = Path(os.environ["VCR_ARTIFACTS_DIR"])
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, target / shot.name)
        print(f"copied to {target / shot.name}")

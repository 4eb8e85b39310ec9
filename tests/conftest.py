"""Shared pytest fixtures.

S3: one moto server per test session on 127.0.0.1, reset before each test that asks for a bucket.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

# Dummy AWS credentials and no config files or instance metadata, so no test reads real
# credentials or waits on the EC2 metadata endpoint. Set before anything imports botocore.
os.environ.update({
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    "AWS_EC2_METADATA_DISABLED": "true",
})

# Ray reads this when `ray` is first imported: keep every Ray node of the tests on loopback
# (NOTES: "Ray 2.60"); subprocesses (ray start, jobs) inherit it.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

S3_TEST_BUCKET = "vcr-test"


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """Endpoint URL of a moto S3 server running in a thread for the whole session."""
    moto_server = pytest.importorskip("moto.server")
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one log line per request otherwise
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_store_options(s3_server: str) -> dict:
    """fsspec storage_options that point s3fs at the moto server."""
    return {"key": "testing", "secret": "testing",
            "client_kwargs": {"endpoint_url": s3_server, "region_name": "us-east-1"}}


@pytest.fixture
def s3_bucket(s3_server: str) -> str:
    """Reset the moto server and create an empty bucket; returns its name ("vcr-test")."""
    boto3 = pytest.importorskip("boto3")
    req = urllib.request.Request(f"{s3_server}/moto-api/reset", method="POST")
    with urllib.request.urlopen(req, timeout=10):
        pass
    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    client.create_bucket(Bucket=S3_TEST_BUCKET)
    return S3_TEST_BUCKET


@contextmanager
def private_ray(**init_args) -> Iterator[str]:
    """`ray.init(**init_args)` under a private RAY_TMPDIR, so it neither attaches to another
    cluster on this shared machine (via /tmp/ray/ray_current_cluster) nor lets others attach to
    it; yields its GCS address."""
    ray = pytest.importorskip("ray")
    tmp = tempfile.mkdtemp(prefix="vcr", dir="/tmp")  # short: Ray puts sockets under it
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_TMPDIR", tmp)
        mp.setenv("RAY_metrics_report_interval_ms", "1000")
        ray.init(num_cpus=2, include_dashboard=False, **init_args)
        try:
            yield ray.get_runtime_context().gcs_address
        finally:
            ray.shutdown()
            shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_local() -> Iterator[None]:
    """A private local Ray instance with two fake GPUs, one per test module."""
    with private_ray(num_gpus=2):
        yield


@pytest.fixture(scope="module")
def ray_head() -> Iterator[str]:
    """A private local Ray instance (2 CPUs, no GPUs), one per test module; yields its address."""
    with private_ray(num_gpus=0) as address:
        yield address

"""notebooks/cache_report.ipynb runs (nbclient) against a small cache made by real warm runs.

Two warm runs of llama-tiny (eager compiles on a local Ray with fake GPUs): sizes 1,2 then
1,2,4, so the latest run found 9 of its 12 tasks in the cache (hit rate 0.75) and compiled 3.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from vllm_compile_ray import CacheConfig, CompilationConfig, ComputeOptions
from vllm_compile_ray.orchestration.warm import warm

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("pandas")
pytest.importorskip("matplotlib")
ray = pytest.importorskip("ray")

pytestmark = pytest.mark.ray

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "cache_report.ipynb"
SLOT = {"compute": ComputeOptions(device_type="cpu", gpus_per_compile=0.5, cpus_per_compile=0.5)}


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("report-cache")

    def config(sizes: tuple[int, ...]) -> CompilationConfig:
        return CompilationConfig(backend="eager", use_inductor=False, compile_sizes=sizes,
                                 cache=CacheConfig(cache_dir=str(root)))

    ray.init(num_cpus=2, num_gpus=2, include_dashboard=False)
    try:
        first = warm("llama-tiny", config((1, 2)), progress=None, **SLOT)
        second = warm("llama-tiny", config((1, 2, 4)), progress=None, **SLOT)
    finally:
        ray.shutdown()
    assert first.ok and second.ok
    assert (second.total, second.cached, second.compiled) == (12, 9, 3)
    yield root


def _outputs(nb) -> list[dict]:
    return [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs]


def test_notebook_reports_on_the_cache(cache: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("VCR_CACHE", f"file://{cache}")  # the kernel inherits the environment
    monkeypatch.delenv("VCR_STORAGE_OPTIONS", raising=False)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert any("parameters" in c.metadata.get("tags", []) for c in nb.cells)  # papermill can override
    client = nbclient.NotebookClient(nb, timeout=180, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError on any failing cell
    executed = tmp_path / "cache_report.executed.ipynb"
    nbformat.write(nb, executed)
    print(f"\nexecuted notebook: {executed}")

    outputs = _outputs(nb)
    assert not [o for o in outputs if o.output_type == "error"]
    html = [o.data["text/html"] for o in outputs if "text/html" in o.get("data", {})]
    pngs = [o.data["image/png"] for o in outputs if "image/png" in o.get("data", {})]
    assert sum("<table" in h for h in html) >= 5  # manifests, environments, artifacts, tasks, hits...
    assert len(pngs) == 3  # compile seconds, timeline, hit rates (one model, one fingerprint)
    text = "\n".join(o.data.get("text/plain", "") for o in outputs if "data" in o)
    assert "llama-tiny" in text
    # The hit-rate table: the latest run found 9 of 12 tasks in the cache.
    hits = next(h for h in html if "hit_rate" in h)
    assert "0.75" in hits and ">12<" in hits, hits


def test_notebook_names_a_missing_cache(tmp_path: Path, monkeypatch) -> None:
    """An empty cache fails with a message that says what to do, not a KeyError."""
    monkeypatch.setenv("VCR_CACHE", f"file://{tmp_path / 'empty'}")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=180, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    with pytest.raises(nbclient.exceptions.CellExecutionError, match="run a warm job against this cache"):
        client.execute()

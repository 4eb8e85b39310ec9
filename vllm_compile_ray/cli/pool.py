"""`vcr pool up|status|down`: the standing pool of compile workers (`pool.py`) from the shell."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import click

from ..config import CompilationConfig
from .options import epilog, make_compute, slot_options, table


@click.group(epilog=epilog("pool"))
def pool() -> None:
    """The standing pool of compile workers that `vcr warm --pool` starts and reuses."""


_address = click.option("--address", default=None, envvar="RAY_ADDRESS",
                        help="Ray cluster address [env RAY_ADDRESS; default: the local cluster]")


@contextmanager
def _connected(address: str | None) -> Iterator[None]:
    import ray

    if ray.is_initialized():
        yield
        return
    try:
        ray.init(address=address or "auto", logging_level="ERROR")
    except ConnectionError as exc:
        raise click.ClickException(f"no Ray cluster at {address or 'auto'}: {exc}") from None
    try:
        yield
    finally:
        ray.shutdown()


@pool.command("up", epilog=epilog("pool"))
@click.option("--device", type=click.Choice(["cuda", "cpu"]), default="cuda", show_default=True,
              help="compile target")
@click.option("--backend", type=click.Choice(["inductor", "eager"]), default="inductor",
              show_default=True)
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="pool size [default: as many as the cluster's resources hold, as warm --pool]")
@slot_options
@click.option("--timeout", type=float, default=600.0, show_default=True,
              help="seconds to wait for the workers to start")
@_address
def pool_up(address: str | None, workers: int | None, timeout: float, **opts: Any) -> None:
    """Start the pool that `vcr warm --pool` with the same options compiles in, and wait for it."""
    import ray

    from ..orchestration import pool as compile_pool
    from ..orchestration.warm_cluster import TaskRequest, cluster_capacity, pool_spec

    config = CompilationConfig(backend=opts["backend"], use_inductor=opts["backend"] == "inductor")
    with _connected(address):  # first: a cuda pool is sized from the cluster
        spec = pool_spec(config, make_compute(opts))
        size = min(workers or 1 << 30, cluster_capacity(TaskRequest(spec.gpus, spec.cpus,
                                                                    spec.resources)))
        refs = [ref for _, ref in compile_pool.up(spec, size, opts["pool_idle_timeout"])]
        done, pending = ray.wait(refs, num_returns=len(refs), timeout=timeout)
        rows = compile_pool.status()
    click.echo(table([r for r in rows if r["name"].startswith(compile_pool.PREFIX + spec.tag)],
                      ["name", "pid", "started", "served", "idle_timeout_s"]))
    click.echo(f"{len(done)} of {size} compile workers started"
               + (f"; {len(pending)} still starting after {timeout:g}s" if pending else ""))


@pool.command("status")
@_address
def pool_status(address: str | None) -> None:
    """List the pool's workers: pid, node, busy, compiles served, idle seconds."""
    from ..orchestration import pool as compile_pool

    with _connected(address):
        rows = compile_pool.status()
    if not rows:
        click.echo("no compile workers in the pool")
        return
    for row in rows:
        row["node"] = row.pop("node_id", "")[:8]
    click.echo(table(rows, ["name", "pid", "node", "started", "busy", "served", "idle_s",
                             "idle_timeout_s", "error"]))


@pool.command("down")
@_address
def pool_down(address: str | None) -> None:
    """Stop every worker of the pool (their GPU fractions and CPUs free up)."""
    from ..orchestration import pool as compile_pool

    with _connected(address):
        names = compile_pool.down()
    click.echo(f"stopped {len(names)} compile workers")

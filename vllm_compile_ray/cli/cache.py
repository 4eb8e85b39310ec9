"""`vcr ls|stats|verify|gc`: read a compile cache's manifests and artifacts, check and prune them.

Registered on the `vcr` group by `cli`; the options they share come from `cli_options`.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from .options import cache_options, epilog, open_cache, table


@click.command(epilog=epilog("ls"))
@cache_options
@click.option("--model", default=None, help="only this model")
@click.option("--shape", default=None, help='only this shape ("dynamic" or a size)')
@click.option("--json", "as_json", is_flag=True, help="print JSON rows")
def ls(model: str | None, shape: str | None, as_json: bool, **opts: Any) -> None:
    """List the cache's manifests as a table (no bucket listing)."""
    from ..cache import manifest

    store = open_cache(opts)
    rows: list[dict[str, Any]] = []
    for entry in manifest.list_manifests(store):
        if model and entry["model"] != model:
            continue
        for row in manifest.read_manifest(store, entry["model"], entry["fingerprint_id"]).to_pylist():
            if shape is None or row["shape"] == str(shape):
                rows.append(row)
    if as_json:
        click.echo(json.dumps(rows, indent=1, default=str))
        return
    for row in rows:
        row["key"] = row["key"][:16]
        row["compile_s"] = f"{row['compile_seconds']:.2f}"
    click.echo(table(rows, ["model", "tp_size", "piece", "shape", "bytes", "compile_s", "node",
                             "fingerprint_id", "key"]))


@click.command(epilog=epilog("stats"))
@cache_options
@click.option("--model", default=None, help="read the stored snapshot of this model's last warm")
@click.option("--address", default=None, help="read the live stats actor of this Ray cluster")
@click.option("--run-id", default=None, help="one run of the live stats actor")
def stats(model: str | None, address: str | None, run_id: str | None, **opts: Any) -> None:
    """Show compile statistics from the stats actor or a stored snapshot."""
    if address:
        import ray

        from ..orchestration.stats import snapshot
        ray.init(address=address, namespace="vllm_compile_ray", logging_level="ERROR")
        try:
            click.echo(json.dumps(snapshot(run_id), indent=1, default=str))
        finally:
            ray.shutdown()
        return
    if not model:
        raise click.UsageError("give --model (stored snapshot) or --address (live stats actor)")
    from ..cache import manifest

    store = open_cache(opts)
    entries = [e for e in manifest.list_manifests(store) if e["model"] == model]
    if not entries:
        raise click.ClickException(f"no manifest for model {model!r} in {store.url}")
    for entry in entries:
        data = json.loads(store.get_file(manifest.stats_path(model, entry["fingerprint_id"])))
        click.echo(json.dumps({k: v for k, v in data.items() if k != "tasks"}, indent=1, default=str))


@click.command(epilog=epilog("verify"))
@cache_options
@click.option("--delete-corrupt", is_flag=True, help="delete artifacts that fail verification")
def verify(delete_corrupt: bool, **opts: Any) -> None:
    """Re-hash every artifact (and check its signature when a key is given); report corrupt ones,
    orphans (in no manifest) and missing ones."""
    from ..cache import manifest
    from ..errors import ArtifactCorruptError
    from ..cache.store import decode_artifact

    store = open_cache(opts)
    keys = store.list_keys()
    listed: dict[str, str] = {}
    for entry in manifest.list_manifests(store):
        for row in manifest.read_manifest(store, entry["model"], entry["fingerprint_id"]).to_pylist():
            listed[row["key"]] = entry["model"]
    corrupt: list[tuple[str, str]] = []
    traced: set[str] = set()  # traced models a rank published (`aot`): in no manifest, by design
    with click.progressbar(keys, label="verifying", file=sys.stderr) as bar:
        for key in bar:
            try:
                artifact = decode_artifact(store.read_raw(key), key, verifier=store.verifier)
            except ArtifactCorruptError as exc:
                corrupt.append((key, str(exc)))
                continue
            if artifact.meta.get("kind") == "dynamo":
                traced.add(key)
    orphans = sorted(set(keys) - set(listed) - traced)
    missing = sorted(set(listed) - set(keys))
    click.echo(f"{len(keys)} artifacts: {len(keys) - len(corrupt)} ok, {len(corrupt)} corrupt, "
               f"{len(orphans)} orphaned (in no manifest), {len(missing)} listed but missing, "
               f"{len(traced)} traced models")
    for key, why in corrupt:
        click.echo(f"corrupt {key}: {why}")
        if delete_corrupt:
            store.delete(key)
    for key in orphans:
        click.echo(f"orphan {key}")
    for key in missing:
        click.echo(f"missing {key} (manifest of {listed[key]})")
    if corrupt or missing:
        raise SystemExit(1)


@click.command(epilog=epilog("gc"))
@cache_options
@click.option("--keep-fingerprint", multiple=True,
              help="fingerprint ids to keep; manifests of others are dropped with their artifacts")
@click.option("--older-than-days", type=float, default=None,
              help="drop artifacts created more than N days ago")
@click.option("--yes", is_flag=True, help="delete for real (default: dry run)")
def gc(keep_fingerprint: tuple[str, ...], older_than_days: float | None, yes: bool,
       **opts: Any) -> None:
    """Drop entries for other torch/GPU fingerprints or older than N days (dry run by default),
    and the traced models (`vcr load`'s skip of dynamo) of other fingerprints or that old."""
    import time

    from ..cache import manifest

    if not keep_fingerprint and older_than_days is None:
        raise click.UsageError("give --keep-fingerprint and/or --older-than-days")
    store = open_cache(opts)
    cutoff = None if older_than_days is None else time.time() - older_than_days * 86400
    drop: list[tuple[str, str]] = []
    for entry in manifest.list_manifests(store):
        table = manifest.read_manifest(store, entry["model"], entry["fingerprint_id"])
        rows = table.to_pylist()
        other = keep_fingerprint and entry["fingerprint_id"] not in keep_fingerprint
        gone = [r for r in rows if other or (cutoff and r["created_at"].timestamp() < cutoff)]
        drop += [(r["key"], f"{entry['model']}/{entry['fingerprint_id']} {r['piece']}/{r['shape']}")
                 for r in gone]
        if yes and gone:
            kept = [r for r in rows if r not in gone]
            manifest.write_manifest(store, entry["model"], entry["fingerprint_id"],
                                    manifest.merge(manifest.empty(), kept))
    drop += _stale_traced_models(store, keep_fingerprint, cutoff)
    verb = "deleting" if yes else "would delete"
    with click.progressbar(drop, label=verb, file=sys.stderr) as bar:
        for key, what in bar:
            if yes:
                store.delete(key)
    for key, what in drop:
        click.echo(f"{verb} {key} ({what})")
    click.echo(f"{len(drop)} artifacts {'deleted' if yes else 'to delete (dry run; --yes deletes)'}")


def _stale_traced_models(store: Any, keep_fingerprint: tuple[str, ...], cutoff: float | None
                         ) -> list[tuple[str, str]]:
    """(key, what) of the traced models a rank published (in no manifest, by design: `aot`)
    whose fingerprint is not kept, or published before `cutoff` (an older one, without its
    time, is kept). Only artifacts outside every manifest are read."""
    from ..cache import manifest
    from ..cache.store import decode_artifact
    from ..errors import ArtifactCorruptError

    listed = {row["key"] for entry in manifest.list_manifests(store)
              for row in manifest.read_manifest(store, entry["model"],
                                                entry["fingerprint_id"]).to_pylist()}
    out = []
    for key in sorted(set(store.list_keys()) - listed):
        try:
            meta = decode_artifact(store.read_raw(key), key, verifier=store.verifier).meta
        except ArtifactCorruptError:
            continue  # `vcr verify --delete-corrupt` reports and removes those
        if meta.get("kind") != "dynamo":
            continue
        fingerprint = meta.get("fingerprint", "")
        if (keep_fingerprint and fingerprint not in keep_fingerprint) or (
                cutoff is not None and meta.get("published_at", cutoff) < cutoff):
            out.append((key, f"traced model, fingerprint {fingerprint}, torch {meta.get('torch')}"))
    return out

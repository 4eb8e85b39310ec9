"""`vcr`: warm, load, plan, ls, stats, verify and gc a compile cache, and run its pool of
compile workers, from the shell.

Environment and flags are read here, at the edge, and passed down as config objects.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

import click

from .config import DEFAULT_POOL_IDLE_TIMEOUT_S, CompilationConfig
from .errors import VcrError

EXAMPLES = {
    "warm": "vcr warm --model llama-3-8b --tp 8 --sizes 1,2,4,8,16 --cache s3://bucket/vcr\n"
            "vcr warm --model llama-tiny --device cpu --sizes 1,2,4      # embedded Ray, local cache",
    "load": "vcr load --model llama-tiny --device cpu --sizes 1,2,4 --on-miss error",
    "plan": "vcr plan --model llama-3-70b --tp 8 --sizes 1,2,4,8",
    "ls": "vcr ls --cache s3://bucket/vcr --model llama-3-8b --shape dynamic",
    "stats": "vcr stats --cache s3://bucket/vcr --model llama-3-8b\n"
             "vcr stats --address auto                                 # live, from the stats actor",
    "verify": "vcr verify --cache s3://bucket/vcr",
    "pool": "vcr pool up --address auto --gpus-per-compile 0.125    # before the first warm\n"
            "vcr warm --model llama-3-8b --sizes 1,2,4,8 --cache s3://bucket/vcr --pool "
            "--gpus-per-compile 0.125\n"
            "vcr pool status --address auto\nvcr pool down --address auto",
    "gc": "vcr gc --cache s3://bucket/vcr --older-than-days 30          # dry run\n"
          "vcr gc --cache s3://bucket/vcr --keep-fingerprint 3f2a.. --yes",
}


def _epilog(name: str) -> str:
    return "\b\nExamples:\n" + "\n".join("  " + line for line in EXAMPLES[name].splitlines())


def _sizes(ctx: click.Context, param: click.Parameter, value: str) -> tuple[int, ...]:
    try:
        return tuple(int(s) for s in value.split(",") if s.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated positive ints, got {value!r}") from None


def _json_dict(ctx: click.Context, param: click.Parameter, value: str) -> dict:
    try:
        data = json.loads(value) if value else {}
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"expected a JSON object: {exc}") from None
    if not isinstance(data, dict):
        raise click.BadParameter(f"expected a JSON object, got {value!r}")
    return data


SIGNING_HELP = ("artifact signing: hmac-sha256 (shared secret, >= 32 bytes) or ed25519 (private key "
                "signs, public key verifies); loaders refuse unsigned or forged artifacts")


def cache_options(fn: Callable) -> Callable:
    fn = click.option("--signing-key-env", default="", help="env var holding the signing key")(fn)
    fn = click.option("--signing-key-file", default="", help="file holding the signing key")(fn)
    fn = click.option("--signing-scheme", type=click.Choice(["", "hmac-sha256", "ed25519"]),
                      default="", help=SIGNING_HELP)(fn)
    fn = click.option("--storage-options", callback=_json_dict, envvar="VCR_STORAGE_OPTIONS",
                      default="", help="fsspec storage options as JSON [env VCR_STORAGE_OPTIONS]")(fn)
    fn = click.option("--cache", envvar="VCR_CACHE", default="",
                      help="cache URL: s3://bucket/prefix, gs://, az://, file:///path, /path "
                           "[env VCR_CACHE; default ~/.cache/vllm_compile_ray/cache]")(fn)
    return fn


def model_options(fn: Callable) -> Callable:
    for decorator in reversed([
        click.option("--model", required=True,
                     help="a preset (llama-3-8b), a config.json or its directory, or an entry "
                          "point package.module:function returning the model"),
        click.option("--tp", type=int, default=1, show_default=True, help="tensor-parallel size"),
        click.option("--num-layers", type=int, default=None, help="override the layer count"),
        click.option("--sizes", callback=_sizes, default="", help="static sizes, e.g. 1,2,4,8"),
        click.option("--no-dynamic", is_flag=True, help="skip the dynamic-shape compile"),
        click.option("--device", type=click.Choice(["cuda", "cpu"]), default="cuda",
                     show_default=True, help="compile target"),
        click.option("--backend", type=click.Choice(["inductor", "eager"]), default="inductor",
                     show_default=True),
        click.option("--inductor-config", callback=_json_dict, default="",
                     help='Inductor options as JSON, e.g. {"max_autotune": true}'),
        click.option("--max-autotune", is_flag=True,
                     help="shorthand for max_autotune (+ coordinate_descent_tuning on torch >= 2.12, where "
                          "its results ship in the artifacts)"),
        click.option("--max-compile-time", type=float, default=600.0, show_default=True,
                     help="seconds per compile"),
        click.option("--staging-dir", default="", help="node-local staging directory"),
    ]):
        fn = decorator(fn)
    return cache_options(fn)


def make_config(opts: dict[str, Any], **extra: Any) -> CompilationConfig:
    inductor_config = dict(opts["inductor_config"])
    if opts["max_autotune"]:
        from . import inductor

        inductor_config.update(max_autotune=True)
        if inductor.COORDINATE_DESCENT_SHIPS:  # where its results load complete
            inductor_config.update(coordinate_descent_tuning=True)
    return CompilationConfig(
        backend=opts["backend"], use_inductor=opts["backend"] == "inductor",
        compile_sizes=opts["sizes"], compile_dynamic=not opts["no_dynamic"],
        inductor_compile_config=inductor_config, max_compile_time=opts["max_compile_time"],
        cache_dir=opts["cache"], storage_options=opts["storage_options"],
        staging_dir=opts["staging_dir"], **_signing(opts), **extra)


def _signing(opts: dict[str, Any]) -> dict[str, str]:
    return {name: opts[name] for name in ("signing_scheme", "signing_key_file", "signing_key_env")}


def _store(opts: dict[str, Any]):
    from .api import open_store
    return open_store(CompilationConfig(cache_dir=opts["cache"], storage_options=opts["storage_options"],
                                        **_signing(opts)))


def _table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    if not rows:
        return "(none)"
    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    line = lambda values: "  ".join(v.ljust(w) for v, w in zip(values, widths)).rstrip()  # noqa: E731
    return "\n".join([line(columns), line(["-" * w for w in widths]), *map(line, cells)])


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
def cli() -> None:
    """vllm_compile_ray: a shared, Ray-warmed compile cache for vLLM-style piecewise torch.compile."""


def slot_options(fn: Callable) -> Callable:
    """What one compile asks of Ray and how it compiles: `vcr warm` and `vcr pool up`."""
    for decorator in reversed([
        click.option("--gpus-per-compile", type=float, default=None,
                     help="GPU fraction per compile task [default: cpu 0; cuda sized from the "
                          "cluster: one compile per CPU core of each GPU node, within its memory "
                          "and the task count]"),
        click.option("--cpus-per-compile", type=float, default=1.0, show_default=True,
                     help="CPUs per compile task; also Inductor's compile threads"),
        click.option("--resources", callback=_json_dict, default="",
                     help='extra Ray resources per compile task as JSON, e.g. {"H100": 0.25} to '
                          "pin one GPU type"),
        click.option("--gpu-sharing", type=click.Choice(["time-slice", "mps"]),
                     default="time-slice", show_default=True,
                     help="how the compiles on one GPU share it: CUDA's time slices, or NVIDIA "
                          "MPS (each node's MPS daemon, started where none runs)"),
        click.option("--pool-idle-timeout", type=click.FloatRange(min=0, min_open=True),
                     default=DEFAULT_POOL_IDLE_TIMEOUT_S, show_default=True,
                     help="seconds a pool worker stays up without work"),
    ]):
        fn = decorator(fn)
    return fn


@cli.command(epilog=_epilog("warm"))
@model_options
@slot_options
@click.option("--max-in-flight", type=int, default=None,
              help="compile tasks in flight at once [default: the sized compile slots; with "
                   "--gpus-per-compile or --device cpu, twice the slots the cluster holds]")
@click.option("--max-retries", type=int, default=3, show_default=True,
              help="Ray retries of a task whose worker died")
@click.option("--compile-retries", type=int, default=1, show_default=True,
              help="retries of a compile that raised")
@click.option("--address", default=None, envvar="RAY_ADDRESS",
              help="Ray cluster address [env RAY_ADDRESS; default: start Ray in this process]")
@click.option("--tune-gemms", type=click.Choice(["off", "ahead", "alongside"]), default="off",
              is_flag=False, flag_value="ahead", show_default=True,
              help="tune each unique GEMM problem as a task of its own (max-autotune on cuda): "
                   "'ahead' of the compiles that use it (the bare flag), or 'alongside' them")
@click.option("--pool", is_flag=True,
              help="compile in the cluster's standing pool of compile workers, starting the ones "
                   "missing; they stay up for the next run (see `vcr pool`)")
@click.option("--json", "--summary-json", "summary_json", default=None, is_flag=False,
              flag_value="-", metavar="[PATH]",
              help="the full summary as JSON (every task's row): on stdout, with progress and the "
                   "short summary moved to stderr, or written to PATH")
def warm(**opts: Any) -> None:
    """Compile every unique (piece, shape) of a model into the cache, in parallel on Ray."""
    from . import intake
    from .warm import warm as warm_fn

    intake.check(opts["model"])  # an unknown model fails before Ray starts
    json_to_stdout = opts["summary_json"] == "-"
    summary = warm_fn(opts["model"], make_config(opts), tp_size=opts["tp"],
                      num_layers=opts["num_layers"], device_type=opts["device"],
                      address=opts["address"], max_in_flight=opts["max_in_flight"],
                      gpus_per_compile=opts["gpus_per_compile"],
                      cpus_per_compile=opts["cpus_per_compile"], resources=opts["resources"] or None,
                      max_retries=opts["max_retries"],
                      compile_retries=opts["compile_retries"],
                      tune_gemms=opts["tune_gemms"],
                      pool=opts["pool"], pool_idle_timeout_s=opts["pool_idle_timeout"],
                      gpu_sharing=opts["gpu_sharing"],
                      progress=lambda line: click.echo(line, err=json_to_stdout))
    # Progress lines as they come, then WarmSummary.format() (warm() says it last).
    if json_to_stdout:
        click.echo(json.dumps(summary.to_dict(), sort_keys=True, default=str))
    elif opts["summary_json"]:
        with open(opts["summary_json"], "w") as f:
            json.dump(summary.to_dict(), f, indent=1, default=str)
    if not summary.ok:
        raise SystemExit(1)


@cli.command(epilog=_epilog("load"))
@model_options
@click.option("--rank", type=int, default=0, show_default=True)
@click.option("--on-miss", type=click.Choice(["error", "compile", "compile_and_publish", "eager"]),
              default="error", show_default=True, help="what a missing artifact does")
@click.option("--no-warmup", is_flag=True, help="skip running each compiled shape once")
@click.option("--weights", default=None,
              help="checkpoint directory (model.safetensors or its index) or .safetensors file "
                   "for this rank's real weights (default: random weights from --seed, a dry run)")
@click.option("--seed", type=int, default=0, help="weight seed when no --weights are given")
def load(**opts: Any) -> None:
    """Pull a rank's compiled pieces from the cache (as a TP worker does) and print the report."""
    from . import intake
    from .load import load as load_fn

    config = make_config(opts, on_miss=opts["on_miss"])
    device = opts["device"]
    spec = intake.build(opts["model"], tp_size=opts["tp"], rank=opts["rank"], device=device,
                        num_layers=opts["num_layers"], seed=opts["seed"], weights=opts["weights"])
    compiled = load_fn(spec.module, config, rank=opts["rank"], world_size=opts["tp"],
                       warmup=not opts["no_warmup"], model_name=opts["model"],
                       example_inputs=spec.example_inputs)
    click.echo(compiled.report.table())


@cli.command(epilog=_epilog("plan"))
@model_options
@click.option("--fingerprint", "fingerprint_json", callback=_json_dict, default="",
              help="target environment fingerprint as JSON (default: this machine's)")
@click.option("--json", "as_json", is_flag=True, help="print JSON")
def plan(**opts: Any) -> None:
    """Show a model's pieces, unique keys, shapes and task count, without compiling."""
    from . import inductor, intake
    from .api import plan_model

    config = make_config(opts)
    spec = intake.build(opts["model"], tp_size=opts["tp"], device="meta",
                        num_layers=opts["num_layers"])
    fingerprint = opts["fingerprint_json"] or None
    note = ""
    if fingerprint is None and opts["device"] == "cuda":
        import torch
        if not torch.cuda.is_available():
            fingerprint = {"device_type": "cuda", "note": "no GPU here: keys are placeholders"}
            note = "note: no GPU on this machine, keys use a placeholder fingerprint"
    if fingerprint is None:
        fingerprint = inductor.environment_fingerprint(opts["device"])
    result = plan_model(spec.module, config, device_type=opts["device"], fingerprint=fingerprint,
                        example_inputs=spec.example_inputs)
    uses: dict[str, int] = {}
    for piece in result.pieces:
        uses[piece.code_id] = uses.get(piece.code_id, 0) + 1
    tasks = [{"key": t.key, "piece": t.code_id, "shape": t.shape, "uses": uses[t.code_id]}
             for t in result.tasks()]
    if opts["as_json"]:
        click.echo(json.dumps({"summary": result.summary(), "tasks": tasks}, indent=1))
        return
    from .plan_report import plan_report

    click.echo(plan_report(opts["model"], spec.module, result, tp_size=opts["tp"],
                           device=opts["device"], num_layers=opts["num_layers"],
                           cache=opts.get("cache") or None))
    click.echo(f"fingerprint {result.key_context.fingerprint_id}")
    click.echo(_table(tasks, ["piece", "shape", "uses", "key"]))
    if note:
        click.echo(note)


@cli.command(epilog=_epilog("ls"))
@cache_options
@click.option("--model", default=None, help="only this model")
@click.option("--shape", default=None, help='only this shape ("dynamic" or a size)')
@click.option("--json", "as_json", is_flag=True, help="print JSON rows")
def ls(model: str | None, shape: str | None, as_json: bool, **opts: Any) -> None:
    """List the cache's manifests as a table (no bucket listing)."""
    from . import manifest

    store = _store(opts)
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
    click.echo(_table(rows, ["model", "tp_size", "piece", "shape", "bytes", "compile_s", "node",
                             "fingerprint_id", "key"]))


@cli.command(epilog=_epilog("stats"))
@cache_options
@click.option("--model", default=None, help="read the stored snapshot of this model's last warm")
@click.option("--address", default=None, help="read the live stats actor of this Ray cluster")
@click.option("--run-id", default=None, help="one run of the live stats actor")
def stats(model: str | None, address: str | None, run_id: str | None, **opts: Any) -> None:
    """Show compile statistics from the stats actor or a stored snapshot."""
    if address:
        import ray

        from .stats import snapshot
        ray.init(address=address, namespace="vllm_compile_ray", logging_level="ERROR")
        try:
            click.echo(json.dumps(snapshot(run_id), indent=1, default=str))
        finally:
            ray.shutdown()
        return
    if not model:
        raise click.UsageError("give --model (stored snapshot) or --address (live stats actor)")
    from . import manifest

    store = _store(opts)
    entries = [e for e in manifest.list_manifests(store) if e["model"] == model]
    if not entries:
        raise click.ClickException(f"no manifest for model {model!r} in {store.url}")
    for entry in entries:
        data = json.loads(store.get_file(manifest.stats_path(model, entry["fingerprint_id"])))
        click.echo(json.dumps({k: v for k, v in data.items() if k != "tasks"}, indent=1, default=str))


@cli.command(epilog=_epilog("verify"))
@cache_options
@click.option("--delete-corrupt", is_flag=True, help="delete artifacts that fail verification")
def verify(delete_corrupt: bool, **opts: Any) -> None:
    """Re-hash every artifact (and check its signature when a key is given); report corrupt ones,
    orphans (in no manifest) and missing ones."""
    from . import manifest
    from .errors import ArtifactCorruptError
    from .store import decode_artifact

    store = _store(opts)
    keys = store.list_keys()
    listed: dict[str, str] = {}
    for entry in manifest.list_manifests(store):
        for row in manifest.read_manifest(store, entry["model"], entry["fingerprint_id"]).to_pylist():
            listed[row["key"]] = entry["model"]
    corrupt: list[tuple[str, str]] = []
    with click.progressbar(keys, label="verifying", file=sys.stderr) as bar:
        for key in bar:
            try:
                decode_artifact(store.read_raw(key), key, verifier=store.verifier)
            except ArtifactCorruptError as exc:
                corrupt.append((key, str(exc)))
    orphans = sorted(set(keys) - set(listed))
    missing = sorted(set(listed) - set(keys))
    click.echo(f"{len(keys)} artifacts: {len(keys) - len(corrupt)} ok, {len(corrupt)} corrupt, "
               f"{len(orphans)} orphaned (in no manifest), {len(missing)} listed but missing")
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


@cli.command(epilog=_epilog("gc"))
@cache_options
@click.option("--keep-fingerprint", multiple=True,
              help="fingerprint ids to keep; manifests of others are dropped with their artifacts")
@click.option("--older-than-days", type=float, default=None,
              help="drop artifacts created more than N days ago")
@click.option("--yes", is_flag=True, help="delete for real (default: dry run)")
def gc(keep_fingerprint: tuple[str, ...], older_than_days: float | None, yes: bool,
       **opts: Any) -> None:
    """Drop entries for other torch/GPU fingerprints or older than N days (dry run by default)."""
    import time

    from . import manifest

    if not keep_fingerprint and older_than_days is None:
        raise click.UsageError("give --keep-fingerprint and/or --older-than-days")
    store = _store(opts)
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
    verb = "deleting" if yes else "would delete"
    with click.progressbar(drop, label=verb, file=sys.stderr) as bar:
        for key, what in bar:
            if yes:
                store.delete(key)
    for key, what in drop:
        click.echo(f"{verb} {key} ({what})")
    click.echo(f"{len(drop)} artifacts {'deleted' if yes else 'to delete (dry run; --yes deletes)'}")


# `vcr pool ...` lives in pool_cli.py (it uses the helpers above).
from .pool_cli import pool  # noqa: E402

cli.add_command(pool)


def parse_warm_args(argv: list[str]) -> argparse.Namespace:
    """The options of `vcr warm` (and of jobs/warm_cache.py) parsed without running anything."""
    try:
        ctx = warm.make_context("warm", list(argv))
    except click.ClickException as exc:
        exc.show()
        raise SystemExit(2) from None
    return argparse.Namespace(**ctx.params)


def main(argv: list[str] | None = None) -> int:
    """Entry point: clear errors, non-zero exit codes, no tracebacks for expected failures."""
    try:
        cli.main(args=argv, prog_name="vcr", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 130
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except SystemExit as exc:
        return int(exc.code or 0) if not isinstance(exc.code, str) else 1
    except (VcrError, ValueError, OSError) as exc:
        click.echo(f"vcr: error: {exc}", err=True)
        return 1 if not isinstance(exc, (ValueError,)) else 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

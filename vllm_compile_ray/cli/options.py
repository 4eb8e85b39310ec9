"""The options the `vcr` commands share, grouped by concern, and the config objects built from
them: the pieces `cli`, `cli_cache` and `pool_cli` all use (none of them imports another)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import click

from ..config import DEFAULT_POOL_IDLE_TIMEOUT_S, CacheConfig, CompilationConfig

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

SIGNING_HELP = ("artifact signing: hmac-sha256 (shared secret, >= 32 bytes) or ed25519 (private key "
                "signs, public key verifies); loaders refuse unsigned or forged artifacts")


def epilog(name: str) -> str:
    """The "Examples:" block of command `name`'s help."""
    return "\b\nExamples:\n" + "\n".join("  " + line for line in EXAMPLES[name].splitlines())


def _sizes(ctx: click.Context, param: click.Parameter, value: str) -> tuple[int, ...]:
    try:
        return tuple(int(s) for s in value.split(",") if s.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated positive ints, got {value!r}") from None


def json_dict(ctx: click.Context, param: click.Parameter, value: str) -> dict:
    """Click callback: a JSON object option as a dict ("" -> {})."""
    try:
        data = json.loads(value) if value else {}
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"expected a JSON object: {exc}") from None
    if not isinstance(data, dict):
        raise click.BadParameter(f"expected a JSON object, got {value!r}")
    return data


def cache_options(fn: Callable) -> Callable:
    """Where the cache is and how its artifacts are signed."""
    fn = click.option("--signing-key-env", default="", help="env var holding the signing key")(fn)
    fn = click.option("--signing-key-file", default="", help="file holding the signing key")(fn)
    fn = click.option("--signing-scheme", type=click.Choice(["", "hmac-sha256", "ed25519"]),
                      default="", help=SIGNING_HELP)(fn)
    fn = click.option("--storage-options", callback=json_dict, envvar="VCR_STORAGE_OPTIONS",
                      default="", help="fsspec storage options as JSON [env VCR_STORAGE_OPTIONS]")(fn)
    fn = click.option("--cache", envvar="VCR_CACHE", default="",
                      help="cache URL: s3://bucket/prefix, gs://, az://, file:///path, /path "
                           "[env VCR_CACHE; default ~/.cache/vllm_compile_ray/cache]")(fn)
    return fn


def model_options(fn: Callable) -> Callable:
    """The model, its shapes and how it compiles (and `cache_options`)."""
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
        click.option("--inductor-config", callback=json_dict, default="",
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


def slot_options(fn: Callable) -> Callable:
    """What one compile asks of Ray and how it compiles: `vcr warm` and `vcr pool up`."""
    for decorator in reversed([
        click.option("--gpus-per-compile", type=float, default=None,
                     help="GPU fraction per compile task [default: cpu 0; cuda sized from the "
                          "cluster: 3 compiles per 4 CPU cores of each GPU node, within its memory "
                          "and the task count]"),
        click.option("--cpus-per-compile", type=float, default=1.0, show_default=True,
                     help="CPUs per compile task; also Inductor's compile threads"),
        click.option("--resources", callback=json_dict, default="",
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


def make_config(opts: dict[str, Any], **extra: Any) -> CompilationConfig:
    """The CompilationConfig of a command's `model_options`."""
    inductor_config = dict(opts["inductor_config"])
    if opts["max_autotune"]:
        from ..torch_private import inductor

        inductor_config.update(max_autotune=True)
        if inductor.COORDINATE_DESCENT_SHIPS:  # where its results load complete
            inductor_config.update(coordinate_descent_tuning=True)
    return CompilationConfig(
        backend=opts["backend"], use_inductor=opts["backend"] == "inductor",
        compile_sizes=opts["sizes"], compile_dynamic=not opts["no_dynamic"],
        inductor_compile_config=inductor_config, max_compile_time=opts["max_compile_time"],
        cache=make_cache(opts), **extra)


def make_compute(opts: dict[str, Any], **extra: Any):
    """The ComputeOptions of a command's `slot_options` (and --device, --max-in-flight,
    --address, --pool where the command has them)."""
    from ..orchestration.options import ComputeOptions

    return ComputeOptions(
        device_type=opts["device"], gpus_per_compile=opts["gpus_per_compile"],
        cpus_per_compile=opts["cpus_per_compile"], resources=opts["resources"] or {},
        max_in_flight=opts.get("max_in_flight"), address=opts.get("address"),
        pool=opts.get("pool", False), pool_idle_timeout_s=opts["pool_idle_timeout"],
        gpu_sharing=opts["gpu_sharing"], **extra)


def make_cache(opts: dict[str, Any]) -> CacheConfig:
    """The CacheConfig of a command's `cache_options` (and --staging-dir where it has one)."""
    return CacheConfig(cache_dir=opts["cache"], storage_options=opts["storage_options"],
                       staging_dir=opts.get("staging_dir") or "",
                       **{name: opts[name] for name in ("signing_scheme", "signing_key_file",
                                                        "signing_key_env")})


def open_cache(opts: dict[str, Any]):
    """The ArtifactStore of a command's `cache_options`."""
    from ..runtime.api import open_store
    return open_store(make_cache(opts))


def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """`rows` as a plain text table of `columns`; "(none)" when empty."""
    if not rows:
        return "(none)"
    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    line = lambda values: "  ".join(v.ljust(w) for v, w in zip(values, widths)).rstrip()  # noqa: E731
    return "\n".join([line(columns), line(["-" * w for w in widths]), *map(line, cells)])

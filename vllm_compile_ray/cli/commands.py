"""`vcr`: warm, load, plan, ls, stats, verify and gc a compile cache, and run its pool of
compile workers, from the shell.

Environment and flags are read here, at the edge, and passed down as config objects. The shared
options live in `cli_options`, the cache commands (ls, stats, verify, gc) in `cli_cache` and
`vcr pool` in `pool_cli`; this module builds the group from them.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import click

from ..errors import VcrError
from .cache import gc, ls, stats, verify
from .options import (EXAMPLES, SIGNING_HELP, cache_options, epilog, json_dict, make_compute,
                      make_config, model_options, slot_options, table)
from .pool import pool


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
def cli() -> None:
    """vllm_compile_ray: a shared, Ray-warmed compile cache for vLLM-style piecewise torch.compile."""


@cli.command(epilog=epilog("warm"))
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
@click.option("--pool", is_flag=True,
              help="compile in the cluster's standing pool of compile workers, starting the ones "
                   "missing; they stay up for the next run (see `vcr pool`)")
@click.option("--json", "--summary-json", "summary_json", default=None, is_flag=False,
              flag_value="-", metavar="[PATH]",
              help="the full summary as JSON (every task's row): on stdout, with progress and the "
                   "short summary moved to stderr, or written to PATH")
def warm(**opts: Any) -> None:
    """Compile every unique (piece, shape) of a model into the cache, in parallel on Ray."""
    from ..planning import intake
    from ..orchestration.options import RetryOptions
    from ..orchestration.warm import warm as warm_fn

    intake.check(opts["model"], opts["tp"])  # an unknown model fails before Ray starts
    json_to_stdout = opts["summary_json"] == "-"
    summary = warm_fn(opts["model"], make_config(opts), tp_size=opts["tp"],
                      num_layers=opts["num_layers"], compute=make_compute(opts),
                      retry=RetryOptions(opts["max_retries"], opts["compile_retries"]),
                      progress=lambda line: click.echo(line, err=json_to_stdout))
    # Progress lines as they come, then WarmSummary.format() (warm() says it last).
    if json_to_stdout:
        click.echo(json.dumps(summary.to_dict(), sort_keys=True, default=str))
    elif opts["summary_json"]:
        with open(opts["summary_json"], "w") as f:
            json.dump(summary.to_dict(), f, indent=1, default=str)
    if not summary.ok:
        raise SystemExit(1)


@cli.command(epilog=epilog("load"))
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
    from ..runtime.gc_pause import gc_paused

    # A process that starts a rank and exits: the collector's full passes (0.5-0.7 s of a 5 s
    # llama-tiny start on the 2-core machine) would free nothing it still needs; its compiles
    # (`--on-miss compile`) collect as usual.
    with gc_paused():
        click.echo(_load_rank(opts).report.table())


def _load_rank(opts: dict[str, Any]) -> Any:
    import torch

    from ..planning import intake
    from ..runtime.aot import fake_group
    from ..runtime.load import load as load_fn

    config = make_config(opts, on_miss=opts["on_miss"])
    device = opts["device"]
    spec = intake.build(opts["model"], tp_size=opts["tp"], rank=opts["rank"], device=device,
                        num_layers=opts["num_layers"], seed=opts["seed"], weights=opts["weights"])
    # A rank of a TP group (of no peers: nothing is communicated), so it traces and keys as the
    # served ranks and the warm do (`aot.dynamo_key` holds the group's size).
    grouped = opts["tp"] > 1 and fake_group(opts["tp"], opts["rank"])
    try:
        return load_fn(spec.module, config, rank=opts["rank"], world_size=opts["tp"],
                       warmup=not opts["no_warmup"], model_name=opts["model"],
                       example_inputs=spec.example_inputs)
    finally:
        if grouped:
            torch.distributed.destroy_process_group()


@cli.command(epilog=epilog("plan"))
@model_options
@click.option("--fingerprint", "fingerprint_json", callback=json_dict, default="",
              help="target environment fingerprint as JSON (default: this machine's)")
@click.option("--json", "as_json", is_flag=True, help="print JSON")
def plan(**opts: Any) -> None:
    """Show a model's pieces, unique keys, shapes and task count, without compiling."""
    from ..planning import intake
    from ..runtime.api import plan_model
    from ..torch_private import inductor

    config = make_config(opts)
    spec = intake.build_for_plan(opts["model"], tp_size=opts["tp"], device_type=opts["device"],
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
    from ..planning.plan_report import plan_report

    click.echo(plan_report(opts["model"], spec.module, result, tp_size=opts["tp"],
                           device=opts["device"], num_layers=opts["num_layers"],
                           cache=opts.get("cache") or None))
    click.echo(f"fingerprint {result.key_context.fingerprint_id}")
    click.echo(table(tasks, ["piece", "shape", "uses", "key"]))
    if note:
        click.echo(note)


cli.add_command(ls)
cli.add_command(stats)
cli.add_command(verify)
cli.add_command(gc)
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

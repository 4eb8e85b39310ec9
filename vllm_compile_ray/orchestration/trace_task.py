"""The warm job's traced model: one task on a compile node traces the model as its first rank
would and publishes the result (`aot.publish_ahead`), so that every rank, the first included,
restores it instead of running dynamo (`load`'s "dynamo restored").

It builds rank 0 of the model on the node's device (random weights: only shapes, dtypes and
settings reach the key) under a process group of the TP size that communicates nothing, and
makes the call `load` makes (`api.trace_size` tokens, the spec's example inputs); a warm-up
size outside the guards of what that call traced (1 token for DeepSeek-V3) gets a traced
function of its own, published too. With a standing pool, which may hold every compile slot,
one of its workers runs it (`CompileWorker.trace`). Models given as an nn.Module are not
rebuilt on a node: their ranks trace. A failure costs nothing but the first rank's trace: the
summary says why.
"""

from __future__ import annotations

import logging

import ray

from ..cache.store import ArtifactStore
from ..config import CompilationConfig

logger = logging.getLogger(__name__)
WAIT_S = 300.0  # past the compiles (a 32-layer trace took 4-5 s on a GPU host)


def publish_traced(spec: str, config: CompilationConfig, store: ArtifactStore, tp_size: int,
                   num_layers: int | None, device_type: str,
                   planned: frozenset[str] | None = None) -> str:
    """Trace rank 0 of `spec` as `vcr load` does and publish it; "published", "present" or
    "off: <why>" (`aot.publish_ahead`). planned: the warm's keys, to say which pieces the
    ranks load that it did not plan."""
    import torch

    from ..planning import intake
    from ..planning.hf import maybe_prepare
    from ..planning.inputs import example_call
    from ..runtime import aot
    from ..runtime.api import compile as compile_model
    from ..runtime.api import model_device, plan_sizes

    if tp_size > 1 and not aot.fake_group(tp_size):
        return f"off: this torch makes no fake process group of {tp_size} ranks to trace in"
    built = None
    try:
        built = intake.build(spec, tp_size=tp_size, rank=0, device=device_type,
                             num_layers=num_layers)
        compiled = compile_model(built.module, config, store=store, model_name=spec)
        model = maybe_prepare(built.module)
        first, *later = plan_sizes(config)
        example_inputs = built.example_inputs

        def call(size: int) -> tuple:
            return example_call(model, example_inputs, size, model_device(model))

        return aot.publish_ahead(compiled, store, *call(first), planned,
                                 [(size, *call(size)) for size in later])
    finally:
        del built
        if tp_size > 1:
            torch.distributed.destroy_process_group()
        if device_type == "cuda":
            torch.cuda.empty_cache()  # a reused compile worker gets its memory back


publish_traced_remote = ray.remote(max_calls=0)(publish_traced)


def outcome(traced: ray.ObjectRef | str, wait_s: float = WAIT_S,
            worker: ray.actor.ActorHandle | None = None) -> str:
    """What the traced-model task did (or why there was none: `traced` a str), for the summary
    line. Waits up to `wait_s` past the compiles, then stops it: a task is cancelled, a pool
    `worker` running it restarts (Ray interrupts no running call of an actor). A failure is
    logged, not raised."""
    if isinstance(traced, str):
        return traced
    try:
        return ray.get(traced, timeout=wait_s)
    except ray.exceptions.GetTimeoutError:
        if worker is None:
            ray.cancel(traced, force=True)
        else:
            ray.kill(worker, no_restart=False)
        return f"off: not done {wait_s:.0f} s after the compiles (its ranks trace)"
    except ray.exceptions.RayError as exc:
        logger.warning("tracing the model for its ranks failed (each first rank traces): %s",
                       str(exc)[-2000:])
        return f"off: {type(exc).__name__}"

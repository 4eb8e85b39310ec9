"""Every touch of torch's private API (`torch._inductor`, `torch._dynamo`, `torch._functorch`,
`torch._guards`, `torch._subclasses`, `torch._ops`, `torch._library`, `torch._C`,
`torch.fx.experimental`, `torch.fx._*`, `torch.compiler._cache`, `torch.utils._*`,
`torch.amp._*`), behind small functions of ours, so a torch upgrade touches this package only.

- `inductor`: compile (`standalone_compile`), load and tune artifacts; fingerprints; Inductor
  config and worker setup. `artifact_format`: the artifact's bytes, loaded in memory.
  `retarget`: moving an artifact to another GPU index. `bundle_prune`: an artifact's Triton
  bundle cut to the kernels it launches. `triton_key`: Triton's build hash,
  computed in the background while a rank starts. `inductor_metrics`: Inductor's timers,
  counters and logs. `graph_pass`: the custom post-grad pass base class.
- `aot_compile`: dynamo's AOT compile of a traced call (`TracedModel`, trace / save / restore).
  `dynamo`: marking dims dynamic, the settings a capture runs under, dynamo's errors.
- `ops`: op targets' names and defining modules. `graphs`: fx graph modules as the splitter
  builds them, size symbols.

Checked on torch 2.13 (CPU, the tests) and 2.11 (the GPU host: benchmarks/). Names only some
versions have sit behind a gate here, and the package switches the feature off when it is
False: `aot_compile.SUPPORTED` (dynamo's AOT compile), `artifact_format.save_options()` (the
bundled AOT artifact, 2.10+), `inductor.COORDINATE_DESCENT_SHIPS` (tuned configs load
complete, 2.12+).

Nothing else in `vllm_compile_ray` may name a torch private module or attribute: it calls a
function here instead. tests/test_torch_contract.py lists every private name used here (with
the signature or fields relied on) and fails naming it when one moves; it also scans the rest
of the package for private names. This package imports nothing of ours but `specs`, and its
modules are imported one by one (this file imports none of them: `torch._inductor` loads only
where it is used).
"""

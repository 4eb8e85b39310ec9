"""`WarmSummary`: what a warm run did, as `warm()` returns and prints it."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class WarmSummary:
    model: str
    tp_size: int
    fingerprint_id: str
    total: int  # unique (piece, shape) tasks of the plan: unique_pieces x len(shapes)
    compiled: int
    cached: int  # already in the cache (at plan time or when the task started)
    failed: int
    timed_out: int
    wall_s: float  # compile phase: first submit to last result
    plan_s: float
    task_s_sum: float  # sum of the compile seconds of the tasks
    total_s: float = 0.0  # plan + compile phase + manifest (Ray start-up and connect excluded)
    run_id: str = ""
    unique_pieces: int = 0
    shapes: list[int | str] = field(default_factory=list)
    max_concurrent: int = 0
    prestarted: int = 0  # workers started while planning
    prestart_s: float = 0.0  # the longest of their start-ups (in the worker)
    prestart_ready: int = 0  # of them, finished when the compile phase began
    prestart_last_s: float = 0.0  # when the last one finished, from the phase's start
    ran_in_prestarted: int = 0  # compile tasks that ran in one of them
    pool_reused: int = 0  # with pool=True: workers of the standing pool already up at the start
    # their start-ups: pid, seconds, submitted_at, entered_at, finished_at, steps (seconds by step)
    prestart_rows: list[dict[str, Any]] = field(default_factory=list)
    manifest_path: str = ""
    stats_path: str = ""
    errors: dict[str, str] = field(default_factory=dict)  # task name -> error
    rows: list[dict[str, Any]] = field(default_factory=list)
    gemm_benchmarked: int = 0  # GEMM selections the compiles benchmarked
    phase_started_at: float = 0.0  # wall clock (time.time()) of the compile phase's first submit

    @property
    def ok(self) -> bool:
        """Every compile succeeded."""
        return self.failed == 0 and self.timed_out == 0

    @property
    def speedup(self) -> float:
        """Sum of compile times over wall time: the parallel speedup over running them in
        turn."""
        return self.task_s_sum / self.wall_s if self.wall_s > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok, "speedup": round(self.speedup, 3)}

    def slowest(self, n: int = 3) -> list[dict[str, Any]]:
        """The n compiled tasks that took longest: the floor of any run's wall time."""
        done = [r for r in self.rows if r.get("status") == "compiled"]
        return sorted(done, key=lambda r: -r.get("seconds", 0.0))[:n]

    def format(self, max_errors: int = 5) -> str:
        """A few lines for people; `to_dict()` (vcr warm --json) has everything."""
        lines = [f"warm {self.model} tp={self.tp_size}: {self.compiled} compiled, {self.cached} "
                 f"cached, {self.failed} failed, {self.timed_out} timed out of {self.total} "
                 f"(fingerprint {self.fingerprint_id}, run {self.run_id})",
                 f"took {self.total_s:.1f}s without Ray start-up: plan {self.plan_s:.1f}s, "
                 f"compile phase {self.wall_s:.1f}s; compiles {self.task_s_sum:.1f}s summed, "
                 f"{self.speedup:.2f}x, at most {self.max_concurrent} at once"]
        if slow := self.slowest():
            lines.append("slowest: " + ", ".join(f"{r['name']} {r.get('seconds', 0.0):.1f}s"
                                                  for r in slow))
        lines += self._artifact_lines()
        failed_choices = [r for r in self.rows if r.get("autotune_failed")]
        if failed_choices:
            lines.append(f"autotune: {sum(r['autotune_failed'] for r in failed_choices)} GEMM "
                         f"choices failed in {len(failed_choices)} compiles and were skipped "
                         f"(tracebacks not logged), e.g. {failed_choices[0].get('autotune_error', '')}")
        errors = sorted(self.errors.items())
        lines += [f"error {name}: {_first_line(err)}" for name, err in errors[:max_errors]]
        if len(errors) > max_errors:
            lines.append(f"... {len(errors) - max_errors} more errors (vcr warm --json has them all)")
        lines += [f"manifest {self.manifest_path}", f"stats {self.stats_path}"]
        return "\n".join(lines)

    def _artifact_lines(self) -> list[str]:
        """What the compiled tasks published, and whether it loads complete."""
        lines = []
        compiled = [r for r in self.rows if r.get("status") == "compiled" and "bytes" in r]
        if compiled:
            line = (f"published: {len(compiled)} artifact{'' if len(compiled) == 1 else 's'}, "
                    f"{sum(r['bytes'] for r in compiled) / 1e6:.1f} MB")
            cut = [r for r in compiled if "bundle_groups" in r]
            if cut:
                line += (f" (Triton bundles cut to the launched kernels: "
                         f"{sum(r['bundle_groups_kept'] for r in cut)} of "
                         f"{sum(r['bundle_groups'] for r in cut)} kernel groups)")
            lines.append(line)
        checked = [r for r in self.rows if "check_kernel_compiles" in r]
        if checked:
            incomplete = [r for r in checked
                          if r["check_kernel_compiles"] or r.get("check_autotunes")]
            line = (f"complete artifacts: {len(checked) - len(incomplete)} of {len(checked)} "
                    "checked load and run with no kernel compile or autotune")
            if incomplete:
                compiles = sum(r["check_kernel_compiles"] for r in incomplete)
                tunes = sum(r.get("check_autotunes", 0) for r in incomplete)
                line += (f"; {len(incomplete)} need {compiles} kernel compiles, {tunes} autotunes "
                         f"at a rank's first call (e.g. {incomplete[0]['name']})")
            if whole := [r["name"] for r in checked if r.get("bundle_cut_undone")]:
                line += (f"; {len(whole)} shipped with their whole Triton bundle (cut to the "
                         f"launched kernels, they did not check complete; e.g. {whole[0]})")
            lines.append(line)
        return lines


def _first_line(text: str, limit: int = 300) -> str:
    line = (text.strip().splitlines() or [""])[0]
    return line if len(line) <= limit else line[:limit] + "..."

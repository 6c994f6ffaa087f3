"""Whole-process timing for the task benches (``segmentation.py``, ``detection.py``): each
pipeline runs as a fresh child process, its wall time and CPU time (user + kernel, its own
and its reaped children's: the decoding workers) measured from the parent, in rounds; the
ratios to the floor are taken round by round and their median reported, beside the load
average the machine carried (other jobs move wall-clock ratios much more than CPU ones).

Imported by the benches (``bench/`` is on ``sys.path`` when they run); not a test.
"""

from __future__ import annotations

import os
import resource
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Timed:
    """One child's run: wall seconds, CPU seconds, and the 1-minute load average before it."""

    wall: float
    cpu: float
    load: float


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(command: Sequence[str], checkout: Path = ROOT) -> Timed:
    """Run ``command`` with camx imported from ``checkout`` (default: this one), from a neutral
    working folder, its output discarded; raises on failure."""
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    load = os.getloadavg()[0]
    cpu = children_cpu()
    started = time.perf_counter()
    run = subprocess.run(list(command), env=env, cwd=tempfile.gettempdir(), stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)  # fmt: skip
    wall = time.perf_counter() - started
    if run.returncode != 0:
        raise SystemExit(f"{command[:4]} failed:\n{run.stderr[-2000:]}")
    return Timed(wall, children_cpu() - cpu, load)


@dataclass
class Rounds:
    """Every pipeline's runs, round by round; ``floor`` names the pipeline ratios are taken against."""

    images: int
    floor: str = "floor"
    runs: dict[str, list[Timed]] = field(default_factory=dict)

    def run(self, rounds: int, pipelines: dict[str, Callable[[str], Sequence[str]]],
            baseline: Path | None = None) -> None:  # fmt: skip
        """``pipelines[name](tag)`` is the command of that pipeline in a round (``tag``: a name
        for its outputs, unique to the run); with ``baseline`` (another checkout), each ``camx``
        pipeline also runs with camx from it."""
        for k in range(rounds):
            line = []
            for name, command in self._with_baseline(pipelines, baseline):
                before = baseline is not None and name.endswith("(baseline)")
                found = timed(command(f"{k}{'b' if before else ''}"), baseline if before else ROOT)
                self.runs.setdefault(name, []).append(found)
                line.append(f"{name} {found.wall:.1f}s/{found.cpu:.1f}cpu-s (load {found.load:.1f})")
            print(f"  round {k + 1}: " + ", ".join(line), flush=True)

    @staticmethod
    def _with_baseline(pipelines: dict[str, Callable[[str], Sequence[str]]],
                       baseline: Path | None) -> list[tuple[str, Callable[[str], Sequence[str]]]]:  # fmt: skip
        found = []
        for name, command in pipelines.items():
            found.append((name, command))
            if baseline is not None and name.startswith("camx"):
                found.append((f"{name} (baseline)", command))
        return found

    def table(self) -> str:
        floor = self.runs[self.floor]
        rows = [
            "| pipeline | wall s (median) | img/s | floor/this, wall (median, range) | CPU s (median) "
            "| floor/this, CPU (median) | load average (1 min) |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, runs in self.runs.items():
            wall = [f.wall / r.wall for f, r in zip(floor, runs, strict=False)]
            cpu = [f.cpu / r.cpu for f, r in zip(floor, runs, strict=False)]
            median = statistics.median(r.wall for r in runs)
            loads = [r.load for r in runs]
            rows.append(
                f"| {name} | {median:.1f} | {self.images / median:.2f} | {statistics.median(wall):.2f} "
                f"({min(wall):.2f}..{max(wall):.2f}) | {statistics.median(r.cpu for r in runs):.1f} "
                f"| {statistics.median(cpu):.2f} | {min(loads):.1f}..{max(loads):.1f} |"
            )
        return "\n".join(rows)

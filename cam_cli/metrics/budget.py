"""What a metric costs in forward passes per map, and the one guard that refuses a run
whose metrics would cost more than ``LIMIT`` times deletion and insertion together
(the references' budgets can take hours: Quantus's pixel flipping flips one feature
per step, 150,528 passes per 224 x 224 map; MPRT explains every image again once per
block of the model).

The metrics that explain again (``mprt``, ``random-logit``, ``arcc``) cost a number of
explains times what one explain of one map costs (``explain_cost``: forward passes, a
backward counted as two, Score-CAM's masked passes counted, shared by the methods of
an image), which only the rebuilt model and its methods can tell."""

from __future__ import annotations

import math
from collections.abc import Sequence

from cam_cli.metrics.options import MetricOptions

LIMIT = 10
#: superpixels IROF asks slic for (its passes per map, about)
IROF_SEGMENTS = 100
#: ROAD's passes inside ARCC (MoRF and LeRF at 20, 40, 60, 80)
ARCC_ROAD_PASSES = 8
#: what lowers each guarded metric's cost
LOWER_WITH = {
    "pixel-flipping": "pass a larger --flip-step",
    "region-perturbation": "pass fewer --regions or a larger --patch-size",
    "faithfulness-correlation": "pass fewer --corr-runs",
    "irof": "",
    "mprt": "evaluate a run of fewer or cheaper methods",
    "random-logit": "evaluate a run of fewer or cheaper methods",
    "arcc": "evaluate a run of fewer or cheaper methods",
}


def deletion_insertion_passes(size: int, steps: int) -> int:
    """Forward passes of deletion and insertion per ``size x size`` map at ``steps``."""
    positions = size * size
    points = len(range(0, positions, math.ceil(positions / steps))) + 1
    return 1 + 2 * (points - 2)


def passes_per_map(name: str, options: MetricOptions, size: int, explain_cost: float = 0.0,
                   blocks: int = 0) -> int | None:  # fmt: skip
    """Forward passes the metric ``name`` takes per ``size x size`` map (IROF's: about;
    the metrics that explain again: ``explain_cost`` per explain, with ``blocks`` blocks
    for MPRT); None for a metric the guard does not watch."""
    if name == "pixel-flipping":
        return math.ceil(size * size / options.flip_step)
    if name == "region-perturbation":
        patches = math.ceil(size / options.patch_size) ** 2
        return 2 * min(options.regions, patches)
    if name == "faithfulness-correlation":
        return options.corr_runs
    if name == "irof":
        return IROF_SEGMENTS
    explains = {"mprt": 1 + blocks, "random-logit": 2, "arcc": 1}.get(name)
    if explains is None:
        return None
    return math.ceil(explains * explain_cost) + (ARCC_ROAD_PASSES if name == "arcc" else 0)


def over_budget(names: Sequence[str], options: MetricOptions, size: int, explain_cost: float = 0.0,
                blocks: int = 0) -> str | None:  # fmt: skip
    """The one-line refusal for the first metric of ``names`` over the budget, else None
    (``explain_cost`` and ``blocks`` as :func:`passes_per_map`)."""
    reference = deletion_insertion_passes(size, options.steps)
    for name in names:
        cost = passes_per_map(name, options, size, explain_cost, blocks)
        if cost is not None and cost > LIMIT * reference:
            lower = LOWER_WITH.get(name)
            return (
                f"{name} would take {cost:,} forward passes per {size}x{size} map, {cost / reference:.0f}x "
                f"deletion/insertion's {reference} at --steps {options.steps} (more than {LIMIT}x): "
                f"{lower + ', or ' if lower else ''}pass --budget-ok to run it anyway"
            )
    return None

"""What a metric costs in forward passes per map, and the guard that refuses a run
whose metrics would cost more than ``LIMIT`` times deletion and insertion together
(the references' budgets can take hours: Quantus's pixel flipping flips one feature
per step, 150,528 passes per 224 x 224 map)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from cam_cli.metrics.options import MetricOptions

LIMIT = 10
#: superpixels IROF asks slic for (its passes per map, about)
IROF_SEGMENTS = 100
#: the option that lowers each guarded metric's cost
LOWER_WITH = {
    "pixel-flipping": "a larger --flip-step",
    "region-perturbation": "fewer --regions or a larger --patch-size",
    "faithfulness-correlation": "fewer --corr-runs",
    "irof": "",
}


def deletion_insertion_passes(size: int, steps: int) -> int:
    """Forward passes of deletion and insertion per ``size x size`` map at ``steps``."""
    positions = size * size
    points = len(range(0, positions, math.ceil(positions / steps))) + 1
    return 1 + 2 * (points - 2)


def passes_per_map(name: str, options: MetricOptions, size: int) -> int | None:
    """Forward passes the metric ``name`` takes per ``size x size`` map (IROF's: about);
    None for a metric the guard does not watch."""
    if name == "pixel-flipping":
        return math.ceil(size * size / options.flip_step)
    if name == "region-perturbation":
        patches = math.ceil(size / options.patch_size) ** 2
        return 2 * min(options.regions, patches)
    if name == "faithfulness-correlation":
        return options.corr_runs
    if name == "irof":
        return IROF_SEGMENTS
    return None


def over_budget(names: Sequence[str], options: MetricOptions, size: int) -> str | None:
    """The one-line refusal for the first metric of ``names`` over the budget, else None."""
    reference = deletion_insertion_passes(size, options.steps)
    for name in names:
        cost = passes_per_map(name, options, size)
        if cost is not None and cost > LIMIT * reference:
            lower = LOWER_WITH.get(name)
            return (
                f"{name} would take {cost:,} forward passes per {size}x{size} map, {cost / reference:.0f}x "
                f"deletion/insertion's {reference} at --steps {options.steps} (more than {LIMIT}x): "
                f"pass {lower + ' or ' if lower else ''}--budget-ok to run it anyway"
            )
    return None

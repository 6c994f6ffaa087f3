"""Complexity of a map: how few pixels it spends its mass on. No model, no ground truth.

Each works on one map ``(H, W)`` at its own resolution (the ``.npy``: the image's
pixels), as Quantus 0.6 does on ``a_batch`` ``(N, 1, H, W)`` flattened per map.
camx's maps are non-negative with their maximum at 1, so Quantus's defaults
(``abs=True`` and ``normalise_by_max``) leave them as they are; camx divides
each map by its own maximum (Quantus by the maximum of the whole batch, which
for maps not already scaled makes a map's value depend on its batch mates).

* ``sparseness`` (Chalasani et al., "Concise Explanations of Neural Networks
  using Adversarial Training", ICML 2020): the Gini index of the map's values
  ``a`` sorted ascending, ``Σ_i (2i − P − 1) a_(i) / (P Σ_i a_i)`` over ``P``
  pixels, with ``1e-7`` added to every value first (as Quantus, so an all-zero
  map scores 0). 0 for a uniform map, towards 1 for a single hot pixel; higher is
  sparser.
* ``complexity`` (Bhatt et al., "Evaluating and Aggregating Feature-based Model
  Explanations", IJCAI 2020): the entropy ``−Σ p_i ln(p_i + 1e-12)`` of the map
  normalised to a distribution ``p = a / Σ a``; lower is simpler. None for an
  all-zero map (no distribution).
* ``effective_complexity`` (Nguyen and Martínez, "On Quantitative Aspects of
  Model Interpretability", 2020, as Quantus defines it): how many pixels exceed
  ``eps`` (Quantus's default ``1e-5``); lower is simpler. A count, so it grows
  with the image's size.
"""

from __future__ import annotations

from collections.abc import Collection

import numpy as np

#: Quantus's shift before the Gini index, and its guard inside the logarithm
GINI_SHIFT = 1e-7
LOG_GUARD = 1e-12


def _scaled(norm_map: np.ndarray) -> np.ndarray:
    """The map as float64 ``(P,)``, absolute values divided by their maximum (zeros stay zeros)."""
    values = np.abs(np.asarray(norm_map, dtype=np.float64)).ravel()
    top = values.max() if values.size else 0.0
    return values / top if top > 0 else values


def sparseness(norm_map: np.ndarray) -> float:
    """The Gini index of the map's values (module docstring)."""
    values = np.sort(_scaled(norm_map) + GINI_SHIFT)
    count = values.size
    weights = 2.0 * np.arange(1, count + 1) - count - 1
    return float((weights * values).sum() / (count * values.sum()))


def complexity(norm_map: np.ndarray) -> float | None:
    """The entropy of the map as a distribution over its pixels; None for an all-zero map."""
    values = _scaled(norm_map)
    total = values.sum()
    if total <= 0:
        return None
    share = values / total
    return float(-(share * np.log(share + LOG_GUARD)).sum())


def effective_complexity(norm_map: np.ndarray, eps: float = 1e-5) -> int:
    """How many pixels of the map (scaled to a maximum of 1) exceed ``eps``."""
    return int((_scaled(norm_map) > eps).sum())


def complexity_values(norm_map: np.ndarray, names: Collection[str], eps: float) -> dict[str, float | int | None]:
    """The line fields of the complexity metrics in ``names`` for one map ``(H, W)``."""
    values: dict[str, float | int | None] = {}
    if "sparseness" in names:
        values["sparseness"] = round(sparseness(norm_map), 6)
    if "complexity" in names:
        entropy = complexity(norm_map)
        values["complexity"] = None if entropy is None else round(entropy, 6)
    if "effective-complexity" in names:
        values["effective_complexity"] = effective_complexity(norm_map, eps)
    return values

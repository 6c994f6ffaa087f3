"""Localisation against a ground-truth region: a mask ``(H, W)`` of the object
(from ``--masks-from``, or the boxes of ``--boxes-from`` filled in) at the map's
own resolution, rows ``y`` and columns ``x``.

* ``energy_pointing`` (Wang et al., "Score-CAM", CVPR-W 2020, the energy-based
  pointing game): the share of the map's energy inside the region,
  ``Σ_{in} a / Σ a``. Quantus's ``AttributionLocalisation`` (Kohlbrenner et al.
  2020) computes the same. A box covers rows ``y0:y1`` and columns ``x0:x1``
  of the map; the Score-CAM authors' ``utils/energyPointGame.py`` fills
  ``[x0:x1, y0:y1]`` of an ``(H, W)`` map, swapping x and y on non-square maps.
* ``relevance_mass`` (Arras et al., "CLEVR-XAI", Information Fusion 2022): the
  same ratio, as Quantus's ``RelevanceMassAccuracy``; on camx's non-negative
  maps the two coincide (they differ only for signed maps, which camx never
  writes). An all-zero map scores 0 on both (no energy inside).
* ``relevance_rank`` (Arras et al. 2022): with ``K`` the region's pixel count,
  the share of the map's ``K`` highest pixels that lie in the region.
* ``topk_intersection`` (Theiner et al., "Interpretable Semantic Photo
  Geolocation", WACV 2022): the share of the map's ``k`` highest pixels
  (``--topk``, Quantus's default 1000) in the region; None when the map has
  fewer than ``k`` pixels.
* ``mask_auc`` (Fawcett 2006, as Quantus's ``AUC``): the area under the ROC
  curve of the map's values as a score for "pixel in the region", the
  Mann-Whitney statistic with ties counted half (what scikit-learn's
  ``roc_curve`` and ``auc`` give); None when the region is the whole map.

Ties at the top-``K`` boundary are shared: where pixels of equal value straddle
it, each of them counts for the share of the remaining places it would get under
a random order, so the value does not depend on a sort's order of equals.
Quantus sorts with ``np.argsort`` (not stable), whose order of equal values
numpy does not define; the two agree whenever no tie straddles the boundary.
Every value is None without a region (no mask or box of the explained class).
"""

from __future__ import annotations

from collections.abc import Collection

import numpy as np


def energy_pointing(norm_map: np.ndarray, mask: np.ndarray) -> float:
    """``Σ_{mask} a / Σ a`` of a map and a boolean mask of the same ``(H, W)``; 0 for an all-zero map."""
    values = np.asarray(norm_map, dtype=np.float64)
    total = values.sum()
    return float(values[mask].sum() / total) if total > 0 else 0.0


def top_share(norm_map: np.ndarray, mask: np.ndarray, k: int) -> float:
    """How many of the map's ``k`` highest pixels lie in ``mask``, over ``k`` (ties shared)."""
    values = np.asarray(norm_map, dtype=np.float64).ravel()
    inside = np.asarray(mask, dtype=bool).ravel()
    count = values.size
    kth = np.partition(values, count - k)[count - k]  # the k-th highest value
    above = values > kth
    tied = values == kth
    places = k - int(above.sum())
    hits = float((above & inside).sum()) + places * float((tied & inside).sum()) / float(tied.sum())
    return hits / k


def relevance_rank(norm_map: np.ndarray, mask: np.ndarray) -> float:
    """The share of the map's ``|mask|`` highest pixels in the mask."""
    return top_share(norm_map, mask, int(np.count_nonzero(mask)))


def topk_intersection(norm_map: np.ndarray, mask: np.ndarray, k: int) -> float | None:
    """The share of the map's ``k`` highest pixels in the mask; None for a map of fewer pixels."""
    return top_share(norm_map, mask, k) if k <= np.asarray(norm_map).size else None


def mean_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks of ``values`` ``(P,)`` ascending, equal values sharing their mean rank."""
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    counts = np.diff(np.r_[starts, values.size])
    ranks = np.empty(values.size, dtype=np.float64)
    ranks[order] = np.repeat(starts + (counts + 1) / 2.0, counts)
    return ranks


def mask_auc(norm_map: np.ndarray, mask: np.ndarray) -> float | None:
    """ROC AUC of the map's values against the mask; None when the mask is everything."""
    inside = np.asarray(mask, dtype=bool).ravel()
    positives = int(inside.sum())
    negatives = inside.size - positives
    if positives == 0 or negatives == 0:
        return None
    ranks = mean_ranks(np.asarray(norm_map, dtype=np.float64).ravel())
    return float((ranks[inside].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def region_values(
    norm_map: np.ndarray, mask: np.ndarray | None, names: Collection[str], k: int
) -> dict[str, float | None]:
    """The line fields of the region metrics in ``names`` for one map and its mask ``(H, W)``
    (all None without a mask, or with an empty one)."""
    empty = mask is None or not mask.any()
    values: dict[str, float | None] = {}
    for name, field in FIELDS.items():
        if name in names:
            value = None if empty else _compute(name, norm_map, mask, k)  # type: ignore[arg-type]
            values[field] = None if value is None else round(value, 6)
    return values


def _compute(name: str, norm_map: np.ndarray, mask: np.ndarray, k: int) -> float | None:
    if name in ("energy-pointing", "relevance-mass"):
        return energy_pointing(norm_map, mask)
    if name == "relevance-rank":
        return relevance_rank(norm_map, mask)
    if name == "topk-intersection":
        return topk_intersection(norm_map, mask, k)
    return mask_auc(norm_map, mask)


#: metric name -> its line field
FIELDS = {
    "energy-pointing": "energy_pointing",
    "relevance-mass": "relevance_mass",
    "relevance-rank": "relevance_rank",
    "topk-intersection": "topk_intersection",
    "mask-auc": "mask_auc",
}

"""The summary of ``OUT/metrics.jsonl`` per method: each summary statistic of the
metric registry as a mean with a seeded 95% bootstrap interval, the methods ordered
by their mean rank over the statistics and given competition ranks that methods
the intervals cannot tell apart share, and each method's paired gap to ``random``."""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from cam_cli import rundir
from cam_cli.metrics import statistics_of
from cam_cli.metrics.options import MPRT_THRESHOLD

BOOTSTRAP_SAMPLES = 2000

#: summary statistic -> (line field, scale, better)
Stats = Mapping[str, tuple[str, float, str]]
#: per method, per input key, its ok line
Rows = dict[str, dict[str, dict[str, Any]]]


def summary_stats(names: Sequence[str]) -> dict[str, tuple[str, float, str]]:
    """The summary statistics of the metrics ``names`` (the registry's), in their order:
    name -> (line field, scale, better)."""
    return {s.name: (s.field, s.scale, s.better) for s in statistics_of(names)}


def rows_by_method(records: Iterable[dict[str, Any]], lines: Mapping[rundir.RecordKey, dict[str, Any]]) -> Rows:
    """The ok lines of ``records`` by method, then by input key; a fixed ``--target``
    class is summarised apart (``gradcam.class281``); a detection run's maps of one method
    together, by input key and detection."""
    rows: Rows = {}
    for record in records:
        key = rundir.record_key(record)
        line = lines.get(key)
        if line is not None and line.get("status") == "ok":
            method, where = key[1], str(record["key"])
            if record.get("task") == "detection":  # every detection of a method in one row, paired by its
                # rank with other methods' (a class-agnostic map is scored for the top detection, det0)
                method, where = str(record["method"]), f"{where}\0{record.get('variant') or 'det0'}"
            rows.setdefault(method, {})[where] = line
    return rows


def summarise_methods(rows: Rows, names: Sequence[str], seed: int) -> tuple[dict[str, Any], list[str]]:
    """Per method: ``n``, each statistic's bootstrap summary (with its own ``n``: the lines
    that have the value), ``rank`` (:func:`shared_ranks`) and ``mean_rank``, and
    ``gap_to_random`` when the run has the ``random`` control; and the ranking."""
    stats = summary_stats(names)
    methods: dict[str, Any] = {}
    for method, lines in sorted(rows.items()):
        entry: dict[str, Any] = {"n": len(lines), "metrics": {}}
        for stat, (source, scale, better) in stats.items():
            values = [float(r[source]) * scale for r in lines.values() if _is_number(r.get(source))]
            entry["metrics"][stat] = bootstrap(values, better, _rng(seed, method, stat))
        methods[method] = entry
    ranking = rank_methods(methods, stats)
    means = mean_ranks(methods, stats)
    ranks = shared_ranks(methods, ranking, stats)
    for method in ranking:
        methods[method]["rank"] = ranks[method]
        methods[method]["mean_rank"] = means[method]
    if "random" in rows:
        for method, lines in rows.items():
            if method != "random":
                methods[method]["gap_to_random"] = _gaps(lines, rows["random"], stats, seed, method)
    return methods, ranking


def _gaps(
    lines: dict[str, dict[str, Any]], control: dict[str, dict[str, Any]], stats: Stats, seed: int, method: str
) -> dict[str, Any]:
    """Each statistic's bootstrap summary of (method − random), paired by input key."""
    gaps = {}
    for stat, (source, scale, better) in stats.items():
        diffs = [
            (float(r[source]) - float(control[k][source])) * scale
            for k, r in lines.items()
            if k in control and _is_number(r.get(source)) and _is_number(control[k].get(source))
        ]
        gaps[stat] = bootstrap(diffs, better, _rng(seed, method, "gap " + stat))
    return gaps


def bootstrap(values: Sequence[float], better: str, rng: np.random.Generator) -> dict[str, Any]:
    """Mean and percentile-bootstrap 95% interval of ``values`` (``BOOTSTRAP_SAMPLES`` resamples)."""
    if not values:
        return {"n": 0, "mean": None, "low": None, "high": None, "better": better}
    data = np.asarray(values, dtype=np.float64)
    if len(data) == 1:
        low = high = float(data[0])
    else:
        means = data[rng.integers(0, len(data), size=(BOOTSTRAP_SAMPLES, len(data)))].mean(axis=1)
        low, high = (float(v) for v in np.percentile(means, [2.5, 97.5]))
    return {
        "n": len(data),
        "mean": round(float(data.mean()), 6),
        "low": round(low, 6),
        "high": round(high, 6),
        "better": better,
    }


def rank_methods(methods: dict[str, Any], stats: Stats) -> list[str]:
    """Methods best first: by the mean over the statistics of their rank on each (1 = best,
    ties sharing their mean rank); equal means by name."""
    means = mean_ranks(methods, stats)
    return sorted(methods, key=lambda m: (means[m], m))


def shared_ranks(methods: dict[str, Any], ranking: Sequence[str], stats: Stats) -> dict[str, int]:
    """Competition ranks ("1, 1, 3") of the methods in ``ranking`` order, shared where the
    bootstrap intervals cannot tell methods apart.

    Walking down the ranking, the first method opens a group at its position; each next
    method joins the open group (takes its rank) when its 95% interval overlaps that of
    the group's first method on every statistic both have, and otherwise opens a group at
    its own position. So a method shares the leader's rank 1 unless some statistic
    separates the two, and equal maps (CAM and Grad-CAM on a GAP + linear head) always
    share a rank however their means differ in the sixth decimal. Overlapping intervals
    are a conservative test: a rank of its own means the data support a difference,
    a shared rank only that they do not.
    """
    ranks: dict[str, int] = {}
    head: str | None = None
    for position, method in enumerate(ranking, 1):
        if head is not None and intervals_overlap(methods[head], methods[method], stats):
            ranks[method] = ranks[head]
        else:
            head = method
            ranks[method] = position
    return ranks


def intervals_overlap(a: dict[str, Any], b: dict[str, Any], stats: Iterable[str]) -> bool:
    """Whether the 95% intervals of the summaries ``a`` and ``b`` overlap on every statistic
    of ``stats`` that both have (a statistic one of them lacks separates nothing)."""
    for stat in stats:
        x, y = a["metrics"][stat], b["metrics"][stat]
        if x.get("low") is None or y.get("low") is None or x.get("high") is None or y.get("high") is None:
            continue
        if x["low"] > y["high"] or y["low"] > x["high"]:
            return False
    return True


def mean_ranks(methods: dict[str, Any], stats: Stats) -> dict[str, float]:
    """Each method's mean rank over the statistics (what :func:`rank_methods` orders by)."""
    ranks: dict[str, list[float]] = {m: [] for m in methods}
    for stat, (_, _, better) in stats.items():
        scored = [(m, e["metrics"][stat]["mean"]) for m, e in methods.items() if e["metrics"][stat]["mean"] is not None]
        for method, value in scored:
            ahead = sum(1 for _, v in scored if (v < value if better == "lower" else v > value))
            ranks[method].append(ahead + (sum(1 for _, v in scored if v == value) + 1) / 2)
    return {m: round(mean_rank(r), 3) for m, r in ranks.items()}


def mean_rank(ranks: Sequence[float]) -> float:
    return sum(ranks) / len(ranks) if ranks else math.inf


def _rng(seed: int, method: str, stat: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(f"{method}\0{stat}".encode())])


def _is_number(value: Any) -> bool:
    """A metric value to average: a number (a pointing hit is a bool), not None or NaN."""
    return isinstance(value, (int, float)) and not (isinstance(value, float) and math.isnan(value))


def add_mprt_verdicts(methods: dict[str, Any], rows: Rows) -> None:
    """Each method's MPRT verdict under ``"mprt"``: the mean rank correlation after every block
    is randomised (the mean over blocks for ``--mprt-order independent``) with its interval,
    ``pass`` when the interval lies below ``MPRT_THRESHOLD`` (the map changes with the model),
    ``fail`` when it lies at or above, ``unclear`` when it straddles it; and the mean similarity
    per number of randomised blocks (the report's curve)."""
    for method, lines in rows.items():
        entry = methods.get(method)
        stat = entry["metrics"].get("mprt_spearman") if entry else None
        if entry is None or stat is None or stat["mean"] is None:
            continue
        verdict = "pass" if stat["high"] < MPRT_THRESHOLD else "fail" if stat["low"] >= MPRT_THRESHOLD else "unclear"
        curves = [r for r in lines.values() if isinstance(r.get("mprt_spearman_curve"), list)]
        entry["mprt"] = {
            "statistic": "mprt_spearman",
            "mean": stat["mean"],
            "low": stat["low"],
            "high": stat["high"],
            "ssim": entry["metrics"]["mprt_ssim"]["mean"],
            "threshold": MPRT_THRESHOLD,
            "verdict": verdict,
            "blocks": curves[0].get("mprt_blocks") if curves else None,
            "spearman_curve": _mean_curve([r["mprt_spearman_curve"] for r in curves]),
            "ssim_curve": _mean_curve([r.get("mprt_ssim_curve") or [] for r in curves]),
        }


def _mean_curve(curves: Sequence[Sequence[Any]]) -> list[float | None]:
    """The mean at each depth of the curves of one length (the longest's), ignoring missing values."""
    depth = max((len(c) for c in curves), default=0)
    out: list[float | None] = []
    for i in range(depth):
        values = [float(c[i]) for c in curves if i < len(c) and _is_number(c[i])]
        out.append(round(float(np.mean(values)), 6) if values else None)
    return out

"""What a report shows, read from a run's folder: manifest lines and metrics.

Torch-free. Reads every record of OUT through :func:`cam_cli.rundir.read_run`
(the manifest and its shard parts, with the journals of runs in progress) and
``OUT/metrics.jsonl`` when ``camx evaluate`` wrote one; which fields are metrics,
and which way each is better, comes from the metric registry.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any

from cam_cli import rundir
from cam_cli.metrics import METRICS, fields_of
from cam_cli.rundir import read_records, record_key

#: Metrics written by ``camx evaluate`` (the registry's fields); other numeric fields
#: of a metrics line (steps, noise, ...) say what shaped them and are not shown as metrics.
KNOWN_METRICS = tuple(fields_of(METRICS))
#: Options a metrics line records (``road_noise``, ``steps``): what shaped the values, not values.
SETTINGS = frozenset(name for spec in METRICS.values() for name in spec.settings)
#: Metrics where a smaller value means a more faithful map.
LOWER_IS_BETTER = frozenset(s.field for spec in METRICS.values() for s in spec.statistics if s.better == "lower")


@dataclass
class Run:
    """A run's records and where they came from."""

    out_dir: Path
    records: list[dict[str, Any]]
    sources: list[Path]
    metrics: dict[tuple[str, str], dict[str, float]] = field(default_factory=dict)
    metric_names: list[str] = field(default_factory=list)


def _is_metric(name: str, value: Any) -> bool:
    if name in SETTINGS:
        return False
    if isinstance(value, bool):
        return name in KNOWN_METRICS
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return False
    return name in KNOWN_METRICS or name.endswith("_auc") or name.startswith("road_")


def read_metrics(path: Path) -> tuple[dict[tuple[str, str], dict[str, float]], list[str]]:
    """Per record key (:func:`cam_cli.rundir.record_key`: the input's key and the method,
    with a fixed class or ``topK`` target as in the manifest), the metrics of
    ``OUT/metrics.jsonl``; and their names in order.

    Lines with ``status: error`` or without a key and method are left out; a
    later line for the same record key replaces an earlier one.
    """
    found: dict[tuple[str, str], dict[str, float]] = {}
    names: dict[str, None] = {}
    for line in read_metric_lines(path):
        if line.get("status", "ok") != "ok" or not isinstance(line.get("key"), str):
            continue
        if not isinstance(line.get("method"), str):
            continue
        values = {k: float(v) for k, v in line.items() if _is_metric(k, v)}
        for name in values:
            names.setdefault(name, None)
        found[record_key(line)] = values
    ordered = [n for n in KNOWN_METRICS if n in names] + sorted(n for n in names if n not in KNOWN_METRICS)
    return found, ordered


def read_metric_lines(path: Path) -> Iterable[dict[str, Any]]:
    """JSON objects of a JSON-lines file (torn or foreign lines skipped)."""
    import json

    try:
        with open(path, "rb") as handle:
            for raw in handle:
                try:
                    line = json.loads(raw)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    continue
                if isinstance(line, dict):
                    yield line
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return


def load_run(out_dir: Path) -> Run:
    """The records of the run in ``out_dir`` (:func:`cam_cli.rundir.read_run`, sorted by
    key) and the metrics of ``OUT/metrics.jsonl``.

    Raises ``InputError`` (one line) when ``out_dir`` is not a folder or holds
    no manifest, merged or in parts.
    """
    found = rundir.read_run(out_dir)
    records = [found.records[k] for k in sorted(found.records)]
    metrics, names = read_metrics(out_dir / rundir.METRICS)
    return Run(out_dir, records, found.sources, metrics, names)


def safe_relative(path: Any) -> PurePosixPath | None:
    """``path`` as a relative POSIX path that stays inside its folder, else None."""
    if not isinstance(path, str) or not path or "\0" in path or "\\" in path:
        return None
    pure = PurePosixPath(path)
    if pure.is_absolute() or any(part == ".." for part in pure.parts) or not pure.parts:
        return None
    return pure


def ran_at(run: Run) -> str | None:
    """When the run last wrote its manifest: a ``timestamp``-like field when records
    carry one, else the newest manifest file's modification time, as ISO 8601 UTC."""
    stamps = [
        r[name]
        for r in run.records
        for name in ("finished", "timestamp", "time")
        if isinstance(r.get(name), str) and r.get(name)
    ]
    if stamps:
        return max(stamps)
    times = []
    for source in run.sources:
        try:
            times.append(os.stat(source).st_mtime)
        except OSError:
            continue
    if not times:
        return None
    return datetime.fromtimestamp(max(times), tz=timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


__all__ = [
    "KNOWN_METRICS",
    "LOWER_IS_BETTER",
    "Run",
    "ran_at",
    "load_run",
    "read_metrics",
    "record_key",
    "read_records",
]

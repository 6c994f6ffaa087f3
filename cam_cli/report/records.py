"""What a report shows, read from a run's folder: manifest lines and metrics.

Torch-free. Reads ``OUT/manifest.jsonl`` (with the journal of a run in
progress), or the shard parts and their journals when no merged manifest is
there, and ``OUT/metrics.jsonl`` when ``camx evaluate`` wrote one.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any

from cam_cli.errors import InputError
from cam_cli.rundir import journal_path, load_manifest, read_records, record_key, shard_parts

#: Metrics written by ``camx evaluate``; other numeric fields of a metrics line
#: (steps, noise, ...) say what shaped them and are not shown as metrics.
KNOWN_METRICS = (
    "deletion_auc",
    "insertion_auc",
    "drop",
    "increase",
    "road_morf",
    "road_lerf",
    "road_combined",
    "pointing_hit",
    "iou",
)
#: Metrics where a smaller value means a more faithful map.
LOWER_IS_BETTER = frozenset({"deletion_auc", "drop", "road_morf"})


@dataclass
class Run:
    """A run's records and where they came from."""

    out_dir: Path
    records: list[dict[str, Any]]
    sources: list[Path]
    metrics: dict[tuple[str, str], dict[str, float]] = field(default_factory=dict)
    metric_names: list[str] = field(default_factory=list)


def _is_metric(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return name in KNOWN_METRICS
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return False
    return name in KNOWN_METRICS or name.endswith("_auc") or name.startswith("road_")


def read_metrics(path: Path) -> tuple[dict[tuple[str, str], dict[str, float]], list[str]]:
    """Per (key, method), the metrics of ``OUT/metrics.jsonl``; and their names in order.

    Lines with ``status: error`` or without a key and method are left out; a
    later line for the same (key, method) replaces an earlier one.
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
        found[(line["key"], line["method"])] = values
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


def read_run(out_dir: Path) -> Run:
    """The records of the run in ``out_dir``.

    Raises ``InputError`` (one line) when ``out_dir`` is not a folder or holds
    no manifest, merged or in parts.
    """
    if not out_dir.is_dir():
        what = "does not exist" if not out_dir.exists() else "is not a folder"
        raise InputError(f"{out_dir} {what}; give the output folder of a camx explain run")
    manifest = out_dir / "manifest.jsonl"
    if manifest.is_file() or journal_path(manifest).is_file():
        sources = [p for p in (manifest, journal_path(manifest)) if p.is_file()]
        by_key = load_manifest(manifest)
    else:
        parts = shard_parts(out_dir)
        if not parts:
            raise InputError(
                f"no camx manifest in {out_dir} (manifest.jsonl or manifest.shard-K-of-N.jsonl); "
                "run camx explain with -o there first"
            )
        by_key = {}
        sources = []
        for part in parts:
            by_key.update(load_manifest(part))
            sources.extend(p for p in (part, journal_path(part)) if p.is_file())
    records = [by_key[k] for k in sorted(by_key)]
    if not records:
        raise InputError(f"the manifest in {out_dir} has no records; run camx explain with -o there first")
    metrics, names = read_metrics(out_dir / "metrics.jsonl")
    return Run(out_dir, records, sources, metrics, names)


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
    "read_metrics",
    "read_run",
    "record_key",
    "read_records",
]

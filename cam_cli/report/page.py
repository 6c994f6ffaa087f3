"""The report page's data: one item per input with an entry per method, the run's
facts and the metrics table, built from a run's records. Torch-free.

Short keys keep the embedded JSON small for runs of many thousand inputs: an item
is ``{k: key, m: [entry], c: class, s: score, f: failed, i: thumbnail}``, an entry
``{i: method index, st: status, c, s, ci, b: box, h: overlay URL, t: thumbnail,
r: ranked targets, x: metrics, e: error}``. ``report.js`` reads them.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import quote

from cam_cli import __version__, rundir
from cam_cli.metrics import METRICS, statistic, statistics_of
from cam_cli.report.records import LOWER_IS_BETTER, Run, ran_at, safe_relative
from cam_cli.report.thumbs import ThumbJob, thumb_name

THUMBS_FOLDER = "thumbs"
#: every summary statistic of the metric registry
STATISTICS = statistics_of(list(METRICS))


def script_json(data: Any) -> str:
    """``data`` as JSON that is safe inside ``<script type="application/json">``.

    ``<``, ``>`` and ``&`` become ``\\u003c``-style escapes (so ``</script>`` or
    ``<!--`` in a file name cannot end or change the block), and so do U+2028
    and U+2029 (non-ASCII is escaped too, so lone surrogates from odd file
    names cannot break the page's encoding); JSON.parse reads them back unchanged.
    """
    text = json.dumps(data, ensure_ascii=True, separators=(",", ":"), allow_nan=False)
    return (
        text.replace("<", "\\u003c")
        .replace(">", "\\u003e")
        .replace("&", "\\u0026")
        .replace("\u2028", "\\u2028")
        .replace("\u2029", "\\u2029")
    )


def url_path(path: PurePosixPath | str) -> str:
    """A relative POSIX path as a URL path, every segment percent-encoded
    (``#``, ``?``, ``%``, quotes, spaces and non-ASCII included)."""

    def segment(part: str) -> str:
        try:  # names the file system gave as undecodable bytes keep those bytes
            return quote(part, safe="", errors="surrogateescape")
        except UnicodeEncodeError:
            return quote(part, safe="", errors="replace")

    return "/".join(segment(part) for part in str(path).split("/"))


def _run_base_url(out_dir: Path, dest: Path) -> str:
    """URL from the report folder to the run folder, ending in ``/``."""
    try:
        relative = os.path.relpath(out_dir.resolve(), dest.resolve())
    except ValueError:  # another drive (Windows): an absolute file URL
        return out_dir.resolve().as_uri().rstrip("/") + "/"
    if relative == ".":
        return ""
    return url_path(PurePosixPath(Path(relative).as_posix())) + "/"


def _number(value: Any, digits: int = 6) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return round(float(value), digits)


def _class_label(record: dict[str, Any]) -> str | None:
    """A record's class name, or ``class N`` for a model without class names."""
    name = record.get("class_name")
    if isinstance(name, str):
        return name
    index = record.get("class_index")
    if isinstance(index, int) and not isinstance(index, bool):
        return f"class {index}"
    return None


def _box(value: Any) -> list[float] | None:
    if isinstance(value, list) and len(value) == 4 and all(_number(v) is not None for v in value):
        return [_number(v, 2) for v in value]  # type: ignore[misc]
    return None


def _input_source(value: Any) -> Path | None:
    """The original image of a record, when its ``input`` names a file path."""
    if not isinstance(value, str) or not value or "\0" in value:
        return None
    return Path(value)


def _detected(records: list[dict[str, Any]]) -> list[str]:
    """The classes of an image's detections that have maps (a detection run), in order."""
    found: dict[str, None] = {}
    for record in records:
        name = _class_label(record) if record.get("det_box") is not None and record.get("status") == "ok" else None
        if name is not None:
            found.setdefault(name, None)
    return list(found)


def _predicted(record: dict[str, Any]) -> tuple[str | None, float | None]:
    """The top-1 class (rank 1 of ``targets`` when recorded) and its score."""
    chosen = record
    targets = record.get("targets")
    if isinstance(targets, list):
        chosen = next((t for t in targets if isinstance(t, dict) and t.get("rank") == 1), record)
    return _class_label(chosen), _number(chosen.get("score"))


class _Collector:
    """Builds the items of one page and the thumbnails they need."""

    def __init__(self, run: Run, dest: Path, methods: list[str]) -> None:
        self.run = run
        self.base = _run_base_url(run.out_dir, dest)
        self.method_index = {m: i for i, m in enumerate(methods)}
        self.jobs: list[ThumbJob] = []
        self.statuses: Counter[str] = Counter()
        self.classes: Counter[str] = Counter()

    def ok_entry(self, entry: dict[str, Any], key: str, method: str, record: dict[str, Any]) -> None:
        """Fill in the entry of a line whose maps were written."""
        entry["c"] = _class_label(record)
        entry["s"] = _number(record.get("score"))
        entry["ci"] = record.get("class_index") if isinstance(record.get("class_index"), int) else None
        box = _box(record.get("box") if record.get("box") is not None else record.get("det_box"))
        if box is not None:
            entry["b"] = box
        overlay = safe_relative(record.get("overlay"))
        if overlay is not None:
            entry["h"] = self.base + url_path(overlay)
            entry["t"] = thumb_name(key, method)
            self.jobs.append(ThumbJob(entry["t"], self.run.out_dir / Path(*overlay.parts)))
        targets = record.get("targets")
        if isinstance(targets, list) and len(targets) > 1:
            entry["r"] = [
                [_number(t.get("rank"), 0), _class_label(t), _number(t.get("score"))]
                for t in targets
                if isinstance(t, dict)
            ]
        for flag in ("flat", "class_agnostic"):
            if record.get(flag) is True:
                entry[flag] = True
        metrics = self.run.metrics.get(rundir.record_key(record))
        if metrics:
            entry["x"] = {k: _number(v) for k, v in metrics.items()}

    def item(self, key: str, records: list[dict[str, Any]]) -> dict[str, Any]:
        """One input's item: an entry per method, its class and score, its thumbnail."""
        records.sort(key=lambda r: self.method_index[str(r.get("method"))])
        entries: list[dict[str, Any]] = []
        item: dict[str, Any] = {"k": key, "m": entries}
        source: Path | None = None
        for record in records:
            method = str(record.get("method"))
            status = str(record.get("status", "ok"))
            self.statuses[status] += 1
            entry: dict[str, Any] = {"i": self.method_index[method], "st": status}
            source = source or _input_source(record.get("input"))
            if status == "ok":
                name, value = _predicted(record)
                if "c" not in item and name is not None:
                    item["c"] = name
                    if value is not None:
                        item["s"] = value
                self.ok_entry(entry, key, method, record)
            else:
                item["f"] = 1
                entry["e"] = " ".join(str(record.get("error") or status).split())
            entries.append(entry)
        labels = _detected(records)
        if len(labels) > 1:  # a detection run's image: it is under each of its detections' classes
            item["cs"] = labels
            self.classes.update(labels)
        elif "c" in item:
            self.classes[item["c"]] += 1
        if source is not None and any(e["st"] == "ok" for e in entries):
            item["i"] = thumb_name(key, None)
            self.jobs.append(ThumbJob(item["i"], source))
        return item


def collect(run: Run, dest: Path) -> tuple[dict[str, Any], list[ThumbJob]]:
    """The page's data and the thumbnails it needs."""
    by_key: dict[str, list[dict[str, Any]]] = {}
    for record in run.records:
        by_key.setdefault(str(record.get("key", record.get("input"))), []).append(record)
    methods = sorted({str(record.get("method")) for record in run.records})
    collector = _Collector(run, dest, methods)
    items = [collector.item(key, records) for key, records in by_key.items()]
    class_list = [name for name, _ in sorted(collector.classes.items(), key=lambda kv: (-kv[1], kv[0]))]
    class_of = {name: i for i, name in enumerate(class_list)}
    for item in items:
        if "c" in item:
            item["c"] = class_of[item["c"]]
        if "cs" in item:
            item["cs"] = [class_of[name] for name in item["cs"]]
    data = {
        "run": _run_facts(run, methods, collector.statuses, len(items)),
        "methods": methods,
        "classes": class_list,
        "metrics": _metrics_table(run, methods),
        "lineMetrics": run.metric_names,
        "lowerIsBetter": sorted(LOWER_IS_BETTER),
        "thumbs": THUMBS_FOLDER + "/",
        "items": items,
        "sort": _default_sort(run.records),
    }
    return data, collector.jobs


def _default_sort(records: list[dict[str, Any]]) -> str:
    """How the page opens: a similarity run (``--target similar:REF``) by its score, the
    images most like the reference first (or, for ``dissimilar``, least); others by name."""
    return "score" if any(isinstance(r.get("reference"), dict) for r in records) else "key"


def _distinct(records: list[dict[str, Any]], field: str) -> list[str]:
    seen: dict[str, None] = {}
    for record in records:
        value = record.get(field)
        if value is not None and not isinstance(value, (dict, list)):
            seen.setdefault(str(value), None)
    return list(seen)


def _run_facts(run: Run, methods: list[str], statuses: Counter[str], inputs: int) -> dict[str, Any]:
    """The header's facts. ``inputs`` counts images (keys); ``maps``, ``failed`` and ``skipped``
    count (input, method) lines by status: one map per line is shown (with ``--target topK``
    a line holds K, its rank-1 map shown)."""
    layers: dict[str, list[str]] = {}
    for record in run.records:
        layer = record.get("layer")
        if layer is not None:
            per = layers.setdefault(str(record.get("method")), [])
            if str(layer) not in per:
                per.append(str(layer))
    facts = {
        "out": run.out_dir.resolve().name or str(run.out_dir),
        "model": _distinct(run.records, "model"),
        "weights": _distinct(run.records, "weights"),
        "target": _distinct(run.records, "target"),
        "input_size": _distinct(run.records, "input_size"),
        "precision": _distinct(run.records, "precision"),
        "layers": [[m, ", ".join(layers.get(m, []))] for m in methods],
        "when": ran_at(run),
        "inputs": inputs,
        "maps": statuses.get("ok", 0),
        "failed": statuses.get("error", 0),
        "skipped": sum(v for k, v in statuses.items() if k not in ("ok", "error")),
        "version": __version__,
    }
    return facts


def _metrics_table(run: Run, methods: list[str]) -> dict[str, Any] | None:
    """The per-method metrics table: ``camx evaluate``'s summary (means with their 95%
    bootstrap intervals and counts, its ranking) when ``OUT/metrics-summary.json`` is
    readable, else the mean of each statistic over the lines of ``OUT/metrics.jsonl``.

    ``names``: the columns (summary statistics); ``titles``: their titles in the metric
    registry; ``better``: which way each is better; ``best``: per column, the method whose
    value is bold (see :func:`_best`); each row has ``n`` (the method's lines) and
    ``count`` (per column, the lines that have the value: pointing and IoU only those with
    a box).
    """
    table = _summary_table(run.out_dir / rundir.METRICS_SUMMARY) or _lines_table(run, methods)
    if table is None:
        return None
    table["titles"] = {name: _title(name) for name in table["names"]}
    table["best"] = _best(table)
    return table


def _title(name: str) -> str:
    """A column's title: its statistic's in the metric registry, else its name."""
    try:
        return statistic(name).title
    except KeyError:
        return name


def _lines_table(run: Run, methods: list[str]) -> dict[str, Any] | None:
    """Means over ``OUT/metrics.jsonl`` of each registry statistic (its field times its
    scale, as ``camx evaluate``'s summary has it), and of other numeric fields as they are;
    no intervals, no ranks."""
    if not run.metrics:
        return None
    known = {s.field: s for s in STATISTICS}
    columns = [(known[f].name, f, known[f].scale) if f in known else (f, f, 1.0) for f in run.metric_names]
    rows = []
    # by record key's method part: lines of a fixed class or a topK target are their own rows, as in the summary
    for method in sorted({m for _, m in run.metrics}, key=lambda m: (m.split(".")[0] not in methods, m)):
        values = [v for (key, m), v in run.metrics.items() if m == method]
        if not values:
            continue
        means: dict[str, float | None] = {}
        counts: dict[str, int] = {}
        for name, field, scale in columns:
            column = [v[field] * scale for v in values if field in v]
            means[name] = _number(sum(column) / len(column)) if column else None
            counts[name] = len(column)
        rows.append({"method": method, "n": len(values), "mean": means, "count": counts})
    better = {name: known[field].better if field in known else "higher" for name, field, _ in columns}
    return {"names": [c[0] for c in columns], "better": better, "rows": rows, "source": rundir.METRICS}


def _summary_table(path: Path) -> dict[str, Any] | None:
    """The table of ``metrics-summary.json`` (``ranking``, ``methods: {name: {n, rank,
    metrics: {statistic: {n, mean, low, high, better}}}}``), rows in the ranking's order;
    None when it is missing or not of that shape."""
    try:
        summary = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError):
        return None
    methods = summary.get("methods") if isinstance(summary, dict) else None
    if not isinstance(methods, dict) or not methods:
        return None
    names: dict[str, None] = {}
    better: dict[str, str] = {}
    rows = []
    for method, entry in methods.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("metrics"), dict):
            continue
        row: dict[str, Any] = {"method": str(method), "n": _number(entry.get("n"), 0)}
        row.update(mean={}, low={}, high={}, count={})
        if _number(entry.get("rank"), 0) is not None:
            row["rank"] = int(entry["rank"])
        for name, stats in entry["metrics"].items():
            if not isinstance(stats, dict):
                continue
            names.setdefault(str(name), None)
            if stats.get("better") in ("lower", "higher"):
                better[str(name)] = stats["better"]
            for field in ("mean", "low", "high"):
                row[field][str(name)] = _number(stats.get(field))
            count = _number(stats.get("n"), 0)
            row["count"][str(name)] = int(count) if count is not None else None
        rows.append(row)
    if not rows:
        return None
    ranking = summary.get("ranking")
    order = {str(m): i for i, m in enumerate(ranking)} if isinstance(ranking, list) else {}
    rows.sort(key=lambda r: (order.get(r["method"], math.inf), r.get("rank", math.inf), r["method"]))
    return {"names": list(names), "better": better, "rows": rows, "source": rundir.METRICS_SUMMARY}


def _best(table: dict[str, Any]) -> dict[str, str]:
    """Per column, the method whose value is bold: the best mean, where its 95% interval
    does not overlap the runner-up's (the data support the difference). No column has
    one when the table has no intervals, when fewer than two methods have a value, or
    when the best ties the runner-up (equal maps give equal means, up to rounding)."""
    best: dict[str, str] = {}
    for name in table["names"]:
        lower = table["better"].get(name) == "lower"
        scored = [r for r in table["rows"] if r["mean"].get(name) is not None]
        if len(scored) < 2:
            continue
        scored.sort(key=lambda r: r["mean"][name] if lower else -r["mean"][name])
        first, second = scored[0], scored[1]
        bounds = [r.get(side, {}).get(name) for r in (first, second) for side in ("low", "high")]
        if any(b is None for b in bounds):
            continue
        first_low, first_high, second_low, second_high = bounds
        if (first_high < second_low) if lower else (first_low > second_high):
            best[name] = first["method"]
    return best

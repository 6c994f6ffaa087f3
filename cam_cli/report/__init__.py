"""``camx report``: a run laid out as a static page that opens from disk, offline.

The page is ``index.html`` with its own ``report.css``, ``report.js`` and a
``thumbs/`` folder beside it. The run's data is embedded in the page as a
JSON block (escaped so that no file name can end the block); the script
builds every element with ``textContent``/``setAttribute``, never with
markup, so untrusted names are shown as text. Links to the full-resolution
overlays are relative URLs to the run's folder, percent-encoded segment by
segment. Nothing here imports torch.
"""

from __future__ import annotations

import html
import json
import math
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass
from importlib import resources
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import quote

from cam_cli import __version__, rundir
from cam_cli.errors import OutputError
from cam_cli.report.records import LOWER_IS_BETTER, Run, load_run, ran_at, safe_relative
from cam_cli.report.thumbs import THUMB_SIZE, ThumbJob, ThumbResult, make_thumbnails, thumb_name
from cam_cli.rundir import write_atomic

ASSETS = ("report.css", "report.js")
THUMBS_FOLDER = "thumbs"


@dataclass
class ReportSummary:
    """What a build did: the page, how many inputs and lines it shows, thumbnails made."""

    index: Path
    inputs: int
    lines: int
    failed: int
    thumbnails: ThumbResult
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "report": str(self.index),
            "inputs": self.inputs,
            "lines": self.lines,
            "failed_lines": self.failed,
            "thumbnails_made": self.thumbnails.made,
            "thumbnails_reused": self.thumbnails.reused,
            "thumbnails_failed": self.thumbnails.failed,
            "thumbnails_removed": self.thumbnails.removed,
            "seconds": round(self.seconds, 3),
        }


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


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else (None if value is None else str(value))


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


def _collect(run: Run, dest: Path) -> tuple[dict[str, Any], list[ThumbJob]]:
    """The page's data and the thumbnails it needs."""
    base = _run_base_url(run.out_dir, dest)
    methods: list[str] = []
    method_index: dict[str, int] = {}
    classes: Counter[str] = Counter()
    by_key: dict[str, list[dict[str, Any]]] = {}
    for record in run.records:
        key = str(record.get("key", record.get("input")))
        method = str(record.get("method"))
        if method not in method_index:
            method_index[method] = len(methods)
            methods.append(method)
        by_key.setdefault(key, []).append(record)
    methods_sorted = sorted(methods)
    method_index = {m: i for i, m in enumerate(methods_sorted)}

    def predicted(record: dict[str, Any]) -> tuple[str | None, float | None]:
        """The top-1 class (rank 1 of ``targets`` when recorded) and its score."""
        chosen = record
        targets = record.get("targets")
        if isinstance(targets, list):
            chosen = next((t for t in targets if isinstance(t, dict) and t.get("rank") == 1), record)
        return _class_label(chosen), _number(chosen.get("score"))

    jobs: list[ThumbJob] = []
    raw_items = []
    statuses: Counter[str] = Counter()
    for key, records in by_key.items():
        records.sort(key=lambda r: method_index[str(r.get("method"))])
        entries = []
        failed = False
        class_name: str | None = None
        score: float | None = None
        source: Path | None = None
        for record in records:
            method = str(record.get("method"))
            status = str(record.get("status", "ok"))
            statuses[status] += 1
            entry: dict[str, Any] = {"i": method_index[method], "st": status}
            if source is None:
                source = _input_source(record.get("input"))
            if status == "ok":
                name, value = predicted(record)
                if class_name is None and name is not None:
                    class_name, score = name, value
                entry["c"] = _class_label(record)
                entry["s"] = _number(record.get("score"))
                entry["ci"] = record.get("class_index") if isinstance(record.get("class_index"), int) else None
                box = _box(record.get("box"))
                if box is not None:
                    entry["b"] = box
                overlay = safe_relative(record.get("overlay"))
                if overlay is not None:
                    entry["h"] = base + url_path(overlay)
                    thumb = thumb_name(key, method)
                    entry["t"] = thumb
                    jobs.append(ThumbJob(thumb, run.out_dir / Path(*overlay.parts)))
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
                metrics = run.metrics.get((key, method))
                if metrics:
                    entry["x"] = {k: _number(v) for k, v in metrics.items()}
            else:
                failed = True
                entry["e"] = " ".join(str(record.get("error") or status).split())
            entries.append(entry)
        item: dict[str, Any] = {"k": key, "m": entries}
        if class_name is not None:
            classes[class_name] += 1
            item["c"] = class_name
        if score is not None:
            item["s"] = score
        if failed:
            item["f"] = 1
        if source is not None and any(e["st"] == "ok" for e in entries):
            thumb = thumb_name(key, None)
            item["i"] = thumb
            jobs.append(ThumbJob(thumb, source))
        raw_items.append(item)

    class_list = [name for name, _ in sorted(classes.items(), key=lambda kv: (-kv[1], kv[0]))]
    class_of = {name: i for i, name in enumerate(class_list)}
    for item in raw_items:
        if "c" in item:
            item["c"] = class_of[item["c"]]
    data = {
        "run": _run_facts(run, methods_sorted, statuses, len(raw_items)),
        "methods": methods_sorted,
        "classes": class_list,
        "metrics": _metrics_table(run, methods_sorted),
        "lineMetrics": run.metric_names,
        "lowerIsBetter": sorted(LOWER_IS_BETTER),
        "thumbs": THUMBS_FOLDER + "/",
        "items": raw_items,
    }
    return data, jobs


def _distinct(records: list[dict[str, Any]], field: str) -> list[str]:
    seen: dict[str, None] = {}
    for record in records:
        value = record.get(field)
        if value is not None and not isinstance(value, (dict, list)):
            seen.setdefault(str(value), None)
    return list(seen)


def _run_facts(run: Run, methods: list[str], statuses: Counter[str], inputs: int) -> dict[str, Any]:
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
        "done": statuses.get("ok", 0),
        "failed": statuses.get("error", 0),
        "skipped": sum(v for k, v in statuses.items() if k not in ("ok", "error")),
        "version": __version__,
    }
    return facts


def _metrics_table(run: Run, methods: list[str]) -> dict[str, Any] | None:
    """The per-method metrics table: ``camx evaluate``'s summary (means with their 95%
    bootstrap intervals, its ranking) when ``OUT/metrics-summary.json`` is readable, else the
    mean of each metric over the lines of ``OUT/metrics.jsonl``."""
    summary = _summary_table(run.out_dir / rundir.METRICS_SUMMARY)
    if summary is not None:
        return summary
    if not run.metrics:
        return None
    rows = []
    for method in methods:
        values = [v for (key, m), v in run.metrics.items() if m == method]
        if not values:
            continue
        means = {}
        for name in run.metric_names:
            column = [v[name] for v in values if name in v]
            means[name] = _number(sum(column) / len(column)) if column else None
        rows.append({"method": method, "n": len(values), "mean": means})
    better = {name: "lower" if name in LOWER_IS_BETTER else "higher" for name in run.metric_names}
    return {"names": run.metric_names, "better": better, "rows": rows, "source": rundir.METRICS}


def _summary_table(path: Path) -> dict[str, Any] | None:
    """The table of ``metrics-summary.json`` (``methods: {name: {n, rank, metrics: {metric:
    {mean, low, high, better}}}}``); None when it is missing or not of that shape."""
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
        row.update(mean={}, low={}, high={})
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
        rows.append(row)
    if not rows:
        return None
    rows.sort(key=lambda r: (r.get("rank", math.inf), r["method"]))
    return {"names": list(names), "better": better, "rows": rows, "source": rundir.METRICS_SUMMARY}


PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; script-src 'self' file:; \
style-src 'self' file:; img-src 'self' file: data:; base-uri 'none'; form-action 'none'">
<meta name="referrer" content="no-referrer">
<meta name="generator" content="camx {version}">
<title>camx report: {title}</title>
<link rel="stylesheet" href="report.css">
</head>
<body>
<noscript><p class="noscript">This page needs JavaScript to show the run.</p></noscript>
<div id="app" aria-live="polite"><h1>camx report: {title}</h1><p>Loading {count} inputs…</p></div>
<script type="application/json" id="camx-data">{data}</script>
<script src="report.js"></script>
</body>
</html>
"""


def _check_dest(dest: Path) -> None:
    probe = dest
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise OutputError(f"report folder {dest}: {probe} is not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise OutputError(f"report folder {dest} is not writable ({probe}: permission denied)")


def make_report(
    out_dir: Path,
    dest: Path | None = None,
    *,
    quiet: bool = True,
    workers: int | None = None,
    thumb_size: int = THUMB_SIZE,
) -> ReportSummary:
    """Build the report of the run in ``out_dir`` into ``dest`` (default ``out_dir/report``).

    Raises ``InputError`` when ``out_dir`` holds no manifest and ``OutputError``
    when ``dest`` cannot be written; in both cases nothing is written.
    Progress (a tqdm bar on stderr) only when ``quiet`` is False.
    """
    started = time.perf_counter()
    out_dir = Path(out_dir)
    run = load_run(out_dir)
    dest = Path(dest) if dest is not None else out_dir / rundir.REPORT
    _check_dest(dest)
    data, jobs = _collect(run, dest)
    try:
        dest.mkdir(parents=True, exist_ok=True)
        bar = None
        if not quiet:
            from tqdm import tqdm

            bar = tqdm(total=len(jobs), unit="thumb", desc="thumbnails", file=sys.stderr, leave=False)
        try:
            exists, counts = make_thumbnails(
                jobs, dest / THUMBS_FOLDER, size=thumb_size, workers=workers, progress=bar.update if bar else None
            )
        finally:
            if bar is not None:
                bar.close()
        for item in data["items"]:
            if "i" in item and not exists.get(item["i"]):
                del item["i"]
            for entry in item["m"]:
                if "t" in entry and not exists.get(entry["t"]):
                    del entry["t"]
        for asset in ASSETS:
            content = resources.files("cam_cli.report").joinpath("assets", asset).read_bytes()
            target = dest / asset
            if not target.is_file() or target.read_bytes() != content:
                write_atomic(target, content)
        title = html.escape(data["run"]["out"], quote=True)
        page = PAGE.format(
            version=html.escape(__version__),
            title=title,
            count=len(data["items"]),
            data=script_json(data),
        )
        index = dest / "index.html"
        write_atomic(index, page.encode("utf-8", "replace"))
    except OSError as exc:
        raise OutputError(f"cannot write the report in {dest}: {exc.strerror or exc}") from None
    return ReportSummary(
        index=index,
        inputs=len(data["items"]),
        lines=len(run.records),
        failed=data["run"]["failed"],
        thumbnails=counts,
        seconds=time.perf_counter() - started,
    )


def build_report(out_dir: Path, dest: Path | None = None, *, quiet: bool = True) -> Path:
    """Build the report of ``out_dir`` (see ``make_report``); returns the path of its ``index.html``."""
    return make_report(out_dir, dest, quiet=quiet).index


__all__ = ["ReportSummary", "build_report", "make_report", "script_json", "url_path"]

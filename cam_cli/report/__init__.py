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
import os
import sys
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from cam_cli import __version__, rundir
from cam_cli.errors import OutputError
from cam_cli.report.mprt import mprt_section
from cam_cli.report.page import THUMBS_FOLDER, collect, script_json, url_path
from cam_cli.report.records import load_run, safe_relative
from cam_cli.report.thumbs import THUMB_SIZE, ThumbJob, ThumbResult, make_thumbnails
from cam_cli.rundir import write_atomic

ASSETS = ("report.css", "report.js")


@dataclass
class ReportSummary:
    """What a build did: the page, how many inputs and lines it shows, thumbnails made."""

    index: Path
    inputs: int
    lines: int
    failed: int
    thumbnails: ThumbResult
    seconds: float
    #: overlays the manifest's ok lines name that are not in OUT (moved, deleted, outside OUT)
    missing_overlays: int = 0

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
            "missing_overlays": self.missing_overlays,
            "seconds": round(self.seconds, 3),
        }


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
{mprt}
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


def _write_thumbnails(
    data: dict[str, Any], jobs: list[ThumbJob], dest: Path, quiet: bool, workers: int | None, size: int
) -> ThumbResult:
    """Make the thumbnails and drop from ``data`` those that could not be made."""
    bar = None
    if not quiet:
        from tqdm import tqdm

        bar = tqdm(total=len(jobs), unit="thumb", desc="thumbnails", file=sys.stderr, leave=False)
    try:
        exists, counts = make_thumbnails(
            jobs, dest / THUMBS_FOLDER, size=size, workers=workers, progress=bar.update if bar else None
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
    return counts


def _write_page(data: dict[str, Any], dest: Path, mprt: str = "") -> Path:
    """Write the page's assets (only when changed) and ``index.html``."""
    for asset in ASSETS:
        content = resources.files("cam_cli.report").joinpath("assets", asset).read_bytes()
        target = dest / asset
        if not target.is_file() or target.read_bytes() != content:
            write_atomic(target, content)
    page = PAGE.format(
        version=html.escape(__version__),
        title=html.escape(data["run"]["out"], quote=True),
        count=len(data["items"]),
        data=script_json(data),
        mprt=mprt,
    )
    index = dest / "index.html"
    write_atomic(index, page.encode("utf-8", "replace"))
    return index


def count_missing_overlays(run: Any) -> int:
    """How many overlays the ok lines of ``run`` name (every rank's) that are not files in its OUT."""
    missing = 0
    for record in run.records:
        if record.get("status") != "ok":
            continue
        named = {t.get("overlay") for t in record.get("targets") or [] if isinstance(t, dict)} | {record.get("overlay")}
        for overlay in named - {None}:
            relative = safe_relative(overlay)
            if relative is None or not (run.out_dir / relative).is_file():
                missing += 1
    return missing


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
    data, jobs = collect(run, dest)
    try:
        dest.mkdir(parents=True, exist_ok=True)
        counts = _write_thumbnails(data, jobs, dest, quiet, workers, thumb_size)
        index = _write_page(data, dest, mprt_section(out_dir, dest))
    except OSError as exc:
        raise OutputError(f"cannot write the report in {dest}: {exc.strerror or exc}") from None
    return ReportSummary(
        index=index,
        inputs=len(data["items"]),
        lines=len(run.records),
        failed=data["run"]["failed"],
        thumbnails=counts,
        seconds=time.perf_counter() - started,
        missing_overlays=count_missing_overlays(run),
    )


def build_report(out_dir: Path, dest: Path | None = None, *, quiet: bool = True) -> Path:
    """Build the report of ``out_dir`` (see ``make_report``); returns the path of its ``index.html``."""
    return make_report(out_dir, dest, quiet=quiet).index


__all__ = ["ReportSummary", "build_report", "make_report", "script_json", "url_path"]

"""How `camx report` scales: build time and time-to-interactive for a large run.

Writes a synthetic run of N inputs (default 10,000) into a temporary folder: one
manifest line per input and method, each with its own overlay and input file (hard
links of one photo-sized JPEG, so that writing the run is quick while the report
still decodes and shrinks every one of them), then times

* ``make_report`` from scratch (every thumbnail made), and again (nothing changed);
* the page in headless Chromium: from navigation to the first page of cards built
  and interactive (the script's ``data-ready``), to the visible thumbnails loaded,
  and a search and a sort over all N inputs.

    .venv/bin/python bench/report_scale.py                 # 10,000 inputs, 2 methods
    .venv/bin/python bench/report_scale.py --inputs 100000 --methods 1
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cam_cli.report import make_report  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
METHODS = ["gradcam", "cam", "gradcam++", "layercam"]


def photo(path: Path, width: int, height: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(height // 16, width // 16, 3), dtype=np.uint8)
    Image.fromarray(small).resize((width, height), Image.BILINEAR).save(path, quality=90)


def write_run(root: Path, inputs: int, methods: list[str], width: int, height: int) -> Path:
    out = root / "out"
    images = root / "imgs"
    out.mkdir()
    images.mkdir()
    original = root / "original.jpg"
    overlay = root / "overlay.jpg"
    photo(original, width, height, 1)
    photo(overlay, width, height, 2)
    links = {original: 0, overlay: 0}

    def link(source: Path, target: Path) -> None:
        """Hard-link ``target`` to ``source`` (a fresh copy every 50,000 links: ext4 allows 65,000)."""
        if links[source] and links[source] % 50_000 == 0:
            copy = source.with_name(f"{source.stem}-{links[source]}{source.suffix}")
            shutil.copyfile(source, copy)
            os.replace(copy, source)  # the old inode keeps its links; new ones go to the copy
        links[source] += 1
        os.link(source, target)

    rng = np.random.default_rng(0)
    classes = [f"class {i}" for i in range(50)]
    lines = []
    for n in range(inputs):
        key = f"{n // 1000:03d}/img_{n:06d}.jpg"
        source = images / key
        source.parent.mkdir(exist_ok=True)
        link(original, source)
        ci = int(rng.integers(0, len(classes)))
        score = round(float(rng.random()), 6)
        for method in methods:
            name = f"{key}.{method}.jpg"
            (out / name).parent.mkdir(exist_ok=True)
            link(overlay, out / name)
            record = {
                "input": str(source),
                "key": key,
                "status": "ok",
                "error": None,
                "overlay": name,
                "map": f"{key}.{method}.npy",
                "class_index": ci,
                "class_name": classes[ci],
                "score": score,
                "method": method,
                "model": "resnet50",
                "weights": "DEFAULT",
                "layer": "layer4",
                "target": "top1",
                "input_size": 224,
                "width": width,
                "height": height,
            }
            lines.append(json.dumps(record))
    (out / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    return out


def timed(page: Any, action: Callable[[Any], None]) -> float:
    """Run ``action(page)``; the page's own seconds for the filter/sort and re-render it caused."""
    before = page.evaluate("window.camxRefreshes")
    action(page)
    deadline = time.monotonic() + 60
    while page.evaluate("window.camxRefreshes") == before:
        assert time.monotonic() < deadline, "the page did not refresh"
        page.wait_for_timeout(10)
    return page.evaluate("window.camxRefreshMs") / 1000


def time_page(index: Path, runs: int) -> list[dict[str, float]]:
    from playwright.sync_api import sync_playwright

    results = []
    with sync_playwright() as play:
        browser = play.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        for _ in range(runs):
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            errors: list[str] = []
            page.on("pageerror", lambda exc, errors=errors: errors.append(str(exc)))
            page.on("console", lambda m, errors=errors: errors.append(m.text) if m.type == "error" else None)
            started = time.perf_counter()
            page.goto(index.as_uri(), wait_until="commit")
            page.wait_for_selector("html[data-ready]", timeout=60_000)
            ready_wall = time.perf_counter() - started
            ready = page.evaluate("window.camxReadyAt")
            page.wait_for_function(
                "Array.from(document.querySelectorAll('#grid img')).filter(i => {"
                " const r = i.getBoundingClientRect(); return r.top < innerHeight && r.bottom > 0; })"
                ".every(i => i.complete && i.naturalWidth > 0)",
                timeout=60_000,
            )
            visible = page.evaluate("performance.now()")
            cards = page.locator("#grid .card").count()

            search = timed(page, lambda p: p.fill("#f-search", "img_0099"))
            timed(page, lambda p: p.fill("#f-search", ""))
            sort = timed(page, lambda p: p.select_option("#f-sort", "score"))
            results.append(
                {
                    "ready_ms": ready,
                    "ready_wall_s": ready_wall,
                    "visible_thumbs_ms": visible,
                    "cards": cards,
                    "search_s": search,
                    "sort_s": sort,
                    "errors": len(errors),
                }
            )
            page.close()
        browser.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--inputs", type=int, default=10_000)
    parser.add_argument("--methods", type=int, default=2, help="methods per input (lines per input)")
    parser.add_argument("--size", default="500x375", help="WxH of every input and overlay")
    parser.add_argument("--workers", type=int, default=None, help="thumbnail threads (default: cores, up to 8)")
    parser.add_argument("--page-runs", type=int, default=3, help="page loads to time")
    parser.add_argument("--keep", type=Path, default=None, help="build in this folder and keep it")
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.split("x"))
    methods = METHODS[: args.methods]

    root = Path(tempfile.mkdtemp(prefix="camx-report-bench-", dir=args.keep))
    try:
        t0 = time.perf_counter()
        out = write_run(root, args.inputs, methods, width, height)
        print(
            f"synthetic run: {args.inputs} inputs x {len(methods)} methods, {width}x{height}, "
            f"written in {time.perf_counter() - t0:.1f} s; {os.cpu_count()} cores"
        )
        first = make_report(out, workers=args.workers)
        print(
            f"build from scratch: {first.seconds:.1f} s ({first.thumbnails.made} thumbnails made, "
            f"{first.thumbnails.failed} failed)"
        )
        again = make_report(out, workers=args.workers)
        print(
            f"re-build, nothing changed: {again.seconds:.2f} s ({again.thumbnails.reused} thumbnails reused, "
            f"{again.thumbnails.made} made)"
        )
        size = sum(f.stat().st_size for f in (out / "report").rglob("*") if f.is_file())
        page_mb = (out / "report" / "index.html").stat().st_size / 1e6
        print(f"report folder: {size / 1e6:.1f} MB, index.html {page_mb:.1f} MB")
        if not (Path(CHROMIUM).exists()):
            print(f"page: skipped ({CHROMIUM} not found)")
            return
        for n, r in enumerate(time_page(first.index, args.page_runs), 1):
            print(
                f"page load {n}: interactive at {r['ready_ms']:.0f} ms after navigation "
                f"({r['ready_wall_s']:.2f} s wall), visible thumbnails loaded at {r['visible_thumbs_ms']:.0f} ms, "
                f"{r['cards']} cards; search over all {args.inputs}: {r['search_s'] * 1000:.0f} ms, "
                f"sort by score: {r['sort_s'] * 1000:.0f} ms; console errors: {r['errors']}"
            )
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

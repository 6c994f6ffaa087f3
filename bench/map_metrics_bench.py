"""The complexity and region metrics of ``camx evaluate`` against Quantus 0.6 on the same maps.

Makes its own run first (not timed): ``camx explain`` of the sample photos,
copied ``--copies`` times, with a seeded random ``--model`` and ``--methods``,
and one PNG mask per photo (an ellipse in its labelled box of
``tests/data/boxes.json``). Then times:

* per metric, the computation alone, in this process: camx's function against
  the Quantus metric with its defaults, each over every map with its mask (one
  call per map: the photos differ in size, so Quantus cannot take them as one
  batch), the maps and masks already in memory;
* the whole process for all eight metrics at once: ``camx evaluate OUT
  --metrics ... --masks-from MASKS --json`` against a child process that imports
  Quantus, reads the same ``.npy`` maps, images and masks and calls the eight
  metrics on each (interpreter start, imports and reading included).

Prints seconds and the ratio Quantus / camx (above 1: camx is faster); medians
over ``--rounds``. Not a test: nothing is asserted, and on a shared machine the
figures are noisy.

    python bench/map_metrics_bench.py --copies 4 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

METRICS = ",".join(
    ("sparseness", "complexity", "effective-complexity")
    + ("energy-pointing", "relevance-mass", "relevance-rank", "topk-intersection", "mask-auc")
)

QUANTUS_PROCESS = """
import json, sys, time, warnings
from pathlib import Path
import numpy as np
from PIL import Image
import quantus
warnings.simplefilter("ignore")
out, masks = Path(sys.argv[1]), Path(sys.argv[2])
names = ["Sparseness", "Complexity", "EffectiveComplexity", "AttributionLocalisation", "RelevanceMassAccuracy",
         "RelevanceRankAccuracy", "TopKIntersection", "AUC"]
metrics = [getattr(quantus, name)(disable_warnings=True) for name in names]
count = 0
for line in map(json.loads, (out / "manifest.jsonl").read_text().splitlines()):
    a = np.load(out / line["map"])[None, None]
    x = np.asarray(Image.open(line["input"]).convert("RGB"), np.float32).transpose(2, 0, 1)[None] / 255
    s = (np.asarray(Image.open(masks / (Path(line["key"]).stem + ".png"))) > 0)[None, None].astype(np.float32)
    for metric in metrics:
        metric(model=None, x_batch=x, y_batch=np.array([0]), a_batch=a.copy(), s_batch=s)
    count += 1
print(json.dumps({"maps": count}))
"""


def make_run(work: Path, args: argparse.Namespace) -> tuple[Path, Path]:
    """The photos copied, explained by camx, and a mask per photo: (OUT, MASKS)."""
    boxes = json.loads((ROOT / "tests" / "data" / "boxes.json").read_text())
    images, masks = work / "imgs", work / "masks"
    images.mkdir()
    masks.mkdir()
    for copy in range(args.copies):
        for name, entry in boxes.items():
            target = images / f"{Path(name).stem}{copy}.jpg"
            shutil.copy(ROOT / "sample_images" / name, target)
            width, height = Image.open(target).size
            canvas = Image.new("L", (width, height), 0)
            x0, y0, x1, y1 = entry["box"]
            ImageDraw.Draw(canvas).ellipse([x0, y0, x1 - 1, y1 - 1], fill=255)
            canvas.save(masks / f"{target.stem}.png")
    out = work / "out"
    command = [sys.executable, "-m", "cam_cli", "explain", str(images), "-o", str(out), "--model", args.model]
    command += ["--weights", "NONE", "--method", args.methods, "--device", "cpu", "-q"]
    timed(command)
    return out, masks


def timed(command: list[str]) -> tuple[float, str]:
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"failed ({done.returncode}): {' '.join(command[:4])}...\n{done.stderr.strip()[-2000:]}")
    return seconds, done.stdout


def pairs_of(out: Path, masks: Path) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(map, mask, image batch) of every line of OUT's manifest."""
    found = []
    for line in map(json.loads, (out / "manifest.jsonl").read_text().splitlines()):
        norm_map = np.load(out / line["map"])
        mask = np.asarray(Image.open(masks / f"{Path(line['key']).stem}.png")) > 0
        image = np.asarray(Image.open(ROOT / line["input"]).convert("RGB"), np.float32).transpose(2, 0, 1)[None]
        found.append((norm_map, mask, image / 255))
    return found


def functions() -> dict[str, tuple[Callable[..., Any], Any]]:
    """Per metric: camx's function of (map, mask), and the Quantus metric with its defaults."""
    import quantus

    from cam_cli.metrics import complexity as cx
    from cam_cli.metrics import regions as rg

    return {
        "sparseness": (lambda a, s: cx.sparseness(a), quantus.Sparseness(disable_warnings=True)),
        "complexity": (lambda a, s: cx.complexity(a), quantus.Complexity(disable_warnings=True)),
        "effective-complexity": (
            lambda a, s: cx.effective_complexity(a),
            quantus.EffectiveComplexity(disable_warnings=True),
        ),
        "energy-pointing": (rg.energy_pointing, quantus.AttributionLocalisation(disable_warnings=True)),
        "relevance-mass": (rg.energy_pointing, quantus.RelevanceMassAccuracy(disable_warnings=True)),
        "relevance-rank": (rg.relevance_rank, quantus.RelevanceRankAccuracy(disable_warnings=True)),
        "topk-intersection": (
            lambda a, s: rg.topk_intersection(a, s, 1000),
            quantus.TopKIntersection(disable_warnings=True),
        ),
        "mask-auc": (rg.mask_auc, quantus.AUC(disable_warnings=True)),
    }


Pairs = list[tuple[np.ndarray, np.ndarray, np.ndarray]]


def compute_times(pairs: Pairs, rounds: int) -> dict[str, tuple[float, float]]:
    """Per metric, the median seconds of camx and of Quantus over every pair."""
    times: dict[str, tuple[float, float]] = {}
    for name, (ours, theirs) in functions().items():
        mine, quantus_s = [], []
        for _ in range(rounds):
            started = time.perf_counter()
            for a, s, _x in pairs:
                ours(a, s)
            mine.append(time.perf_counter() - started)
            started = time.perf_counter()
            for a, s, x in pairs:
                batch = {"a_batch": a[None, None].copy(), "s_batch": s[None, None].astype(np.float32)}
                theirs(model=None, x_batch=x, y_batch=np.array([0]), **batch)
            quantus_s.append(time.perf_counter() - started)
        times[name] = (statistics.median(mine), statistics.median(quantus_s))
    return times


def process_times(out: Path, masks: Path, rounds: int) -> tuple[float, float]:
    """Median whole-process seconds of ``camx evaluate`` and of the Quantus script, all eight metrics."""
    camx, quantus = [], []
    evaluate = [sys.executable, "-m", "cam_cli", "evaluate", str(out), "--metrics", METRICS]
    evaluate += ["--masks-from", str(masks), "--device", "cpu", "--workers", "0", "-q", "--json"]
    for _ in range(rounds):
        for name in ("metrics.jsonl", "metrics-summary.json"):
            (out / name).unlink(missing_ok=True)
        camx.append(timed(evaluate)[0])
        quantus.append(timed([sys.executable, "-c", QUANTUS_PROCESS, str(out), str(masks)])[0])
    return statistics.median(camx), statistics.median(quantus)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet18", help="a torchvision model (built with --weights NONE)")
    parser.add_argument("--methods", default="gradcam,cam", help="camx explain --method")
    parser.add_argument("--copies", type=int, default=4, help="copies of the four sample photos")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds of each (medians shown)")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    with tempfile.TemporaryDirectory() as tmp:
        out, masks = make_run(Path(tmp), args)
        pairs = pairs_of(out, masks)
        per_metric = compute_times(pairs, args.rounds)
        camx, quantus = process_times(out, masks, args.rounds)
    print(
        f"map metrics bench: {len(pairs)} maps ({args.copies} x 4 photos x {args.methods}, {args.model}), "
        f"{args.rounds} rounds, medians; shared cores: noisy"
    )
    print(f"  {'metric':22} {'camx s':>8} {'Quantus s':>10} {'Quantus/camx':>13}")
    for name, (ours, theirs) in per_metric.items():
        print(f"  {name:22} {ours:8.3f} {theirs:10.3f} {theirs / ours:13.1f}")
    print(f"  whole process, all eight: camx evaluate {camx:.1f} s, Quantus {quantus:.1f} s", end="")
    print(f", ratio {quantus / camx:.2f}")


if __name__ == "__main__":
    main()

"""Localisation quality of camx's maps on the hand-labelled sample photos.

Runs ``camx explain --boxes --target top5`` (CAM and Grad-CAM) over the photos
labelled in ``tests/data/boxes.json`` with the real ImageNet model of the demo
extra, then scores each map against the labelled object box:

* pointing game (Zhang et al. 2016): a hit when the map's peak lies in the box;
* IoU of the CAM paper's box (``--boxes``: 20% of the max, largest component)
  with the labelled box, and how many reach IoU >= 0.5 (the CAM paper's
  criterion);
* mass/area: the share of the map's mass inside the box over the box's share of
  the image (above 1: the map is denser on the object than off it).

Each photo is scored twice: for the predicted (top-1) class, which is what
``camx explain`` shows by default, and for the best-ranked class of the
object's family in the top 5 (the labelled classes), which asks whether the
map of the right class points at the object. Not a test: nothing is asserted.

    python bench/localisation.py [--device cuda] [--box-threshold 0.2]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
METHODS = ("cam", "gradcam")
TITLES = {"cam": "CAM", "gradcam": "Grad-CAM"}


def run_camx(images: Path, out: Path, method: str, args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """One ``camx explain`` run in a child process; its manifest lines by file name."""
    command = [
        sys.executable, "-m", "cam_cli", "explain", str(images), "-o", str(out),
        "--model", args.model, "--method", method, "--device", args.device,
        "--target", f"top{args.top}", "--boxes", "--box-threshold", str(args.box_threshold), "-q",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"camx failed ({done.returncode}): {done.stderr.strip()}")
    lines = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    return {Path(r["input"]).name: r for r in lines}


def iou(a: list[int], b: list[int]) -> float:
    """Intersection over union of two ``(x0, y0, x1, y1)`` boxes, x1/y1 exclusive."""
    w = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h
    return w * h / union if union else 0.0


def score(norm_map: np.ndarray, box: list[int] | None, label: list[int]) -> dict[str, float]:
    x0, y0, x1, y1 = label
    ys, xs = np.nonzero(norm_map >= norm_map.max() - 1e-6)  # the peak, ties included
    hit = bool(((xs >= x0) & (xs < x1) & (ys >= y0) & (ys < y1)).all())
    share = (x1 - x0) * (y1 - y0) / norm_map.size
    mass = float(norm_map[y0:y1, x0:x1].sum() / norm_map.sum()) if norm_map.sum() > 0 else 0.0
    return {"hit": hit, "iou": iou(box, label) if box is not None else 0.0, "density": mass / share}


def evaluate(args: argparse.Namespace, out: Path) -> list[dict[str, Any]]:
    labels = json.loads(args.labels.read_text())
    images = out / "images"
    images.mkdir(parents=True)
    for name in labels:
        shutil.copy(args.images / name, images / name)
    runs = {m: run_camx(images, out / m, m, args) for m in METHODS}
    rows = []
    for name, label in labels.items():
        targets = runs["cam"][name]["targets"]
        top1 = targets[0]
        family = next((t for t in targets if t["class_name"] in label["classes"]), None)
        row: dict[str, Any] = {"photo": name, "label": label["label"], "top1": top1, "family": family}
        for method in METHODS:
            by_rank = {t["rank"]: t for t in runs[method][name]["targets"]}
            for kind, chosen in (("top1", top1), ("family", family)):
                if chosen is None:
                    row[method, kind] = None
                    continue
                target = by_rank[chosen["rank"]]
                assert target["class_index"] == chosen["class_index"]
                norm_map = np.load(out / method / target["map"])
                row[method, kind] = score(norm_map, target.get("box"), label["box"])
        rows.append(row)
    return rows


def percent(part: int, whole: int) -> str:
    return f"{part}/{whole} ({100 * part / whole:.0f}%)" if whole else "-"


def report(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines = [
        f"camx localisation: {args.model} on {len(rows)} hand-labelled photos, "
        f"box threshold {args.box_threshold:.2f} of the max, device {args.device}",
        "",
        "| photo (object) | top-1 (p) | object's class (rank) | method | hit | IoU | mass/area | top-1 hit, IoU |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        top1, family = row["top1"], row["family"]
        predicted = f"{top1['class_name']} ({top1['score']:.2f})"
        own = f"{family['class_name']} (#{family['rank']})" if family else f"none in top {args.top}"
        for method in METHODS:
            s = row[method, "family"]
            hit = ("yes" if s["hit"] else "no") if s else "-"
            value = f"{s['iou']:.2f}" if s else "-"
            density = f"{s['density']:.2f}" if s else "-"
            t = row[method, "top1"]
            top1_cells = (
                "same class"
                if family is not None and family["rank"] == 1
                else f"{'yes' if t['hit'] else 'no'}, {t['iou']:.2f}"
            )
            cells = [
                f"{row['photo']} ({row['label']})",
                predicted,
                own,
                TITLES[method],
                hit,
                value,
                density,
                top1_cells,
            ]
            lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "hit, IoU and mass/area are for the object's class; the last column scores the top-1 class where it differs.",
        "",
        "| method | class explained | pointing game | mean IoU | IoU >= 0.5 | mean mass/area |",
        "|---|---|---|---|---|---|",
    ]
    for method in METHODS:
        for kind, title in (("top1", "top-1"), ("family", "object's")):
            scores = [row[method, kind] for row in rows if row[method, kind] is not None]
            n = len(scores)
            hits = sum(s["hit"] for s in scores)
            good = sum(s["iou"] >= 0.5 for s in scores)
            mean_iou = f"{np.mean([s['iou'] for s in scores]):.2f}" if n else "-"
            density = f"{np.mean([s['density'] for s in scores]):.2f}" if n else "-"
            missing = f" (of {len(rows)}; {len(rows) - n} without)" if n < len(rows) else ""
            cells = [TITLES[method], title + missing, percent(hits, n), mean_iou, percent(good, n), density]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=Path, default=ROOT / "sample_images", help="folder with the photos")
    parser.add_argument("--labels", type=Path, default=ROOT / "tests" / "data" / "boxes.json", help="hand labels")
    parser.add_argument("--model", default="efficientnet_lite0", help="an ImageNet model camx can load")
    parser.add_argument("--device", default="cpu", help="camx --device")
    parser.add_argument("--box-threshold", type=float, default=0.2, help="camx --box-threshold")
    parser.add_argument("--top", type=int, default=5, help="how deep to look for the object's class")
    parser.add_argument("--keep", type=Path, help="write camx's outputs here (kept) instead of a temporary folder")
    args = parser.parse_args()
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
        rows = evaluate(args, Path(tempfile.mkdtemp(dir=args.keep)))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            rows = evaluate(args, Path(tmp))
    print(report(rows, args))


if __name__ == "__main__":
    main()

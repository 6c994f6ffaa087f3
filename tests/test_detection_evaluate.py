"""``camx evaluate`` and ``camx report`` on a detection run, through the real CLI, on real image
files and a calibrated random Faster R-CNN placed where torchvision's cache looks.

Each detection's map is scored by that detection's score as the model finds it again in the
perturbed input (same label, highest IoU >= 0.5, else 0): the deletion AUC is recomputed here
from the rule, one image at a time, with a matching written from the rule; the pointing game
and box IoU use the detection's own box without ground truth, and ``--boxes-from`` still wins.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from test_detection_parity import CASES, place_checkpoint
from test_detection_readout import reference_match
from test_report import page_data

from cam_cli.cli import main as cli_main
from cam_cli.images import decode_image
from cam_cli.models.detection import load_detector, lower_threshold
from cam_cli.report import build_report

pytestmark = pytest.mark.slow

MODEL = "fasterrcnn_mobilenet_v3_large_320_fpn"
MIN_SCORE = CASES[MODEL][2]
#: two images of different sizes (the model resizes both to 320 x 480)
SIZES = {"a.png": (240, 360), "b.png": (200, 300)}
STEPS = 4


def invoke(*args: object) -> object:
    result = CliRunner().invoke(cli_main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def latest(out: Path) -> dict[tuple[str, str, str | None], dict]:
    """The lines of ``OUT/metrics.jsonl`` by (key, method, variant), a later line winning."""
    return {(m["key"], m["method"], m.get("variant")): m for m in read_jsonl(out / "metrics.jsonl")}


def detection_run(tmp_path: Path, methods: str) -> tuple[Path, Path]:
    place_checkpoint(MODEL, CASES[MODEL][1])
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(3)
    for name, (height, width) in SIZES.items():
        small = rng.integers(0, 256, size=(height // 8, width // 8, 3), dtype=np.uint8)
        Image.fromarray(small).resize((width, height), Image.BILINEAR).save(folder / name)
    out = tmp_path / "out"
    invoke("explain", folder, "--model", MODEL, "--weights", "DEFAULT", "--min-score", MIN_SCORE,
           "--max-detections", "2", "--method", methods, "--batch-size", "1", "-o", out, "-q")  # fmt: skip
    return folder, out


def deletion_by_hand(module: torch.nn.Module, image: torch.Tensor, heat: np.ndarray, box: list[float],
                     label: int) -> float:  # fmt: skip
    """RISE's deletion AUC of one map: positions by the map, highest first (stable), replaced by
    zeros at torchcam's counts; the curve is the detection's matched score; trapezoid on k / P."""
    positions = heat.size
    step = -(-positions // STEPS)
    counts = [*range(0, positions, step), positions]
    order = np.argsort(-heat.flatten(), kind="stable")
    curve = []
    for k in counts:
        keep = np.ones(positions, dtype=np.float32)
        keep[order[:k]] = 0
        x = image * torch.from_numpy(keep.reshape(heat.shape))
        with torch.inference_mode():
            (output,) = module([x])
        curve.append(reference_match(output, box, label))
    return float(np.trapezoid(curve, np.array(counts) / positions))


def test_evaluate_scores_each_detection_by_its_match(tmp_path: Path) -> None:
    folder, out = detection_run(tmp_path, "gradcam,eigencam")
    manifest = read_jsonl(out / "manifest.jsonl")
    detections = [r for r in manifest if r["method"] == "gradcam"]
    assert {r["key"] for r in detections} == set(SIZES) and all(r.get("det_box") for r in detections)
    result = invoke("evaluate", out, "--metrics", "deletion,insertion,confidence,pointing,iou", "--steps", STEPS,
                    "--workers", "0", "--device", "cpu", "--json")  # fmt: skip
    summary = json.loads(next(line for line in result.output.splitlines() if line.startswith("{")))
    assert summary["failed"] == 0 and summary["done"] == len(detections) + len(SIZES), summary
    per_method = summary["summary"]["methods"]  # every detection of a method in one row
    assert set(per_method) == {"gradcam", "eigencam"}
    assert (per_method["gradcam"]["n"], per_method["eigencam"]["n"]) == (len(detections), len(SIZES))
    lines = latest(out)
    module = load_detector(MODEL, "DEFAULT").module
    lower_threshold(module, MIN_SCORE)
    for record in detections:
        line = lines[(record["key"], "gradcam", record["variant"])]
        assert line["status"] == "ok" and line["class_index"] == record["class_index"]
        # the unperturbed image finds the detection itself again
        assert line["score"] == pytest.approx(record["score"], abs=1e-4)
        heat = np.load(out / record["map"])
        image = torch.from_numpy(decode_image(folder / record["key"])).permute(2, 0, 1).float() / 255
        assert heat.shape == tuple(image.shape[1:])
        expected = deletion_by_hand(module, image, heat, record["det_box"], record["class_index"])
        assert line["deletion_auc"] == pytest.approx(expected, abs=1e-4), record["variant"]
        x0, y0, x1, y1 = record["det_box"]
        ys, xs = np.nonzero(heat >= heat.max())
        inside = bool(((xs >= x0) & (xs < x1) & (ys >= y0) & (ys < y1)).all())
        assert line["pointing_hit"] is inside and line["boxes"] == "detections"
        assert 0 <= line["iou"] <= 1
    for key in SIZES:  # a class-agnostic map: scored for its image's top detection
        top = next(r for r in detections if r["key"] == key and r["variant"] == "det0")
        line = lines[(key, "eigencam", None)]
        assert line["class_index"] == top["class_index"] and line["score"] == pytest.approx(top["score"], abs=1e-4)
    # ground-truth boxes win over the detections' own: a box of the whole of a.png holds every peak
    boxes = tmp_path / "boxes.csv"
    boxes.write_text("key,x0,y0,x1,y1\na.png,0,0,360,240\n")
    invoke("evaluate", out, "--metrics", "pointing", "--boxes-from", boxes, "--workers", "0", "-q")
    for line in latest(out).values():
        assert line["pointing_hit"] is (True if line["key"] == "a.png" else None), line
        assert line["boxes"] != "detections"
    refused = CliRunner().invoke(cli_main, ["evaluate", str(out), "--metrics", "random-logit"])
    assert refused.exit_code != 0 and "random-logit does not score detection runs" in refused.output
    # the report: each image under every class it has a detection of, each detection's box shown
    data = page_data(build_report(out))
    by_key = {item["k"]: item for item in data["items"]}
    for key in SIZES:
        names = sorted({r["class_name"] for r in detections if r["key"] == key})
        classes = by_key[key].get("cs", [by_key[key].get("c")])
        assert sorted(data["classes"][c] for c in classes) == names
        boxes = [e["b"] for e in by_key[key]["m"] if "b" in e]
        assert sorted(boxes) == sorted(r["det_box"] for r in detections if r["key"] == key)

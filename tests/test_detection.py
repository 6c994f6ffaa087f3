"""Detection models: targets, the way maps come back to the image's pixels, IoU matching,
a map's peak on a known object, refusals, and the CLI's outputs, manifest and resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from PIL import Image
from torch import nn
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from cam_cli.cli import main as cli_main
from cam_cli.images import decode_image
from cam_cli.methods import create
from cam_cli.methods.base import TargetLayer
from cam_cli.methods.detection import DetectionExplainer, DetectionTargets, matched_scores, to_image
from cam_cli.methods.explain import finish_at

MODEL = "fasterrcnn_mobilenet_v3_large_320_fpn"


def run_camx(*args: str) -> object:
    result = CliRunner().invoke(cli_main, [str(a) for a in args], catch_exceptions=False)
    return result


def read_lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def test_targets_choose_by_score_class_and_rank() -> None:
    scores = torch.tensor([0.3, 0.9, 0.6, 0.55, 0.8])
    labels = torch.tensor([1, 2, 1, 3, 1])
    assert DetectionTargets(min_score=0.5).select(scores, labels).tolist() == [1, 4, 2, 3]
    assert DetectionTargets(min_score=0.5, max_detections=2).select(scores, labels).tolist() == [1, 4]
    assert DetectionTargets(min_score=0.5, label=1).select(scores, labels).tolist() == [4, 2]
    assert DetectionTargets(min_score=0.0, top=1).select(scores, labels).tolist() == [1]


def test_to_image_without_padding_is_the_usual_finish() -> None:
    maps = torch.rand(2, 10, 15, generator=torch.Generator().manual_seed(0))
    ours = to_image(maps, (320, 480), (320, 480), (200, 300))
    usual = finish_at(maps[None], (200, 300))[0]
    assert torch.allclose(ours, usual, atol=1e-5)


def test_to_image_crops_the_padding() -> None:
    """A map over a padded batch: only the part the image covers comes back, resized."""
    maps = torch.rand(1, 12, 16, generator=torch.Generator().manual_seed(1))
    ours = to_image(maps, (192, 200), (192, 256), (96, 100))
    padded = F.interpolate(maps[None], size=(192, 256), mode="bilinear", align_corners=False)
    expected = finish_at(padded[:, :, :192, :200], (96, 100))[0]
    assert torch.allclose(ours, expected, atol=0.02)  # one resampling instead of two
    assert not torch.allclose(ours, finish_at(maps[None], (96, 100))[0], atol=0.05)  # padding not cropped


def test_matched_scores_by_label_and_iou() -> None:
    output = {
        "boxes": torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 12], [50, 50, 60, 60]]),
        "labels": torch.tensor([2, 1, 1]),
        "scores": torch.tensor([0.9, 0.7, 0.8]),
    }
    boxes = torch.tensor([[0.0, 0, 10, 10], [50, 50, 60, 60], [0, 0, 10, 10], [20, 20, 30, 30]])
    labels = torch.tensor([1, 1, 3, 1])
    # same label, best IoU (10/12 >= 0.5); exact box; no such label; no overlap
    assert matched_scores(output, boxes, labels).tolist() == pytest.approx([0.7, 0.8, 0.0, 0.0])


class BrightestCell(nn.Module):
    """A deterministic detector: one box per image, the 16x16 cell (of the resized,
    padded batch) of greatest mean brightness, scored ``sigmoid(10 b - 5)``."""

    def __init__(self) -> None:
        super().__init__()
        self.transform = GeneralizedRCNNTransform(128, 256, [0.0] * 3, [1.0] * 3, size_divisible=32)
        self.backbone = nn.Sequential(nn.Conv2d(3, 2, 16, stride=16))
        with torch.no_grad():
            self.backbone[0].weight.zero_()
            self.backbone[0].weight[0].fill_(1 / (3 * 256))
            self.backbone[0].bias.copy_(torch.tensor([0.0, 1.0]))
        self.eval().requires_grad_(False)

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        sizes = [(int(i.shape[-2]), int(i.shape[-1])) for i in images]
        batch, _ = self.transform(images)
        features = self.backbone(batch.tensors)
        width = features.shape[-1]
        found = []
        for n, (h, w) in enumerate(batch.image_sizes):
            scores = torch.sigmoid(features[n, 0, : h // 16, : w // 16] * 10 - 5)
            best = int(scores.flatten().argmax())
            y, x = divmod(best, scores.shape[1])
            box = torch.tensor([[x * 16.0, y * 16.0, x * 16.0 + 16, y * 16.0 + 16]])
            found.append({"boxes": box, "labels": torch.tensor([1]), "scores": scores.flatten()[best : best + 1]})
        assert width * 16 == batch.tensors.shape[-1]
        return self.transform.postprocess(found, batch.image_sizes, sizes)


def test_peak_falls_on_the_bright_object(tmp_path: Path) -> None:
    """A 300x210 image, resized to 182x128 and padded to 192x128 inside the model: the map's
    peak, brought back through both, lies on the object (ignoring the padding would put it
    14 pixels to its left)."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 60, size=(210, 300, 3), dtype=np.uint8)
    pixels[120:160, 268:292] = 255
    path = tmp_path / "spot.png"
    Image.fromarray(pixels).save(path)
    image = torch.from_numpy(decode_image(path)).permute(2, 0, 1).float() / 255
    methods = [create(name) for name in ("gradcam", "layercam", "hirescam")]
    explainer = DetectionExplainer(BrightestCell(), TargetLayer("backbone.0"), methods, DetectionTargets(min_score=0.5))
    result = explainer.explain([image])
    (box,) = result.detections[0].boxes.tolist()
    assert 255 < box[0] < 292 and 110 < box[1] < 160  # the detection is on the object
    for name in ("layercam", "hirescam"):
        heat = result.maps[0][name][0]
        assert tuple(heat.shape) == (210, 300)
        y, x = divmod(int(heat.flatten().argmax()), 300)
        assert 120 <= y < 160 and 268 <= x < 292, (name, y, x)


def test_refuses_methods_and_options_in_one_line(tmp_path: Path) -> None:
    Image.new("RGB", (40, 30)).save(tmp_path / "a.png")
    for extra, words in (
        (["--method", "cam"], "cam cannot explain a detection model: needs a global-average-pooling"),
        (["--method", "iscam"], "iscam cannot explain a detection model"),
        (["--input-size", "224"], "--input-size does not apply to detection models"),
    ):
        result = run_camx("explain", tmp_path / "a.png", "--model", MODEL, "--weights", "NONE", "-o",
                          tmp_path / "out", *extra)  # fmt: skip
        assert result.exit_code != 0
        assert words in result.output, result.output
        assert not (tmp_path / "out").exists()


def test_target_names_classes_ranks_and_refuses_unknown() -> None:
    from cam_cli.errors import ModelError
    from cam_cli.jobs.detect.run import parse_detection_target
    from cam_cli.models.detection import Detector

    detector = Detector(nn.Identity(), MODEL, "NONE", ["__background__", "person", "bicycle", "car"])
    assert parse_detection_target(None, detector, 0.5, 10) == DetectionTargets("all", 0.5, 10)
    assert parse_detection_target("Car", detector, 0.3, 10).label == 3
    assert parse_detection_target("2", detector, 0.3, 10).label == 2
    assert parse_detection_target("top3", detector, 0.3, 10).limit == 3
    with pytest.raises(ModelError, match="did you mean 'person'"):
        parse_detection_target("persn", detector, 0.5, 10)


@pytest.mark.slow
def test_image_without_detections_resumes(tmp_path: Path) -> None:
    """No detection over --min-score: one line that says so (no files), and a re-run skips it;
    the class-agnostic method still writes its one map."""
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    args = ["explain", tmp_path / "a.png", "--model", MODEL, "--weights", "NONE", "--min-score", "0.9",
            "--method", "gradcam,eigencam", "-o", tmp_path / "out", "--json"]  # fmt: skip
    result = run_camx(*args)
    assert result.exit_code == 0, result.output
    lines = {r["method"]: r for r in read_lines(tmp_path / "out")}
    assert lines["gradcam"]["variant"] == "det-none" and lines["gradcam"]["detections"] == 0
    assert lines["gradcam"]["map"] is None and lines["gradcam"]["task"] == "detection"
    assert lines["eigencam"]["detections"] == 0 and (tmp_path / "out" / lines["eigencam"]["map"]).is_file()
    again = run_camx(*args)
    assert again.exit_code == 0, again.output
    assert json.loads(again.output.strip().splitlines()[-1])["skipped"] == 1


@pytest.mark.slow
def test_models_and_layers_list_detection_models() -> None:
    from cam_cli.models.detection import default_layer, detection_models, listed_default_layer, load_detector

    rows = [json.loads(line) for line in run_camx("models", "--json", "*rcnn*").output.splitlines()]
    assert {r["model"] for r in rows if r.get("task") == "detection"} >= {MODEL, "maskrcnn_resnet50_fpn"}
    for name in detection_models():  # the table camx models prints equals the structural choice
        assert listed_default_layer(name) == default_layer(load_detector(name, "NONE").module)[0], name
    result = run_camx("layers", MODEL)
    assert result.exit_code == 0, result.output
    (marked,) = [line for line in result.output.splitlines() if "(default" in line]
    assert marked.startswith("backbone.body.16 ") and "every FPN level" in marked


@pytest.mark.parametrize("name", ["scorecam", "ablationcam", "sscam"])
def test_perturbation_methods_find_the_bright_object_through_the_padding(tmp_path: Path, name: str) -> None:
    """Score-CAM and Ablation-CAM on a padded batch: each masked or ablated copy is scored by the
    detection matched to the original box (a black copy's detection lands elsewhere: score 0), so
    the brightness channel gets the weight and the map's peak lies on the object."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 60, size=(210, 300, 3), dtype=np.uint8)
    pixels[120:160, 268:292] = 255
    Image.fromarray(pixels).save(tmp_path / "spot.png")
    image = torch.from_numpy(decode_image(tmp_path / "spot.png")).permute(2, 0, 1).float() / 255
    explainer = DetectionExplainer(BrightestCell(), TargetLayer("backbone.0"), [create(name)],
                                   DetectionTargets(min_score=0.5), batch_size=2)  # fmt: skip
    result = explainer.explain([image])
    heat = result.maps[0][name][0]
    assert tuple(heat.shape) == (210, 300)
    y, x = divmod(int(heat.flatten().argmax()), 300)
    assert 120 <= y < 160 and 268 <= x < 292, (name, y, x)

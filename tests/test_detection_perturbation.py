"""Score-CAM and Ablation-CAM on detection models, made by the real CLI from real files, equal
pytorch-grad-cam's ``ScoreCAM`` and ``AblationCAM`` driven with a target that returns the
matched detection's score alone (same label, highest IoU >= 0.5, else 0), at batch sizes 1
and 3, on a two-stage (Faster R-CNN) and a single-stage (SSDlite) model.

pytorch-grad-cam's own ``FasterRCNNBoxScoreTarget`` adds the IoU to the score and takes the
best IoU over every label before it checks the label, so the reference's target is written
here from the rule; and its ``AblationLayer`` sets a channel to ``min - 1e7`` where the layer
has negative values (MobileNet's), so the reference ablates to 0 as the paper and camx do.
A layer with 16 channels keeps the masked passes few.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from click.testing import CliRunner
from PIL import Image
from test_detection_parity import CASES, place_checkpoint
from test_detection_readout import reference_match

from cam_cli.cli import main as cli_main
from cam_cli.images import decode_image
from cam_cli.models.detection import layer_shapes, load_detector, lower_threshold

pytestmark = pytest.mark.slow

METHODS = ["scorecam", "ablationcam"]
#: model -> a layer of 16 channels
LAYERS = {
    "fasterrcnn_mobilenet_v3_large_320_fpn": "backbone.body.1",
    "ssdlite320_mobilenet_v3_large": "backbone.features.0.1",
}


class MatchedScore:
    """The reference's target: the score of the detection matching ``box`` and ``label``."""

    def __init__(self, box: list[float], label: int) -> None:
        self.box, self.label = box, label

    def __call__(self, output: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.tensor(reference_match(output, self.box, self.label))


def pgc_maps(name: str, paths: list[Path], lines: list[dict], layer: str) -> dict[tuple[str, str, str], np.ndarray]:
    """pytorch-grad-cam's map of every (key, method, variant) of ``lines``, the images in one batch."""
    from pytorch_grad_cam import AblationCAM, ScoreCAM
    from pytorch_grad_cam.ablation_layer import AblationLayer

    class ZeroAblation(AblationLayer):
        def __call__(self, x: torch.Tensor) -> torch.Tensor:  # noqa: ARG002
            for i in range(self.activations.size(0)):
                self.activations[i, self.indices[i], :] = 0
            return self.activations

    module = load_detector(name, "DEFAULT").module
    lower_threshold(module, CASES[name][2])
    x = torch.stack([torch.from_numpy(decode_image(p)).permute(2, 0, 1).float() / 255 for p in paths])
    keys = [p.name for p in paths]
    found = {}
    for method in METHODS:
        by_key = {(r["key"], r["variant"]): r for r in lines if r["method"] == method}
        for variant in sorted({v for _, v in by_key}):
            rows = [by_key[(k, variant)] for k in keys]
            targets = [MatchedScore(r["det_box"], r["class_index"]) for r in rows]
            if method == "scorecam":
                cam = ScoreCAM(model=module, target_layers=[module.get_submodule(layer)])
            else:
                cam = AblationCAM(model=module, target_layers=[module.get_submodule(layer)],
                                  ablation_layer=ZeroAblation(), batch_size=16)  # fmt: skip
            with cam:
                maps = cam(input_tensor=x, targets=targets)
            found.update({(k, method, variant): maps[i] for i, k in enumerate(keys)})
    return found


def explain(folder: Path, out: Path, name: str, batch: int) -> list[dict]:
    result = CliRunner().invoke(cli_main, ["explain", str(folder), "--model", name, "--weights", "DEFAULT",
                                           "--min-score", str(CASES[name][2]), "--max-detections", "2",
                                           "--layer", LAYERS[name], "--method", ",".join(METHODS),
                                           "--batch-size", str(batch), "-o", str(out), "-q"])  # fmt: skip
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("name", list(LAYERS))
def test_scorecam_and_ablationcam_equal_pytorch_grad_cam(name: str, tmp_path: Path) -> None:
    (height, width), scale, _ = CASES[name]
    place_checkpoint(name, scale)
    shapes = {layer: shape for layer, _, shape in layer_shapes(load_detector(name, "DEFAULT").module)}
    assert shapes[LAYERS[name]][1] == 16
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(3)
    paths = []
    for i in range(3):
        small = rng.integers(0, 256, size=(height // 8, width // 8, 3), dtype=np.uint8)
        paths.append(folder / f"im{i}.png")
        Image.fromarray(small).resize((width, height), Image.BILINEAR).save(paths[-1])
    three = explain(folder, tmp_path / "b3", name, 3)
    assert {r["variant"] for r in three} == {"det0", "det1"}, "every image should have two detections"
    one = explain(folder, tmp_path / "b1", name, 1)
    assert all(r["weights"].startswith(type(torchvision.models.get_model_weights(name).DEFAULT).__name__)
               for r in three)  # fmt: skip
    reference = pgc_maps(name, paths, three, LAYERS[name])
    flat = 0
    for lines, out in ((three, tmp_path / "b3"), (one, tmp_path / "b1")):
        assert len(lines) == len(three)
        for r in lines:
            ours = np.load(out / r["map"])
            theirs = reference[(r["key"], r["method"], r["variant"])]
            assert ours.shape == (height, width)
            assert np.abs(ours - theirs).max() < 1e-4, (r["method"], r["key"], r["variant"])
            flat += bool(r.get("flat"))
    assert flat < len(three), "the maps should not all be flat"


def test_sscam_without_noise_is_scorecam(tmp_path: Path) -> None:
    """SS-CAM averages Score-CAM's scores over noisy masks: with noise 0 its detection maps are
    Score-CAM's (the averaged, pinned passes), and its settings record the noise."""
    name = "fasterrcnn_mobilenet_v3_large_320_fpn"
    (height, width), scale, min_score = CASES[name]
    place_checkpoint(name, scale)
    folder = tmp_path / "imgs"
    folder.mkdir()
    small = np.random.default_rng(4).integers(0, 256, size=(height // 8, width // 8, 3), dtype=np.uint8)
    Image.fromarray(small).resize((width, height), Image.BILINEAR).save(folder / "a.png")
    maps = {}
    for std in ("0",):
        out = tmp_path / f"std{std}"
        args = ["explain", str(folder), "--model", name, "--weights", "DEFAULT", "--min-score", str(min_score),
                "--max-detections", "2", "--layer", LAYERS[name], "--method", "scorecam,sscam",
                "--noise-samples", "2", "--noise-std", std, "-o", str(out), "-q"]  # fmt: skip
        result = CliRunner().invoke(cli_main, args)
        assert result.exit_code == 0, result.output
        lines = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
        assert {r["variant"] for r in lines} == {"det0", "det1"}
        assert all(r["noise_std"] == float(std) for r in lines if r["method"] == "sscam")
        maps[std] = {(r["method"], r["variant"]): np.load(out / r["map"]) for r in lines}
    for variant in ("det0", "det1"):
        assert np.abs(maps["0"][("sscam", variant)] - maps["0"][("scorecam", variant)]).max() < 1e-5

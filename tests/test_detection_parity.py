"""camx's detection maps, made by the real CLI from real files with a checkpoint placed where
torchvision's cache looks, equal pytorch-grad-cam's with a target returning the detection's
score (the one of the same label with the highest IoU, as camx matches it), at batch sizes 1
and 3, on a two-stage (Faster R-CNN) and a single-stage (SSDlite) model; and the run resumes.

The seeded random models are made usable first: torchvision's random MobileNet shrinks its
activations by ~1e-8 through BatchNorms whose running statistics are the identity, so the
BatchNorms are calibrated on two seeded noise images, and the classifier's weights scaled so
that scores differ. Without that, maps are ~1e-13 and pytorch-grad-cam's 1e-7 in its
normalisation, not the model, decides them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from click.testing import CliRunner
from PIL import Image
from torch import nn

from cam_cli.cli import main as cli_main
from cam_cli.images import decode_image
from cam_cli.methods.detection import matched_scores
from cam_cli.models.base import checkpoint_dir
from cam_cli.models.detection import default_layer, load_detector, lower_threshold

pytestmark = pytest.mark.slow

GRADIENT = ["gradcam", "gradcam++", "xgradcam", "layercam", "hirescam", "gradcam-elementwise", "eigengradcam"]
AGNOSTIC = ["eigencam", "fem"]
#: model -> (image size (H, W), head scale, --min-score)
CASES = {
    "fasterrcnn_mobilenet_v3_large_320_fpn": ((320, 480), 5.0, 0.02),
    "ssdlite320_mobilenet_v3_large": ((240, 360), 1.0, 0.02),
}


def calibrated_state(name: str, scale: float) -> dict[str, torch.Tensor]:
    """The seeded random model with its BatchNorms' statistics taken from two noise images
    and its classification weights scaled by ``scale``."""
    module = load_detector(name, "NONE", seed=0).module
    norms = [m for m in module.modules() if isinstance(m, nn.BatchNorm2d)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a plain average over the calibration batch
        norm.train()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        module([torch.rand(3, 320, 480, generator=generator) for _ in range(2)])
        for norm in norms:
            norm.eval()
            norm.momentum = 0.1
        for key, parameter in module.named_parameters():
            if "cls_score" in key or "classification_head" in key:
                parameter.mul_(scale)
    return module.state_dict()


def place_checkpoint(name: str, scale: float) -> None:
    """The calibrated weights, saved where torchvision's cache looks for DEFAULT."""
    weights = torchvision.models.get_model_weights(name).DEFAULT
    target = checkpoint_dir() / os.path.basename(weights.url)
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.save(calibrated_state(name, scale), target)


class ScoreOf:
    """pytorch-grad-cam target: the score of the detection matching ``box`` and ``label``
    in the model's output for one image (same label, highest IoU >= 0.5; else 0)."""

    def __init__(self, box: list[float], label: int) -> None:
        self.box = torch.tensor([box])
        self.label = torch.tensor([label])

    def __call__(self, output: dict[str, torch.Tensor]) -> torch.Tensor:
        return matched_scores(output, self.box, self.label)[0]


def pgc_maps(name: str, images: list[Path], lines: list[dict], layer: str,
             min_score: float) -> dict[tuple[str, str, str], np.ndarray]:  # fmt: skip
    """pytorch-grad-cam's map for every (key, method, variant) of ``lines`` (one batch)."""
    from pytorch_grad_cam import (
        FEM,
        EigenCAM,
        EigenGradCAM,
        GradCAM,
        GradCAMElementWise,
        GradCAMPlusPlus,
        HiResCAM,
        LayerCAM,
        XGradCAM,
    )
    from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection_with_sign_correction

    class SignCorrectedEigenCAM(EigenCAM):
        """camx's reference for eigencam (docs/methods.md): pytorch-grad-cam's own
        sign-corrected projection, since its EigenCAM keeps LAPACK's arbitrary sign."""

        def get_cam_image(self, input_tensor, target_layer, target_category, activations, grads, eigen_smooth):  # type: ignore[no-untyped-def]
            return get_2d_projection_with_sign_correction(activations)

    class SignCorrectedEigenGradCAM(EigenGradCAM):
        """The same for eigengradcam: the sign-corrected first component of ``g * A``."""

        def get_cam_image(self, input_tensor, target_layer, target_category, activations, grads, eigen_smooth):  # type: ignore[no-untyped-def]
            return get_2d_projection_with_sign_correction(grads * activations)

    implementations = [GradCAM, GradCAMPlusPlus, XGradCAM, LayerCAM, HiResCAM, GradCAMElementWise,
                       SignCorrectedEigenGradCAM,
                       SignCorrectedEigenCAM, FEM]  # fmt: skip
    classes = dict(zip(GRADIENT + AGNOSTIC, implementations, strict=True))
    module = load_detector(name, "DEFAULT").module
    module.requires_grad_(True)  # pytorch-grad-cam differentiates through the parameters' graph
    lower_threshold(module, min_score)  # as camx does: the model reports detections down to --min-score
    x = torch.stack([torch.from_numpy(decode_image(p)).permute(2, 0, 1).float() / 255 for p in images])
    keys = [p.name for p in images]
    found = {}
    for method, cls in classes.items():
        with cls(model=module, target_layers=[module.get_submodule(layer)]) as cam:
            if method in AGNOSTIC:
                maps = cam(input_tensor=x, targets=[lambda o: o["scores"].sum()] * len(keys))
                found.update({(k, method, ""): maps[i] for i, k in enumerate(keys)})
                continue
            by_key = {(r["key"], r["variant"]): r for r in lines if r["method"] == method}
            for variant in sorted({v for _, v in by_key}):
                rows = [by_key[(k, variant)] for k in keys]
                maps = cam(input_tensor=x, targets=[ScoreOf(r["det_box"], r["class_index"]) for r in rows])
                found.update({(k, method, variant): maps[i] for i, k in enumerate(keys)})
    return found


def explain(images: Path, out: Path, name: str, min_score: float, batch: int) -> list[dict]:
    result = CliRunner().invoke(cli_main, ["explain", str(images), "--model", name, "--weights", "DEFAULT",
                                           "--min-score", str(min_score), "--max-detections", "2",
                                           "--method", ",".join(GRADIENT + AGNOSTIC), "--batch-size", str(batch),
                                           "-o", str(out), "-q"])  # fmt: skip
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("name", list(CASES))
def test_maps_equal_pytorch_grad_cam(name: str, tmp_path: Path) -> None:
    (height, width), scale, min_score = CASES[name]
    place_checkpoint(name, scale)
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(3)
    paths = []
    for i in range(3):
        small = rng.integers(0, 256, size=(height // 8, width // 8, 3), dtype=np.uint8)
        paths.append(folder / f"im{i}.png")
        Image.fromarray(small).resize((width, height), Image.BILINEAR).save(paths[-1])
    three = explain(folder, tmp_path / "b3", name, min_score, 3)
    assert {r["method"] for r in three} == set(GRADIENT + AGNOSTIC)
    assert all(r["weights"].startswith(type(torchvision.models.get_model_weights(name).DEFAULT).__name__)
               for r in three)  # fmt: skip
    categories = torchvision.models.get_model_weights(name).DEFAULT.meta["categories"]
    det_lines = [r for r in three if r["method"] == "gradcam"]
    assert {r["variant"] for r in det_lines} == {"det0", "det1"}, "every image should have two detections"
    for r in det_lines:
        x1, y1, x2, y2 = r["det_box"]
        assert 0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height and r["score"] >= min_score
        assert r["class_name"] == categories[r["class_index"]]
    one = explain(folder, tmp_path / "b1", name, min_score, 1)
    layer = default_layer(load_detector(name, "NONE").module)[0]
    reference = pgc_maps(name, paths, three, layer, min_score)
    for lines, out in ((three, tmp_path / "b3"), (one, tmp_path / "b1")):
        for r in lines:
            ours = np.load(out / r["map"])
            theirs = reference[(r["key"], r["method"], r.get("variant", ""))]
            assert ours.shape == (height, width)
            # XGrad-CAM divides by each channel's activation sum, near 0 for some channels of these
            # calibrated random detectors: float32 rounding reaches ~2e-4 there (as on CLIP's ViT)
            tolerance = 1e-3 if r["method"] == "xgradcam" else 1e-4
            assert np.abs(ours - theirs).max() < tolerance, (r["method"], r["key"], r.get("variant"))
    # resume: the same command finds everything complete and rewrites nothing
    stamps = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "b3").iterdir() if p.suffix in (".jpg", ".npy")}
    methods = ",".join(GRADIENT + AGNOSTIC)
    again = CliRunner().invoke(cli_main, ["explain", str(folder), "--model", name, "--weights", "DEFAULT",
                                          "--min-score", str(min_score), "--max-detections", "2", "--json",
                                          "--method", methods, "-o", str(tmp_path / "b3")])  # fmt: skip
    assert again.exit_code == 0, again.output
    assert json.loads(again.output.strip().splitlines()[-1])["skipped"] == 3
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "b3").iterdir() if p.name in stamps} == stamps

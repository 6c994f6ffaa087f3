"""ARCC against pytorch-grad-cam 1.5's ``ARCC`` itself: the library function on the same
camx Grad-CAM maps of a seeded tiny model with camx's Grad-CAM as its base method, and
``camx evaluate --metrics arcc`` on a real run's maps with pytorch-grad-cam's own Grad-CAM
and HiResCAM as base methods (which explain the masked images again); a softmax target
and its ROAD imputer's noise set to 0 throughout."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from conftest import make_tiny
from helpers import GradCAMRunner
from pytorch_grad_cam import GradCAM, HiResCAM
from pytorch_grad_cam.metrics.arcc import ARCC
from pytorch_grad_cam.metrics.road import NoisyLinearImputer
from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget, ClassifierOutputTarget

from cam_cli import rundir
from cam_cli.cli import main
from cam_cli.images import DEFAULT_MAX_PIXELS, InputImage
from cam_cli.jobs.data import ImageDataset
from cam_cli.jobs.evaluate.dataset import read_map
from cam_cli.methods import TargetLayer
from cam_cli.metrics.arcc import arcc, coherency, combine, complexity
from cam_cli.render import upsample_normalise

SIZE = 32
EVAL_SIZE = 48
FAST = ["--device", "cpu", "--workers", "0"]


def camx_gradcam(model: torch.nn.Module):  # noqa: ANN201
    """camx's Grad-CAM of the given classes as ``(N, S, S)`` maps in [0, 1]."""
    runner = GradCAMRunner(model, model, TargetLayer("features"))

    def explain(x: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        result = runner.explain(x, lambda logits: classes.view(-1, 1).to(logits.device))
        return torch.stack([upsample_normalise(result.maps[i], SIZE, SIZE)[0] for i in range(x.shape[0])])

    return explain


@pytest.mark.slow
def test_arcc_equals_pytorch_grad_cam(monkeypatch: pytest.MonkeyPatch) -> None:
    model = make_tiny(seed=1)
    # smooth images, so that the Grad-CAM maps are not mostly zeros (ROAD's imputer needs kept pixels)
    small = torch.randn(4, 3, 4, 4, generator=torch.Generator().manual_seed(5))
    images = torch.nn.functional.interpolate(small, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    classes = model(images).argmax(1)
    explain = camx_gradcam(model)
    maps = explain(images, classes)
    ours = arcc(images, maps, classes, model, explain, noise=0.0, batch_size=5)

    monkeypatch.setattr(
        NoisyLinearImputer.__init__, "__defaults__", (0.0,) + NoisyLinearImputer.__init__.__defaults__[1:]
    )

    def base_method(input_tensor: torch.Tensor, targets: object) -> np.ndarray:
        return explain(input_tensor, classes).numpy()

    targets = [ClassifierOutputSoftmaxTarget(int(c)) for c in classes]
    theirs = ARCC(base_method)(images, maps.numpy(), targets, model)
    assert np.isfinite(theirs).all()
    np.testing.assert_allclose(ours["arcc"].numpy(), theirs, atol=1e-4)
    assert (ours["arcc"] > 0).all() and (ours["arcc"] <= 1).all()


def test_the_parts_by_hand() -> None:
    maps = np.array([[[0.0, 1.0], [0.5, 0.5]]])
    assert complexity(maps)[0] == pytest.approx(0.5)
    assert coherency(maps, maps)[0] == pytest.approx(1.0, abs=1e-7)
    assert coherency(maps, 1 - maps)[0] == pytest.approx(0.0, abs=1e-7)
    # a harmonic mean: three equal scores give that score; one of zero gives (about) zero
    assert combine(np.array([0.6]), np.array([0.4]), np.array([0.3]))[0] == pytest.approx(0.6, abs=1e-6)
    assert combine(np.array([0.9]), np.array([0.1]), np.array([-0.2]))[0] == pytest.approx(0.0, abs=1e-6)


def model_inputs(out: Path, records: list[dict]) -> torch.Tensor:
    """The images of ``records`` as evaluate feeds them to the model (decoded, resized, normalised)."""
    dataset = ImageDataset([InputImage(Path(r["input"]), r["key"]) for r in records], EVAL_SIZE, DEFAULT_MAX_PIXELS)
    images = torch.stack([dataset[i].image for i in range(len(dataset))]).float() / 255
    mean = torch.tensor(records[0]["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(records[0]["std"]).view(1, 3, 1, 1)
    return (images - mean) / std


def evaluated_maps(out: Path, records: list[dict]) -> np.ndarray:
    """The run's maps of ``records`` as evaluate reads them: the ``.npy`` resized bilinearly to ``S x S``."""
    maps = [torch.from_numpy(read_map(out, r["map"]))[None, None] for r in records]
    resized = [F.interpolate(m, size=(EVAL_SIZE, EVAL_SIZE), mode="bilinear", align_corners=False) for m in maps]
    return torch.cat(resized)[:, 0].numpy()


def pgc_arcc(out: Path, records: list[dict], model: torch.nn.Module, reference: type) -> np.ndarray:
    """pytorch-grad-cam's ARCC of the run's maps of ``records``, its own ``reference`` CAM
    explaining the masked images for each record's class."""
    classes = [int(r["class_index"]) for r in records]
    with reference(model=model, target_layers=[model.features]) as cam:

        def base_method(input_tensor: torch.Tensor, targets: object) -> np.ndarray:
            return cam(input_tensor=input_tensor, targets=[ClassifierOutputTarget(c) for c in classes])

        targets = [ClassifierOutputSoftmaxTarget(c) for c in classes]
        return ARCC(base_method)(model_inputs(out, records), evaluated_maps(out, records), targets, model)


@pytest.mark.slow
def test_evaluate_arcc_equals_pytorch_grad_cam_on_camx_maps(positive_factory: str, sample_dir: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    out = tmp_path / "out"
    args = ["explain", str(sample_dir), "-o", str(out), "--model", positive_factory, "--method", "gradcam,hirescam"]
    result = CliRunner().invoke(main, [*args, "--input-size", str(EVAL_SIZE), *FAST, "-q"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    args = ["evaluate", str(out), "--metrics", "arcc", "--road-noise", "0", "--batch-size", "5", "--json", *FAST]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout.strip().splitlines()[-1])
    lines = {(r["key"], r["method"]): r for r in rundir.read_records(out / "metrics.jsonl")}
    manifest = sorted(rundir.read_records(out / "manifest.jsonl"), key=lambda r: r["key"])
    # pytorch-grad-cam's ARCC: its own Grad-CAM / HiResCAM explain the masked images (of the
    # logit, as camx's), its ROAD scores softmax probabilities, its imputer without noise
    monkeypatch.setattr(
        NoisyLinearImputer.__init__, "__defaults__", (0.0,) + NoisyLinearImputer.__init__.__defaults__[1:]
    )
    model = make_tiny()
    model.fc.weight.abs_()
    model.requires_grad_(True)  # pytorch-grad-cam differentiates through the model's parameters' graph
    for method, reference in (("gradcam", GradCAM), ("hirescam", HiResCAM)):
        records = [r for r in manifest if r["method"] == method]
        theirs = pgc_arcc(out, records, model, reference)
        ours = np.array([lines[(r["key"], method)]["arcc"] for r in records], dtype=np.float64)
        assert np.isfinite(theirs).all() and len(ours) == 4
        np.testing.assert_allclose(ours, theirs, atol=1e-4, err_msg=method)
    # one registry entry: the summary's mean, interval and rank, higher is better
    summary = payload["summary"]["methods"]
    stat = summary["gradcam"]["metrics"]["arcc"]
    assert stat["n"] == 4 and stat["better"] == "higher" and stat["low"] <= stat["mean"] <= stat["high"]
    assert {summary[m]["rank"] for m in summary} <= {1, 2}
    # every pass: the image and ROAD's 8 a line, and each line's masked image explained again
    assert payload["forward_passes"] == 8 * (1 + 8) + 8
    # the table and the report read the same entry (a re-run only summarises: every line holds)
    args = ["evaluate", str(out), "--metrics", "arcc", "--road-noise", "0", "-q", *FAST]
    shown = CliRunner().invoke(main, args, catch_exceptions=False)
    assert shown.exit_code == 0 and "| ARCC ↑ |" in shown.stdout, shown.output
    from cam_cli.report import build_report

    page = build_report(out).read_text("utf-8")
    data = json.loads(re.search(r'<script type="application/json" id="camx-data">(.*?)</script>', page, re.S)[1])
    table = data["metrics"]
    assert table["names"] == ["arcc"] and table["titles"]["arcc"] == "ARCC" and table["better"]["arcc"] == "higher"

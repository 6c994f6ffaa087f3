"""Segmentation models: loading, their target (the sum of a class's logits over the pixels the
model assigns to it), every gradient and activation method against pytorch-grad-cam 1.5.7 with
its ``SemanticSegmentationTarget`` on the predicted mask, and the run end to end."""

from __future__ import annotations

import copy
import json
import os
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from click.testing import CliRunner
from PIL import Image
from test_method_parity import sign_corrected_projection

from cam_cli.cli import main
from cam_cli.errors import ModelError
from cam_cli.methods import BatchExplainer, MethodOptions, Setup, create, info
from cam_cli.models import Classifier, checkpoint_dir, load_classifier
from cam_cli.probe import default_target, resolve_target, run_probe
from cam_cli.render import upsample_normalise
from cam_cli.targets import parse_target

SIZE = 64
MODEL = "lraspp_mobilenet_v3_large"


def seeded_lraspp() -> Classifier:
    """LR-ASPP with seeded random weights whose class scores vary across the image (its two
    class convolutions scaled up), so that the predicted mask holds several classes."""
    classifier = load_classifier(MODEL, "NONE", input_size=SIZE)
    with torch.no_grad():
        for name in ("classifier.low_classifier", "classifier.high_classifier"):
            classifier.module.get_submodule(name).weight.mul_(30)
    return classifier


@pytest.fixture(scope="module")
def lraspp() -> Classifier:
    return seeded_lraspp()


class Out(torch.nn.Module):
    """The model's ``out`` tensor, as pytorch-grad-cam's segmentation tutorial wraps it."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)["out"]


def ours(classifier: Classifier, name: str, x: torch.Tensor, target: str, layer: str | None = None):  # noqa: ANN201
    probe = run_probe(classifier)
    where = resolve_target(probe, layer) if layer else default_target(probe)
    method = create(name, MethodOptions())
    method.prepare(Setup(probe, where, classifier.module, classifier.logits, torch.device("cpu"), (where,)))
    explainer = BatchExplainer(classifier.logits, classifier.module, where, [method], readout=classifier.readout)
    spec = parse_target(target, classifier, 21)
    result = explainer.explain(x, spec.chooser(classifier.readout.ranking))  # type: ignore[union-attr]
    maps = result.maps[name]
    finished = np.stack([upsample_normalise(maps[i], SIZE, SIZE).numpy() for i in range(len(x))])  # (N, R, S, S)
    return finished, result.classes_of(method), where, result


def theirs(classifier: Classifier, name: str, x: torch.Tensor, classes: torch.Tensor, layer: str) -> np.ndarray:
    """pytorch-grad-cam's maps ``(N, R, SIZE, SIZE)``: its ``SemanticSegmentationTarget`` for
    each class with the mask the model predicts on the unperturbed image."""
    import pytorch_grad_cam as pgc
    from pytorch_grad_cam.ablation_layer import AblationLayer
    from pytorch_grad_cam.utils.model_targets import SemanticSegmentationTarget

    class ZeroAblation(AblationLayer):
        """Sets the channel to 0 (camx's and the paper's); pgc's own sets min - 1e7 where the
        activation has negative values, as MobileNet's linear bottlenecks do."""

        def __call__(self, x: torch.Tensor) -> torch.Tensor:  # noqa: ARG002
            for i in range(self.activations.size(0)):
                self.activations[i, self.indices[i], :] = 0
            return self.activations

    model = copy.deepcopy(classifier.module).requires_grad_(True)
    with torch.no_grad():
        predicted = model(x)["out"].argmax(dim=1)
    cls = {"gradcam": pgc.GradCAM, "gradcam++": pgc.GradCAMPlusPlus, "xgradcam": pgc.XGradCAM,
           "layercam": pgc.LayerCAM, "hirescam": pgc.HiResCAM, "gradcam-elementwise": pgc.GradCAMElementWise,
           "eigengradcam": pgc.EigenGradCAM, "shapleycam": pgc.ShapleyCAM, "fullgrad": pgc.FullGrad,
           "eigencam": pgc.EigenCAM, "segeigencam": pgc.SegEigenCAM, "fem": pgc.FEM, "scorecam": pgc.ScoreCAM,
           "ablationcam": pgc.AblationCAM}[name]  # fmt: skip
    extra = {"ablation_layer": ZeroAblation()} if name == "ablationcam" else {}
    layers = [] if name == "fullgrad" else [model.get_submodule(layer)]
    maps = []
    for r in range(classes.shape[1]):
        targets = [
            SemanticSegmentationTarget(int(c), (predicted[i] == int(c)).float().numpy())
            for i, c in enumerate(classes[:, r])
        ]
        with sign_corrected_projection(), cls(model=Out(model), target_layers=layers, **extra) as cam:
            maps.append(cam(input_tensor=x, targets=targets))
    return np.stack(maps, axis=1)


def minmax(a: np.ndarray) -> np.ndarray:
    a = a - a.min()
    return a / a.max() if a.max() > 0 else a


#: every gradient and activation method pytorch-grad-cam has a class for (the rest: their own
#: references in test_method_parity.py, or refused for segmentation: cam, finercam, dff)
PGC = ["gradcam", "gradcam++", "xgradcam", "layercam", "hirescam", "gradcam-elementwise", "eigengradcam",
       "shapleycam", "fullgrad", "eigencam", "segeigencam", "fem"]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize(("n", "target"), [(1, "top1"), (3, "top2")])
@pytest.mark.parametrize("name", PGC)
def test_every_method_equals_pgc_semantic_segmentation_target(lraspp: Classifier, name: str, n: int,
                                                              target: str) -> None:  # fmt: skip
    x = torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(n))
    mine, classes, where, _ = ours(lraspp, name, x, target)
    assert where.name == "backbone.16"  # the backbone's last stage
    if info(name).class_specific:
        assert classes.shape[1] == int(target[3:])
    reference = theirs(lraspp, name, x, classes, where.name)
    for i in range(n):
        for r in range(classes.shape[1]):
            ours_r = mine[i, r] if info(name).class_specific else mine[i, 0]  # agnostic: one map
            np.testing.assert_allclose(ours_r, minmax(reference[i, r]), atol=1e-4, err_msg=f"{name} {i} {r}")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["scorecam", "ablationcam"])
def test_perturbation_methods_keep_the_original_mask_as_pgc(lraspp: Classifier, name: str) -> None:
    x = torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(5))
    layer = "backbone.2"  # 24 channels: 24 masked passes an image
    mine, classes, _, _ = ours(lraspp, name, x, "top1", layer)
    reference = theirs(lraspp, name, x, classes, layer)
    for i in range(3):
        np.testing.assert_allclose(mine[i, 0], minmax(reference[i, 0]), atol=1e-4, err_msg=f"{name} {i}")


def test_the_target_is_the_class_logits_summed_over_its_predicted_region(lraspp: Classifier) -> None:
    x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    targets = lraspp.logits(x)
    with torch.no_grad():
        out = lraspp.module(x)["out"]
    labels = out.argmax(dim=1)
    for i in range(2):
        for c in range(21):
            expected = out[i, c][labels[i] == c].sum()
            torch.testing.assert_close(targets[i, c], expected, rtol=1e-5, atol=1e-4)
    readout = lraspp.readout
    counts = torch.stack([torch.bincount(labels[i].flatten(), minlength=21) for i in range(2)]).float()
    ranking = readout.ranking(targets)  # type: ignore[union-attr]
    assert torch.isinf(ranking[:, 0]).all(), "the background is never a topK target"
    best = counts[:, 1:].argmax(dim=1) + 1
    assert ranking.argmax(dim=1).tolist() == best.tolist()
    probability = out.softmax(dim=1)
    scores = readout.scores(targets)  # type: ignore[union-attr]
    c = int(best[0])
    torch.testing.assert_close(scores[0, c], probability[0, c][labels[0] == c].mean(), rtol=1e-5, atol=1e-6)


def test_loading_by_name_with_its_task_categories_and_size() -> None:
    classifier = load_classifier("lraspp_mobilenet_v3_large", "NONE")
    assert classifier.task == "segmentation"
    assert classifier.input_size == 520  # torchvision's segmentation transforms resize to 520
    assert classifier.categories is not None and classifier.categories[15] == "person"
    assert parse_target("person", classifier, 21).index == 15
    with pytest.raises(ModelError, match="between 1 and 21"):
        parse_target("top22", classifier, 21)


def test_a_checkpoint_where_torchvision_caches_it_loads_as_default(torch_home: Path, lraspp: Classifier) -> None:
    weights = torchvision.models.get_model_weights(MODEL).DEFAULT
    target = checkpoint_dir() / os.path.basename(weights.url)
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.save(lraspp.module.state_dict(), target)
    loaded = load_classifier(MODEL, "DEFAULT")
    assert loaded.weights == str(weights) and loaded.input_size == 520 and loaded.task == "segmentation"
    assert (loaded.mean, loaded.std) == (tuple(weights.transforms().mean), tuple(weights.transforms().std))
    assert loaded.categories == list(weights.meta["categories"])
    x = torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(loaded.logits(x), lraspp.logits(x))
    assert load_classifier(MODEL, "DEFAULT", input_size=96).input_size == 96  # --input-size overrides
    path = target.parent / "mine.pth"  # a path, no weights enum: ImageNet's normalisation and --input-size
    torch.save(lraspp.module.state_dict(), path)
    own = load_classifier(MODEL, str(path), input_size=SIZE)
    assert own.weights == str(path) and own.input_size == SIZE
    torch.testing.assert_close(own.logits(x), lraspp.logits(x))


BRIGHT_FACTORY = textwrap.dedent(
    """
    import torch
    from torch import nn
    from torchvision.models._utils import IntermediateLayerGetter
    from torchvision.models.segmentation.fcn import FCN

    def build():
        # channel 0 of layer1 fires on bright pixels; class 1 ("bright") follows it, class 0
        # ("background") is a constant, class 2 ("never") is never predicted
        body = nn.Sequential()
        body.add_module("layer1", nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU()))
        with torch.no_grad():
            conv = body.layer1[0]
            conv.weight.zero_()
            conv.weight[0, :, 1, 1] = 1.0
            conv.bias.copy_(torch.tensor([-3.0, 0.1, 0.2, 0.3]))
        head = nn.Conv2d(4, 3, 1)
        with torch.no_grad():
            head.weight.zero_()
            head.weight[1, 0] = 10.0
            head.bias.copy_(torch.tensor([1.0, 0.0, -100.0]))
        return FCN(IntermediateLayerGetter(body, {"layer1": "out"}), head).eval()
    """
)


@pytest.fixture
def bright_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A 120 x 80 dark image with a bright square at x 80..100, y 20..40, a factory building a
    torchvision FCN that assigns bright pixels to class 1, and a labels file."""
    (tmp_path / "brightseg.py").write_text(BRIGHT_FACTORY, encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    pixels = np.full((80, 120, 3), 20, dtype=np.uint8)
    pixels[20:40, 80:100] = 255
    images = tmp_path / "imgs"
    images.mkdir()
    Image.fromarray(pixels).save(images / "bright.png")
    (tmp_path / "labels.txt").write_text("background\nbright\nnever\n", encoding="utf-8")
    return tmp_path


def run(*args: str) -> object:
    return CliRunner().invoke(main, ["explain", *args], catch_exceptions=False)


def lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def test_the_map_peaks_on_the_bright_object_and_the_manifest_records_its_region(bright_dir: Path) -> None:
    out = bright_dir / "out"
    common = ["--model", "brightseg:build", "--labels", "labels.txt", "--input-size", "64", "-o", str(out)]
    result = run("imgs", "--method", "gradcam,eigencam,scorecam", *common)
    assert result.exit_code == 0, result.output  # type: ignore[attr-defined]
    records = {r["method"]: r for r in lines(out)}
    for name, record in records.items():
        assert record["status"] == "ok", record
        assert record["task"] == "segmentation" and record["layer"] == "backbone.layer1"
        heat = np.load(out / record["map"])
        assert heat.shape == (80, 120)
        y, x = np.unravel_index(int(heat.argmax()), heat.shape)
        assert 20 <= y < 40 and 80 <= x < 100, f"{name}: peak at {(x, y)}"
    gradcam = records["gradcam"]
    assert gradcam["class_name"] == "bright" and gradcam["class_index"] == 1
    assert gradcam["region_share"] == pytest.approx(400 / 9600, abs=0.02)  # the square's share, at 64 x 64
    assert 0.99 < gradcam["region_probability"] == gradcam["score"] <= 1.0
    again = run("imgs", "--method", "gradcam,eigencam,scorecam", *common)  # resume: nothing to do
    assert again.exit_code == 0, again.output  # type: ignore[attr-defined]
    assert "1 skipped" in again.output  # type: ignore[attr-defined]
    assert len(lines(out)) == 3


def test_a_class_on_no_pixel_is_a_per_image_error(bright_dir: Path) -> None:
    out = bright_dir / "out"
    result = run("imgs", "--method", "gradcam,eigencam", "--model", "brightseg:build", "--labels", "labels.txt",
                 "--input-size", "64", "--target", "never", "-o", str(out))  # fmt: skip
    assert result.exit_code != 0, result.output  # type: ignore[attr-defined]
    records = {r["method"]: r for r in lines(out)}
    assert records["gradcam"]["status"] == "error"
    assert "no pixel of this image to class 2 (never)" in records["gradcam"]["error"]
    agnostic = records["eigencam"]  # class-agnostic: one map as always, recording the top-1 region
    assert agnostic["status"] == "ok" and agnostic["class_name"] == "bright"
    assert agnostic["region_share"] == pytest.approx(400 / 9600, abs=0.02)


@pytest.mark.parametrize("name", ["cam", "finercam", "dff"])
def test_methods_that_cannot_apply_are_refused_before_the_run(bright_dir: Path, name: str) -> None:
    out = bright_dir / "out"
    result = CliRunner().invoke(main, ["explain", "imgs", "--method", f"gradcam,{name}", "--model", "brightseg:build",
                                       "--input-size", "64", "-o", str(out)])  # fmt: skip
    assert result.exit_code != 0
    assert f"{name} cannot explain a segmentation model" in result.output
    assert len(result.output.strip().splitlines()) == 1 and not out.exists()


def test_classifier_lines_carry_no_segmentation_fields(tiny_factory: str, image_dir: Path) -> None:
    out = image_dir.parent / "out"
    result = run(str(image_dir), "--model", tiny_factory, "--method", "gradcam,eigencam", "-o", str(out))
    assert result.exit_code == 0, result.output  # type: ignore[attr-defined]
    for record in lines(out):
        assert not {"task", "region_share", "region_probability"} & set(record), record
        assert not {"region_share", "region_probability"} & set(record["targets"][0])


def test_models_lists_the_task_and_layers_marks_the_backbone_stage() -> None:
    listed = CliRunner().invoke(main, ["models", "lraspp*", "--json"])
    assert listed.exit_code == 0, listed.output
    row = json.loads(listed.output.splitlines()[0])
    assert (row["task"], row["layer"], row["input_size"]) == ("segmentation", "backbone.16", 520)
    layers = CliRunner().invoke(main, ["layers", MODEL, "--input-size", "64"])
    assert layers.exit_code == 0, layers.output
    default = [line for line in layers.output.splitlines() if line.endswith("(default)")]
    assert len(default) == 1 and default[0].startswith("backbone.16 ")

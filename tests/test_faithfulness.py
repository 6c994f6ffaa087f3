"""pixel-flipping, irof, region-perturbation and faithfulness-correlation: the values
``camx evaluate`` writes for real camx maps (the tiny model, the sample photos) against
Quantus 0.6 itself on the same image, map and model, and the budget guard.

Quantus ranks with numpy's unstable sort, camx with a stable one (ties in raster order):
where the order matters, Quantus is given the map with its ties broken camx's way (a
relabelling that keeps every strict order of the map, so nothing else changes)."""

from __future__ import annotations

import json
import re
import shutil
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from conftest import SAMPLES, make_tiny

from cam_cli import images, rundir
from cam_cli.cli import main
from cam_cli.jobs.data import ImageDataset
from cam_cli.metrics.budget import deletion_insertion_passes, over_budget, passes_per_map
from cam_cli.metrics.faithcorr import subset_seed
from cam_cli.metrics.flipping import patch_ranks
from cam_cli.metrics.irof import mean_fills, segment_order, superpixels
from cam_cli.metrics.options import MetricOptions
from cam_cli.metrics.rise import position_ranks


def reference() -> Any:
    """Quantus 0.6, imported on first use (it takes seconds)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import quantus
    return quantus


SIZE = 48  # 48 * 48 is a multiple of 3, as Quantus's features_in_step = 3 * flip_step needs
FLIP = 48
FAST = ["--device", "cpu", "--workers", "0"]
METRICS = "pixel-flipping,irof,region-perturbation,faithfulness-correlation"


def explain(photos: Path, out: Path) -> None:
    args = ["explain", str(photos), "-o", str(out), "--model", "tinynet_module:build", "--weights", "NONE"]
    args += ["--method", "gradcam,cam", "--input-size", str(SIZE), *FAST, "-q"]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output


def evaluate(out: Path, *extra: str) -> tuple[int, dict, str]:
    args = ["evaluate", str(out), *FAST, "--json", "--metrics", METRICS, "--flip-step", str(FLIP), *extra]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    payload = json.loads(result.stdout.strip().splitlines()[-1]) if result.stdout.strip() else {}
    return result.exit_code, payload, result.stderr


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("samples")
    for photo in sorted(SAMPLES.glob("*.jpg")):
        shutil.copy(photo, target / photo.name)
    return target


@pytest.fixture(scope="module")
def evaluated(photos: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One explain (gradcam and cam on the 4 sample photos) and one evaluate for the module."""
    root = tmp_path_factory.mktemp("faith")
    (root / "tinynet_module.py").write_text(
        f"import sys\nsys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from conftest import make_tiny\ndef build():\n    return make_tiny()\n"
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        patch.syspath_prepend(str(root))
        patch.setenv("TORCH_HOME", str(root / "torch_home"))
        sys.modules.pop("tinynet_module", None)
        out = root / "out"
        explain(photos, out)
        code, _, stderr = evaluate(out, "--patch-size", "8", "--regions", "12", "--corr-runs", "30")
        assert code == 0, stderr
        yield out


@pytest.fixture(autouse=True)
def numpy_trapz(monkeypatch: pytest.MonkeyPatch) -> None:
    """Quantus 0.6 calls ``np.trapz``, which NumPy 2.4 removed: the same rule as ``np.trapezoid``."""
    if not hasattr(np, "trapz"):
        monkeypatch.setattr(np, "trapz", np.trapezoid, raising=False)


def as_seen(out: Path, line: dict, photos: Path) -> tuple[np.ndarray, np.ndarray, int]:
    """The normalised image ``(1, 3, S, S)``, the map ``(S, S)`` and the class, as evaluate saw them."""
    item = ImageDataset([images.InputImage(photos / line["key"], line["key"])], SIZE, images.DEFAULT_MAX_PIXELS)[0]
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1) * 255
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) * 255
    x = (item.image[None].float() - mean) / std
    native = torch.from_numpy(np.load(out / line["map"]))
    resized = F.interpolate(native[None, None], size=(SIZE, SIZE), mode="bilinear", align_corners=False)[0, 0]
    return x.numpy(), resized.numpy(), int(line["class_index"])


def lines_of(out: Path) -> list[dict]:
    lines = list(rundir.read_records(out / "metrics.jsonl"))
    assert len(lines) == 8 and all(line["status"] == "ok" for line in lines)
    return lines


def channel_mask_replacement(arr: np.ndarray, mask: np.ndarray, **kwargs: object) -> np.ndarray:
    """Quantus's ``baseline_replacement_by_mask`` with the mask broadcast to the image's channels."""
    return reference().baseline_replacement_by_mask(arr=arr, mask=np.broadcast_to(mask, arr.shape), **kwargs)


def by_keys(keys: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """A map whose value at each pixel is ``keys[labels]`` divided by the size of its label,
    so that a label's sum is its key (region perturbation ranks patches by their sums)."""
    sizes = np.bincount(labels.ravel(), minlength=len(keys))
    return (keys[labels] / sizes[labels]).astype(np.float64)


@pytest.mark.slow
def test_pixel_flipping_equals_quantus(evaluated: Path, photos: Path) -> None:
    model = make_tiny()
    quantus = reference()
    metric = quantus.PixelFlipping(
        features_in_step=3 * FLIP,
        perturb_baseline="black",
        abs=False,
        normalise=False,
        return_auc_per_sample=True,
        disable_warnings=True,
    )
    for line in lines_of(evaluated):
        x, a, c = as_seen(evaluated, line, photos)
        rank = position_ranks(torch.from_numpy(a)[None])[0].numpy().reshape(SIZE, SIZE)
        ordered = (rank.size - rank).astype(np.float64)[None, None]  # camx's order, no ties
        auc = metric(model=model, x_batch=x, y_batch=np.array([c]), a_batch=ordered, device="cpu")[0]
        steps = SIZE * SIZE // FLIP
        assert line["pixel_flipping_auc"] == pytest.approx(auc / (steps - 1), abs=1e-4)
        assert line["flip_step"] == FLIP


@pytest.mark.slow
def test_region_perturbation_equals_quantus_both_orders(evaluated: Path, photos: Path) -> None:
    model = make_tiny()
    for line in lines_of(evaluated):
        x, a, c = as_seen(evaluated, line, photos)
        for order in ("morf", "lerf"):
            rank, patches = patch_ranks(torch.from_numpy(a)[None], 8, order)
            patch = np.arange(SIZE * SIZE).reshape(SIZE, SIZE) // SIZE // 8 * (SIZE // 8) + np.arange(SIZE) // 8
            keys = np.zeros(patches)
            keys[patch.ravel()] = rank[0].numpy()
            keys = patches - keys if order == "morf" else keys
            metric = reference().RegionPerturbation(
                patch_size=8, regions_evaluation=12, order=order, perturb_baseline="black",
                abs=False, normalise=False, disable_warnings=True,
            )  # fmt: skip
            curve = metric(
                model=model, x_batch=x, y_batch=np.array([c]), a_batch=by_keys(keys, patch)[None, None], device="cpu"
            )[0]
            assert line[f"region_{order}_aopc"] == pytest.approx(np.sum(curve) / 13, abs=1e-4)


@pytest.mark.slow
def test_irof_equals_quantus_one_image_per_batch(evaluated: Path, photos: Path) -> None:
    model = make_tiny()
    # Quantus 0.6's IROF hands its perturb_func a (B, 1, H, W) mask for (B, 3, H, W) images, which
    # baseline_replacement_by_mask refuses: the corrected reference broadcasts the mask over the channels
    quantus = reference()
    metric = quantus.IROF(
        perturb_baseline="mean", perturb_func=channel_mask_replacement, abs=False, normalise=False,
        disable_warnings=True,
    )  # fmt: skip
    for line in lines_of(evaluated):
        x, a, c = as_seen(evaluated, line, photos)
        segments = superpixels(x[0])
        order = segment_order(a, segments)
        keys = np.zeros(segments.max() + 1)
        keys[order] = np.arange(len(order), 0, -1)  # camx's order, highest first, no ties
        aoc = metric(
            model=model, x_batch=x, y_batch=np.array([c]), a_batch=keys[segments][None, None], device="cpu",
            batch_size=1,
        )[0]  # fmt: skip
        assert line["irof"] == pytest.approx(aoc / len(order), abs=1e-4)


@pytest.mark.slow
def test_faithfulness_correlation_reproduces_quantus_under_the_recorded_seed(evaluated: Path, photos: Path) -> None:
    model = make_tiny()
    quantus = reference()
    metric = quantus.FaithfulnessCorrelation(
        nr_runs=30, subset_size=224, perturb_baseline="black", abs=False, normalise=False,
        return_aggregate=False, disable_warnings=True,
    )  # fmt: skip
    for line in lines_of(evaluated):
        x, a, c = as_seen(evaluated, line, photos)
        np.random.seed(subset_seed(line["seed"], f"{line['key']}\0{line['method']}"))
        ours = metric(model=model, x_batch=x, y_batch=np.array([c]), a_batch=a[None, None], device="cpu", softmax=True)
        assert line["faithfulness_correlation"] == pytest.approx(ours[0], abs=1e-4)
        assert line["corr_runs"] == 30 and line["corr_subset"] == 224 and line["seed"] == 0


@pytest.mark.slow
def test_summary_gives_each_statistic_its_direction_and_the_table_shows_it(evaluated: Path) -> None:
    summary = json.loads((evaluated / "metrics-summary.json").read_text())
    better = {
        "pixel_flipping_auc": "lower",
        "irof": "higher",
        "region_morf_aopc": "higher",
        "region_lerf_aopc": "lower",
        "faithfulness_correlation": "higher",
    }
    assert summary["options"]["flip_step"] == FLIP and summary["options"]["corr_runs"] == 30
    for method in ("cam", "gradcam"):
        entry = summary["methods"][method]
        for stat, way in better.items():
            values = [line[stat] for line in lines_of(evaluated) if line["method"] == method]
            assert entry["metrics"][stat]["better"] == way and entry["metrics"][stat]["n"] == 4
            assert entry["metrics"][stat]["mean"] == pytest.approx(np.mean(values), abs=1e-6)
        assert "rank" in entry
    result = CliRunner().invoke(main, ["evaluate", str(evaluated), *FAST, "--metrics", METRICS, "--flip-step", "48",
                                       "--patch-size", "8", "--regions", "12", "--corr-runs", "30", "-q"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert (
        "| pixel flipping AUC ↓ | IROF ↑ | region MoRF AOPC ↑ | region LeRF AOPC ↓ | faith. corr. ↑ |" in result.stdout
    )


@pytest.mark.slow
def test_a_rerun_resumes_and_a_changed_option_redoes_only_its_metric(evaluated: Path, tmp_path: Path) -> None:
    out = tmp_path / "copy"
    shutil.copytree(evaluated, out)
    before = {(line["key"], line["method"]): line for line in lines_of(out)}
    code, payload, stderr = evaluate(out, "--patch-size", "8", "--regions", "12", "--corr-runs", "30")
    assert code == 0, stderr
    assert payload["skipped"] == 8 and payload["forward_passes"] == 0
    code, payload, stderr = evaluate(out, "--patch-size", "8", "--regions", "12", "--corr-runs", "20", "--seed", "3")
    assert code == 0, stderr
    assert payload["done"] == 8 and payload["forward_passes"] == 8 * (1 + 20)  # the clean image and 20 subsets
    for line in lines_of(out):
        old = before[(line["key"], line["method"])]
        assert line["corr_runs"] == 20 and line["seed"] == 3
        for kept in ("pixel_flipping_auc", "irof", "region_morf_aopc", "region_lerf_aopc"):
            assert line[kept] == old[kept]


@pytest.mark.slow
def test_a_reference_budget_is_refused_in_one_line_unless_budget_ok(evaluated: Path, tmp_path: Path) -> None:
    out = tmp_path / "copy"
    shutil.copytree(evaluated, out)
    before = (out / "metrics.jsonl").read_bytes()
    result = CliRunner().invoke(main, ["evaluate", str(out), *FAST, "--metrics", "pixel-flipping"])
    assert result.exit_code == 1, result.output
    message = result.stderr.strip()
    assert len(message.splitlines()) == 1
    assert "pixel-flipping would take 2,304 forward passes per 48x48 map" in message
    assert "--flip-step" in message and "--budget-ok" in message
    assert (out / "metrics.jsonl").read_bytes() == before
    # 24 pixels per step: 96 passes per map, over ten times the 5 of deletion/insertion at --steps 3
    code, payload, stderr = evaluate(out, "--metrics", "pixel-flipping", "--flip-step", "24", "--steps", "3")
    assert code == 1 and "--budget-ok" in stderr
    code, payload, stderr = evaluate(out, "--metrics", "pixel-flipping", "--flip-step", "24", "--steps", "3",
                                     "--budget-ok")  # fmt: skip
    assert code == 0, stderr
    assert payload["forward_passes"] == 8 * (1 + 96)


def test_the_budget_of_each_metric_against_deletion_and_insertion() -> None:
    assert deletion_insertion_passes(224, 20) == 39
    message = over_budget(["irof", "pixel-flipping"], MetricOptions(), 224)
    assert message is not None and message.startswith("pixel-flipping would take 50,176 forward passes per 224x224")
    assert "1287x" in message and "--flip-step" in message and "--budget-ok" in message
    # the references' other budgets fit: IROF ~100, region perturbation 2 x 100, 100 subsets
    assert over_budget(["irof", "region-perturbation", "faithfulness-correlation"], MetricOptions(), 224) is None
    assert over_budget(["pixel-flipping"], MetricOptions(flip_step=256), 224) is None  # 196 passes
    assert passes_per_map("region-perturbation", MetricOptions(patch_size=100), 224) == 2 * 9
    assert passes_per_map("deletion", MetricOptions(), 224) is None


def test_irof_fills_equal_the_mean_of_the_image_replaced_step_by_step() -> None:
    rng = np.random.default_rng(0)
    image = rng.normal(size=(3, 20, 20)).astype(np.float32)
    segments = superpixels(image)
    norm_map = rng.random((20, 20)).astype(np.float32)
    order = segment_order(norm_map, segments)
    assert len(order) == len(np.unique(segments)) > 1
    means = [norm_map[segments == s].mean() for s in order]
    assert all(a >= b for a, b in zip(means, means[1:], strict=False))
    current = image.astype(np.float64).copy()
    expected = []
    for seg in order:
        expected.append(current.mean())
        current[:, segments == seg] = current.mean()
    np.testing.assert_allclose(mean_fills(image, segments, order), expected, rtol=1e-10)


def test_region_patches_follow_quantus_padding() -> None:
    maps = torch.zeros(1, 10, 10)
    maps[0, 0, 0] = 1.0  # padded to 12 x 12, one row and column before: the first patch holds pixels 0..1
    maps[0, 9, 9] = 0.5  # and the last patch pixels 8..9
    rank, patches = patch_ranks(maps, 3, "morf")
    assert patches == 16
    grid = rank[0].view(10, 10)
    assert (grid[:2, :2] == 0).all() and grid[2, 2] != 0  # pixels 0..1 fall in the first patch
    assert (grid[8:, 8:] == 1).all() and grid[7, 7] != 1
    lerf, _ = patch_ranks(maps, 3, "lerf")
    assert int(lerf[0].view(10, 10)[0, 0]) == 15


@pytest.mark.slow
def test_the_report_shows_each_statistic_with_its_title_and_direction(evaluated: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["report", str(evaluated), "-o", str(tmp_path / "report")])
    assert result.exit_code == 0, result.output
    text = (tmp_path / "report" / "index.html").read_text("utf-8")
    match = re.search(r'<script type="application/json" id="camx-data">(.*?)</script>', text, re.S)
    assert match, "no data block in the page"
    table = json.loads(match.group(1))["metrics"]
    summary = json.loads((evaluated / "metrics-summary.json").read_text())
    for name, title, better in (
        ("pixel_flipping_auc", "pixel flipping AUC", "lower"),
        ("irof", "IROF", "higher"),
        ("region_lerf_aopc", "region LeRF AOPC", "lower"),
        ("faithfulness_correlation", "faith. corr.", "higher"),
    ):
        assert table["titles"][name] == title and table["better"][name] == better
        for row in table["rows"]:
            assert row["mean"][name] == pytest.approx(summary["methods"][row["method"]]["metrics"][name]["mean"])

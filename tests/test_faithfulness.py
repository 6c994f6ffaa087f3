"""pixel-flipping, irof, region-perturbation and faithfulness-correlation: the values
``camx evaluate`` writes for real camx maps (the tiny model, the sample photos) against
Quantus 0.6 itself on the same image, map and model, and the budget guard.

Quantus ranks with numpy's unstable sort, camx with a stable one (ties in raster order):
where the order matters, Quantus is given the map with its ties broken camx's way (a
relabelling that keeps every strict order of the map, so nothing else changes)."""

from __future__ import annotations

import json
import shutil
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from conftest import SAMPLES, make_tiny

from cam_cli import images, rundir
from cam_cli.cli import main
from cam_cli.jobs.data import ImageDataset
from cam_cli.metrics.faithcorr import subset_seed
from cam_cli.metrics.flipping import patch_ranks
from cam_cli.metrics.irof import segment_order, superpixels
from cam_cli.metrics.rise import position_ranks

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import quantus

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
    return quantus.baseline_replacement_by_mask(arr=arr, mask=np.broadcast_to(mask, arr.shape), **kwargs)


def by_keys(keys: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """A map whose value at each pixel is ``keys[labels]`` divided by the size of its label,
    so that a label's sum is its key (region perturbation ranks patches by their sums)."""
    sizes = np.bincount(labels.ravel(), minlength=len(keys))
    return (keys[labels] / sizes[labels]).astype(np.float64)


@pytest.mark.slow
def test_pixel_flipping_equals_quantus(evaluated: Path, photos: Path) -> None:
    model = make_tiny()
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
            metric = quantus.RegionPerturbation(
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

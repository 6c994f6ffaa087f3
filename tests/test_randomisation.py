"""``camx evaluate --metrics mprt,random-logit``: the randomisation sanity checks, against
Quantus 0.6's MPRT and RandomLogit themselves on real camx maps of a seeded CNN.

Quantus is fed the same explanation function (``cam_cli.explain``) and, for MPRT, the same
randomised models (its layer generator yields camx's :class:`Randomiser` depths: Quantus
seeds every layer with ``seed + 1``, so layers of one shape get identical weights; camx
gives each block its own seed). Its SSIM flattens the maps to 1-D rows before calling
skimage (``a.reshape(N, -1)``); the papers compare 2-D images, so the reference here is
Quantus's own ``ssim`` called on each 2-D pair (the corrected reference).
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from quantus.functions.similarity_func import correlation_spearman
from quantus.functions.similarity_func import ssim as quantus_ssim

import cam_cli
from cam_cli import rundir
from cam_cli.cli import main
from cam_cli.cli.evaluate import evaluate
from cam_cli.images import DEFAULT_MAX_PIXELS, InputImage
from cam_cli.jobs.data import ImageDataset
from cam_cli.metrics.randomisation import Randomiser, model_blocks, ranks, spearman

sys.path.insert(0, str(Path(__file__).parent))
from conftest import TinyNet, make_tiny  # noqa: E402

SIZE = 64
FAST = ["--device", "cpu", "--workers", "0"]
METHODS = "gradcam,eigencam,scorecam"


def explain_run(images: Path, out: Path, model: str, methods: str = METHODS) -> None:
    args = ["explain", str(images), "-o", str(out), "--model", model, "--method", methods, "--input-size", str(SIZE)]
    result = CliRunner().invoke(main, [*args, *FAST, "-q"], catch_exceptions=False)
    assert result.exit_code == 0, result.output


def evaluate_run(out: Path, *args: str) -> tuple[int, dict, str]:
    result = CliRunner().invoke(evaluate, [str(out), *FAST, "--json", *args], catch_exceptions=False)
    payload = json.loads(result.stdout.strip().splitlines()[-1]) if result.stdout.strip() else {}
    return result.exit_code, payload, result.stderr


def lines_of(out: Path) -> dict[tuple[str, str], dict]:
    return {(r["key"], r["method"]): r for r in rundir.read_records(out / "metrics.jsonl")}


def model_inputs(out: Path, model: torch.nn.Module) -> tuple[list[str], torch.Tensor]:
    """The run's keys and their images as evaluate feeds them to the model (decoded, resized, normalised)."""
    by_key = {r["key"]: r for r in rundir.read_records(out / "manifest.jsonl")}
    records = [by_key[k] for k in sorted(by_key)]
    dataset = ImageDataset([InputImage(Path(r["input"]), r["key"]) for r in records], SIZE, DEFAULT_MAX_PIXELS)
    images = torch.stack([dataset[i].image for i in range(len(dataset))]).float() / 255
    mean = torch.tensor(records[0]["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(records[0]["std"]).view(1, 3, 1, 1)
    return [r["key"] for r in records], (images - mean) / std


def explain_func(method: str):
    """Quantus's explanation function: camx's maps ``(N, 1, S, S)`` of each image's own target."""

    def explain(model, inputs, targets, **_):
        x = torch.as_tensor(np.asarray(inputs), dtype=torch.float32)
        maps = [cam_cli.explain(model, x[i : i + 1], method, target=int(t))[method].maps for i, t in enumerate(targets)]
        return torch.cat(maps)[:, None].numpy()

    return explain


def ssim_2d(a: np.ndarray, b: np.ndarray, batched: bool = False, **_) -> np.ndarray:
    """The corrected reference: Quantus's ssim on each pair of 2-D maps, not on flattened rows
    (and as an array: MPRT calls ``.tolist()`` on it, which Quantus's own batched ssim, a list, lacks)."""
    side = int(round(a.shape[1] ** 0.5))
    return np.array([quantus_ssim(x.reshape(side, side), y.reshape(side, side)) for x, y in zip(a, b, strict=True)])


@pytest.fixture
def tiny_run(tiny_factory: str, sample_dir: Path, tmp_path: Path) -> Path:
    out = tmp_path / "out"
    explain_run(sample_dir, out, tiny_factory)
    return out


def test_blocks_are_quantus_layers_top_down(tiny_model: TinyNet) -> None:
    from quantus.helpers.model.pytorch_model import PyTorchModel

    wrapped = PyTorchModel(tiny_model, channel_first=True)
    theirs = [name for name, _ in wrapped.get_random_layer_generator(order="top_down")]
    assert [name for name, _ in model_blocks(tiny_model)] == theirs == ["fc", "features.2", "features.0"]


def test_randomiser_draws_each_block_with_its_own_initialiser_and_puts_it_back() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 4))
    with torch.no_grad():
        model[1].running_mean.fill_(3.0)
    trained = copy.deepcopy(model.state_dict())
    randomiser = Randomiser(model, seed=7)
    assert randomiser.names == ["2", "1", "0"]
    randomiser.set_depth(2)  # the top two blocks: the last Linear and the BatchNorm
    assert not torch.equal(model[2].weight, trained["2.weight"])
    assert torch.equal(model[1].running_mean, torch.zeros(4))  # BatchNorm's own reset
    assert torch.equal(model[0].weight, trained["0.weight"])
    # two layers of one shape get different weights (Quantus reseeds every layer alike)
    assert not torch.equal(randomiser.random[0]["weight"], randomiser.random[2]["weight"])
    again = Randomiser(copy.deepcopy(model), seed=7)  # the same seed, the same random weights
    assert all(torch.equal(a[k], b[k]) for a, b in zip(randomiser.random, again.random, strict=True) for k in a)
    randomiser.restore()
    assert all(torch.equal(v, trained[k]) for k, v in model.state_dict().items())
    independent = Randomiser(model, seed=7, order="independent")
    independent.set_depth(3)
    assert not torch.equal(model[0].weight, trained["0.weight"])
    assert torch.equal(model[2].weight, trained["2.weight"])


def test_ranks_and_spearman_equal_scipy() -> None:
    from scipy.stats import rankdata, spearmanr

    rng = np.random.default_rng(0)
    a = rng.integers(0, 5, size=(3, 40)).astype(np.float32)  # many ties, as ReLU'd maps have
    b = rng.random((3, 40)).astype(np.float32)
    np.testing.assert_allclose(ranks(torch.from_numpy(a)).numpy(), rankdata(a, axis=1), atol=1e-12)
    reference = [spearmanr(x, y)[0] for x, y in zip(a, b, strict=True)]
    np.testing.assert_allclose(spearman(a, b), reference, atol=1e-12)
    np.testing.assert_allclose(spearman(a, b), correlation_spearman(a, b, batched=True), atol=1e-12)
    assert np.isnan(spearman(np.zeros((1, 5)), b[:1, :5]))[0]


@pytest.mark.slow
def test_mprt_equals_quantus_mprt_on_camx_maps(tiny_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import quantus
    from quantus.helpers.model.pytorch_model import PyTorchModel

    code, payload, err = evaluate_run(tiny_run, "--metrics", "mprt", "--seed", "3")
    assert code == 0, err
    lines = lines_of(tiny_run)
    model = make_tiny()
    keys, x = model_inputs(tiny_run, model)
    randomised = copy.deepcopy(model)
    mine = Randomiser(randomised, seed=3)

    def camx_layers(self, order="top_down", seed=42):  # Quantus's generator, yielding camx's randomised model
        for depth, name in enumerate(mine.names, 1):
            mine.set_depth(depth)
            yield name, randomised

    monkeypatch.setattr(PyTorchModel, "get_random_layer_generator", camx_layers)
    for method in METHODS.split(","):
        y = np.array([lines[(k, method)]["class_index"] for k in keys])
        for similarity, field in ((None, "mprt_spearman_curve"), (ssim_2d, "mprt_ssim_curve")):
            metric = quantus.MPRT(similarity_func=similarity, abs=False, normalise=False, disable_warnings=True)
            scores = metric(model=model, x_batch=x.numpy(), y_batch=y, explain_func=explain_func(method), batch_size=4)
            theirs = np.array([scores[name] for name in mine.names]).T  # (images, depths)
            ours = np.array([lines[(k, method)][field] for k in keys], dtype=np.float64)
            np.testing.assert_allclose(ours, theirs, atol=1e-4, err_msg=f"{method} {field}")
    verdict = payload["summary"]["methods"]["gradcam"]["mprt"]
    assert verdict["blocks"] == ["fc", "features.2", "features.0"] and len(verdict["spearman_curve"]) == 3
    assert verdict["verdict"] in ("pass", "fail", "unclear") and verdict["threshold"] == 0.5
    assert (tiny_run / rundir.mprt_strip_name(keys[0], "gradcam")).is_file()


@pytest.fixture
def two_class_factory(tiny_factory: str, tmp_path: Path) -> str:
    """``--model two_class:build``: the tiny CNN with two classes (random-logit's other class is then fixed)."""
    (tmp_path / "two_class.py").write_text(
        f"import sys\nsys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from conftest import make_tiny\ndef build():\n    return make_tiny(num_classes=2)\n"
    )
    sys.modules.pop("two_class", None)
    return "two_class:build"


@pytest.mark.slow
def test_random_logit_equals_quantus_random_logit(two_class_factory: str, sample_dir: Path, tmp_path: Path) -> None:
    import quantus

    out = tmp_path / "out"
    explain_run(sample_dir, out, two_class_factory, "gradcam,gradcam++")
    code, payload, err = evaluate_run(out, "--metrics", "random-logit")
    assert code == 0, err
    lines = lines_of(out)
    model = make_tiny(num_classes=2)
    keys, x = model_inputs(out, model)
    for method in ("gradcam", "gradcam++"):
        y = np.array([lines[(k, method)]["class_index"] for k in keys])
        assert [lines[(k, method)]["random_logit_class"] for k in keys] == list(1 - y)
        metric = quantus.RandomLogit(num_classes=2, similarity_func=ssim_2d, abs=False, normalise=False,
                                     disable_warnings=True)  # fmt: skip
        theirs = metric(model=model, x_batch=x.numpy(), y_batch=y, explain_func=explain_func(method), batch_size=4)
        ours = [lines[(k, method)]["random_logit_ssim"] for k in keys]
        np.testing.assert_allclose(ours, theirs, atol=1e-4, err_msg=method)
    assert payload["summary"]["methods"]["gradcam"]["metrics"]["random_logit_ssim"]["n"] == len(keys)


def test_random_logit_class_is_seeded_per_sample_and_never_the_explained_one() -> None:
    from cam_cli.metrics.randomisation import other_class

    drawn = [other_class(0, f"img{i}.jpg\0gradcam", 3, 10) for i in range(200)]
    assert 3 not in drawn and set(drawn) == set(range(10)) - {3}
    assert drawn == [other_class(0, f"img{i}.jpg\0gradcam", 3, 10) for i in range(200)]
    assert drawn != [other_class(1, f"img{i}.jpg\0gradcam", 3, 10) for i in range(200)]


@pytest.fixture
def wide_factory(tiny_factory: str, tmp_path: Path) -> str:
    """``--model wide:build``: the tiny CNN with 64 channels (Score-CAM: 64 passes an image)."""
    (tmp_path / "wide.py").write_text(
        f"import sys, torch\nsys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from conftest import TinyNet\ndef build():\n"
        "    torch.manual_seed(0)\n    return TinyNet(5, channels=64).eval()\n"
    )
    sys.modules.pop("wide", None)
    return "wide:build"


@pytest.mark.slow
def test_mprt_resumes_recomputes_another_order_and_guards_its_budget(wide_factory: str, image_dir: Path,
                                                                      tmp_path: Path) -> None:  # fmt: skip
    out = tmp_path / "out"
    explain_run(image_dir, out, wide_factory, "gradcam,scorecam")
    code, _, err = evaluate_run(out, "--metrics", "mprt", "--steps", "1")
    assert code != 0 and "--budget-ok" in err and "mprt" in err
    assert not (out / "metrics.jsonl").exists()  # refused before anything is written
    code, payload, err = evaluate_run(out, "--metrics", "mprt,deletion", "--steps", "1", "--budget-ok")
    assert code == 0 and payload["done"] == 12, err
    first = lines_of(out)
    line = first[("a.jpg", "gradcam")]
    assert line["mprt_order"] == "cascading" and line["seed"] == 0 and len(line["mprt_ssim_curve"]) == 3
    assert line["mprt_spearman"] == line["mprt_spearman_curve"][-1]
    code, payload, _ = evaluate_run(out, "--metrics", "mprt,deletion", "--steps", "1", "--budget-ok")
    assert payload["skipped"] == 12 and lines_of(out) == first
    code, payload, _ = evaluate_run(out, "--metrics", "mprt,deletion", "--steps", "1", "--budget-ok", "--mprt-order",
                                    "independent")  # fmt: skip
    # deletion's values still hold: the passes are MPRT's, each of the 6 images explained by both
    # methods at 4 depths (one pass and Score-CAM's 64 masked passes an image each time)
    assert code == 0 and payload["done"] == 12 and payload["forward_passes"] == 6 * 4 * (1 + 64)
    again = lines_of(out)[("a.jpg", "gradcam")]
    assert again["mprt_order"] == "independent" and again["deletion_auc"] == line["deletion_auc"]
    assert again["mprt_spearman_curve"][0] == line["mprt_spearman_curve"][0]  # the top block alone: the same model
    assert again["mprt_spearman"] == pytest.approx(np.mean(again["mprt_spearman_curve"]), abs=1e-6)
    args = ["--metrics", "mprt,deletion", "--steps", "1", "--mprt-order", "independent", "--budget-ok", "-q"]
    table = CliRunner().invoke(evaluate, [str(out), *FAST, *args])
    assert "MPRT sanity check" in table.stdout and "| gradcam |" in table.stdout
    # camx report draws the curves (inline SVG) and the strip of one input's maps across depths
    from cam_cli.report import build_report

    page = build_report(out).read_text("utf-8")
    section = page[page.index('<section class="run mprt" id="mprt">') :]
    assert section.count('<figure class="mprt-chart">') == 2 and section.count("<polyline") == 4
    summary = json.loads((out / "metrics-summary.json").read_text())["methods"]
    for method in ("gradcam", "scorecam"):
        assert f'<b>{method}</b> <span class="verdict {summary[method]["mprt"]["verdict"]}">' in section
    strips = sorted(p.name for p in (out / "report" / "mprt").iterdir())
    assert strips == [f"{i}.d{d:02d}.png" for i in range(2) for d in range(4)]
    assert section.count('<img src="mprt/') == 8


def test_batched_ssim_equals_skimage_on_each_pair() -> None:
    from skimage.metrics import structural_similarity

    from cam_cli.metrics.randomisation import ssim

    rng = np.random.default_rng(1)
    a = rng.random((4, 23, 31)).astype(np.float32)
    b = np.clip(a + rng.normal(scale=0.2, size=a.shape), 0, 1).astype(np.float32)
    b[3] = 0.5  # a flat map
    reference = [
        structural_similarity(x.astype(np.float64), y.astype(np.float64), data_range=1.0)
        for x, y in zip(a, b, strict=True)
    ]
    np.testing.assert_allclose(ssim(a, b), reference, rtol=0, atol=1e-12)
    assert ssim(a[:1], a[:1])[0] == pytest.approx(1.0, abs=1e-12)

"""camx's faithfulness metrics against their references: torchcam 0.5's
DeletionInsertionMetric and ClassificationMetric fed the same map, pytorch-grad-cam's
ROAD with an imputer of noise 0, and hand-computed pointing game and IoU."""

from __future__ import annotations

import json
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny
from pytorch_grad_cam.metrics.perturbation_confidence import (
    PerturbationConfidenceMetric,
    RemoveLeastRelevantFirst,
    RemoveMostRelevantFirst,
)
from pytorch_grad_cam.metrics.road import NoisyLinearImputer
from torchcam.metrics import ClassificationMetric, DeletionInsertionMetric

from cam_cli.errors import InputError
from cam_cli.metrics import DEFAULT_METRICS, METRICS, parse_metrics, plan_factory
from cam_cli.metrics.base import Samples, Scheduler, run_plans
from cam_cli.metrics.confidence import confidence
from cam_cli.metrics.localisation import GroundTruth, iou, localise, pointing, read_boxes
from cam_cli.metrics.options import MetricOptions
from cam_cli.metrics.rise import blur, deletion, deletion_insertion, insertion, perturbation_counts
from cam_cli.metrics.road import PERCENTILES, impute, road

SIZE = 32


class FixedMap:
    """A torchcam CAM extractor that gives a fixed map (at any resolution) for every input."""

    def __init__(self, model: torch.nn.Module, maps: torch.Tensor) -> None:
        self.model = model
        self.maps = maps

    def __call__(self, class_idx: object = None, scores: object = None, **_: object) -> list[torch.Tensor]:
        return [self.maps]

    def fuse_cams(self, cams: list[torch.Tensor]) -> torch.Tensor:
        return cams[0]

    @contextmanager
    def _hooks_off(self):  # noqa: ANN202
        yield


@pytest.fixture
def case() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A tiny model, 5 normalised images, maps in [0, 1] at the input size and classes."""
    torch.manual_seed(3)
    model = make_tiny(seed=1)
    images = torch.randn(5, 3, SIZE, SIZE)
    raw = torch.rand(5, 1, 6, 6)
    maps = F.interpolate(raw, size=(SIZE, SIZE), mode="bilinear", align_corners=False)[:, 0]
    maps = (maps - maps.amin(dim=(1, 2), keepdim=True)) / (
        maps.amax(dim=(1, 2), keepdim=True) - maps.amin(dim=(1, 2), keepdim=True)
    )
    classes = torch.tensor([0, 3, 1, 4, 2])
    return model, images, maps, classes


def test_registry_lists_every_metric_and_imports_lazily() -> None:
    assert list(METRICS) == [
        "deletion",
        "insertion",
        "confidence",
        "road",
        "pixel-flipping",
        "irof",
        "region-perturbation",
        "faithfulness-correlation",
        "arcc",
        "pointing",
        "iou",
        "sparseness",
        "complexity",
        "effective-complexity",
        "energy-pointing",
        "relevance-mass",
        "relevance-rank",
        "topk-intersection",
        "mask-auc",
        "mprt",
        "random-logit",
    ]
    assert DEFAULT_METRICS == ("deletion", "insertion", "confidence")
    assert parse_metrics("insertion, deletion") == ["deletion", "insertion"]
    assert parse_metrics("all") == [
        n
        for n in METRICS
        if n not in ("pixel-flipping", "irof", "region-perturbation", "faithfulness-correlation", "arcc")
        and METRICS[n].family != "randomisation"
    ]
    with pytest.raises(ValueError, match="unknown metric bogus; choose from deletion"):
        parse_metrics("deletion,bogus")
    for spec in METRICS.values():
        if spec.entry is not None:
            assert callable(plan_factory(spec.entry))
        assert len(spec.better) == len(spec.statistics)
        assert spec.fields[: len(spec.statistics)] == tuple(s.field for s in spec.statistics)


@pytest.mark.parametrize("steps", [20, 7])
def test_deletion_insertion_equal_torchcam(case, steps: int) -> None:  # noqa: ANN001
    model, images, maps, classes = case
    ours = deletion_insertion(images, maps, classes, model, steps=steps, batch_size=16)
    for i in range(len(images)):
        metric = DeletionInsertionMetric(FixedMap(model, maps[i : i + 1]), partial(torch.softmax, dim=-1), steps=steps)
        metric.update(images[i : i + 1], class_idx=[int(classes[i])])
        ref = metric.summary()
        assert ours["deletion_auc"][i].item() == pytest.approx(ref["deletion_auc"], abs=1e-4)
        assert ours["insertion_auc"][i].item() == pytest.approx(ref["insertion_auc"], abs=1e-4)
    # each curve alone gives the same values
    assert torch.allclose(deletion(images, maps, classes, model, steps=steps), ours["deletion_auc"], atol=1e-6)
    assert torch.allclose(insertion(images, maps, classes, model, steps=steps), ours["insertion_auc"], atol=1e-6)


def test_deletion_insertion_with_a_low_resolution_map_equal_torchcam(case) -> None:  # noqa: ANN001
    """torchcam resizes the map bilinearly (align_corners=False), as evaluate does with the .npy."""
    model, images, _, classes = case
    low = torch.rand(5, 9, 13)
    resized = F.interpolate(low[:, None], size=(SIZE, SIZE), mode="bilinear", align_corners=False)[:, 0]
    ours = deletion_insertion(images, resized, classes, model)
    metric = DeletionInsertionMetric(FixedMap(model, low), partial(torch.softmax, dim=-1))
    metric.update(images, class_idx=classes.tolist())
    ref = metric.summary()
    assert ours["deletion_auc"].mean().item() == pytest.approx(ref["deletion_auc"], abs=1e-4)
    assert ours["insertion_auc"].mean().item() == pytest.approx(ref["insertion_auc"], abs=1e-4)


def test_blur_baseline_equals_torchcam_with_the_same_baseline(case) -> None:  # noqa: ANN001
    model, images, maps, classes = case
    ours = deletion_insertion(images, maps, classes, model, baseline="blur")
    zero = deletion_insertion(images, maps, classes, model, baseline="zero")
    assert not torch.allclose(ours["deletion_auc"], zero["deletion_auc"])
    metric = DeletionInsertionMetric(FixedMap(model, maps), partial(torch.softmax, dim=-1), baseline=blur)
    metric.update(images, class_idx=classes.tolist())
    ref = metric.summary()
    assert ours["deletion_auc"].mean().item() == pytest.approx(ref["deletion_auc"], abs=1e-4)
    assert ours["insertion_auc"].mean().item() == pytest.approx(ref["insertion_auc"], abs=1e-4)


def test_confidence_equals_torchcam(case) -> None:  # noqa: ANN001
    model, images, maps, classes = case
    ours = confidence(images, maps, classes, model, batch_size=3)
    for i in range(len(images)):
        metric = ClassificationMetric(FixedMap(model, maps[i : i + 1]), partial(torch.softmax, dim=-1))
        metric.update(images[i : i + 1], class_idx=[int(classes[i])])
        ref = metric.summary()
        assert ours["drop"][i].item() == pytest.approx(ref["avg_drop"], abs=1e-4)
        assert ours["increase"][i].item() == ref["conf_increase"]
    # a map of ones changes nothing: no drop
    same = confidence(images, torch.ones_like(maps), classes, model)
    assert torch.allclose(same["drop"], torch.zeros(5), atol=1e-5)


def _pgc_road(model, images, maps, classes, order: str) -> np.ndarray:  # noqa: ANN001
    """pytorch-grad-cam's ROAD averaged over the percentiles, softmax target, imputer noise 0."""
    removal = RemoveMostRelevantFirst if order == "morf" else RemoveLeastRelevantFirst
    targets = [lambda out, c=int(c): torch.softmax(out, dim=-1)[c] for c in classes]
    scores = []
    for p in PERCENTILES:
        metric = PerturbationConfidenceMetric(removal(p, NoisyLinearImputer(noise=0.0)))
        scores.append(metric(images, maps.numpy(), targets, model))
    return np.mean(np.float32(scores), axis=0)


def test_road_equals_pytorch_grad_cam_with_noise_zero(case) -> None:  # noqa: ANN001
    model, images, maps, classes = case
    images, maps, classes = images[:3], maps[:3], classes[:3]
    ours = road(images, maps, classes, model, noise=0.0, batch_size=7)
    morf = _pgc_road(model, images, maps, classes, "morf")
    lerf = _pgc_road(model, images, maps, classes, "lerf")
    np.testing.assert_allclose(ours["road_morf"].numpy(), morf, atol=1e-4)
    np.testing.assert_allclose(ours["road_lerf"].numpy(), lerf, atol=1e-4)
    np.testing.assert_allclose(ours["road_combined"].numpy(), (lerf - morf) / 2, atol=1e-4)


def test_road_imputer_equals_pytorch_grad_cam() -> None:
    rng = np.random.default_rng(0)
    image = rng.standard_normal((3, 12, 17)).astype(np.float32)
    keep = rng.random((12, 17)) > 0.6
    keep[0, :] = False  # a removed border row
    ref = NoisyLinearImputer(noise=0.0)(torch.from_numpy(image), torch.from_numpy(keep.astype(np.float32)))
    np.testing.assert_allclose(impute(image, keep), ref.numpy(), atol=1e-5)
    # a removed pixel is the weighted mean of its neighbours; kept pixels are untouched
    out = impute(image, keep)
    assert np.array_equal(out[:, keep], image[:, keep])


def test_road_noise_is_seeded_per_sample_not_per_batch(case) -> None:  # noqa: ANN001
    model, images, maps, classes = case
    images, maps, classes = images[:2], maps[:2], classes[:2]
    a = road(images, maps, classes, model, noise=0.05, seed=1, ids=["x", "y"])
    b = road(images[1:], maps[1:], classes[1:], model, noise=0.05, seed=1, ids=["y"])
    c = road(images, maps, classes, model, noise=0.05, seed=2, ids=["x", "y"])
    assert a["road_morf"][1].item() == pytest.approx(b["road_morf"][0].item(), abs=1e-6)
    assert not torch.allclose(a["road_morf"], c["road_morf"])


def test_road_fills_an_all_removed_image_with_zeros() -> None:
    image = np.ones((3, 4, 4), np.float32)
    assert np.array_equal(impute(image, np.zeros((4, 4), bool)), np.zeros_like(image))
    assert np.array_equal(impute(image, np.ones((4, 4), bool)), image)


def test_scheduler_sends_full_batches_across_samples_and_metrics(case) -> None:  # noqa: ANN001
    model, images, maps, classes = case
    sizes: list[int] = []

    def forward(x: torch.Tensor) -> torch.Tensor:
        sizes.append(int(x.shape[0]))
        return model(x)

    options = MetricOptions(steps=5)
    scheduler = Scheduler(forward, batch_size=8)
    results = []
    for i in range(len(images)):  # one group per image, as evaluate streams them
        samples = Samples(images[i : i + 1], maps[i : i + 1], classes[i : i + 1])
        plans = [plan_factory(METRICS[m].entry)(samples, {m, "deletion", "insertion"}, options) for m in ("deletion",)]
        plans.append(plan_factory(METRICS["confidence"].entry)(samples, {"confidence"}, options))
        from cam_cli.metrics.base import Group

        scheduler.add(Group(samples, plans), on_finish=results.append)
        scheduler.run()
    scheduler.run(final=True)
    per_image = 1 + (len(perturbation_counts(SIZE * SIZE, 5)) - 1) * 2 - 1 + 1  # clean, 2*steps-1, masked
    assert per_image == 1 + 9 + 1
    assert sum(sizes) == scheduler.passes == 5 * per_image
    assert all(s == 8 for s in sizes[:-1]) and sizes[-1] <= 8
    assert len(results) == 5
    together = run_plans(
        Samples(images, maps, classes),
        [plan_factory(METRICS["deletion"].entry)(Samples(images, maps, classes), {"deletion", "insertion"}, options)],
        model,
        32,
    )
    assert torch.allclose(torch.stack([r["deletion_auc"][0] for r in results]), together["deletion_auc"], atol=1e-6)


def test_pointing_by_hand() -> None:
    maps = np.zeros((3, 10, 10), np.float32)
    maps[0, 2, 3] = 1.0  # peak at x=3, y=2
    maps[1, 8, 8] = 1.0
    maps[2] = 0.5  # flat: every pixel is the peak
    box = np.array([[3, 2, 5, 4]], np.float64)  # x in [3, 5), y in [2, 4)
    hits = pointing(maps, [box, box, box])
    assert hits.tolist() == [1.0, 0.0, 0.0]
    assert pointing(maps, [box, np.array([[0, 0, 10, 10]]), np.zeros((0, 4))])[1] == 1.0
    assert torch.isnan(pointing(maps, [np.zeros((0, 4))] * 3)).all()
    # the x1/y1 edge is exclusive
    assert pointing(maps[:1], [np.array([[0, 0, 3, 3]])]).tolist() == [0.0]


def test_iou_by_hand() -> None:
    norm_map = np.zeros((1, 20, 20), np.float32)
    norm_map[0, 5:10, 4:12] = 1.0  # CAM box (4, 5, 12, 10): 8 x 5 = 40 pixels
    norm_map[0, 15, 15] = 0.1  # below 20% of the max: not part of the box
    truth = np.array([[8, 5, 16, 10]], np.float64)  # 8 x 5, overlap 4 x 5 = 20
    assert iou(norm_map, [truth]).item() == pytest.approx(20 / (40 + 40 - 20))
    best = np.array([[100, 100, 110, 110], [4, 5, 12, 10]], np.float64)
    assert iou(norm_map, [best]).item() == pytest.approx(1.0)
    assert iou(np.zeros((1, 20, 20), np.float32), [truth]).item() == 0.0  # no CAM box


def test_boxes_match_by_class_index_or_name() -> None:
    norm_map = np.zeros((10, 10), np.float32)
    norm_map[1, 1] = 1
    truths = [GroundTruth((0, 0, 3, 3), ("tabby",)), GroundTruth((5, 5, 9, 9), ("7",))]
    assert localise(norm_map, truths, 281, "Tabby", {"pointing", "iou"}, 0.2)["pointing_hit"] is True
    assert localise(norm_map, truths, 7, None, {"pointing"}, 0.2) == {"pointing_hit": False}
    assert localise(norm_map, truths, 3, "dog", {"pointing", "iou"}, 0.2) == {"pointing_hit": None, "iou": None}
    assert localise(norm_map, [GroundTruth((0, 0, 3, 3))], 3, "dog", {"iou"}, 0.2)["iou"] == pytest.approx(1 / 9)


def test_read_boxes_csv_coco_and_mapping(tmp_path: Path) -> None:
    csv_file = tmp_path / "b.csv"
    csv_file.write_text("key,x0,y0,x1,y1,class\na.jpg,1,2,3,4,cat\na.jpg,0,0,5,5\nsub/b.png,1,1,2,2,7\n")
    boxes = read_boxes(csv_file)
    assert boxes["a.jpg"] == [GroundTruth((1, 2, 3, 4), ("cat",)), GroundTruth((0, 0, 5, 5))]
    assert boxes["sub/b.png"][0].classes == ("7",)
    coco = tmp_path / "coco.json"
    coco.write_text(
        json.dumps(
            {
                "images": [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "b.jpg"}],
                "annotations": [{"image_id": 1, "bbox": [10, 20, 30, 40], "category_id": 5}],
                "categories": [{"id": 5, "name": "Tabby"}],
            }
        )
    )
    assert read_boxes(coco) == {"a.jpg": [GroundTruth((10, 20, 40, 60), ("tabby",))], "b.jpg": []}
    labels = read_boxes(Path(__file__).parent / "data" / "boxes.json")
    assert labels["chelsea.jpg"][0].box == (0, 0, 395, 300) and "tabby" in labels["chelsea.jpg"][0].classes
    bad = tmp_path / "bad.csv"
    bad.write_text("a.jpg,1,2,3\n")
    with pytest.raises(InputError, match="expected key,x0,y0,x1,y1"):
        read_boxes(bad)
    bad.write_text("a.jpg,5,2,3,4\n")
    with pytest.raises(InputError, match="is empty"):
        read_boxes(bad)


def test_a_metric_whose_package_is_missing_is_refused_in_one_line_naming_the_extra(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import importlib.util

    from cam_cli.jobs.evaluate import run

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "skimage" else real(name, *a))
    with pytest.raises(InputError, match=r"^the metric irof needs scikit-image: pip install 'camx\[metrics\]'$"):
        run._metric_names(["deletion", "irof"])
    assert run._metric_names(["insertion", "deletion"]) == ["deletion", "insertion"]  # no extra needed

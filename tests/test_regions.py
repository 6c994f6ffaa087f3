"""The region metrics (energy-pointing, relevance-mass, relevance-rank,
topk-intersection, mask-auc) and their ground truth (PNG masks, COCO polygons and
RLE, boxes filled in): hand-computed cases, ``camx evaluate`` end to end, and
Quantus 0.6 itself on real camx maps of the sample photos (non-square)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image, ImageDraw
from sklearn.metrics import auc, roc_curve
from test_complexity import FAST, explain, image_batch, lines_of, run

from cam_cli.errors import InputError
from cam_cli.metrics import METRICS, REGION_METRICS
from cam_cli.metrics.masks import Region, boxes_mask, match_keys, read_masks, regions_mask
from cam_cli.metrics.regions import energy_pointing, mask_auc, relevance_rank, top_share, topk_intersection

ROOT = Path(__file__).resolve().parent.parent
FIELDS = ("energy_pointing", "relevance_mass", "relevance_rank", "topk_intersection", "mask_auc")


def save_mask(path: Path, mask: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask.astype(np.uint8) * 255).save(path)
    return path


def ellipse_in(box: list[int], width: int, height: int) -> np.ndarray:
    """A filled ellipse inscribed in ``box`` on a ``height x width`` canvas (not a box: a real outline)."""
    canvas = Image.new("L", (width, height), 0)
    ImageDraw.Draw(canvas).ellipse([box[0], box[1], box[2] - 1, box[3] - 1], fill=255)
    return np.asarray(canvas) > 0


# ------------------------------------------------------------ hand-computed


def test_hand_computed_cases() -> None:
    norm_map = np.array([[0.0, 0.2, 0.4], [0.6, 0.8, 1.0]])
    mask = np.array([[False, False, False], [False, True, True]])
    assert energy_pointing(norm_map, mask) == pytest.approx(1.8 / 3.0)
    assert energy_pointing(np.zeros((2, 3)), mask) == 0.0  # no energy, none inside
    assert relevance_rank(norm_map, mask) == 1.0  # the 2 highest pixels are the mask
    assert topk_intersection(norm_map, mask, 3) == pytest.approx(2 / 3)
    assert topk_intersection(norm_map, mask, 7) is None  # more than the map's pixels
    assert mask_auc(norm_map, mask) == 1.0 and mask_auc(-norm_map, mask) == 0.0
    assert mask_auc(np.ones((2, 3)), mask) == 0.5 and mask_auc(norm_map, np.ones((2, 3), bool)) is None


def test_ties_at_the_top_k_boundary_are_shared() -> None:
    """Five pixels at 0.5, two of them in the mask, compete for the last 2 of 3 places:
    each gets 2/5 of a place, so the mask expects 2 · 2/5 of them."""
    norm_map = np.array([1.0, 0.5, 0.5, 0.5, 0.5, 0.5, 0.0])
    mask = np.array([False, True, True, False, False, False, True])
    assert top_share(norm_map, mask, 3) == pytest.approx((0 + 2 * 2 / 5) / 3)
    # all 5 tied fit: no sharing
    assert top_share(norm_map, mask, 6) == pytest.approx(2 / 6)
    # the same value whatever the order of the pixels
    order = np.random.default_rng(0).permutation(7)
    assert top_share(norm_map[order], mask[order], 3) == pytest.approx(top_share(norm_map, mask, 3))


def test_mask_auc_equals_scikit_learn_with_ties() -> None:
    rng = np.random.default_rng(4)
    for _ in range(5):
        norm_map = np.round(rng.random((13, 21)), 1)  # many ties
        mask = rng.random((13, 21)) > 0.7
        fpr, tpr, _ = roc_curve(mask.ravel(), norm_map.ravel())
        assert mask_auc(norm_map, mask) == pytest.approx(auc(fpr, tpr), abs=1e-12)


def test_a_box_fills_columns_x_and_rows_y_on_a_non_square_map() -> None:
    mask = boxes_mask(np.array([[2, 1, 5, 3]]), (4, 7))  # x0, y0, x1, y1 (exclusive) on H=4, W=7
    assert mask is not None and mask.shape == (4, 7)
    assert np.argwhere(mask).tolist() == [[y, x] for y in (1, 2) for x in (2, 3, 4)]
    assert boxes_mask(np.zeros((0, 4)), (4, 7)) is None


def test_masks_are_matched_by_path_then_file_name(tmp_path: Path) -> None:
    for name in ("a.png", "sub/d.jpeg.png", "e.png", "zzz.png", "f.png", "x/f.png", "g.png"):
        save_mask(tmp_path / "m" / name, np.ones((2, 2), bool))
    found = read_masks(tmp_path / "m")
    keys = ["a.jpg", "sub/d.jpeg", "sub/e.webp", "f.tif", "x/f.jpg", "p/g.jpg", "q/g.jpg", "c.bmp"]
    matched, unmatched = match_keys(found, keys)
    # by relative path first (f.png is f.tif's, x/f.png x/f.jpg's), else by a file name
    # one input has (e.png); g.png names two inputs by file name: it matches neither
    assert sorted(matched) == ["a.jpg", "f.tif", "sub/d.jpeg", "sub/e.webp", "x/f.jpg"] and unmatched == 2
    assert matched["x/f.jpg"][0].png == tmp_path / "m" / "x" / "f.png"
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="holds no PNG masks"):
        read_masks(tmp_path / "empty")


def test_png_masks_nonzero_in_any_channel_and_of_the_wrong_size(tmp_path: Path) -> None:
    rgba = np.zeros((3, 4, 4), np.uint8)
    rgba[..., 3] = 255  # opaque black: no object
    rgba[1, 2, 2] = 1  # a faint blue pixel is object
    Image.fromarray(rgba, "RGBA").save(tmp_path / "m.png")
    mask = regions_mask([Region(png=tmp_path / "m.png")], 0, None, (3, 4))
    assert mask is not None and np.argwhere(mask).tolist() == [[1, 2]]
    with pytest.raises(ValueError, match=r"is 4x3, the map 3x4"):
        regions_mask([Region(png=tmp_path / "m.png")], 0, None, (4, 3))
    assert regions_mask([Region(png=tmp_path / "m.png", classes=("dog",))], 0, "cat", (3, 4)) is None


# ------------------------------------------------------------ camx evaluate


@pytest.fixture
def run_dir(tiny_factory: str, image_dir: Path, tmp_path: Path) -> Path:
    return explain(image_dir, tmp_path / "out", "gradcam,cam")


def test_png_masks_missing_unmatched_and_wrong_sized(run_dir: Path, tmp_path: Path) -> None:
    masks = tmp_path / "masks"
    a = ellipse_in([10, 5, 60, 40], 67, 45)
    save_mask(masks / "a.png", a)
    save_mask(masks / "sub" / "d.jpeg.png", ellipse_in([0, 0, 45, 50], 90, 50))
    save_mask(masks / "b.png", np.ones((10, 10), bool))  # b.png is 40x71
    save_mask(masks / "nothing.png", np.ones((4, 4), bool))
    # --masks-from adds the region metrics when --metrics names none
    code, payload, stderr = run(run_dir, "--masks-from", str(masks), "--topk", "50", "--metrics", "sparseness")
    assert code == 3, stderr  # b.png's lines failed
    assert "1 mask of 4 match no input" in stderr and "3 of 6 inputs have no mask" in stderr
    lines = lines_of(run_dir)
    line = lines[("a.jpg", "gradcam")]
    assert line["metrics"] == ["sparseness", *REGION_METRICS] and line["masks_from"] == str(masks)
    assert line["region_source"].startswith("masks:") and line["topk"] == 50
    norm_map = np.load(run_dir / line["map"])
    assert line["energy_pointing"] == pytest.approx(energy_pointing(norm_map, a), abs=1e-6)
    assert line["relevance_mass"] == line["energy_pointing"]
    assert line["topk_intersection"] == pytest.approx(topk_intersection(norm_map, a, 50), abs=1e-6)
    assert all(lines[("c.bmp", "cam")][f] is None for f in FIELDS)  # no mask: not counted
    wrong = lines[("b.png", "cam")]
    assert wrong["status"] == "error" and "is 10x10, the map 40x71" in wrong["error"]
    assert payload["summary"]["methods"]["cam"]["metrics"]["energy_pointing"]["n"] == 2
    # a re-run skips what holds; another --topk redoes only topk-intersection's lines
    code, payload, _ = run(run_dir, "--masks-from", str(masks), "--topk", "50", "--metrics", "sparseness")
    assert payload["skipped"] == 10 and payload["done"] == 0  # b.png's error lines are tried again
    code, payload, _ = run(run_dir, "--masks-from", str(masks), "--topk", "20", "--metrics", "topk-intersection")
    assert payload["done"] == 10
    assert lines_of(run_dir)[("a.jpg", "gradcam")]["energy_pointing"] == line["energy_pointing"]


def test_coco_polygons_and_rle_equal_the_same_png_mask(run_dir: Path, tmp_path: Path) -> None:
    x0, y0, x1, y1 = 8, 4, 40, 30  # inclusive corners: Pillow fills the outline too
    rect = np.zeros((45, 67), bool)
    rect[y0 : y1 + 1, x0 : x1 + 1] = True
    tall = np.zeros((71, 40), bool)
    tall[20:50, 5:30] = True
    save_mask(tmp_path / "png" / "a.png", rect)
    save_mask(tmp_path / "png" / "b.png", tall)
    column_major = tall.T.ravel()  # COCO's RLE: runs of 0s then 1s, column by column
    runs, value, count = [], False, 0
    for pixel in column_major:
        if pixel != value:
            runs.append(count)
            value, count = pixel, 0
        count += 1
    runs.append(count)
    assert sum(runs) == 71 * 40
    coco = {
        "images": [
            {"id": 1, "file_name": "a.jpg", "width": 67, "height": 45},
            {"id": 2, "file_name": "b.png", "width": 40, "height": 71},
            {"id": 3, "file_name": "c.bmp", "width": 33, "height": 33},
        ],
        "annotations": [
            {"image_id": 1, "segmentation": [[x0, y0, x1, y0, x1, y1, x0, y1]]},
            {"image_id": 2, "segmentation": {"counts": runs, "size": [71, 40]}},
            {"image_id": 3, "category_id": 7, "segmentation": [[0, 0, 20, 0, 20, 20]]},
        ],
        "categories": [{"id": 7, "name": "zebra"}],
    }
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    assert run(run_dir, "--masks-from", str(tmp_path / "png"), "--metrics", ",".join(REGION_METRICS))[0] == 0
    from_png = lines_of(run_dir)
    code, _, stderr = run(run_dir, "--masks-from", str(tmp_path / "coco.json"), "--metrics", ",".join(REGION_METRICS))
    assert code == 0, stderr
    from_coco = lines_of(run_dir)
    for key in (("a.jpg", "cam"), ("b.png", "gradcam")):
        assert from_coco[key]["region_source"] != from_png[key]["region_source"]
        for f in FIELDS:
            assert from_coco[key][f] == from_png[key][f] is not None, (key, f)
    assert from_coco[("c.bmp", "cam")]["energy_pointing"] is None  # a zebra is not the explained class
    (tmp_path / "bad.json").write_text(json.dumps({**coco, "annotations": [{"image_id": 1, "segmentation": [[1, 2]]}]}))
    result = CliRunner().invoke(evaluate_command(), [str(run_dir), *FAST, "--masks-from", str(tmp_path / "bad.json")])
    assert result.exit_code == 1 and "at least 3 points" in result.output


def evaluate_command():  # noqa: ANN201
    from cam_cli.cli.evaluate import evaluate

    return evaluate


def test_region_metrics_need_ground_truth(run_dir: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(evaluate_command(), [str(run_dir), *FAST, "--metrics", "mask-auc"])
    assert result.exit_code == 2 and "--masks-from" in result.output and "--boxes-from" in result.output
    assert all(METRICS[n].family == "region" and METRICS[n].better == ("higher",) for n in REGION_METRICS)


# ------------------------------------------------------------ against Quantus


def quantus_values(quantus, x: np.ndarray, norm_map: np.ndarray, mask: np.ndarray, k: int = 1000) -> dict:  # noqa: ANN001
    """Quantus 0.6's five metrics with their defaults on one map ``(H, W)`` and mask."""
    metrics = {
        "energy_pointing": quantus.AttributionLocalisation(disable_warnings=True),
        "relevance_mass": quantus.RelevanceMassAccuracy(disable_warnings=True),
        "relevance_rank": quantus.RelevanceRankAccuracy(disable_warnings=True),
        "topk_intersection": quantus.TopKIntersection(k=k, disable_warnings=True),
        "mask_auc": quantus.AUC(disable_warnings=True),
    }
    found = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for field, metric in metrics.items():
            a, s = norm_map[None, None].copy(), mask[None, None].astype(np.float32)
            found[field] = float(metric(model=None, x_batch=x, y_batch=np.array([0]), a_batch=a, s_batch=s)[0])
    return found


def boundary_tied(norm_map: np.ndarray, k: int) -> bool:
    """Whether pixels of equal value straddle the map's top-``k`` boundary."""
    values = np.sort(norm_map.ravel())[::-1]
    return k < values.size and values[k - 1] == values[k]


@pytest.mark.slow
def test_region_metrics_equal_quantus_on_camx_maps_of_the_photos(
    tiny_factory: str, sample_dir: Path, tmp_path: Path
) -> None:
    """PNG masks (ellipses in the labelled boxes of the sample photos, three of four
    non-square): every line equals Quantus fed the same map and the mask read back."""
    quantus = pytest.importorskip("quantus")
    out = explain(sample_dir, tmp_path / "out")
    boxes = json.loads((ROOT / "tests" / "data" / "boxes.json").read_text())
    for name, entry in boxes.items():
        width, height = Image.open(sample_dir / name).size
        save_mask(tmp_path / "masks" / name.replace(".jpg", ".png"), ellipse_in(entry["box"], width, height))
    code, _, stderr = run(out, "--masks-from", str(tmp_path / "masks"), "--metrics", ",".join(REGION_METRICS))
    assert code == 0, stderr
    compared = 0
    for (key, method), line in lines_of(out).items():
        norm_map = np.load(out / line["map"])
        with Image.open(tmp_path / "masks" / key.replace(".jpg", ".png")) as image:
            mask = np.asarray(image) > 0
        found = quantus_values(quantus, image_batch(sample_dir / key), norm_map, mask)
        for field in FIELDS:
            if field == "relevance_rank" and boundary_tied(norm_map, int(mask.sum())):
                continue
            if field == "topk_intersection" and boundary_tied(norm_map, 1000):
                continue
            assert line[field] == pytest.approx(found[field], abs=1e-4), (key, method, field)
            compared += 1
    assert compared >= 12 * 5 - 4


@pytest.mark.slow
def test_boxes_as_regions_equal_quantus_and_the_swapped_energy_game_does_not(
    tiny_factory: str, sample_dir: Path, tmp_path: Path
) -> None:
    """--boxes-from alone: each box filled in rows y0:y1 and columns x0:x1 (the paper's
    box on the image). An energy pointing game that fills ``empty[x0:x1, y0:y1]`` of an
    ``(H, W)`` map (as one public Score-CAM implementation does) gives other values on the
    non-square photos: the test would catch camx doing that."""
    quantus = pytest.importorskip("quantus")
    out = explain(sample_dir, tmp_path / "out", "gradcam,cam")
    boxes = json.loads((ROOT / "tests" / "data" / "boxes.json").read_text())
    csv = "key,x0,y0,x1,y1\n" + "".join(f"{k},{','.join(map(str, e['box']))}\n" for k, e in boxes.items())
    (tmp_path / "boxes.csv").write_text(csv)  # no classes: each box counts for the tiny model's class
    code, _, stderr = run(out, "--boxes-from", str(tmp_path / "boxes.csv"), "--metrics", "energy-pointing,mask-auc")
    assert code == 0, stderr
    swapped_differs = 0
    for (key, method), line in lines_of(out).items():
        assert line["region_source"].startswith("boxes:")
        norm_map = np.load(out / line["map"])
        x0, y0, x1, y1 = boxes[key]["box"]
        mask = np.zeros(norm_map.shape, bool)
        mask[y0:y1, x0:x1] = True
        found = quantus_values(quantus, image_batch(sample_dir / key), norm_map, mask)
        assert line["energy_pointing"] == pytest.approx(found["energy_pointing"], abs=1e-4), (key, method)
        assert line["mask_auc"] == pytest.approx(found["mask_auc"], abs=1e-4), (key, method)
        swapped = np.zeros(norm_map.shape, bool)
        swapped[x0:x1, y0:y1] = True  # the trap: x indexes rows
        if abs(energy_pointing(norm_map, swapped) - line["energy_pointing"]) > 1e-3:
            swapped_differs += 1
    assert swapped_differs >= 4  # the non-square photos, at least


@pytest.mark.slow
def test_tied_boundaries_equal_quantus_averaged_over_pixel_orders(
    tiny_factory: str, image_dir: Path, tmp_path: Path
) -> None:
    """Where equal values straddle the top-K boundary (Grad-CAM's zeros, a mask larger
    than the map's support), Quantus's value depends on ``np.argsort``'s order of equals;
    camx's equals Quantus's mean over random orders of the pixels (the corrected reference)."""
    quantus = pytest.importorskip("quantus")
    out = explain(image_dir, tmp_path / "out", "gradcam")
    tested = 0
    rng = np.random.default_rng(0)
    for path in sorted(out.glob("*.gradcam.npy")):
        norm_map = np.load(path)
        mask = np.zeros(norm_map.shape, bool)
        mask[:, : norm_map.shape[1] * 3 // 4] = True
        if not boundary_tied(norm_map, int(mask.sum())):
            continue
        orders = np.stack([rng.permutation(norm_map.size) for _ in range(400)])
        a = norm_map.ravel()[orders].reshape(400, 1, *norm_map.shape)
        s = mask.ravel()[orders].reshape(400, 1, *norm_map.shape).astype(np.float32)
        x = np.zeros((400, 3, *norm_map.shape), np.float32)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            metric = quantus.RelevanceRankAccuracy(disable_warnings=True)
            values = np.asarray(metric(model=None, x_batch=x, y_batch=np.zeros(400, int), a_batch=a, s_batch=s))
        error = 4 * values.std() / np.sqrt(len(values)) + 1e-3
        assert relevance_rank(norm_map, mask) == pytest.approx(values.mean(), abs=error)
        tested += 1
    assert tested >= 1

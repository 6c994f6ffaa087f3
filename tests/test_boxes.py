"""Localisation boxes: ``render.localisation_box`` on hand-made maps, and ``--boxes`` /
``--box-threshold`` / ``--draw-boxes`` through the CLI.

The box is the CAM paper's (Zhou et al. 2016, section 4): threshold the map at a
fraction of its maximum, keep the largest connected component, take its
bounding box ``(x0, y0, x1, y1)`` with ``x1``/``y1`` exclusive.
"""

from __future__ import annotations

import json
from collections import deque
from pathlib import Path

import numpy as np
from click.testing import CliRunner
from PIL import Image

from cam_cli.cli import main
from cam_cli.render import localisation_box


def blank(height: int = 20, width: int = 30) -> np.ndarray:
    return np.zeros((height, width), dtype=np.float32)


# --------------------------------------------------------------- localisation_box


def test_the_largest_component_wins_over_the_hottest():
    m = blank()
    m[2:8, 3:9] = 0.5  # 36 pixels, lukewarm
    m[14:16, 20:22] = 1.0  # 4 pixels, the peak
    assert localisation_box(m, 0.2) == (3, 2, 9, 8)


def test_x1_and_y1_are_exclusive():
    m = blank()
    m[5, 7] = 1.0
    assert localisation_box(m, 0.2) == (7, 5, 8, 6)
    m = blank()
    m[2:5, 5:9] = 1.0  # rows 2..4, columns 5..8
    assert localisation_box(m, 0.2) == (5, 2, 9, 5)


def test_a_blob_touching_the_far_edges_ends_at_width_and_height():
    m = blank(20, 30)
    m[12:, 25:] = 1.0
    assert localisation_box(m, 0.2) == (25, 12, 30, 20)


def test_the_threshold_is_a_fraction_of_the_maximum_not_an_absolute_value():
    m = blank()
    m[4:6, 4:6] = 0.5  # the maximum
    m[4:6, 6:12] = 0.15  # >= 0.2 * 0.5 but < 0.2: kept only by a relative threshold
    assert localisation_box(m, 0.2) == (4, 4, 12, 6)
    # scaling the map does not move the box
    assert localisation_box(m * 7.0, 0.2) == (4, 4, 12, 6)
    # a higher threshold drops the shoulder
    assert localisation_box(m, 0.5) == (4, 4, 6, 6)


def test_threshold_one_keeps_the_peak_and_zero_keeps_everything():
    m = np.linspace(0.0, 1.0, 20 * 30, dtype=np.float32).reshape(20, 30)
    assert localisation_box(m, 1.0) == (29, 19, 30, 20)
    assert localisation_box(m, 0.0) == (0, 0, 30, 20)


def test_components_are_8_connected():
    m = blank()
    for i in range(5):  # a diagonal of 5 pixels: one component with 8-connectivity
        m[2 + i, 2 + i] = 1.0
    m[15:17, 20:22] = 1.0  # a 2x2 block (4 pixels): larger than any 4-connected piece
    assert localisation_box(m, 0.2) == (2, 2, 7, 7)


def test_a_flat_positive_map_gives_the_whole_image():
    assert localisation_box(np.full((20, 30), 0.3, dtype=np.float32), 0.2) == (0, 0, 30, 20)


def test_an_all_zero_map_gives_no_box():
    """A flat map after normalisation, or a Grad-CAM map the ReLU zeroed, holds no evidence."""
    assert localisation_box(blank(), 0.2) is None


def test_a_map_with_nan_gives_no_box():
    m = blank()
    m[3:6, 3:6] = 1.0
    m[0, 0] = np.nan
    assert localisation_box(m, 0.2) is None


def test_coordinates_are_plain_ints_for_the_json_manifest():
    m = blank()
    m[3:6, 4:9] = 1.0
    box = localisation_box(m, 0.2)
    assert box is not None and all(type(v) is int for v in box)
    json.dumps(box)


# ---------------------------------------------------------------------------- CLI

TINY = ["--method", "cam", "--device", "cpu", "--workers", "0", "--format", "png", "-q"]


def explain(image_dir: Path, out: Path, model: str, *extra: str) -> list[dict]:
    result = CliRunner().invoke(main, ["explain", str(image_dir), "-o", str(out), "--model", model, *TINY, *extra])
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def reference_box(norm_map: np.ndarray, threshold: float) -> tuple[int, int, int, int]:
    """Largest 8-connected component at ``threshold * max``, by breadth-first search."""
    mask = norm_map >= threshold * norm_map.max()
    seen = np.zeros_like(mask)
    best: list[tuple[int, int]] = []
    height, width = mask.shape
    for y, x in zip(*np.nonzero(mask), strict=True):
        if seen[y, x]:
            continue
        seen[y, x] = True
        queue, component = deque([(y, x)]), []
        while queue:
            cy, cx = queue.popleft()
            component.append((cy, cx))
            for ny in range(max(cy - 1, 0), min(cy + 2, height)):
                for nx in range(max(cx - 1, 0), min(cx + 2, width)):
                    if mask[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        queue.append((ny, nx))
        if len(component) > len(best):
            best = component
    ys, xs = zip(*best, strict=True)
    return (min(xs), min(ys), max(xs) + 1, max(ys) + 1)


def test_boxes_adds_a_box_in_original_image_pixels_to_every_line(image_dir, tiny_factory, tmp_path):
    out = tmp_path / "out"
    records = explain(image_dir, out, tiny_factory, "--boxes")
    assert len(records) == 6
    for record in records:
        assert record["status"] == "ok", record
        width, height = Image.open(record["input"]).size
        assert (record["width"], record["height"]) == (width, height)
        box = record["box"]
        assert isinstance(box, list) and len(box) == 4 and all(isinstance(v, int) for v in box), record
        x0, y0, x1, y1 = box
        assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height, (box, width, height)
        assert record["targets"][0]["box"] == box
        norm_map = np.load(out / record["map"])
        assert norm_map.shape == (height, width)
        assert tuple(box) == reference_box(norm_map, 0.2), record["input"]


def test_box_threshold_zero_boxes_the_whole_image_and_one_boxes_the_peak(image_dir, tiny_factory, tmp_path):
    for record in explain(image_dir, tmp_path / "zero", tiny_factory, "--boxes", "--box-threshold", "0"):
        assert record["box"] == [0, 0, record["width"], record["height"]], record
    for record in explain(image_dir, tmp_path / "one", tiny_factory, "--boxes", "--box-threshold", "1"):
        norm_map = np.load(tmp_path / "one" / record["map"])
        x0, y0, x1, y1 = record["box"]
        # only pixels equal to the maximum pass (there may be ties in several places)
        assert norm_map[y0:y1, x0:x1].max() == norm_map.max(), record
        assert (x1 - x0) * (y1 - y0) < record["width"] * record["height"], record


def test_draw_boxes_changes_the_overlay_only_along_the_box_edge(image_dir, tiny_factory, tmp_path):
    plain = explain(image_dir, tmp_path / "plain", tiny_factory)
    assert all("box" not in record for record in plain)
    drawn = explain(image_dir, tmp_path / "drawn", tiny_factory, "--boxes", "--draw-boxes")
    assert [r["input"] for r in plain] == [r["input"] for r in drawn]
    band = 3  # the rectangle's black edge is 2 px thicker than its white line
    for before, after in zip(plain, drawn, strict=True):
        a = np.asarray(Image.open(tmp_path / "plain" / before["overlay"]).convert("RGB")).astype(int)
        b = np.asarray(Image.open(tmp_path / "drawn" / after["overlay"]).convert("RGB")).astype(int)
        assert a.shape == b.shape
        x0, y0, x1, y1 = after["box"]
        ys, xs = np.mgrid[0 : a.shape[0], 0 : a.shape[1]]
        # distance (in pixels, Chebyshev) from the rectangle's outline
        inside = (xs >= x0) & (xs < x1) & (ys >= y0) & (ys < y1)
        to_edge = np.minimum.reduce([abs(xs - x0), abs(xs - (x1 - 1)), abs(ys - y0), abs(ys - (y1 - 1))])
        outside = np.maximum.reduce([x0 - xs, xs - (x1 - 1), y0 - ys, ys - (y1 - 1)])
        distance = np.where(inside, to_edge, outside)
        changed = np.any(a != b, axis=2)
        assert changed.any(), after["input"]
        assert not changed[distance > band].any(), f"{after['input']}: pixels changed away from the box edge"
        # the outline itself is white
        assert (b[y0:y1, x0] == 255).all() and (b[y0:y1, x1 - 1] == 255).all(), after["input"]
        assert (b[y0, x0:x1] == 255).all() and (b[y1 - 1, x0:x1] == 255).all(), after["input"]


def test_draw_boxes_alone_records_the_box_it_draws_and_resumes_with_boxes(image_dir, tiny_factory, tmp_path):
    out = tmp_path / "out"
    drawn = explain(image_dir, out, tiny_factory, "--draw-boxes")
    with_boxes = explain(image_dir, tmp_path / "both", tiny_factory, "--boxes", "--draw-boxes")
    assert [(r["input"], r["box"]) for r in drawn] == [(r["input"], r["box"]) for r in with_boxes]
    assert all(r["targets"][0]["box"] == r["box"] for r in drawn)
    # the same boxes, drawn and recorded: adding --boxes finds every input complete
    args = ["explain", str(image_dir), "-o", str(out), "--model", tiny_factory, *TINY, "--boxes", "--draw-boxes"]
    result = CliRunner().invoke(main, [*args, "--json"])
    assert result.exit_code == 0 and json.loads(result.stdout)["skipped"] == len(drawn), result.output

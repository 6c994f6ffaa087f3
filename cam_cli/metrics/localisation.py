"""Localisation against ground-truth boxes: the pointing game and the box IoU.

* ``pointing`` (Zhang et al., "Top-down Neural Attention by Excitation
  Backprop", ECCV 2016): a hit when the map's peak lies inside a box of the
  explained class. Every pixel at the maximum must lie inside (one of) the
  boxes, so a flat map is no hit; no 15-pixel tolerance.
* ``iou`` (Zhou et al., "Learning Deep Features for Discriminative
  Localization", CVPR 2016): the CAM paper's box (the largest 8-connected
  component of the map at ``threshold`` times its maximum, as ``camx explain
  --boxes`` draws it) against the best-matching box of the class; 0 for a map
  without a box.

Both work at the map's own resolution (the ``.npy`` is at the image's size, the
boxes' pixel grid). Boxes are ``(x0, y0, x1, y1)`` with ``x1, y1`` exclusive. A
sample with no box of its class gets NaN (not counted).

Boxes come from ``--boxes-from FILE``: a CSV ``key,x0,y0,x1,y1[,class]`` (a
header line is skipped), COCO-style JSON (``images`` with ``file_name``,
``annotations`` with ``bbox`` ``[x, y, w, h]`` and ``category_id``,
``categories`` with ``name``), or JSON ``{key: {"box"|"boxes": ..., "classes":
[names]}}``. A box's class is a class index or name (names match
case-insensitively); a box without one counts for every class.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cam_cli.errors import InputError
from cam_cli.render import localisation_box

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class GroundTruth:
    """One labelled box and the classes it stands for (empty: any class)."""

    box: Box
    classes: tuple[str, ...] = ()

    def matches(self, class_index: int, class_name: str | None) -> bool:
        if not self.classes:
            return True
        names = {str(class_index)}
        if class_name:
            names.add(class_name.strip().lower())
        return any(c in names for c in self.classes)


def boxes_of_class(truths: Sequence[GroundTruth], class_index: int, class_name: str | None) -> np.ndarray:
    """``(B, 4)`` float boxes of ``truths`` that stand for the class."""
    chosen = [t.box for t in truths if t.matches(class_index, class_name)]
    return np.asarray(chosen, dtype=np.float64).reshape(-1, 4)


def _as_numpy(maps: torch.Tensor | np.ndarray) -> np.ndarray:
    return maps.detach().float().cpu().numpy() if isinstance(maps, torch.Tensor) else np.asarray(maps, np.float32)


def pointing(maps: torch.Tensor | np.ndarray, boxes: Sequence[np.ndarray]) -> torch.Tensor:
    """Pointing-game hits ``(N,)`` (1.0 hit, 0.0 miss, NaN without a box) of
    ``maps`` ``(N, H, W)``; ``boxes[i]`` is ``(B_i, 4)`` in the maps' pixels."""
    arrays = _as_numpy(maps)
    out = torch.full((len(arrays),), float("nan"))
    for i, (norm_map, where) in enumerate(zip(arrays, boxes, strict=True)):
        if len(where) == 0:
            continue
        ys, xs = np.nonzero(norm_map >= norm_map.max())
        inside = np.zeros(len(xs), dtype=bool)
        for x0, y0, x1, y1 in where:
            inside |= (xs >= x0) & (xs < x1) & (ys >= y0) & (ys < y1)
        out[i] = float(bool(inside.all()) and len(xs) > 0)
    return out


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two ``(x0, y0, x1, y1)`` boxes."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h
    return float(w * h / union) if union > 0 else 0.0


def iou(maps: torch.Tensor | np.ndarray, boxes: Sequence[np.ndarray], threshold: float = 0.2) -> torch.Tensor:
    """``(N,)`` best IoU of each map's CAM-paper box with its ground-truth boxes
    (NaN without a ground-truth box, 0 for a map without a box)."""
    arrays = _as_numpy(maps)
    out = torch.full((len(arrays),), float("nan"))
    for i, (norm_map, where) in enumerate(zip(arrays, boxes, strict=True)):
        if len(where) == 0:
            continue
        found = localisation_box(norm_map, threshold)
        out[i] = 0.0 if found is None else max(box_iou(found, truth) for truth in where)
    return out


def localise(
    norm_map: np.ndarray, truths: Sequence[GroundTruth], class_index: int, class_name: str | None,
    names: Collection[str], threshold: float,
) -> dict[str, float | None]:  # fmt: skip
    """``pointing_hit`` and/or ``iou`` of one map ``(H, W)`` (None without a box of its class)."""
    where = [boxes_of_class(truths, class_index, class_name)]
    values: dict[str, float | None] = {}
    if "pointing" in names:
        hit = float(pointing(norm_map[None], where)[0])
        values["pointing_hit"] = None if np.isnan(hit) else bool(hit)  # type: ignore[assignment]
    if "iou" in names:
        value = float(iou(norm_map[None], where, threshold)[0])
        values["iou"] = None if np.isnan(value) else round(value, 6)
    return values


# ------------------------------------------------------------------- box files


def _classes(value: Any) -> tuple[str, ...]:
    if value is None or value == "":
        return ()
    items = value if isinstance(value, (list, tuple)) else [value]
    return tuple(str(v).strip().lower() for v in items if str(v).strip())


def _box(values: Sequence[Any], where: str) -> Box:
    try:
        x0, y0, x1, y1 = (float(v) for v in values)
    except (TypeError, ValueError):
        raise InputError(f"{where}: a box is 4 numbers x0,y0,x1,y1, got {list(values)!r}") from None
    if not (x1 > x0 and y1 > y0):
        raise InputError(f"{where}: box {[x0, y0, x1, y1]} is empty (x1 must exceed x0 and y1 y0)")
    return (x0, y0, x1, y1)


def _read_csv(text: str, path: Path) -> dict[str, list[GroundTruth]]:
    found: dict[str, list[GroundTruth]] = {}
    for number, row in enumerate(csv.reader(io.StringIO(text)), 1):
        if not row or not "".join(row).strip() or row[0].lstrip().startswith("#"):
            continue
        if len(row) not in (5, 6):
            raise InputError(f"{path}:{number}: expected key,x0,y0,x1,y1[,class], got {len(row)} fields")
        if number == 1 and not _is_number(row[1]):
            continue  # a header
        box = _box(row[1:5], f"{path}:{number}")
        found.setdefault(row[0].strip(), []).append(GroundTruth(box, _classes(row[5] if len(row) == 6 else None)))
    return found


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _read_coco(data: dict[str, Any], path: Path) -> dict[str, list[GroundTruth]]:
    names = {c.get("id"): c.get("name") for c in data.get("categories", []) if isinstance(c, dict)}
    files = {i.get("id"): i.get("file_name") for i in data.get("images", []) if isinstance(i, dict)}
    found: dict[str, list[GroundTruth]] = {key: [] for key in files.values() if isinstance(key, str)}
    for number, note in enumerate(data.get("annotations", [])):
        key = files.get(note.get("image_id")) if isinstance(note, dict) else None
        if not isinstance(key, str):
            raise InputError(f"{path}: annotation {number} names no image of 'images'")
        try:
            x, y, w, h = (float(v) for v in note["bbox"])
        except (KeyError, TypeError, ValueError):
            raise InputError(f"{path}: annotation {number} has no bbox [x, y, w, h]") from None
        category = note.get("category_id")
        classes = _classes([names[category]] if names.get(category) else category)
        found[key].append(GroundTruth(_box([x, y, x + w, y + h], f"{path}: annotation {number}"), classes))
    return found


def _read_mapping(data: dict[str, Any], path: Path) -> dict[str, list[GroundTruth]]:
    found: dict[str, list[GroundTruth]] = {}
    for key, entry in data.items():
        if not isinstance(entry, dict):
            raise InputError(f"{path}: entry {key!r} is not an object with a box")
        raw = entry.get("boxes", [entry["box"]] if "box" in entry else [])
        classes = _classes(entry.get("classes", entry.get("class")))
        found[str(key)] = [GroundTruth(_box(b, f"{path}: {key}"), classes) for b in raw]
    return found


def read_boxes(path: Path) -> dict[str, list[GroundTruth]]:
    """Ground-truth boxes by input key from a CSV or JSON file (formats above)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read --boxes-from {path}: {getattr(exc, 'strerror', None) or exc}") from None
    if path.suffix.lower() == ".json" or text.lstrip().startswith(("{", "[")):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(f"--boxes-from {path} is not valid JSON: {exc.msg} (line {exc.lineno})") from None
        if not isinstance(data, dict):
            raise InputError(f"--boxes-from {path}: expected a JSON object (COCO-style or {{key: {{box}}}})")
        if "annotations" in data:
            return _read_coco(data, path)
        return _read_mapping(data, path)
    return _read_csv(text, path)

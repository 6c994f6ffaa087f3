"""Ground-truth regions for the mask metrics (:mod:`cam_cli.metrics.regions`).

``--masks-from`` is a folder of PNGs, one per input (nonzero in any colour
channel = object, alpha ignored; a palette image by its index), matched to the
run's inputs by relative path (``sub/d.jpeg`` by ``sub/d.png`` or
``sub/d.jpeg.png``), else by file name when one input has it; a PNG mask counts
for every class. Or it is COCO JSON with polygons: ``images`` (``file_name``,
``width``, ``height``), ``annotations`` (``image_id``, ``category_id``,
``segmentation`` as polygons ``[[x0, y0, x1, y1, ...], ...]`` or an
uncompressed RLE ``{"counts": [...], "size": [h, w]}``) and ``categories``
(``id``, ``name``); an image's region for a class is the union of its
annotations of that class, filled with Pillow (pixels on the outline count).
Without ``--masks-from``, the boxes of ``--boxes-from`` filled in serve: pixel
``(x, y)`` (column, row) is inside ``(x0, y0, x1, y1)`` when ``x0 <= x < x1`` and
``y0 <= y < y1``, the pointing game's rule.

A mask must have the map's size (the image's, ``W x H``); one of another size
is an error of that line.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from cam_cli.errors import InputError
from cam_cli.metrics.localisation import GroundTruth


@dataclass(frozen=True)
class Region:
    """One labelled region: a PNG file, or COCO polygons or RLE at ``size`` ``(W, H)``;
    ``classes`` as :class:`GroundTruth`'s (empty: any class)."""

    png: Path | None = None
    polygons: tuple[tuple[float, ...], ...] = ()
    rle: tuple[int, ...] = ()
    size: tuple[int, int] | None = None
    classes: tuple[str, ...] = ()

    def matches(self, class_index: int, class_name: str | None) -> bool:
        return GroundTruth((0, 0, 1, 1), self.classes).matches(class_index, class_name)


def boxes_mask(boxes: np.ndarray, shape: tuple[int, int]) -> np.ndarray | None:
    """The union of ``boxes`` ``(B, 4)`` as a boolean ``(H, W)`` mask; None without a box."""
    if len(boxes) == 0:
        return None
    ys = np.arange(shape[0])[:, None]
    xs = np.arange(shape[1])[None, :]
    mask = np.zeros(shape, dtype=bool)
    for x0, y0, x1, y1 in boxes:
        mask |= (xs >= x0) & (xs < x1) & (ys >= y0) & (ys < y1)
    return mask


def regions_mask(regions: Sequence[Region], class_index: int, class_name: str | None, shape: tuple[int, int]) -> (
    np.ndarray | None
):  # fmt: skip
    """The union of the regions of the class as a boolean ``(H, W)`` mask; None without one.
    ``ValueError`` (one line) for a mask of another size than the map or an unreadable PNG."""
    chosen = [r for r in regions if r.matches(class_index, class_name)]
    if not chosen:
        return None
    mask = np.zeros(shape, dtype=bool)
    for region in chosen:
        found = _png_mask(region.png, _mtime(region.png)) if region.png is not None else _coco_mask(region)
        if found.shape != tuple(shape):
            where = region.png or "the COCO annotation"
            raise ValueError(
                f"mask {where} is {found.shape[1]}x{found.shape[0]}, the map {shape[1]}x{shape[0]}: "
                "a mask must have its image's size"
            )
        mask |= found
    return mask


def _mtime(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return 0


@lru_cache(maxsize=16)
def _png_mask(path: Path, mtime_ns: int) -> np.ndarray:
    """The PNG's object pixels (``mtime_ns`` keys the cache: a rewritten mask is read again)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            if image.mode == "P":
                return np.asarray(image) != 0
            bands = [b for b in image.getbands() if b != "A"] or list(image.getbands())
            array = np.stack([np.asarray(image.getchannel(b)) for b in bands], axis=-1)
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise ValueError(f"cannot read mask {path}: {' '.join(str(exc).split())[:200]}") from None
    return np.asarray((array != 0).any(axis=-1), dtype=bool)


def _coco_mask(region: Region) -> np.ndarray:
    from PIL import Image, ImageDraw

    assert region.size is not None
    width, height = region.size
    if region.rle:
        flat = np.zeros(width * height, dtype=bool)
        position = 0
        for index, run in enumerate(region.rle):
            flat[position : position + run] = index % 2 == 1  # runs alternate 0s and 1s, from 0s
            position += run
        return flat.reshape(width, height).T  # column-major, as COCO's RLE
    canvas = Image.new("1", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    for polygon in region.polygons:
        draw.polygon(list(zip(polygon[0::2], polygon[1::2], strict=False)), fill=1, outline=1)
    return np.asarray(canvas, dtype=bool)


# ------------------------------------------------------------------ reading


def read_masks(path: Path) -> dict[str, list[Region]]:
    """Regions by mask key: a folder's PNGs by relative path (``sub/d.png``), or a COCO
    JSON file's by ``file_name``; ``InputError`` for an unreadable or malformed source."""
    if path.is_dir():
        found = {p.relative_to(path).as_posix(): [Region(png=p)] for p in sorted(path.rglob("*")) if _is_png(p)}
        if not found:
            raise InputError(f"--masks-from {path} holds no PNG masks")
        return found
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read --masks-from {path}: {getattr(exc, 'strerror', None) or exc}") from None
    except json.JSONDecodeError as exc:
        raise InputError(f"--masks-from {path} is not valid JSON: {exc.msg} (line {exc.lineno})") from None
    if not isinstance(data, dict) or "annotations" not in data:
        raise InputError(f"--masks-from {path}: expected a folder of PNGs or COCO JSON with 'annotations'")
    return _read_coco(data, path)


def _is_png(path: Path) -> bool:
    return path.suffix.lower() == ".png" and path.is_file() and not path.name.startswith(".")


def _read_coco(data: dict[str, Any], path: Path) -> dict[str, list[Region]]:
    names = {c.get("id"): c.get("name") for c in data.get("categories", []) if isinstance(c, dict)}
    images = {i.get("id"): i for i in data.get("images", []) if isinstance(i, dict)}
    found: dict[str, list[Region]] = {}
    for number, note in enumerate(data.get("annotations", [])):
        image = images.get(note.get("image_id")) if isinstance(note, dict) else None
        if image is None or not isinstance(image.get("file_name"), str):
            raise InputError(f"{path}: annotation {number} names no image of 'images'")
        try:
            size = (int(image["width"]), int(image["height"]))
        except (KeyError, TypeError, ValueError):
            raise InputError(f"{path}: image {image.get('file_name')!r} has no width and height") from None
        category = note.get("category_id")
        label = names.get(category)
        classes = (str(label).strip().lower(),) if label else (() if category is None else (str(category),))
        found.setdefault(image["file_name"], []).append(
            _coco_region(note.get("segmentation"), size, classes, path, number)
        )
    return found


def _coco_region(shape: Any, size: tuple[int, int], classes: tuple[str, ...], path: Path, number: int) -> Region:
    where = f"{path}: annotation {number}"
    if isinstance(shape, dict):
        counts = shape.get("counts")
        if isinstance(counts, str):
            raise InputError(f"{where}: compressed RLE is not supported; give polygons or uncompressed RLE counts")
        if not isinstance(counts, list) or sum(int(c) for c in counts) != size[0] * size[1]:
            raise InputError(f"{where}: RLE counts must sum to width x height = {size[0] * size[1]}")
        return Region(rle=tuple(int(c) for c in counts), size=size, classes=classes)
    try:
        polygons = tuple(tuple(float(v) for v in p) for p in shape)
    except (TypeError, ValueError):
        raise InputError(f"{where}: segmentation is not a list of polygons [x0, y0, x1, y1, ...]") from None
    if not polygons or any(len(p) < 6 or len(p) % 2 for p in polygons):
        raise InputError(f"{where}: each polygon needs at least 3 points as [x0, y0, x1, y1, ...]")
    return Region(polygons=polygons, size=size, classes=classes)


def match_keys(found: dict[str, list[Region]], keys: Iterable[str]) -> tuple[dict[str, list[Region]], int]:
    """Regions by input key, and how many mask keys matched no input: a mask key
    matches the input of the same relative path, with or without the input's suffix
    (``sub/d.png`` or ``sub/d.jpeg.png`` for ``sub/d.jpeg``), else the one input of
    that file name."""
    full = set(keys)
    stems: dict[str, set[str]] = {}
    names: dict[str, set[str]] = {}
    for each in full:
        stem = os.path.splitext(each)[0]
        stems.setdefault(stem, set()).add(each)
        for spelling in (each, stem):
            names.setdefault(os.path.basename(spelling), set()).add(each)
    matched: dict[str, list[Region]] = {}
    unmatched = 0
    for name, regions in found.items():
        stem = name[:-4] if regions[0].png is not None else name  # a PNG's key without ".png"
        if stem in full:
            key: str | None = stem
        else:
            candidates = stems.get(stem) or names.get(os.path.basename(stem), set())
            key = next(iter(candidates)) if len(candidates) == 1 else None
        if key is None:
            unmatched += 1
            continue
        matched.setdefault(key, []).extend(regions)
    return matched, unmatched


def masks_digest(path: Path) -> str:
    """What identifies the masks: a folder's PNGs' relative paths, sizes and times, or the
    JSON file's bytes (a changed mask redoes the metrics it shaped)."""
    digest = hashlib.sha256()
    if path.is_dir():
        for png in sorted(p for p in path.rglob("*") if _is_png(p)):
            st = png.stat()
            digest.update(f"{png.relative_to(path).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    else:
        digest.update(path.read_bytes())
    return "masks:" + digest.hexdigest()[:16]

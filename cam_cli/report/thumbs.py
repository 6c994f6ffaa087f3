"""Small JPEG thumbnails for the report, made in a thread pool and kept between runs.

Pillow releases the GIL while it decodes, resizes and encodes, so threads use
every core without the start-up cost (or the fork hazards) of processes.
JPEG sources are decoded at 1/2, 1/4 or 1/8 scale (``Image.draft``), which
makes a thumbnail of a large photo cost a fraction of a full decode.

A thumbnail is made again only when its source changed: ``thumbs/cache.json``
records each thumbnail's source path, size and modification time.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import math
import os
import re
import stat
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from cam_cli.images import DEFAULT_MAX_PIXELS, to_rgb
from cam_cli.rundir import write_atomic

#: Longest side of a thumbnail in pixels (cards show them at up to half of it
#: on a 2x display).
THUMB_SIZE = 200
QUALITY = 80
CACHE_NAME = "cache.json"
#: Sources larger than this get no thumbnail (each is read whole into memory).
MAX_SOURCE_BYTES = 512 * 2**20
CACHE_VERSION = 1
#: The only names the report writes in its thumbnails folder (and may delete there).
THUMB_NAME = re.compile(r"[0-9a-f]{2}/[im]-[0-9a-f]{24}\.jpg")
SUBFOLDER = re.compile(r"[0-9a-f]{2}")


def thumb_name(key: str, method: str | None) -> str:
    """A safe ASCII file name for the thumbnail of ``key``'s input (``method`` None)
    or of its ``method`` overlay: a hash, never the (untrusted) key itself.

    Thumbnails are spread over 256 subfolders (``ab/m-ab….jpg``): creating many
    files in one folder is serialised by the file system, in several it is not.
    """
    if method is None:
        digest = hashlib.sha256(f"input\0{key}".encode("utf-8", "surrogatepass")).hexdigest()
        return f"{digest[:2]}/i-{digest[:24]}.jpg"
    digest = hashlib.sha256(f"overlay\0{key}\0{method}".encode("utf-8", "surrogatepass")).hexdigest()
    return f"{digest[:2]}/m-{digest[:24]}.jpg"


@dataclass(frozen=True)
class ThumbJob:
    """Make ``name`` in the thumbnails folder from the image at ``source``."""

    name: str
    source: Path


@dataclass
class ThumbResult:
    made: int = 0
    reused: int = 0
    failed: int = 0
    removed: int = 0


#: Formats and modes OpenCV decodes as a viewer shows them (no alpha to composite,
#: no 16-bit range to scale); anything else goes through Pillow and camx's own RGB rules.
_CV2_FORMATS = frozenset({"JPEG", "PNG", "WEBP", "BMP"})
_CV2_MODES = frozenset({"RGB", "L"})


def _reduction(width: int, height: int, size: int) -> int:
    """The largest JPEG DCT scale-down (1, 2, 4, 8) that keeps the longest side >= ``size``."""
    longest = max(width, height)
    for factor in (8, 4, 2):
        if longest // factor >= size:
            return factor
    return 1


def _with_opencv(data: bytes, width: int, height: int, size: int) -> bytes | None:
    import cv2  # torch-free; imported here to keep ``import cam_cli.report`` light

    flag = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4}.get(
        _reduction(width, height, size), cv2.IMREAD_REDUCED_COLOR_8
    )
    image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), flag)  # BGR, EXIF orientation applied
    if image is None or image.ndim != 3 or image.shape[2] != 3:
        return None
    rows, cols = image.shape[:2]
    scale = min(1.0, size / max(rows, cols))
    if scale < 1.0:
        shape = (max(1, round(cols * scale)), max(1, round(rows * scale)))
        method = cv2.INTER_AREA if scale < 0.5 else cv2.INTER_LINEAR
        image = cv2.resize(image, shape, interpolation=method)
    ok, encoded = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, QUALITY])
    return encoded.tobytes() if ok else None


_SOF_MARKERS = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a JPEG's frame header, as stored (before EXIF orientation);
    None when ``data`` is not a JPEG whose header can be walked."""
    if data[:2] != b"\xff\xd8":
        return None
    at = 2
    while at + 4 <= len(data):
        if data[at] != 0xFF:
            return None
        marker = data[at + 1]
        if marker == 0xFF:  # fill byte
            at += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # no length
            at += 2
            continue
        if marker == 0xDA:  # start of scan: no frame header before it
            return None
        length = int.from_bytes(data[at + 2 : at + 4], "big")
        if marker in _SOF_MARKERS:
            if at + 9 > len(data):
                return None
            height = int.from_bytes(data[at + 5 : at + 7], "big")
            width = int.from_bytes(data[at + 7 : at + 9], "big")
            return (width, height) if width and height else None
        if length < 2:
            return None
        at += 2 + length
    return None


def render_thumbnail(source: Path, size: int = THUMB_SIZE) -> bytes:
    """JPEG bytes of ``source`` shrunk to fit ``size`` x ``size``, upright (EXIF applied).

    JPEGs are decoded at 1/2, 1/4 or 1/8 scale where that still covers the
    thumbnail. Raises ``OSError``/``ValueError`` for a file that cannot be read.
    """
    with open(source, "rb") as handle:
        data = handle.read()
    stored = jpeg_size(data)  # a JPEG's size without Pillow's (Python) header parsing
    if stored is not None and stored[0] * stored[1] <= DEFAULT_MAX_PIXELS:
        encoded = _with_opencv(data, stored[0], stored[1], size)
        if encoded is not None:
            return encoded
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with Image.open(io.BytesIO(data)) as image:  # reads the header only
            width, height = image.size
            if width * height > DEFAULT_MAX_PIXELS:
                raise ValueError(f"{width}x{height} is too large for a thumbnail")
            if image.format in _CV2_FORMATS and image.mode in _CV2_MODES and "transparency" not in image.info:
                encoded = _with_opencv(data, width, height, size)
                if encoded is not None:
                    return encoded
            scale = min(1.0, size / max(width, height, 1))
            image.draft("RGB", (max(1, math.ceil(width * scale)), max(1, math.ceil(height * scale))))
            image.seek(0)
            image.load()
            upright = ImageOps.exif_transpose(image) or image
            rgb = to_rgb(upright)
            rgb.thumbnail((size, size), Image.Resampling.BILINEAR, reducing_gap=2.0)
            buffer = io.BytesIO()
            rgb.save(buffer, "JPEG", quality=QUALITY)
    return buffer.getvalue()


def _stamp(path: Path) -> list[int] | None:
    """Size and modification time of a regular file (never open a pipe or a device)."""
    try:
        status = os.stat(path)
    except (OSError, ValueError):
        return None
    if not stat.S_ISREG(status.st_mode) or not 0 < status.st_size <= MAX_SOURCE_BYTES:
        return None
    return [status.st_size, status.st_mtime_ns]


def _read_cache(folder: Path, size: int) -> dict[str, list]:
    try:
        data = json.loads((folder / CACHE_NAME).read_text("utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("version") != CACHE_VERSION or data.get("size") != size:
        return {}
    entries = data.get("entries")
    return entries if isinstance(entries, dict) else {}


def _present(folder: Path) -> set[str]:
    """Thumbnails already in ``folder`` (only names the report writes)."""
    found: set[str] = set()
    try:
        subfolders = [entry.name for entry in os.scandir(folder) if SUBFOLDER.fullmatch(entry.name)]
    except OSError:
        return found
    for sub in subfolders:
        try:
            with os.scandir(folder / sub) as scan:
                found.update(f"{sub}/{entry.name}" for entry in scan if THUMB_NAME.fullmatch(f"{sub}/{entry.name}"))
        except OSError:
            continue
    return found


def _plan(
    jobs: Sequence[ThumbJob], folder: Path, size: int
) -> tuple[dict[str, bool], dict[str, list], list[tuple[ThumbJob, list[int] | None]], ThumbResult, set[str]]:
    """Which thumbnails are current (reused) and which must be made, from the cache and the folder."""
    cache = _read_cache(folder, size)
    present = _present(folder)
    result = ThumbResult()
    exists: dict[str, bool] = {}
    entries: dict[str, list] = {}
    todo: list[tuple[ThumbJob, list[int] | None]] = []
    for job in jobs:
        stamp = _stamp(job.source)
        entry = cache.get(job.name)
        if stamp is not None and job.name in present and entry == [os.fsdecode(job.source), *stamp]:
            exists[job.name] = True
            entries[job.name] = entry
            result.reused += 1
        else:
            todo.append((job, stamp))
    return exists, entries, todo, result, present


def _make_one(folder: Path, size: int, item: tuple[ThumbJob, list[int] | None]) -> tuple[str, list | None]:
    """Make one thumbnail; its cache entry, or None when its source cannot be read."""
    job, stamp = item
    if stamp is None:
        return job.name, None
    try:
        data = render_thumbnail(job.source, size)
        # Written in place, not through a renamed temporary (that doubles the cost of
        # every file): a thumbnail cut short by a kill has no entry in the cache yet,
        # so the next run makes it again.
        descriptor = os.open(folder / job.name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(descriptor, data)
        finally:
            os.close(descriptor)
    except Exception:  # an unreadable or hostile file gives no thumbnail, never a failed report
        return job.name, None
    return job.name, [os.fsdecode(job.source), *stamp]


def make_thumbnails(
    jobs: Sequence[ThumbJob],
    folder: Path,
    *,
    size: int = THUMB_SIZE,
    workers: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> tuple[dict[str, bool], ThumbResult]:
    """Make the thumbnails ``jobs`` ask for in ``folder``, reusing unchanged ones.

    Returns, per thumbnail name, whether it exists now, and the counts. A
    source that cannot be read gives no thumbnail (False) and no error.
    Thumbnails in ``folder`` that no job names any more are deleted.
    """
    folder.mkdir(parents=True, exist_ok=True)
    exists, entries, todo, result, present = _plan(jobs, folder, size)
    if progress is not None and result.reused:
        progress(result.reused)
    for sub in sorted({job.name.split("/")[0] for job, _ in todo}):
        (folder / sub).mkdir(exist_ok=True)
    if todo:
        count = workers or min(8, 2 * (os.cpu_count() or 1))
        with ThreadPoolExecutor(max_workers=count, thread_name_prefix="camx-thumb") as pool:
            for index, (name, entry) in enumerate(pool.map(functools.partial(_make_one, folder, size), todo)):
                exists[name] = entry is not None
                if entry is None:
                    result.failed += 1
                else:
                    entries[name] = entry
                    result.made += 1
                if progress is not None and (index + 1) % 64 == 0:
                    progress(64)
            if progress is not None and len(todo) % 64:
                progress(len(todo) % 64)
    for name in present:
        if not exists.get(name):  # no longer needed, or its source is unreadable now
            with contextlib.suppress(OSError):
                os.unlink(folder / name)
                result.removed += name not in exists
    cache_text = json.dumps({"version": CACHE_VERSION, "size": size, "entries": entries}, ensure_ascii=True)
    write_atomic(folder / CACHE_NAME, cache_text.encode("ascii"))
    return exists, result

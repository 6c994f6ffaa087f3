"""Finding input images and decoding them (torch-free).

An input's *key* is its path relative to the folder it was found in (POSIX
separators), or its file name when it was named directly; the run folder
(:mod:`cam_cli.rundir`) names every output after it. Keys never contain ``..``
or a leading ``/``, so every output stays inside OUT.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import stat
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from cam_cli.errors import DecodeError, InputError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"})
#: Pillow raises DecompressionBombError above twice its warning limit; keep that default.
DEFAULT_MAX_PIXELS = 2 * 89_478_485


@dataclass(frozen=True)
class InputImage:
    """One input: where to read it and the key its outputs are named by."""

    path: Path
    key: str


def _is_image_name(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _walk(
    root: Path,
    exclude: Path | None,
    prune: Callable[[Sequence[str]], bool] | None = None,
    pruned: list[Path] | None = None,
) -> Iterator[InputImage]:
    """Images under ``root``, recursively; hidden entries and ``exclude`` pruned, and
    the subfolders whose entry names ``prune`` says to skip (added to ``pruned``).

    Symbolic links to folders are followed (keys keep the link's name, so
    outputs stay under OUT) unless they lead back to a folder being walked.
    A folder that cannot be listed is yielded itself, so that it becomes an
    ``error`` line in the manifest instead of vanishing.
    """
    excluded = os.path.realpath(exclude) if exclude is not None else None

    def visit(folder: Path, rel: PurePosixPath, ancestors: frozenset[str]) -> Iterator[InputImage]:
        try:
            with os.scandir(folder) as scan:
                entries = sorted(scan, key=lambda e: e.name)
        except OSError:
            if str(rel) != ".":
                yield InputImage(folder, str(rel))
                return
            raise
        if prune is not None and str(rel) != "." and prune([e.name for e in entries]):
            if pruned is not None:
                pruned.append(folder)
            return
        folders = []
        for entry in entries:
            if entry.name.startswith("."):
                continue
            try:
                is_dir = entry.is_dir()  # follows links; a broken link is not a folder
            except OSError:
                is_dir = False
            if is_dir:
                folders.append(entry)
            elif _is_image_name(entry.name):
                yield InputImage(folder / entry.name, str(rel / entry.name))
        for entry in folders:
            real = os.path.realpath(entry.path)
            if real in ancestors or real == excluded:
                continue
            yield from visit(folder / entry.name, rel / entry.name, ancestors | {real})

    yield from visit(root, PurePosixPath("."), frozenset({os.path.realpath(root)}))


def key_for_listed_path(path: Path) -> str:
    """Key of a path named in ``--files-from``: the relative path as written, or
    the absolute path without its root when it is absolute or climbs with ``..``."""
    parts = PurePosixPath(path.as_posix()).parts
    if path.is_absolute() or ".." in parts:
        absolute = PurePosixPath(Path(os.path.abspath(path)).as_posix())
        return str(PurePosixPath(*absolute.parts[1:]))
    return str(PurePosixPath(*[p for p in parts if p != "."]))


def discover(
    inputs: Sequence[Path],
    listed: Sequence[Path] = (),
    exclude: Path | None = None,
    prune: Callable[[Sequence[str]], bool] | None = None,
    pruned: list[Path] | None = None,
) -> list[InputImage]:
    """All images named by ``inputs`` (folders or files) and ``listed`` paths.

    Folders found inside an input folder whose entry names ``prune`` says to skip
    (another run's output folder) are left out and added to ``pruned``; an input
    folder given by name is always read.

    Sorted by key, so the order (and any shard of it) is deterministic. A file
    named more than once (under spellings of the same path) is one input.
    Raises ``InputError`` for a missing input, for two inputs that would write
    the same outputs, or when nothing is found.
    """
    found: list[InputImage] = []
    for item in inputs:
        if item.is_dir():
            try:
                found.extend(_walk(item, exclude, prune, pruned))
            except OSError as exc:
                raise InputError(f"cannot read folder {item}: {exc.strerror or exc}") from None
        elif item.exists() or item.is_symlink():
            found.append(InputImage(item, item.name))
        else:
            raise InputError(f"input not found: {item}")
    # Listed paths are taken as given, whatever their extension: the user chose them.
    found.extend(InputImage(p, key_for_listed_path(p)) for p in listed)

    by_key: dict[str, InputImage] = {}
    seen: set[str] = set()
    for image in found:
        # One file named twice (a folder and a list, ./a.jpg and /abs/a.jpg) is one
        # input, under the key it was first found with.
        where = os.path.abspath(image.path)
        if where in seen:
            continue
        seen.add(where)
        other = by_key.get(image.key)
        if other is not None and os.path.abspath(other.path) != os.path.abspath(image.path):
            raise InputError(
                f"inputs {other.path} and {image.path} would write the same outputs "
                f"({image.key}); explain them into different output folders"
            )
        by_key[image.key] = image
    if not by_key:
        names = ", ".join(str(p) for p in [*inputs, *listed][:3])
        raise InputError(
            f"no images found in {names or 'the inputs'} (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})"
        )
    return [by_key[k] for k in sorted(by_key)]


def read_file_list(text: str) -> list[Path]:
    """Paths from a ``--files-from`` list: one per line (blank lines and ``#``
    comments skipped, trailing spaces, tabs and carriage returns stripped), or
    NUL-separated as ``find -print0`` writes them (names taken exactly as they are)."""
    if "\0" in text:
        return [Path(item) for item in text.split("\0") if item]
    paths = []
    for line in text.split("\n"):
        line = line.rstrip()
        if line.strip() and not line.lstrip().startswith("#"):
            paths.append(Path(line))
    return paths


def select_shard(images: Sequence[InputImage], index: int, count: int) -> list[InputImage]:
    """The ``index``-th (1-based) of ``count`` disjoint, interleaved slices."""
    return list(images[index - 1 :: count])


# --------------------------------------------------------------------- decoding


def _not_found(path: Path) -> str:
    """Why a listed path is not there, as far as its name tells."""
    name = str(path)
    if name != name.strip() and Path(name.strip()).exists():
        return f"file not found: the name has spaces around it ({name!r}); {name.strip()!r} exists"
    if os.path.lexists(name):
        return "file not found (a broken link)"
    return "file not found"


def _one_line(message: str) -> str:
    return re.sub(r"\s+", " ", message).strip()


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode as 8-bit RGB; transparency is composited over white."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I") and values.max(initial=0) > 255 else 255.0
        if image.mode == "F" and values.max(initial=0) <= 1.0:
            top = 1.0
        grey = np.clip(values * (255.0 / top), 0, 255).round().astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


#: pixels converted at once from Pillow's storage to the array (``pixels``)
STRIP_PIXELS = 1 << 22


def pixels(rgb: Image.Image) -> np.ndarray:
    """An RGB image's pixels as a new ``(H, W, 3)`` uint8 array.

    ``np.array(image)`` goes through a ``bytes`` copy of the whole image besides
    Pillow's own 4-byte pixels; a large image is copied in strips of rows instead,
    so decoding a 10000x10000 JPEG peaks at Pillow's 400 MB and the array's 300 MB.
    """
    width, height = rgb.size
    rows = max(1, STRIP_PIXELS // max(1, width))
    if height <= rows:
        return np.array(rgb, dtype=np.uint8)
    array = np.empty((height, width, 3), dtype=np.uint8)
    for top in range(0, height, rows):
        bottom = min(height, top + rows)
        array[top:bottom] = np.asarray(rgb.crop((0, top, width, bottom)), dtype=np.uint8)
    return array


def decode_image(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read an image file as an ``(H, W, 3)`` uint8 RGB array, as a viewer shows it.

    EXIF orientation is applied; animated images give their first frame.
    Raises ``DecodeError`` with a one-line reason for anything unreadable.
    """
    array = _read_pixels(path, max_pixels)  # Pillow's copy is gone once this returns
    if array.ndim != 3 or array.shape[2] != 3 or array.shape[0] == 0 or array.shape[1] == 0:
        raise DecodeError(f"unexpected decoded shape {array.shape}")
    if array.shape[0] * array.shape[1] >= TRIM_PIXELS:
        release_free_memory()
    return np.ascontiguousarray(array)


def _read_pixels(path: Path, max_pixels: int) -> np.ndarray:
    try:
        status = os.stat(path)
        if stat.S_ISDIR(status.st_mode):
            os.listdir(path)  # PermissionError for a folder that cannot be read
            raise DecodeError("is a folder, not an image file")
        if not stat.S_ISREG(status.st_mode):
            raise DecodeError("not a regular file (a pipe, socket or device)")  # never open a FIFO
        if status.st_size == 0:
            raise DecodeError("empty file (0 bytes)")
        # Our own limit replaces Pillow's decompression-bomb guard (checked below).
        Image.MAX_IMAGE_PIXELS = None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as image:
                width, height = image.size
                if width * height > max_pixels:
                    raise DecodeError(
                        f"image is {width}x{height} = {width * height} pixels, more than --max-pixels {max_pixels}"
                    )
                image.seek(0)
                image.load()
                ImageOps.exif_transpose(image, in_place=True)  # (a copy when not in place, even upright)
                array = pixels(to_rgb(image))
    except DecodeError:
        raise
    except FileNotFoundError:
        raise DecodeError(_not_found(Path(path))) from None
    except PermissionError:
        raise DecodeError("permission denied") from None
    except UnidentifiedImageError:
        raise DecodeError("not a recognised image file") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise DecodeError(_one_line(f"cannot decode: {exc}")) from None
    except Exception as exc:  # a decoder bug on a hostile file must not end the run
        raise DecodeError(_one_line(f"cannot decode: {type(exc).__name__}: {exc}")) from None
    return array


#: images this large give the memory of their decoding back to the system (``release_free_memory``)
TRIM_PIXELS = 1 << 24


def release_free_memory() -> None:
    """Give the heap's free pages back to the system (glibc's ``malloc_trim``; a no-op elsewhere).

    camx keeps glibc from unmapping freed memory (``cam_cli.device.tune_allocator``), which
    pays for small activations but would keep the 4 bytes a pixel Pillow decoded a huge
    image into resident for the rest of the run, on top of the overlays rendered later.
    """
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)

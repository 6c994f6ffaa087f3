"""Finding images, decoding them, writing files atomically, and the manifest.

Output naming: an input's *key* is its path relative to the folder it was
found in (POSIX separators), or its file name when it was named directly.
Its outputs are ``OUT/<key>.<method>.<fmt>`` (overlay) and
``OUT/<key>.<method>.npy`` (map); with ``--target topK`` the rank is added,
``OUT/<key>.<method>.top2.<fmt>``.  Keys never contain ``..`` or a leading
``/``, so every output stays inside OUT.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import stat
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from cam_cli.errors import DecodeError, InputError, OutputError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"})
#: Pillow raises DecompressionBombError above twice its warning limit; keep that default.
DEFAULT_MAX_PIXELS = 2 * 89_478_485
TMP_SUFFIX = ".camx-tmp"


@dataclass(frozen=True)
class InputImage:
    """One input: where to read it and the key its outputs are named by."""

    path: Path
    key: str


def _is_image_name(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _walk(root: Path, exclude: Path | None) -> Iterator[InputImage]:
    """Images under ``root``, recursively; hidden entries and ``exclude`` pruned.

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
) -> list[InputImage]:
    """All images named by ``inputs`` (folders or files) and ``listed`` paths.

    Sorted by key, so the order (and any shard of it) is deterministic. A file
    named more than once (under spellings of the same path) is one input.
    Raises ``InputError`` for a missing input, for two inputs that would write
    the same outputs, or when nothing is found.
    """
    found: list[InputImage] = []
    for item in inputs:
        if item.is_dir():
            try:
                found.extend(_walk(item, exclude))
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
    comments skipped), or NUL-separated as ``find -print0`` writes them."""
    if "\0" in text:
        return [Path(item) for item in text.split("\0") if item]
    paths = []
    for line in text.split("\n"):
        line = line.rstrip("\r")
        if line.strip() and not line.lstrip().startswith("#"):
            paths.append(Path(line))
    return paths


def select_shard(images: Sequence[InputImage], index: int, count: int) -> list[InputImage]:
    """The ``index``-th (1-based) of ``count`` disjoint, interleaved slices."""
    return list(images[index - 1 :: count])


# --------------------------------------------------------------------- decoding


def _one_line(message: str) -> str:
    return re.sub(r"\s+", " ", message).strip()


def _to_rgb(image: Image.Image) -> Image.Image:
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


def decode_image(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read an image file as an ``(H, W, 3)`` uint8 RGB array, as a viewer shows it.

    EXIF orientation is applied; animated images give their first frame.
    Raises ``DecodeError`` with a one-line reason for anything unreadable.
    """
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
                upright = ImageOps.exif_transpose(image) or image
                rgb = _to_rgb(upright)
                array = np.array(rgb, dtype=np.uint8)  # a writable copy
    except DecodeError:
        raise
    except FileNotFoundError:
        raise DecodeError("file not found (broken link?)") from None
    except PermissionError:
        raise DecodeError("permission denied") from None
    except UnidentifiedImageError:
        raise DecodeError("not a recognised image file") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise DecodeError(_one_line(f"cannot decode: {exc}")) from None
    except Exception as exc:  # a decoder bug on a hostile file must not end the run
        raise DecodeError(_one_line(f"cannot decode: {type(exc).__name__}: {exc}")) from None
    if array.ndim != 3 or array.shape[2] != 3 or array.shape[0] == 0 or array.shape[1] == 0:
        raise DecodeError(f"unexpected decoded shape {array.shape}")
    return np.ascontiguousarray(array)


# ----------------------------------------------------------------------- writing


def temporary_name(path: Path) -> Path:
    """The hidden sibling that ``path`` is written to before it is renamed into place."""
    return path.with_name(f".{path.name}{TMP_SUFFIX}")


def write_atomic(path: Path, data: bytes | Callable[[BinaryIO], Any], durable: bool = False) -> None:
    """Write ``data`` to ``path`` so that a kill at any moment leaves either the
    old file or the new one, never a partial ``path``.

    ``data`` is the bytes, or a function that writes them to the open file
    (``write_npy``: a map goes from its array to the file without a copy).
    They go to a hidden temporary in the same folder, renamed into place;
    if writing fails the temporary is removed and the ``OSError`` propagates.
    ``durable`` also syncs the data to disk before the rename (power loss).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    try:
        with open(tmp, "wb") as handle:
            if callable(data):
                data(handle)
            else:
                handle.write(data)
            if durable:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def write_npy(path: Path, array: np.ndarray) -> None:
    """``write_atomic`` of ``array`` as ``.npy``, written from the array itself."""
    write_atomic(path, lambda handle: np.lib.format.write_array(handle, array, allow_pickle=False))


def remove_temporaries(paths: Iterable[Path]) -> int:
    """Delete stale temporaries of the given final paths; returns how many went."""
    wanted: dict[Path, set[str]] = {}
    for path in paths:
        wanted.setdefault(path.parent, set()).add(temporary_name(path).name)
    removed = 0
    for folder, names in wanted.items():
        try:
            entries = os.listdir(folder)
        except OSError:
            continue
        for name in entries:
            if name in names:
                try:
                    os.unlink(folder / name)
                    removed += 1
                except OSError:
                    pass
    return removed


def check_writable(out_dir: Path) -> None:
    """Raise ``OutputError`` unless ``out_dir`` exists writable or can be created."""
    probe = out_dir
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise OutputError(f"output folder {out_dir}: {probe} is not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise OutputError(f"output folder {out_dir} is not writable ({probe}: permission denied)")


# ---------------------------------------------------------------------- manifest

RecordKey = tuple[str, str]


def record_key(record: dict[str, Any]) -> RecordKey:
    """A record's identity: its output key (what names its files) and method, with the
    fixed class of ``--target`` when there is one (``gradcam.class281``).

    Keying by the output key, not the input path as typed, lets ``./imgs`` and
    ``/abs/imgs`` resume each other's work; records without a key fall back to
    their input path.
    """
    method = str(record.get("method"))
    variant = record.get("variant")  # a fixed --target class: outputs of their own
    return (str(record.get("key", record.get("input"))), f"{method}.{variant}" if variant else method)


def journal_path(manifest: Path) -> Path:
    """Where records are appended while a run is in progress."""
    return manifest.with_name(f".{manifest.name}.journal")


def read_records(path: Path) -> Iterator[dict[str, Any]]:
    """Records of a JSON-lines file; a torn last line (a killed run) is skipped."""
    try:
        with open(path, "rb") as handle:  # split on b"\n" only, as written
            for line in handle:
                try:
                    record = json.loads(line)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    continue
                if isinstance(record, dict) and "input" in record:
                    yield record
    except FileNotFoundError:
        return


def load_manifest(manifest: Path) -> dict[RecordKey, dict[str, Any]]:
    """The manifest's records, with those of an interrupted run's journal on top."""
    records: dict[RecordKey, dict[str, Any]] = {}
    for source in (manifest, journal_path(manifest)):
        for record in read_records(source):
            records[record_key(record)] = record
    return records


def dumps_record(record: dict[str, Any]) -> str:
    return json.dumps(record, ensure_ascii=False, sort_keys=False)


def write_manifest(manifest: Path, records: dict[RecordKey, dict[str, Any]]) -> None:
    """Replace ``manifest`` atomically with ``records`` sorted by input and method."""
    text = "".join(dumps_record(records[k]) + "\n" for k in sorted(records))
    write_atomic(manifest, text.encode("utf-8"), durable=True)


def _lock(handle: Any) -> bool:
    """Take an exclusive advisory lock on an open file, without waiting.

    False when another process holds it. The kernel drops the lock when its
    holder exits, however it exits. True where locks are not available (no
    ``fcntl`` on Windows, file systems without locks).
    """
    try:
        import fcntl
    except ImportError:
        return True
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:  # a file system without locks (some NFS setups): run unguarded
        return True
    return True


class Journal:
    """Append-only record log of the run in progress, flushed after every batch.

    The open journal is locked: a second run into the same manifest (two
    unsharded runs into one OUT at once) is refused instead of losing records.
    A journal left by a killed run is appended to (``finalise_manifest`` folds
    it in at the end); its torn last line, if any, is closed off first so that
    it cannot swallow the next record. Close it only after the manifest is
    final, so that no other run takes the journal before it is folded in.
    """

    def __init__(self, manifest: Path) -> None:
        self.path = journal_path(manifest)
        self._handle = open(self.path, "a+b")  # noqa: SIM115 (open for the whole run)
        if not _lock(self._handle):
            self._handle.close()
            raise OutputError(
                f"another camx run is writing {manifest} right now; let it finish, "
                "or give this run another -o (or --shard K/N to split the work)"
            )
        if self._handle.tell() > 0:
            self._handle.seek(-1, os.SEEK_END)
            if self._handle.read(1) != b"\n":
                self._handle.write(b"\n")
                self._handle.flush()

    def append(self, records: Iterable[dict[str, Any]]) -> None:
        """Add ``records`` as one write, flushed to the OS before returning."""
        text = "".join(dumps_record(r) + "\n" for r in records)
        if not text:
            return
        try:
            self._handle.write(text.encode("utf-8"))
            self._handle.flush()
        except OSError as exc:
            raise OutputError(f"cannot write {self.path}: {exc.strerror or exc}") from None

    def close(self) -> None:
        # A failed append was reported already; closing must not raise it again
        # and keep the caller from writing the manifest.
        with contextlib.suppress(OSError):
            self._handle.close()

    def discard(self) -> None:
        self.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


def finalise_manifest(manifest: Path, new_records: dict[RecordKey, dict[str, Any]]) -> int:
    """Merge the manifest on disk, the journal and ``new_records`` into the manifest."""
    records = load_manifest(manifest)
    records.update(new_records)
    write_manifest(manifest, records)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(journal_path(manifest))
    return len(records)


SHARD_PART = re.compile(r"manifest\.shard-(\d+)-of-(\d+)\.jsonl")


def shard_parts(out_dir: Path) -> list[Path]:
    """The manifest parts of ``out_dir``, also those of shards killed before they
    wrote one (whose records are only in the part's journal)."""
    parts = {p for p in out_dir.glob("manifest.shard-*-of-*.jsonl") if SHARD_PART.fullmatch(p.name)}
    for journal in out_dir.glob(".manifest.shard-*-of-*.jsonl.journal"):
        name = journal.name[1 : -len(".journal")]
        if SHARD_PART.fullmatch(name):
            parts.add(out_dir / name)
    return sorted(parts)


def part_warnings(parts: Sequence[Path]) -> list[str]:
    """What a merge of ``parts`` lacks: shards with no part, parts of several shardings."""
    by_count: dict[int, set[int]] = {}
    for part in parts:
        match = SHARD_PART.fullmatch(part.name)
        if match:
            by_count.setdefault(int(match[2]), set()).add(int(match[1]))
    found: list[str] = []
    if len(by_count) > 1:
        counts = ", ".join(f"--shard K/{n}" for n in sorted(by_count))
        found.append(f"parts of {len(by_count)} different shardings ({counts}) in one folder; merged all of them")
    for count, present in sorted(by_count.items()):
        missing = [f"{k}/{count}" for k in range(1, count + 1) if k not in present]
        if missing:
            found.append(
                f"no manifest part of shard {', '.join(missing)}: its images are not in the merged manifest "
                "(run it, then merge again)"
            )
    return found


def merge_manifests(out_dir: Path, parts: Sequence[Path], target: Path) -> int:
    """Join manifest parts (and their journals) into ``target``; returns the line count."""
    if not parts:
        raise InputError(f"no manifest parts (manifest.shard-K-of-N.jsonl) in {out_dir}")
    records: dict[RecordKey, dict[str, Any]] = {}
    for part in parts:
        records.update(load_manifest(part))
    if target.exists():
        # Keep lines of the target that no part speaks of (an earlier unsharded run).
        for record in read_records(target):
            records.setdefault(record_key(record), record)
    try:
        write_manifest(target, records)
    except OSError as exc:
        raise OutputError(f"cannot write {target}: {exc.strerror}") from None
    return len(records)

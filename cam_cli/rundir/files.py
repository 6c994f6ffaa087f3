"""Files in the run folder written so that a kill at any moment leaves the old
file or the new one, never a partial one; and the clean-up of temporaries."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from cam_cli.errors import OutputError

TMP_SUFFIX = ".camx-tmp"


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


def write_npy(path: Path, array: np.ndarray) -> None:
    """``write_atomic`` of ``array`` as ``.npy``, written from the array itself."""
    write_atomic(path, lambda handle: np.lib.format.write_array(handle, array, allow_pickle=False))


def stage_npy(path: Path, array: np.ndarray) -> Path:
    """Write ``array`` as ``.npy`` to the temporary of ``path`` and return it; ``os.replace``
    puts it into place later (once every file of an image is ready). A failed write
    removes the temporary and raises the ``OSError``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    try:
        with open(tmp, "wb") as handle:
            np.lib.format.write_array(handle, array, allow_pickle=False)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return tmp


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

"""Records in the run folder: JSON lines (the manifest, its shard parts, the
metrics), the journal a run appends to while it works, and folding a journal
into its file at the end. Torch-free.

A record's identity is :func:`record_key`; a later record with the same key
replaces an earlier one.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from cam_cli.errors import OutputError
from cam_cli.rundir.files import write_atomic

RecordKey = tuple[str, str]


def record_variant(record: dict[str, Any]) -> str | None:
    """What sets a record's outputs apart from another's of the same input and method:
    the fixed class of ``--target`` (``class281``: outputs of their own), or ``--target
    topK`` with K > 1 (``top5``), so that runs with different targets keep their own
    lines; None for the top-1 class (and class-agnostic methods)."""
    variant = record.get("variant")
    if variant:
        return str(variant)
    target = record.get("target")
    if isinstance(target, str) and target.startswith("top") and target[3:].isdigit() and int(target[3:]) > 1:
        return target
    return None


def record_key(record: dict[str, Any]) -> RecordKey:
    """A record's identity: its output key (what names its files) and method, with its
    :func:`record_variant` when it has one (``gradcam.class281``, ``gradcam.top5``).

    Keying by the output key, not the input path as typed, lets ``./imgs`` and
    ``/abs/imgs`` resume each other's work; records without a key fall back to
    their input path.
    """
    method = str(record.get("method"))
    variant = record_variant(record)
    return (str(record.get("key", record.get("input"))), f"{method}.{variant}" if variant else method)


#: the fields of a record (and of each of its targets) that name a file of OUT
FILE_FIELDS = ("overlay", "map", "gradient")


def record_files(record: dict[str, Any]) -> set[str]:
    """The files of OUT a record names (overlays, maps and gradients of every target), relative to OUT."""
    found = {record.get(k) for k in FILE_FIELDS}
    for target in record.get("targets") or []:
        if isinstance(target, dict):
            found |= {target.get(k) for k in FILE_FIELDS}
    return {f for f in found if isinstance(f, str) and f}


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

"""What a detection run still has to make, and what each output is named (torch-free).

A class-specific method writes one map per detection, each with its own files
(``KEY.METHOD.det0.jpg``, ``KEY.METHOD.det0.npy``) and manifest line (variant ``det0``);
an image without a detection gets one line, variant ``det-none``, with no files. A line
records how many detections its image has (``detections``), so that an image is complete
when the lines of all of them are (same settings, files present). Class-agnostic methods
write one map per image (``KEY.METHOD.jpg``), as for classifiers.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Any

from cam_cli.images import InputImage
from cam_cli.rundir.layout import output_names
from cam_cli.rundir.plan import ResumePlan
from cam_cli.rundir.records import load_manifest, record_files, record_key

NONE_VARIANT = "det-none"


def detection_variant(rank: int) -> str:
    return f"det{rank}"


@dataclass
class DetectionPlan(ResumePlan):
    """:class:`ResumePlan` for a detection run: ``counts[method]`` is the most maps an
    image may get (``--max-detections``); ``agnostic`` the methods with one map an image."""

    agnostic: frozenset[str] = frozenset()
    #: per (input key, method) redone: the files of its earlier lines, removed after the run
    #: where the new lines no longer name them (fewer detections)
    stale: dict[tuple[str, str], set[str]] = field(default_factory=dict)

    def names(self, key: str, method: str) -> list[tuple[str, str]]:
        if method in self.agnostic:
            return output_names(key, method, self.fmt, 1)
        variants = [detection_variant(r) for r in range(self.counts[method])]
        return [(f"{key}.{method}.{v}.{self.fmt}", f"{key}.{method}.{v}.npy") for v in variants]

    def _matches(self, record: dict[str, Any], method: str) -> bool:
        """An ``ok`` line made with this run's settings whose files all exist."""
        if record.get("status") != "ok" or any(record.get(k) != v for k, v in self.settings[method].items()):
            return False
        return all((self.out_dir / rel).is_file() for rel in record_files(record))

    def _complete(self, found: list[dict[str, Any]], method: str) -> bool:
        if method in self.agnostic:
            return len(found) == 1 and self._matches(found[0], method) and found[0].get("map") is not None
        counts = {r.get("detections") for r in found}
        if len(counts) != 1 or not all(self._matches(r, method) for r in found):
            return False
        count = counts.pop()
        if not isinstance(count, int):
            return False
        wanted = {detection_variant(r) for r in range(count)} if count else {NONE_VARIANT}
        return {r.get("variant") for r in found} == wanted

    def pending(self) -> tuple[list[InputImage], int]:
        """Inputs with at least one method still to do, and how many are complete; the
        lines of an (input, method) that is redone are dropped (:meth:`drop`)."""
        if self._pending is None:
            by_input: dict[tuple[str, str], list[dict[str, Any]]] = {}
            for key, record in self.earlier().items():
                by_input.setdefault((key[0], str(record.get("method"))), []).append(record)
            todo = []
            for image in self.images:
                needed = []
                for method in self.methods:
                    found = by_input.get((image.key, method), [])
                    if not self.overwrite and self._complete(found, method):
                        self.carried.update((record_key(r), r) for r in found)
                        continue
                    needed.append(method)
                    for record in found:
                        self.dropped.setdefault(record_key(record), record)
                    self.stale[(image.key, method)] = {f for r in found for f in record_files(r)}
                if needed:
                    self.missing[image.key] = needed
                    todo.append(image)
            self._pending = (todo, len(self.images) - len(todo))
        return self._pending

    def remove_replaced(self) -> None:
        """Remove the files of redone lines that no new line names."""
        if not self.stale:
            return
        named: dict[tuple[str, str], set[str]] = {}
        for record in load_manifest(self.manifest).values():
            named.setdefault((str(record.get("key")), str(record.get("method"))), set()).update(record_files(record))
        for where, files in self.stale.items():
            for rel in files - named.get(where, set()):
                with contextlib.suppress(OSError):
                    os.unlink(self.out_dir / rel)

    def line(self, image: InputImage, method: str, variant: str | None, **fields: Any) -> dict[str, Any]:
        """A manifest line of ``method`` for ``image`` (``variant``: its detection)."""
        record = self.record(image, method, **fields)
        if variant is not None:
            record["variant"] = variant
        return record

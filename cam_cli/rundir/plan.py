"""Resume and manifest planning: which (input, method) outputs a run still has to
make, what each is named, and the manifest line each gets. Torch-free.

A run's settings per method are what shaped that method's outputs (model,
weights, layer, target, preprocessing, precision, alpha and the method's own
options); an earlier ``ok`` line is reused only when every one of them matches,
its class names still follow ``--labels`` and its files exist.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cam_cli.errors import InputError
from cam_cli.images import InputImage
from cam_cli.rundir.layout import output_names, read_run
from cam_cli.rundir.records import RecordKey, record_key

#: Options recorded only when set; a record without one was made without it.
FLAGS = ("aug_smooth", "eigen_smooth", "draw_boxes")


@dataclass
class ResumePlan:
    """What one run makes. ``settings[method]`` go into every line of that method;
    ``counts[method]`` is how many targets (maps) each input gets from it."""

    out_dir: Path
    manifest: Path
    images: Sequence[InputImage]
    methods: list[str]
    settings: dict[str, dict[str, Any]]
    counts: dict[str, int]
    class_name: Callable[[int], str | None]
    fmt: str = "jpg"
    boxes: bool = False
    overwrite: bool = False
    carried: dict[RecordKey, dict[str, Any]] = field(default_factory=dict)
    missing: dict[str, list[str]] = field(default_factory=dict)
    _pending: tuple[list[InputImage], int] | None = None

    def names(self, key: str, method: str) -> list[tuple[str, str]]:
        return output_names(key, method, self.fmt, self.counts[method], self.settings[method].get("variant"))

    def record_key(self, key: str, method: str) -> RecordKey:
        variant = self.settings[method].get("variant")
        return (key, f"{method}.{variant}" if variant else method)

    def all_outputs(self) -> list[Path]:
        """Every output path this run may write (for clearing stale temporaries)."""
        names = (pair for image in self.images for method in self.methods for pair in self.names(image.key, method))
        return [self.out_dir / rel for pair in names for rel in pair]

    def record(self, image: InputImage, method: str, **fields: Any) -> dict[str, Any]:
        record: dict[str, Any] = {
            "input": str(image.path),
            "key": image.key,
            "status": "ok",
            "error": None,
            "overlay": None,
            "map": None,
            "class_index": None,
            "class_name": None,
            "score": None,
            **self.settings[method],
            "width": None,
            "height": None,
        }
        record.update(fields)
        return record

    def is_complete(self, record: dict[str, Any] | None, method: str) -> bool:
        if record is None or record.get("status") != "ok":
            return False
        settings = self.settings[method]
        if any(record.get(k) != v for k, v in settings.items()):
            return False
        if any(bool(record.get(k, False)) != bool(settings.get(k, False)) for k in FLAGS):
            return False
        if self.boxes and "box" not in record:
            return False
        targets = record.get("targets") or []
        if not targets or len(targets) != self.counts[method]:
            return False
        for target in targets:  # class names follow --labels
            if target.get("class_name") != self.class_name(int(target.get("class_index", -1))):
                return False
        paths = [t.get(k) for t in targets for k in ("overlay", "map")]
        suffix = f".{self.fmt}"
        return all(isinstance(p, str) and (self.out_dir / p).is_file() for p in paths) and all(
            str(t["overlay"]).endswith(suffix) for t in targets
        )

    def pending(self) -> tuple[list[InputImage], int]:
        """Inputs with at least one method still to do, and how many inputs are complete.

        Computed once (it reads the manifests and checks every output file).
        ``missing[key]`` lists the methods an input still needs; complete records
        found in another manifest of OUT are carried into this run's manifest.
        """
        if self._pending is None:
            records = {} if self.overwrite else read_run(self.out_dir, self.manifest, required=False).records
            todo = []
            for image in self.images:
                needed = []
                for method in self.methods:
                    record = records.get(self.record_key(image.key, method))
                    if self.is_complete(record, method):
                        assert record is not None
                        self.carried[record_key(record)] = record
                    else:
                        needed.append(method)
                if needed:
                    self.missing[image.key] = needed
                    todo.append(image)
            self._pending = (todo, len(self.images) - len(todo))
        return self._pending


def refuse_writing_over_inputs(
    inputs: Sequence[Path], out_dir: Path, images: Sequence[InputImage], methods: Sequence[str], fmt: str
) -> None:
    """OUT may not be an input folder, and no output may land on an input image."""
    out = os.path.realpath(out_dir)
    for item in inputs:
        if item.is_dir() and os.path.realpath(item) == out:
            raise InputError(
                f"the output folder {out_dir} is the input folder {item}: outputs would mix with "
                "the images and be read as inputs next time; choose another -o"
            )
    by_path = {os.path.realpath(image.path): image.path for image in images}
    for image in images:
        for method in methods:
            for rel in output_names(image.key, method, fmt, 1)[0]:
                target = os.path.join(out, rel)
                if target in by_path:
                    raise InputError(
                        f"the output {target} would overwrite the input image {by_path[target]}; choose another -o"
                    )

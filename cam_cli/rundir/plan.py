"""Resume and manifest planning: which (input, method) outputs a run still has to
make, what each is named, and the manifest line each gets. Torch-free.

A run's settings per method are what shaped that method's outputs (model,
weights, layer, target, preprocessing, precision, alpha and the method's own
options); an earlier ``ok`` line is reused only when every one of them matches,
its class names still follow ``--labels`` and its files exist.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cam_cli.errors import InputError
from cam_cli.images import InputImage
from cam_cli.rundir.files import write_atomic
from cam_cli.rundir.layout import MANIFEST, gradient_name, output_names, read_run, shard_parts
from cam_cli.rundir.records import (
    RecordKey,
    dumps_record,
    load_manifest,
    read_records,
    record_files,
    record_key,
    record_variant,
)

#: Options recorded only when set; a record without one was made without it.
FLAGS = ("aug_smooth", "eigen_smooth", "draw_boxes")
#: What makes the model of a run: an OUT holds the maps of one (its layer included).
IDENTITY = ("model", "weights", "input_size", "mean", "std", "output_key", "layer", "prompts", "reference")
#: Fields of a record that are not settings (compared when two runs share files).
OUTCOME = ("input", "key", "status", "error", "overlay", "map", "class_index", "class_name", "score", "targets",
           "width", "height", "flat", "box", "target", "variant", "gradient")  # fmt: skip


def model_of(record: dict[str, Any]) -> dict[str, Any]:
    """The identity of the model that made ``record``: the ``IDENTITY`` fields it has
    (a record of an older camx may lack some; FullGrad's has no layer) and, for random
    weights, their seed."""
    found = {k: record[k] for k in IDENTITY if record.get(k) is not None}
    if record.get("weights") == "NONE" and "seed" in record:
        found["seed"] = record["seed"]
    return found


def _differences(ours: dict[str, Any], theirs: dict[str, Any]) -> str | None:
    """``field THEIRS, ...; this run: field OURS, ...`` over the fields both have that
    differ; None when none does."""
    keys = [k for k in theirs if k in ours and ours[k] != theirs[k]]
    if not keys:
        return None
    return f"{', '.join(f'{k} {theirs[k]}' for k in keys)}; this run: {', '.join(f'{k} {ours[k]}' for k in keys)}"


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
    #: methods whose lines name a gradient file beside each map (``gradient``: guided backprop)
    gradients: frozenset[str] = frozenset()
    carried: dict[RecordKey, dict[str, Any]] = field(default_factory=dict)
    missing: dict[str, list[str]] = field(default_factory=dict)
    #: files of earlier records this run redoes, to remove once replaced (when the new
    #: record names other files: another format, fewer targets)
    replaced: dict[RecordKey, set[str]] = field(default_factory=dict)
    #: records of OUT this run replaces with --overwrite (another model, or files it rewrites)
    dropped: dict[RecordKey, dict[str, Any]] = field(default_factory=dict)
    _records: dict[RecordKey, dict[str, Any]] | None = None
    _pending: tuple[list[InputImage], int] | None = None

    def names(self, key: str, method: str) -> list[tuple[str, str]]:
        return output_names(key, method, self.fmt, self.counts[method], self.settings[method].get("variant"))

    def gradient_names(self, key: str, method: str) -> list[str] | None:
        """The gradient file beside each map of ``method`` (None: a method without one)."""
        if method not in self.gradients:
            return None
        return [gradient_name(map_rel) for _, map_rel in self.names(key, method)]

    def record_key(self, key: str, method: str) -> RecordKey:
        variant = record_variant(self.settings[method])
        return (key, f"{method}.{variant}" if variant else method)

    def earlier(self) -> dict[RecordKey, dict[str, Any]]:
        """Every record of OUT before this run (read once)."""
        if self._records is None:
            self._records = read_run(self.out_dir, self.manifest, required=False).records
        return self._records

    def check_owner(self) -> None:
        """Refuse, before anything is written, a run whose outputs would mix with or
        overwrite those of another model, or rewrite files that lines of another
        ``--target`` describe with other settings; with ``overwrite`` those lines are
        dropped instead (:meth:`drop`) and their files removed."""
        ours = [model_of(self.settings[m]) for m in self.methods]
        for key, record in self.earlier().items():
            theirs = model_of(record)
            differ = next((d for d in (_differences(o, theirs) for o in ours) if d), None)
            if differ and not self.overwrite:
                raise InputError(
                    f"{self.out_dir} holds maps made with another model ({differ}): "
                    "give another -o to keep both, or --overwrite to replace them"
                )
            if differ:
                self.dropped[key] = record
        shared = self._shared_files()
        for key, record in shared.items():
            if not self.overwrite:
                raise InputError(
                    f"this run would rewrite {sorted(record_files(record))[0]}, which the line of "
                    f"--target {record.get('target')} ({record.get('method')}, made with other settings) "
                    "describes: run with that line's settings, give another -o, or --overwrite to replace it"
                )
            self.dropped[key] = record

    def _shared_files(self) -> dict[RecordKey, dict[str, Any]]:
        """Records of another target (``--target top5`` for a ``top3`` run) whose files this
        run would rewrite, made with other settings (same settings: the same files)."""
        found: dict[RecordKey, dict[str, Any]] = {}
        ours = {self.record_key(image.key, m): (image, m) for image in self.images for m in self.methods}
        by_input: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for key, record in self.earlier().items():
            if key not in ours and key not in self.dropped:
                by_input.setdefault((key[0], str(record.get("method"))), []).append(record)
        for image, method in ours.values():
            others = by_input.get((image.key, method))
            if not others:
                continue
            names = {rel for pair in self.names(image.key, method) for rel in pair}
            settings = {k: v for k, v in self.settings[method].items() if k not in OUTCOME}
            for record in others:
                same = all(record.get(k) == v for k, v in settings.items()) and all(
                    bool(record.get(k, False)) == bool(settings.get(k, False)) for k in FLAGS
                )
                if names & record_files(record) and not same:
                    found[record_key(record)] = record
        return found

    def drop(self, keep: set[str]) -> None:
        """With ``overwrite``: take the :attr:`dropped` lines out of every manifest of OUT
        that holds them and remove their files (but those in ``keep``, this run's own)."""
        if not self.dropped:
            return
        for path in [*shard_parts(self.out_dir), self.out_dir / MANIFEST]:
            records = list(read_records(path))
            kept = [r for r in records if record_key(r) not in self.dropped]
            if len(kept) != len(records):
                write_atomic(path, "".join(dumps_record(r) + "\n" for r in kept).encode("utf-8"))
        for record in self.dropped.values():
            for rel in record_files(record) - keep:
                with contextlib.suppress(OSError):
                    os.unlink(self.out_dir / rel)

    def remove_replaced(self) -> None:
        """Remove the files of redone records that their new record no longer names."""
        if not self.replaced:
            return
        now = load_manifest(self.manifest)
        for key, files in self.replaced.items():
            new = now.get(key)
            if new is not None and new.get("status") == "ok":
                for rel in files - record_files(new):
                    with contextlib.suppress(OSError):
                        os.unlink(self.out_dir / rel)

    def all_outputs(self) -> list[Path]:
        """Every output path this run may write (for clearing stale temporaries)."""
        paths = []
        for image in self.images:
            for method in self.methods:
                paths += [rel for pair in self.names(image.key, method) for rel in pair]
                paths += self.gradient_names(image.key, method) or []
        return [self.out_dir / rel for rel in paths]

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
        fields = ("overlay", "map", "gradient") if method in self.gradients else ("overlay", "map")
        paths = [t.get(k) for t in targets for k in fields]
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
            records = self.earlier()
            todo = []
            for image in self.images:
                needed = []
                for method in self.methods:
                    key = self.record_key(image.key, method)
                    record = records.get(key)
                    if not self.overwrite and self.is_complete(record, method):
                        assert record is not None
                        self.carried[record_key(record)] = record
                    else:
                        needed.append(method)
                        if record is not None and key not in self.dropped:
                            self.replaced[key] = record_files(record)
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

"""One ``camx explain`` run over a detection model: discover -> decode (at each image's
own size) -> batch -> the model once per batch with the layer hooked -> one map per
chosen detection and method -> write -> manifest. Resumable and sharded like a
classifier run, with the same journal; :class:`DetectionRun` offers the interface the
CLI drives (``pending``, ``run``, ``notes``)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from cam_cli import rundir
from cam_cli.device import emulated_precision_note
from cam_cli.errors import CamxError, DecodeError, ModelError, OutputError
from cam_cli.images import InputImage, decode_image
from cam_cli.jobs.base import default_workers, journalled, loader, open_device, prepare_process
from cam_cli.jobs.detect.plan import DetectionPlan
from cam_cli.jobs.detect.writer import DetectionWriter
from cam_cli.jobs.explain.engine import Progress, Summary
from cam_cli.jobs.explain.session import parse_method_list, select_images
from cam_cli.methods import MethodOptions, create
from cam_cli.methods.base import TargetLayer
from cam_cli.methods.detection import PERTURBATION, DetectionExplainer, DetectionTargets, check_detection_methods
from cam_cli.models.base import read_labels
from cam_cli.models.detection import Detector, default_layer, load_detector, lower_threshold
from cam_cli.probe.capture import resolve_module
from cam_cli.rundir.plan import refuse_writing_over_inputs

#: options of ``camx explain`` that do not apply to a detection model, and why
NOT_FOR_DETECTION = {
    "num_classes": ("--num-classes", "the class count comes from the weights"),
    "input_size": ("--input-size", "detection models resize images themselves"),
    "mean": ("--mean", "detection models normalise images themselves"),
    "std": ("--std", "detection models normalise images themselves"),
    "output_key": ("--output-key", "a detection model's output is its detections"),
    "aug_smooth": ("--aug-smooth", "not adapted to detections"),
    "eigen_smooth": ("--eigen-smooth", "not adapted to detections"),
    "boxes": ("--boxes", "each detection's own box is recorded (det_box)"),
    "draw_boxes": ("--draw-boxes", "each overlay draws its detection's box"),
}


def check_options(config: Any) -> None:
    """Refuse, in one line, an option that has no meaning for a detection model."""
    for name, (flag, why) in NOT_FOR_DETECTION.items():
        if getattr(config, name, None) not in (None, False):
            raise CamxError(f"{flag} does not apply to detection models ({why})")
    if config.precision != "fp32":
        raise CamxError("--precision: detection models run in fp32 only")
    if config.layer is not None and "," in config.layer:
        raise CamxError("--layer: one layer for a detection model")


def parse_detection_target(text: str | None, detector: Detector, min_score: float, limit: int) -> DetectionTargets:
    """``--target``: ``all`` (default: every detection over ``min_score``), ``topK`` (the K
    best), or a class name or label index (every detection of that class)."""
    value = (text or "all").strip()
    lowered = value.lower()
    if lowered == "all":
        return DetectionTargets("all", min_score, limit)
    if lowered.startswith("top") and lowered[3:].isdigit() and int(lowered[3:]) >= 1:
        return DetectionTargets(lowered, min_score, limit, top=min(int(lowered[3:]), limit))
    label = detector.label_index(value)
    if label is None or (detector.categories is not None and label >= len(detector.categories)):
        import difflib

        close = difflib.get_close_matches(value, detector.categories or [], n=3)
        hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
        raise ModelError(f"--target {text!r} is not a class of {detector.name}{hint}")
    return DetectionTargets(f"class{label}", min_score, limit, label=label)


class OriginalsDataset(Dataset[tuple[int, torch.Tensor | None, str | None]]):
    """Each image decoded at its own size, ``(H, W, 3)`` uint8; failures as a reason."""

    def __init__(self, images: Sequence[InputImage], max_pixels: int) -> None:
        self.images, self.max_pixels = images, max_pixels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, str | None]:
        try:
            return index, torch.from_numpy(decode_image(self.images[index].path, self.max_pixels)), None
        except DecodeError as exc:
            return index, None, str(exc)


def _as_list(items: list[Any]) -> list[Any]:
    return items


@dataclass
class DetectionSetup:
    detector: Detector
    layer: TargetLayer
    targets: DetectionTargets
    explainer: DetectionExplainer
    device: torch.device


def open_detection(config: Any, names: list[str]) -> DetectionSetup:
    """Load the detector, resolve layer, target and methods; refuse what cannot run."""
    check_options(config)
    check_detection_methods(names)
    device = open_device(config.device)
    detector = load_detector(config.model, config.weights, seed=config.seed)
    if config.labels is not None:  # names by label index, as the model's own would be
        detector.categories = read_labels(config.labels)
    lower_threshold(detector.module, config.min_score)
    detector.module.to(device)
    layer_name = config.layer or default_layer(detector.module)[0]
    resolve_module(detector.module, layer_name)  # an unknown layer: refused now
    layer = TargetLayer(layer_name)
    targets = parse_detection_target(config.target, detector, config.min_score, config.max_detections)
    options = MethodOptions(seed=config.seed, noise_samples=getattr(config, "noise_samples", None),
                            noise_std=getattr(config, "noise_std", None))  # fmt: skip
    methods = [create(name, options) for name in names]
    explainer = DetectionExplainer(detector.module, layer, methods, targets, config.batch_size)
    return DetectionSetup(detector, layer, targets, explainer, device)


class DetectionRun:
    """A prepared detection run: inputs found, model loaded, methods checked, nothing written."""

    counts_passes = False

    def __init__(self, config: Any) -> None:
        prepare_process()
        self.config = config
        self.method_names = parse_method_list(config.method)
        pruned: list[Path] = []
        self.all_images, self.images = select_images(config, pruned)
        self.notes: list[str] = []
        refuse_writing_over_inputs(config.inputs, config.out_dir, self.all_images, self.method_names, config.fmt)
        self.setup = open_detection(config, self.method_names)
        self.device = self.setup.device
        self.notes += [n for n in [emulated_precision_note(self.device, config.precision)] if n]
        rundir.check_writable(config.out_dir)
        self.manifest = config.out_dir / rundir.manifest_name(config.shard)
        agnostic = frozenset(m.name for m in self.setup.explainer.methods if not m.info.class_specific)
        self.plan = DetectionPlan(
            out_dir=config.out_dir,
            manifest=self.manifest,
            images=self.images,
            methods=self.method_names,
            settings={name: self._settings(name, name in agnostic) for name in self.method_names},
            counts={name: 1 if name in agnostic else self.setup.targets.limit for name in self.method_names},
            class_name=self.setup.detector.class_name,
            fmt=config.fmt,
            overwrite=config.overwrite,
            agnostic=agnostic,
        )
        self.plan.check_owner()

    def _settings(self, method: str, agnostic: bool) -> dict[str, Any]:
        """What shaped one method's outputs; in every line of it, compared on resume."""
        detector, targets = self.setup.detector, self.setup.targets
        settings: dict[str, Any] = {
            "method": method,
            "task": "detection",
            "model": detector.name,
            "weights": detector.weights,
            "layer": self.setup.layer.label,
            "target": targets.text,
            "min_score": targets.min_score,
            "max_detections": targets.max_detections,
            "precision": "fp32",
            "alpha": self.config.alpha,
        }
        if detector.weights == "NONE":
            settings["seed"] = self.config.seed
        if agnostic:
            settings["class_agnostic"] = True
        if method in PERTURBATION:  # what shapes its passes (sscam's noise), as for classifiers
            chosen = next(m for m in self.setup.explainer.methods if m.name == method)
            settings.update(chosen.settings())
        return settings

    def pending(self) -> tuple[list[InputImage], int]:
        return self.plan.pending()

    def expected_passes(self, todo: Sequence[InputImage]) -> int:
        return 0

    def run(
        self,
        progress: Progress | None = None,
        stop: threading.Event | None = None,
        on_passes: Callable[[int], None] | None = None,
        on_start: Callable[[], None] | None = None,
    ) -> Summary:
        """Explain every pending input; safe to interrupt through ``stop`` (between batches)."""
        config = self.config
        started = time.perf_counter()
        todo, skipped = self.pending()
        summary = Summary(total=len(self.images), skipped=skipped, out_dir=str(config.out_dir),
                          manifest=str(self.manifest), methods=list(self.method_names))  # fmt: skip
        try:
            config.out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"cannot write to {config.out_dir}: {exc.strerror or exc}") from None
        workers = default_workers() if config.workers is None else config.workers
        if config.workers is None and len(todo) <= config.batch_size:
            workers = 0
        batches = loader(OriginalsDataset(todo, config.max_pixels), config.batch_size, workers, _as_list)
        writer = DetectionWriter(self.plan, config.out_dir, config.alpha, self.setup.detector.class_name)
        with journalled(self.manifest, self.plan.all_outputs) as journal:
            if self.plan.carried:
                journal.append(self.plan.carried.values())
            self.plan.drop(keep={str(p.relative_to(config.out_dir)) for p in self.plan.all_outputs()})
            if on_start is not None:
                on_start()
            for batch in batches:
                ready = self._batch(todo, batch, writer)
                journal.append(r for records in ready for r in records)
                for records in ready:
                    summary.count(records)
                if progress is not None:
                    progress([r for records in ready for r in records])
                if stop is not None and stop.is_set():
                    summary.interrupted = True
                    break
        self.plan.remove_replaced()
        summary.seconds = time.perf_counter() - started
        return summary

    def _batch(self, todo: list[InputImage], batch: list[tuple[int, torch.Tensor | None, str | None]],
               writer: DetectionWriter) -> list[list[dict[str, Any]]]:  # fmt: skip
        """One batch's lines, per image: its decode error, or every method's lines."""
        ready = []
        for index, _, error in batch:
            if error is not None:
                image = todo[index]
                ready.append([self.plan.record(image, m, status="error", error=error)
                              for m in self.plan.missing[image.key]])  # fmt: skip
        good = [(index, original) for index, original, error in batch if original is not None]
        if not good:
            return ready
        wanted = {m for index, _ in good for m in self.plan.missing[todo[index].key]}
        images = [original.permute(2, 0, 1).to(self.device).float().div_(255) for _, original in good]
        result = self.setup.explainer.explain(images, sorted(wanted))
        for j, (index, original) in enumerate(good):
            ready.append(writer.write_image(todo[index], original, result.detections[j], result.maps[j]))
        return ready

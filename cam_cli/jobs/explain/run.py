"""One ``camx explain`` run: discover -> decode (DataLoader workers) -> batch ->
device -> every method from one pass -> post-process and write (thread pool) ->
manifest.

The parts, one module each: ``session`` opens the run (model, probe, layer,
target, methods), ``plan`` decides what is still to do and names outputs and
records, ``engine`` streams the batches, ``writer`` renders and writes, ``data``
decodes. ``Explainer`` ties them together.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cam_cli import rundir
from cam_cli.device import emulated_precision_note
from cam_cli.errors import OutputError
from cam_cli.images import DEFAULT_MAX_PIXELS, InputImage
from cam_cli.jobs.base import Timings, default_workers, journalled, loader, prepare_process
from cam_cli.jobs.data import ImageDataset, collate
from cam_cli.jobs.explain.engine import Engine, Progress, Summary
from cam_cli.jobs.explain.session import open_session, parse_method_list, select_images
from cam_cli.jobs.explain.writer import Writer
from cam_cli.methods import info
from cam_cli.probe import layers_label
from cam_cli.rundir.plan import ResumePlan, refuse_writing_over_inputs

__all__ = ["ExplainConfig", "Explainer", "Summary", "explain"]


@dataclass
class ExplainConfig:
    """Everything ``camx explain`` is asked to do (the CLI's options, parsed)."""

    inputs: Sequence[Path]
    out_dir: Path
    listed: Sequence[Path] = ()
    #: one method, a comma list, or a sequence of names (``camx methods``)
    method: str | Sequence[str] = "gradcam"
    model: str = "resnet50"
    weights: str = "DEFAULT"
    num_classes: int | None = None
    labels: Path | None = None
    layer: str | None = None
    target: str = "top1"
    alpha: float = 0.4
    fmt: str = "jpg"
    input_size: int | None = None
    mean: Sequence[float] | None = None
    std: Sequence[float] | None = None
    output_key: str | None = None
    device: str = "auto"
    batch_size: int = 16
    workers: int | None = None
    precision: str = "fp32"
    overwrite: bool = False
    shard: tuple[int, int] = (1, 1)
    max_pixels: int = DEFAULT_MAX_PIXELS
    boxes: bool = False
    box_threshold: float = 0.2
    draw_boxes: bool = False
    seed: int = 0
    finer_gamma: float = 1.0
    kpca_kernel: str = "sigmoid"
    kpca_gamma: float | None = None
    noise_samples: int | None = None
    noise_std: float | None = None
    concepts: int = 5
    sess_base: str = "gradcam"
    sess_scales: int = 12
    aug_smooth: bool = False
    eigen_smooth: bool = False
    #: a CLIP model's classes, one prompt each (else from ``labels`` and ``prompt_template``)
    prompts: Sequence[str] = ()
    prompt_template: str | None = None
    #: the reference embedding of ``--target similar`` / ``dissimilar``
    target_embedding: Path | None = None
    #: detection models: the detections explained (``docs/detection.md``)
    min_score: float = 0.5
    max_detections: int = 10


class Explainer:
    """A prepared run: inputs found, model loaded and probed, methods checked, nothing written yet."""

    def __init__(self, config: ExplainConfig) -> None:
        prepare_process()
        self.config = config
        self.method_names = parse_method_list(config.method)
        pruned: list[Path] = []
        self.all_images, self.images = select_images(config, pruned)
        #: what the command line tells the user before the run (one line each)
        self.notes = [_pruned_note(pruned)] if pruned else []
        refuse_writing_over_inputs(config.inputs, config.out_dir, self.all_images, self.method_names, config.fmt)
        self.session = open_session(config)
        self.classifier = self.session.classifier
        self.notes += self.classifier.notes  # what the model's source said of it (a pooler left out...)
        self.device = self.session.device
        self.target_layer = self.session.target_layer
        self.target = self.session.target
        self.notes += [n for n in [emulated_precision_note(self.device, config.precision)] if n]
        rundir.check_writable(config.out_dir)
        self.manifest = config.out_dir / rundir.manifest_name(config.shard)
        self.plan = ResumePlan(
            out_dir=config.out_dir,
            manifest=self.manifest,
            images=self.images,
            methods=self.method_names,
            settings={m.name: self._settings(m) for m in self.session.methods},
            counts={m.name: m.map_count(self.target.count) for m in self.session.methods},
            class_name=self.classifier.class_name,
            fmt=config.fmt,
            boxes=config.boxes or config.draw_boxes,
            overwrite=config.overwrite,
            gradients=frozenset(name for name in self.method_names if info(name).gradient_file),
        )
        self.plan.check_owner()  # another model's maps in OUT: refused before anything is written
        self.timings = Timings()

    def _settings(self, method: Any) -> dict[str, Any]:
        """What shaped one method's outputs; recorded in its manifest lines and compared on resume."""
        config = self.config
        agnostic = not method.info.class_specific
        settings: dict[str, Any] = {
            "method": method.name,
            "model": self.classifier.name,
            "weights": self.classifier.weights,
            "layer": layers_label(self.session.target_layers)
            if self.session.target_layers and method.info.uses_layer
            else None,
            "target": "top1" if agnostic else self.target.text,
            "input_size": self.classifier.input_size,
            "mean": [round(v, 6) for v in self.classifier.mean],
            "std": [round(v, 6) for v in self.classifier.std],
            "output_key": config.output_key,
            "precision": config.precision,
            "alpha": config.alpha,
            **method.settings(),
        }
        if self.classifier.prompts is not None:
            settings["prompts"] = list(self.classifier.prompts)  # a CLIP model's classes
        if self.session.reference is not None:
            settings["reference"] = self.session.reference.record()
            if config.num_classes == 0:
                settings["num_classes"] = 0  # the model without its head: evaluate rebuilds it so
        if self.classifier.task != "classification":  # classifier lines stay as they were
            settings["task"] = self.classifier.task
        if self.classifier.weights == "NONE":
            settings["seed"] = config.seed  # the seed of the random initialisation
        if agnostic:
            settings["class_agnostic"] = True
        elif self.target.index is not None:  # a fixed class: outputs and manifest lines of its own
            settings["variant"] = f"class{self.target.index}"
        if config.aug_smooth:
            settings["aug_smooth"] = True
        if config.boxes or config.draw_boxes:
            settings["box_threshold"] = config.box_threshold
        if config.draw_boxes:
            settings["draw_boxes"] = True
        return settings

    def pending(self) -> tuple[list[InputImage], int]:
        """Inputs with a method still to do, and how many inputs are already complete."""
        return self.plan.pending()

    @property
    def counts_passes(self) -> bool:
        """Whether a method runs forward passes of its own (Score-CAM, Ablation-CAM): many an image."""
        return any(m.after_pass for m in self.session.methods)

    def expected_passes(self, todo: Sequence[InputImage]) -> int:
        """The forward passes of the methods' own (Score-CAM: K an image, K the target layer's
        channels) that explaining ``todo`` takes: what ``on_passes`` will have counted at the end."""
        per_image = {m.name: m.passes_per_image for m in self.session.methods}
        factor = 6 if self.config.aug_smooth else 1  # every augmented pass runs them again
        return factor * sum(per_image.get(name, 0) for image in todo for name in self.plan.missing.get(image.key, ()))

    def run(
        self,
        progress: Progress | None = None,
        stop: threading.Event | None = None,
        on_passes: Callable[[int], None] | None = None,
        on_start: Callable[[], None] | None = None,
    ) -> Summary:
        """Explain every pending input; safe to interrupt through ``stop``.

        ``progress`` is called with the records of each finished batch; ``on_passes``
        with the count of each group of extra forward passes a method ran; ``on_start``
        once the outputs are open, before the first batch (nothing can fail before it
        but opening them)."""
        config = self.config
        prepare_process(self.device)
        started = time.perf_counter()
        todo, skipped = self.pending()
        summary = Summary(
            total=len(self.images),
            skipped=skipped,
            out_dir=str(config.out_dir),
            manifest=str(self.manifest),
            methods=list(self.method_names),
        )
        try:
            config.out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"cannot write to {config.out_dir}: {exc.strerror or exc}") from None
        workers = default_workers() if config.workers is None else config.workers
        if config.workers is None and len(todo) <= config.batch_size:
            workers = 0  # one batch: a worker would only add its start-up before the model can begin
        dataset = ImageDataset(todo, self.classifier.input_size, config.max_pixels, self.classifier.interpolation)
        batches = loader(dataset, config.batch_size, workers, collate, pin=self.device.type == "cuda")
        writer = Writer(self.plan, config.out_dir, config.fmt, config.alpha, config.boxes, config.draw_boxes,
                        config.box_threshold, self.timings.add,
                        self.classifier.readout.record_fields if self.classifier.readout else ())  # fmt: skip
        engine = Engine(self.session.explainer, self.target, self.plan, writer, self.session.runner, self.timings)
        self.session.explainer.on_passes = on_passes
        # all of this shard's temporaries are cleared at the end, also those an interrupted --overwrite left
        with journalled(self.manifest, self.plan.all_outputs) as journal:
            # Records live in the journal on disk, not in memory: memory stays flat
            # however many images there are; the manifest is rebuilt from it at the end.
            if self.plan.carried:
                journal.append(self.plan.carried.values())
            self.plan.drop(keep={str(p.relative_to(config.out_dir)) for p in self.plan.all_outputs()})
            self.timings.add("start", time.perf_counter() - started)
            if on_start is not None:
                on_start()
            try:
                engine.run(todo, batches, journal, summary, self.device.type == "cpu", progress, stop)
            finally:
                finishing = time.perf_counter()
        self.plan.remove_replaced()
        self.timings.add("finish", time.perf_counter() - finishing)
        summary.seconds = time.perf_counter() - started
        summary.timings = dict(self.timings.seconds)
        return summary


def _pruned_note(pruned: list[Path]) -> str:
    folders = ", ".join(str(p) for p in pruned[:3]) + (", ..." if len(pruned) > 3 else "")
    return (
        f"skipped {len(pruned)} folder{'s' if len(pruned) > 1 else ''} inside the inputs that "
        f"{'hold' if len(pruned) > 1 else 'holds'} camx outputs ({folders}); "
        "give such a folder as an INPUT to explain its images"
    )


def explain(config: ExplainConfig, progress: Progress | None = None, stop: threading.Event | None = None) -> Summary:
    """Prepare and run ``config`` in one call (what ``camx explain`` does)."""
    return Explainer(config).run(progress, stop)

"""The pairs of one model setup, scored: images and maps decoded by the loader's
workers, the localisation values computed at once, the perturbation plans of many
(image, method) pairs packed into full model batches by one
:class:`~cam_cli.metrics.base.Scheduler`, one line per pair handed to ``emit``. A model
whose readout pins (segmentation) gets a free pass per loaded batch and its perturbed
inputs scored pinned to their images (:mod:`~cam_cli.jobs.evaluate.pinning`)."""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cam_cli.images import InputImage
from cam_cli.jobs.base import default_workers, loader
from cam_cli.jobs.evaluate import detection
from cam_cli.jobs.evaluate.config import EvaluateResult
from cam_cli.jobs.evaluate.dataset import MapDataset, MapItem, collate
from cam_cli.jobs.evaluate.lines import Lines, Pair
from cam_cli.jobs.evaluate.pinning import PinnedScores, pins
from cam_cli.jobs.evaluate.setups import ModelSetup
from cam_cli.metrics import METRICS, fields_of, plan_factory
from cam_cli.metrics.base import Group, Samples, Scheduler, output_score
from cam_cli.metrics.complexity import complexity_values
from cam_cli.metrics.localisation import GroundTruth, boxes_of_class, localise
from cam_cli.metrics.masks import Region, boxes_mask, regions_mask
from cam_cli.metrics.regions import region_values

#: a rebuilt model whose probability differs from the manifest's by more than this share of it is reported
SCORE_TOLERANCE = 0.02
IMAGES_PER_LOAD = 4
#: images per load at most when the methods explain again (MPRT's explains are batches of a load's
#: images, up to --batch-size; the trained bottom it keeps grows with them)
REEXPLAINED_PER_LOAD = 16

#: takes finished lines and the forward passes they took
Emit = Callable[[list[dict[str, Any]], int], None]


@dataclass
class Scoring:
    """What the passes of every setup share: how lines are made (with the metric
    options), the device, the metrics asked for, the ground-truth boxes by key, the
    batch and worker counts, where lines go (``emit``) and the result that counts
    forward passes."""

    lines: Lines
    out_dir: Path
    device: torch.device
    localising: list[str]
    perturbing: list[str]
    boxes: dict[str, list[GroundTruth]]
    batch_size: int
    workers: int | None
    emit: Emit
    result: EvaluateResult
    #: the ``--masks-from`` regions by key; None: the region metrics fill in the boxes
    masks: dict[str, list[Region]] | None = None
    #: the randomisation metrics asked for, and the re-explainer of each setup (by ``id``:
    #: a ``RandomisationScorer`` when randomising, for ARCC too)
    randomising: list[str] = field(default_factory=list)
    scorers: dict[int, Any] = field(default_factory=dict)


@dataclass
class Scored:
    """The pairs of one loaded batch that can be scored, and the lines of those that failed."""

    pairs: list[Pair] = field(default_factory=list)
    images: list[torch.Tensor] = field(default_factory=list)  # (3, S, S) uint8, one per input
    image_of: list[int] = field(default_factory=list)  # per pair, the index of its image
    maps: list[torch.Tensor] = field(default_factory=list)  # (S, S) per pair
    local: list[dict[str, Any]] = field(default_factory=list)  # per pair, its localisation values
    errors: list[dict[str, Any]] = field(default_factory=list)


class SetupPass:
    """Every pending pair of one model setup, scored; ``mismatched`` counts the lines
    whose rebuilt probability differs from the manifest's beyond ``SCORE_TOLERANCE``."""

    def __init__(self, scoring: Scoring, setup: ModelSetup, pairs: list[Pair]) -> None:
        self.scoring = scoring
        self.setup = setup
        self.pairs = pairs
        runner = setup.runner
        readout = getattr(setup.classifier, "readout", None) if setup.scoring is None else None
        # a readout whose targets depend on the unperturbed image: free pass, then pinned passes
        self.pinned = PinnedScores(runner.forward, readout) if runner and readout and pins(readout) else None
        score = setup.scoring.score if setup.scoring is not None else None  # a detection run's
        score = score or self.pinned or (output_score(runner.forward) if runner and setup.scores_output else None)
        self.scheduler = Scheduler(runner.forward, scoring.batch_size, score) if runner else None
        self.passes_before = 0
        # the passes and batches of the setups scored before this one (several models)
        self.counted = (scoring.result.passes, scoring.result.batches)
        self.mismatched = 0
        self.reexplainer = scoring.scorers.get(id(setup))
        # the re-explainer's passes and batches before this pass (it counts from its making)
        self.reexplained = (self.reexplainer.passes, self.reexplainer.batches) if self.reexplainer else (0, 0)

    def run(self, stop: threading.Event | None = None) -> None:
        """Score the pairs, batch after batch, until done or ``stop`` is set."""
        dataset = self._dataset()
        workers = default_workers() if self.scoring.workers is None else self.scoring.workers
        per_load = IMAGES_PER_LOAD
        if self.reexplainer is not None and self.scoring.randomising:
            per_load = max(per_load, min(self.scoring.batch_size, REEXPLAINED_PER_LOAD))
        for batch in loader(dataset, per_load, min(workers, len(dataset)), collate):
            self._score(self._split(dataset, batch))
            if stop is not None and stop.is_set():
                break
        if self.scheduler is not None:
            self.scheduler.run(final=True)

    def _dataset(self) -> MapDataset:
        """One item per input (sorted by key) with the pairs of its methods."""
        inputs: dict[str, InputImage] = {}
        per_input: dict[str, list[Pair]] = {}
        for pair in self.pairs:
            key = str(pair.record["key"])
            inputs.setdefault(key, InputImage(Path(str(pair.record.get("input") or key)), key))
            per_input.setdefault(key, []).append(pair)
        order = sorted(inputs)
        classifier = self.setup.classifier
        native = self.setup.scoring is not None and self.setup.scoring.native
        return MapDataset(
            self.scoring.out_dir,
            [inputs[k] for k in order],
            [per_input[k] for k in order],
            None if native else self.setup.size,
            bool(self.scoring.localising),
            classifier.interpolation if classifier else "bilinear",
        )

    def _split(self, dataset: MapDataset, batch: list[MapItem]) -> Scored:
        """The pairs of ``batch`` that can be scored, with their localisation values;
        the lines of those that cannot (an unreadable map or image, a class out of range)."""
        scored = Scored()
        for item in batch:
            slot = None
            for pair, resized, native, error in zip(
                dataset.pairs[item.index], item.maps, item.natives, item.errors, strict=True
            ):
                error = error or self._class_error(pair)
                local: dict[str, Any] = {}
                if error is None and self.scoring.localising:
                    try:
                        local = self._localise(pair, native)
                    except ValueError as exc:  # a mask of the wrong size, an unreadable mask
                        error = str(exc)
                if error is not None:
                    scored.errors.append(self.scoring.lines.line(pair, None, error, None))
                    continue
                assert resized is not None and item.image is not None
                if slot is None:
                    slot = len(scored.images)
                    scored.images.append(item.image)
                scored.image_of.append(slot)
                scored.maps.append(resized)
                scored.pairs.append(pair)
                scored.local.append(local)
        return scored

    def _class_error(self, pair: Pair) -> str | None:
        outputs = self.setup.outputs
        if outputs and not 0 <= int(pair.record["class_index"]) < outputs:
            return f"class_index {pair.record['class_index']} is out of range for a model with {outputs} outputs"
        return None

    def _localise(self, pair: Pair, native: np.ndarray | None) -> dict[str, Any]:
        """The localisation values of ``pair`` from its map at its own resolution ``(H, W)``."""
        assert native is not None
        wanted = [n for n in self.scoring.localising if n in pair.todo]
        class_index = int(pair.record["class_index"])
        classifier = self.setup.classifier
        name = classifier.class_name(class_index) if classifier and classifier.categories else None
        truths = self.scoring.boxes.get(str(pair.record["key"]), [])
        if self.scoring.lines.boxes_digest == detection.OWN_BOXES:
            truths = detection.own_truths(pair.record)
        options = self.scoring.lines.options
        class_name = name or pair.record.get("class_name")
        values: dict[str, Any] = localise(native, truths, class_index, class_name, wanted, options.box_threshold)
        regional = [n for n in wanted if METRICS[n].family == "region"]
        if regional:
            masks = self.scoring.masks
            if masks is not None:
                mask = regions_mask(masks.get(str(pair.record["key"]), []), class_index, class_name, native.shape)
            else:
                mask = boxes_mask(boxes_of_class(truths, class_index, class_name), native.shape)
            values.update(region_values(native, mask, regional, options.topk))
        values.update(complexity_values(native, wanted, options.complexity_eps))
        return values

    def _score(self, scored: Scored) -> None:
        """Emit the failed lines; hand the perturbation plans of the others to the
        scheduler (their lines are emitted when it finishes them), or emit them now."""
        lines, emit = self.scoring.lines, self.scoring.emit
        if scored.errors:
            emit(scored.errors, 0)
        if not scored.pairs:
            return
        todo = sorted({n for p in scored.pairs for n in p.todo if n in self.scoring.perturbing})
        randomising = any(n in p.todo for p in scored.pairs for n in self.scoring.randomising)
        if self.reexplainer is not None and randomising:
            assert self.setup.runner is not None
            x = self.setup.runner.normalise(torch.stack(scored.images))
            self.reexplainer.score(scored.pairs, x, scored.image_of, scored.local)
        if self.scheduler is None or not todo:
            emit([lines.line(p, scored.local[j], None, None) for j, p in enumerate(scored.pairs)], self._tally())
            return
        assert self.setup.runner is not None
        for part in _by_size(scored):  # one part, unless a model takes images at their own sizes
            x = self.setup.runner.normalise(torch.stack(part.images))
            ids = self._fix(part, x) if self.pinned is not None else None
            if not part.pairs:
                continue
            samples = self._samples(part, x, ids, "arcc" in todo)
            plans = []
            for entry in dict.fromkeys(METRICS[n].entry for n in todo):
                names = [n for n in todo if METRICS[n].entry == entry]
                plans.append(plan_factory(str(entry))(samples, names, self.scoring.lines.options))
            self.scheduler.add(Group(samples, plans), on_finish=self._finished(part, samples))
        self.scheduler.run()

    def _fix(self, scored: Scored, x: torch.Tensor) -> list[int]:
        """The free pass over ``scored``'s images ``x`` (normalised) for a readout that pins
        (:mod:`~cam_cli.jobs.evaluate.pinning`); the pairs it leaves nothing to score (a class
        on no pixel) taken out of ``scored`` and emitted as error lines. Its image ids."""
        assert self.pinned is not None
        ids = self.pinned.fix(x)
        classes = [int(p.record["class_index"]) for p in scored.pairs]
        reasons = self.pinned.absent(ids, scored.image_of, classes)
        if not any(reasons):
            return ids
        kept = [j for j, reason in enumerate(reasons) if reason is None]
        failed = [(p, reason) for p, reason in zip(scored.pairs, reasons, strict=True) if reason is not None]
        self.scoring.emit([self.scoring.lines.line(p, None, f"the rebuilt model: {r}", None) for p, r in failed], 0)
        scored.pairs = [scored.pairs[j] for j in kept]
        scored.image_of = [scored.image_of[j] for j in kept]
        scored.maps = [scored.maps[j] for j in kept]
        scored.local = [scored.local[j] for j in kept]
        for slot in set(range(len(ids))) - set(scored.image_of):  # no pair of it left to score
            self.pinned.images.pop(ids[slot], None)
        return ids

    def _samples(self, scored: Scored, x: torch.Tensor, ids: list[int] | None, remade: bool = False) -> Samples:
        """The pairs' normalised images ``(N, 3, S, S)`` (of ``x``, one per image), maps
        ``(N, S, S)`` and classes on the device; for a readout that pins (``ids``: its image
        ids of ``x``), a tag per pair in place of its class (:meth:`PinnedScores.tags`); with
        ``remade``, each map made again from its image multiplied by it (ARCC)."""
        device = self.scoring.device
        x = x[torch.tensor(scored.image_of, device=device)]
        classes = [int(p.record["class_index"]) for p in scored.pairs]
        if self.setup.scoring is not None:  # a detection run: the free pass pins each sample's detection
            tags = self.setup.scoring.pin([p.record for p in scored.pairs], x).to(device)
        elif self.pinned is not None and ids is not None:
            tags = self.pinned.tags([ids[i] for i in scored.image_of], classes, device)
        else:
            tags = torch.tensor(classes, device=device)
        samples = Samples(
            x,
            torch.stack(scored.maps).to(device),
            tags,
            [f"{p.record['key']}\0{p.record['method']}" for p in scored.pairs],
        )
        if remade:
            assert self.reexplainer is not None
            samples.remaps = self.reexplainer.remade(scored.pairs, samples.images, samples.maps)
        return samples

    def _tally(self) -> int:
        """The run's forward passes and batches brought up to date (the scheduler's, the pinned
        free passes' and the re-explainer's); the passes since the last call."""
        passes, batches = (self.scheduler.passes, self.scheduler.batches) if self.scheduler else (0, 0)
        if self.pinned is not None:  # and the free passes
            passes, batches = passes + self.pinned.passes, batches + self.pinned.batches
        if self.reexplainer is not None:
            passes += self.reexplainer.passes - self.reexplained[0]
            batches += self.reexplainer.batches - self.reexplained[1]
        self.scoring.result.passes = self.counted[0] + passes
        self.scoring.result.batches = self.counted[1] + batches
        new, self.passes_before = passes - self.passes_before, passes
        return new

    def _finished(self, scored: Scored, samples: Samples) -> Callable[[dict[str, torch.Tensor]], None]:
        """What the scheduler calls with the values of ``scored``'s pairs: their lines emitted."""
        fields = fields_of(self.scoring.perturbing)

        def done(values: dict[str, torch.Tensor]) -> None:
            lines = []
            for j, pair in enumerate(scored.pairs):
                row = {f: _value(values[f][j]) for f in fields if f in values}
                row.update(scored.local[j])
                score = float(values["score"][j])
                recorded = pair.record.get("score")
                if (
                    isinstance(recorded, (int, float))
                    and abs(score - recorded) > SCORE_TOLERANCE * abs(recorded) + 1e-4
                ):
                    self.mismatched += 1
                lines.append(self.scoring.lines.line(pair, row, None, score))
            if self.pinned is not None:  # its images' pinned state is no longer needed
                self.pinned.release(samples.classes)
            self.scoring.emit(lines, self._tally())

        return done


def _by_size(scored: Scored) -> list[Scored]:
    """``scored`` in parts whose images share one size (itself when they all do)."""
    sizes = [tuple(image.shape) for image in scored.images]
    if len(set(sizes)) <= 1:
        return [scored]
    parts: dict[tuple[int, ...], Scored] = {}
    slots: dict[int, int] = {}
    for j, pair in enumerate(scored.pairs):
        slot = scored.image_of[j]
        part = parts.setdefault(sizes[slot], Scored())
        if slot not in slots:
            slots[slot] = len(part.images)
            part.images.append(scored.images[slot])
        part.image_of.append(slots[slot])
        part.maps.append(scored.maps[j])
        part.pairs.append(pair)
        part.local.append(scored.local[j])
    return list(parts.values())


def _value(tensor: torch.Tensor) -> float | None:
    value = float(tensor)
    return None if math.isnan(value) else round(value, 6)

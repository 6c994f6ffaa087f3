"""One ``camx evaluate`` run: faithfulness metrics over a finished ``camx explain`` run.

manifest lines -> rebuild each model -> decode the images and load their maps
(DataLoader workers) -> perturbation plans of many (image, method) pairs packed
into full model batches (:class:`cam_cli.metrics.base.Scheduler`) -> one line
per pair through a journal into ``OUT/metrics.jsonl`` -> the summary
(``OUT/metrics-summary.json``).

Each line records what shaped its values (the model and preprocessing, the map
file, the metric options). A re-run skips the lines whose values still hold,
computes only the metrics missing or shaped differently, and a killed run
resumes from the journal.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from cam_cli import rundir
from cam_cli.errors import CamxError, InputError, ModelError, OutputError
from cam_cli.images import DEFAULT_MAX_PIXELS, InputImage
from cam_cli.jobs.base import (
    ModelRunner,
    Tally,
    check_precision,
    default_workers,
    journalled,
    loader,
    open_device,
    place_model,
    prepare_process,
)
from cam_cli.jobs.data import ImageDataset
from cam_cli.metrics import DEFAULT_METRICS, METRICS, MetricOptions, fields_of, plan_factory
from cam_cli.metrics.base import Group, Samples, Scheduler
from cam_cli.metrics.localisation import GroundTruth, localise, read_boxes
from cam_cli.models import Classifier, load_classifier

BOOTSTRAP_SAMPLES = 2000
#: a rebuilt model whose probability differs from the manifest's by more than this share of it is reported
SCORE_TOLERANCE = 0.02
#: the fields a manifest line needs for its map to be evaluated
NEEDED = ("key", "method", "map", "class_index")
MODEL_FIELDS = ("model", "input_size")
IMAGES_PER_LOAD = 4


@dataclass
class EvaluateConfig:
    """Everything ``camx evaluate`` is asked to do (the CLI's options, parsed).

    ``model`` and the fields after it override what the manifest records.
    """

    out_dir: Path
    metrics: Sequence[str] = DEFAULT_METRICS
    steps: int = 20
    baseline: str = "zero"
    road_noise: float = 0.01
    boxes_from: Path | None = None
    seed: int = 0
    box_threshold: float = 0.2
    model: str | None = None
    weights: str | None = None
    num_classes: int | None = None
    labels: Path | None = None
    input_size: int | None = None
    mean: Sequence[float] | None = None
    std: Sequence[float] | None = None
    output_key: str | None = None
    device: str = "auto"
    batch_size: int = 32
    workers: int | None = None
    precision: str = "fp32"


@dataclass
class EvaluateResult(Tally):
    """What a run did, counted in lines; ``as_dict`` is the ``--json`` output."""

    not_evaluated: int = 0
    passes: int = 0
    batches: int = 0
    metrics_file: str = ""
    summary_file: str = ""
    warnings: list[str] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def passes_per_second(self) -> float:
        return self.passes / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "total": self.total,
            "done": self.done,
            "skipped": self.skipped,
            "failed": self.failed,
            "not_evaluated": self.not_evaluated,
            "seconds": round(self.seconds, 3),
            "forward_passes": self.passes,
            "forward_batches": self.batches,
            "passes_per_second": round(self.passes_per_second, 3),
            "metrics_file": self.metrics_file,
            "summary_file": self.summary_file,
            "warnings": self.warnings,
            "summary": self.summary,
        }


# ------------------------------------------------------------------- manifest


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def _weights_argument(record: dict[str, Any]) -> str:
    """What ``load_classifier`` takes for the weights a record names."""
    label = str(record.get("weights") or "DEFAULT")
    return "DEFAULT" if label in ("as built", "in file") else label


def _accepts(function: Callable[..., Any], name: str) -> bool:
    try:
        return name in inspect.signature(function).parameters
    except (TypeError, ValueError):
        return False


@dataclass
class ModelSetup:
    """One way of rebuilding a model, shared by the records that name it."""

    model: str
    weights: str
    input_size: int | None
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    output_key: str | None
    num_classes: int | None
    seed: int
    classifier: Classifier | None = None
    runner: ModelRunner | None = None
    outputs: int = 0


# ------------------------------------------------------------------- data


@dataclass
class Pair:
    """One (input, method) line to evaluate, and what its values depend on."""

    record: dict[str, Any]
    setup: ModelSetup
    reuse: dict[str, Any]
    todo: list[str]
    stat: tuple[int, int] | None


@dataclass
class Loaded:
    index: int
    image: torch.Tensor | None  # (3, S, S) uint8
    maps: list[torch.Tensor | None]  # (S, S) float32 per pair
    natives: list[np.ndarray | None]  # (H, W) float32 per pair, for the localisation metrics
    errors: list[str | None]


class MapDataset(torch.utils.data.Dataset[Loaded]):
    """One input image per item, decoded and resized as ``explain`` does, with
    the maps of its pairs read and resized bilinearly to ``S x S``."""

    def __init__(
        self,
        out_dir: Path,
        inputs: Sequence[InputImage],
        pairs: Sequence[Sequence[Pair]],
        size: int,
        natives: bool,
        interpolation: str | None,
    ) -> None:
        self.out_dir = out_dir
        kwargs = {"interpolation": interpolation} if interpolation and _accepts(ImageDataset, "interpolation") else {}
        self.images = ImageDataset(inputs, size, DEFAULT_MAX_PIXELS, **kwargs)
        self.pairs = pairs
        self.size = size
        self.natives = natives

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Loaded:
        item = self.images[index]
        maps: list[torch.Tensor | None] = []
        natives: list[np.ndarray | None] = []
        errors: list[str | None] = []
        for pair in self.pairs[index]:
            if item.error is not None:
                maps.append(None)
                natives.append(None)
                errors.append(f"cannot read the input image {pair.record.get('input')}: {item.error}")
                continue
            try:
                native = read_map(self.out_dir, str(pair.record["map"]))
            except ValueError as exc:
                maps.append(None)
                natives.append(None)
                errors.append(str(exc))
                continue
            resized = F.interpolate(
                torch.from_numpy(native)[None, None], size=(self.size, self.size), mode="bilinear", align_corners=False
            )[0, 0]
            maps.append(resized)
            natives.append(native if self.natives else None)
            errors.append(None)
        return Loaded(index, item.image, maps, natives, errors)


def read_map(out_dir: Path, rel: str) -> np.ndarray:
    """The ``(H, W)`` float32 map ``OUT/rel``; ``ValueError`` with a one-line reason."""
    path = out_dir / rel
    try:
        array = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise ValueError(f"map file {path} not found") from None
    except (OSError, ValueError, EOFError) as exc:
        reason = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise ValueError(f"cannot read map file {path}: {reason}") from None
    if array.ndim != 2 or array.size == 0 or not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"map file {path} holds a {array.dtype} array of shape {array.shape}, not a 2-D float map")
    array = np.ascontiguousarray(array, dtype=np.float32)
    if not np.isfinite(array).all():
        raise ValueError(f"map file {path} holds non-finite values")
    return array


def _collate(items: list[Loaded]) -> list[Loaded]:
    return items


# ------------------------------------------------------------------- the run


class Evaluator:
    """A prepared evaluation: manifest read, models rebuilt, nothing written yet."""

    def __init__(self, config: EvaluateConfig) -> None:
        prepare_process()
        self.config = config
        self.out_dir = config.out_dir
        self.metrics_path = self.out_dir / rundir.METRICS
        self.summary_path = self.out_dir / rundir.METRICS_SUMMARY
        unknown = [m for m in config.metrics if m not in METRICS]
        if unknown or not config.metrics:
            raise InputError(f"unknown metric {', '.join(unknown)}; choose from {', '.join(METRICS)}")
        self.names = [m for m in METRICS if m in config.metrics]
        self.localising = [m for m in self.names if METRICS[m].family == "localisation"]
        self.perturbing = [m for m in self.names if METRICS[m].family == "perturbation"]
        check_precision(config.precision)
        self.warnings: list[str] = []
        records = rundir.read_run(self.out_dir).records
        ok = [r for k, r in sorted(records.items()) if r.get("status") == "ok"]
        self.not_evaluated = len(records) - len(ok)
        if not ok:
            raise InputError(f"the manifest of {self.out_dir} has no ok lines to evaluate ({len(records)} failed)")
        self._check_fields(ok)
        self.options = MetricOptions(
            steps=config.steps,
            baseline=config.baseline,
            road_noise=config.road_noise,
            seed=config.seed,
            box_threshold=config.box_threshold,
        )
        self.boxes: dict[str, list[GroundTruth]] = {}
        self.boxes_digest: str | None = None
        if self.localising:
            if config.boxes_from is None:
                raise InputError(f"the metrics {', '.join(self.localising)} need ground-truth boxes: pass --boxes-from")
            self.boxes = self._match_boxes(read_boxes(config.boxes_from), ok)
            self.boxes_digest = _digest(config.boxes_from)
        self.device = open_device(config.device)
        self.setups: dict[tuple[Any, ...], ModelSetup] = {}
        # The run's --seed (which seeds random weights) is recorded on some lines only (random's):
        # it holds for every line of the same model and weights.
        self.seeds: dict[tuple[Any, Any], int] = {}
        for r in ok:
            if isinstance(r.get("seed"), int):
                self.seeds.setdefault((r.get("model"), r.get("weights")), int(r["seed"]))
        self.records = [(r, self._setup_of(r)) for r in ok]
        if self.perturbing:
            for setup in self.setups.values():
                self._rebuild(setup)
        self.mean_std: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._pairs: list[Pair] | None = None

    # -- reading the run
    def _check_fields(self, records: Sequence[dict[str, Any]]) -> None:
        missing = [f for f in NEEDED if any(r.get(f) is None for r in records)]
        overridable = [f for f in MODEL_FIELDS if any(r.get(f) is None for r in records)]
        if self.config.model is not None:
            overridable = [f for f in overridable if f != "model"]
        if self.config.input_size is not None:
            overridable = [f for f in overridable if f != "input_size"]
        if missing or overridable:
            hint = (
                f", or pass {' and '.join('--' + f.replace('_', '-') for f in overridable)}"
                if overridable and not missing
                else ""
            )
            raise InputError(
                f"the manifest of {self.out_dir} comes from an older camx: its lines lack "
                f"{', '.join(missing + overridable)}; run camx explain again with --overwrite{hint}"
            )

    def _setup_of(self, record: dict[str, Any]) -> ModelSetup:
        c = self.config
        model = c.model or str(record["model"])
        weights = c.weights or (_weights_argument(record) if c.model is None else "DEFAULT")
        num_classes = c.num_classes
        if num_classes is None and c.model is None and c.weights is None:
            label = str(record.get("weights") or "")
            if label.upper() == "NONE" or os.sep in label or label.endswith((".pth", ".pt", ".bin", ".ckpt")):
                num_classes = record.get("num_classes")
        key = (
            model,
            weights,
            c.input_size or record.get("input_size"),
            tuple(c.mean) if c.mean else _rounded(record.get("mean")),
            tuple(c.std) if c.std else _rounded(record.get("std")),
            c.output_key if c.output_key is not None else record.get("output_key"),
            num_classes,
            self.seeds.get((record.get("model"), record.get("weights")), 0),
        )
        if key not in self.setups:
            self.setups[key] = ModelSetup(*key)  # type: ignore[arg-type]
        return self.setups[key]

    def _rebuild(self, setup: ModelSetup) -> None:
        c = self.config
        extra = {"seed": setup.seed} if _accepts(load_classifier, "seed") else {}
        try:
            classifier = load_classifier(
                setup.model,
                setup.weights,
                setup.num_classes,
                c.labels,
                setup.input_size,
                tuple(c.mean) if c.mean else None,
                tuple(c.std) if c.std else None,
                setup.output_key,
                **extra,
            )
        except CamxError as exc:
            raise ModelError(
                f"cannot rebuild the model {setup.model} of {self.out_dir}: {exc}{_cwd_hint(setup)}"
            ) from None
        except Exception as exc:  # user code (a factory) may fail any way
            message = " ".join(str(exc).split())[:200]
            raise ModelError(
                f"cannot rebuild the model {setup.model} of {self.out_dir}: {type(exc).__name__}: {message}"
            ) from None
        # the manifest's mean/std win where they differ from the model's own (explain's --mean/--std)
        if setup.mean and not c.mean and not _close(setup.mean, classifier.mean):
            classifier = replace(classifier, mean=tuple(setup.mean))  # type: ignore[arg-type]
        if setup.std and not c.std and not _close(setup.std, classifier.std):
            classifier = replace(classifier, std=tuple(setup.std))  # type: ignore[arg-type]
        outputs = [0]

        def check(runner: ModelRunner) -> None:
            size = classifier.input_size
            try:
                with torch.inference_mode():
                    logits = runner.forward(runner.normalise(torch.zeros(1, 3, size, size, dtype=torch.uint8)))
            except CamxError as exc:
                raise ModelError(f"the rebuilt model {setup.model}: {exc}") from None
            except Exception as exc:
                message = " ".join(str(exc).split())[:200]
                raise ModelError(f"the rebuilt model {setup.model} fails on a {size}x{size} input: {message}") from None
            if logits.ndim != 2:
                raise ModelError(
                    f"the rebuilt model {setup.model} gives outputs of shape {tuple(logits.shape)}, not logits"
                )
            outputs[0] = int(logits.shape[1])

        setup.runner = place_model(classifier.module, classifier.logits, classifier.mean, classifier.std, self.device,
                                   self.config.precision, check=check)  # fmt: skip
        setup.classifier = classifier
        setup.outputs = outputs[0]

    def _match_boxes(
        self, boxes: dict[str, list[GroundTruth]], records: Sequence[dict[str, Any]]
    ) -> dict[str, list[GroundTruth]]:
        """Boxes by record key: exact keys, else a file name that names one input alone."""
        keys = {str(r["key"]) for r in records}
        by_name: dict[str, list[str]] = {}
        for key in keys:
            by_name.setdefault(os.path.basename(key), []).append(key)
        matched: dict[str, list[GroundTruth]] = {}
        for key, truths in boxes.items():
            if key in keys:
                matched[key] = truths
            elif len(by_name.get(os.path.basename(key), [])) == 1:
                matched.setdefault(by_name[os.path.basename(key)][0], truths)
        if len(matched) < len(boxes):
            self.warnings.append(
                f"--boxes-from {self.config.boxes_from}: {len(matched)} of {len(boxes)} keys match an input of "
                f"{self.out_dir} ({len(boxes) - len(matched)} match none)"
            )
        return matched

    # -- what is done already
    def _common(self, record: dict[str, Any], setup: ModelSetup, stat: tuple[int, int] | None) -> dict[str, Any]:
        """What shapes every metric of a line: the model as rebuilt, the map file, the class."""
        classifier = setup.classifier
        return {
            "model": setup.model,
            "weights": setup.weights,
            "input_size": classifier.input_size if classifier else setup.input_size,
            "mean": [round(v, 6) for v in classifier.mean] if classifier else list(setup.mean or []),
            "std": [round(v, 6) for v in classifier.std] if classifier else list(setup.std or []),
            "output_key": setup.output_key,
            "precision": self.config.precision,
            "class_index": record.get("class_index"),
            "map": record.get("map"),
            "map_size": stat[0] if stat else None,
            "map_mtime_ns": stat[1] if stat else None,
        }

    def _metric_settings(self, name: str) -> dict[str, Any]:
        values = {
            "steps": self.options.steps,
            "baseline": self.options.baseline,
            "road_noise": self.options.road_noise,
            "seed": self.options.seed,
            "boxes": self.boxes_digest,
            "box_threshold": self.options.box_threshold,
        }
        return {s: values[s] for s in METRICS[name].settings}

    def _still_valid(self, old: dict[str, Any] | None, common: dict[str, Any]) -> list[str]:
        """The metrics of ``old`` whose values hold for this run's settings."""
        if old is None or old.get("status") != "ok":
            return []
        if any(_norm(old.get(k)) != _norm(v) for k, v in common.items()):
            return []
        valid = []
        for name in old.get("metrics") or []:
            spec = METRICS.get(name)
            if spec is None or any(f not in old for f in spec.fields):
                continue
            if all(_norm(old.get(s)) == _norm(v) for s, v in self._metric_settings(name).items()):
                valid.append(name)
        return valid

    def pending(self) -> tuple[list[Pair], int]:
        """The pairs still to compute (some metrics or all), and how many lines are complete."""
        if self._pairs is None:
            earlier = rundir.load_manifest(self.metrics_path)
            pairs: list[Pair] = []
            skipped = 0
            for record, setup in self.records:
                try:
                    st = os.stat(self.out_dir / str(record["map"]))
                    stat: tuple[int, int] | None = (st.st_size, st.st_mtime_ns)
                except OSError:
                    stat = None
                old = earlier.get(rundir.record_key(record))
                valid = self._still_valid(old, self._common(record, setup, stat)) if stat else []
                todo = [n for n in self.names if n not in valid]
                if not todo:
                    skipped += 1
                    continue
                reuse = {}
                if old is not None:
                    for name in valid:
                        reuse.update({f: old[f] for f in METRICS[name].fields})
                        reuse.update(self._metric_settings(name))
                    reuse["_metrics"] = valid
                pairs.append(Pair(record, setup, reuse, todo, stat))
            self._pairs = pairs
            self._skipped = skipped
        return self._pairs, self._skipped

    # -- lines
    def _line(
        self, pair: Pair, values: dict[str, Any] | None, error: str | None, score: float | None
    ) -> dict[str, Any]:
        record = pair.record
        line: dict[str, Any] = {
            "input": record.get("input"),
            "key": record.get("key"),
            "method": record.get("method"),
            "status": "ok" if error is None else "error",
            "error": error,
            "class_index": record.get("class_index"),
            "class_name": record.get("class_name"),
            "score": None if score is None else round(score, 6),
        }
        if record.get("variant"):  # a fixed --target class: a line of its own, as in the manifest
            line["variant"] = record["variant"]
        if error is not None:
            line.update(self._common(record, pair.setup, pair.stat))
            return line
        metrics = list(pair.reuse.get("_metrics", []))
        merged = {k: v for k, v in pair.reuse.items() if k != "_metrics"}
        for name in pair.todo:
            merged.update(self._metric_settings(name))
            metrics.append(name)
        assert values is not None
        merged.update(values)
        line["metrics"] = [m for m in METRICS if m in metrics]
        for name in line["metrics"]:
            for f in METRICS[name].fields:
                line[f] = merged.get(f)
        for s in ("steps", "baseline", "road_noise", "seed", "boxes", "box_threshold"):
            if s in merged:
                line[s] = merged[s]
        if "boxes" in line and self.config.boxes_from is not None:
            line["boxes_from"] = str(self.config.boxes_from)
        line.update(self._common(record, pair.setup, pair.stat))
        return line

    def run(
        self,
        progress: Callable[[list[dict[str, Any]], int], None] | None = None,
        stop: threading.Event | None = None,
    ) -> EvaluateResult:
        """Evaluate every pending pair, then write the summary; safe to interrupt through ``stop``."""
        started = time.perf_counter()
        pairs, skipped = self.pending()
        result = EvaluateResult(
            total=len(self.records),
            skipped=skipped,
            not_evaluated=self.not_evaluated,
            metrics_file=str(self.metrics_path),
            summary_file=str(self.summary_path),
            warnings=self.warnings,
        )
        mismatched = [0]

        def emit(lines: list[dict[str, Any]], passes: int) -> None:
            journal.append(lines)
            for line in lines:
                if line["status"] == "ok":
                    result.done += 1
                else:
                    result.fail(f"{line['key']} ({line['method']})", line["error"])
            if progress is not None:
                progress(lines, passes)

        prepare_process(self.device)
        busy = f"another camx evaluate is writing {self.metrics_path} right now; let it finish first"
        with journalled(self.metrics_path, lambda: [self.metrics_path, self.summary_path], busy) as journal:
            by_setup: dict[int, list[Pair]] = {}
            for pair in pairs:
                by_setup.setdefault(id(pair.setup), []).append(pair)
            for group in by_setup.values():
                if stop is not None and stop.is_set():
                    break
                self._run_setup(group, emit, stop, result, mismatched)
        if mismatched[0]:
            self.warnings.append(
                f"for {mismatched[0]} lines the rebuilt model's probability of the explained class differs from the "
                f"manifest's by more than {SCORE_TOLERANCE:.0%}: is it the model that made {self.out_dir}? "
                "(pass --model/--weights to choose it)"
            )
        result.summary = self.summarise()
        try:
            rundir.write_atomic(self.summary_path, (json.dumps(result.summary, indent=2) + "\n").encode("utf-8"))
        except OSError as exc:
            raise OutputError(f"cannot write {self.summary_path}: {exc.strerror or exc}") from None
        result.seconds = time.perf_counter() - started
        return result

    def _run_setup(
        self,
        pairs: list[Pair],
        emit: Callable[[list[dict[str, Any]], int], None],
        stop: threading.Event | None,
        result: EvaluateResult,
        mismatched: list[int],
    ) -> None:
        setup = pairs[0].setup
        classifier = setup.classifier
        size = classifier.input_size if classifier else int(setup.input_size or 224)
        inputs: dict[str, InputImage] = {}
        per_input: dict[str, list[Pair]] = {}
        for pair in pairs:
            key = str(pair.record["key"])
            inputs.setdefault(key, InputImage(Path(str(pair.record.get("input") or key)), key))
            per_input.setdefault(key, []).append(pair)
        order = sorted(inputs)
        workers = default_workers() if self.config.workers is None else self.config.workers
        workers = min(workers, len(order))
        dataset = MapDataset(
            self.out_dir,
            [inputs[k] for k in order],
            [per_input[k] for k in order],
            size,
            bool(self.localising),
            getattr(classifier, "interpolation", None),
        )
        batches = loader(dataset, IMAGES_PER_LOAD, workers, _collate)
        runner = setup.runner
        scheduler = Scheduler(runner.forward, self.config.batch_size) if runner else None
        passes_before = [0]

        def finished(group_pairs: list[Pair], local: list[dict[str, Any]]) -> Callable[[dict[str, torch.Tensor]], None]:
            def done(values: dict[str, torch.Tensor]) -> None:
                lines = []
                for j, pair in enumerate(group_pairs):
                    row = {f: _value(values[f][j]) for f in fields_of(self.perturbing) if f in values}
                    row.update(local[j])
                    score = float(values["score"][j])
                    recorded = pair.record.get("score")
                    if isinstance(recorded, (int, float)) and abs(score - recorded) > SCORE_TOLERANCE * recorded + 1e-4:
                        mismatched[0] += 1
                    lines.append(self._line(pair, row, None, score))
                passes = scheduler.passes - passes_before[0] if scheduler else 0
                passes_before[0] = scheduler.passes if scheduler else 0
                result.passes = scheduler.passes if scheduler else 0
                result.batches = scheduler.batches if scheduler else 0
                emit(lines, passes)

            return done

        for batch in batches:
            errors: list[dict[str, Any]] = []
            group_pairs: list[Pair] = []
            images: list[torch.Tensor] = []
            image_of: list[int] = []
            maps: list[torch.Tensor] = []
            local: list[dict[str, Any]] = []
            for item in batch:
                own = dataset.pairs[item.index]
                slot = None
                for pair, resized, native, error in zip(own, item.maps, item.natives, item.errors, strict=True):
                    if error is None and setup.outputs and not 0 <= int(pair.record["class_index"]) < setup.outputs:
                        error = (
                            f"class_index {pair.record['class_index']} is out of range "
                            f"for a model with {setup.outputs} outputs"
                        )
                    if error is not None:
                        errors.append(self._line(pair, None, error, None))
                        continue
                    assert resized is not None and item.image is not None
                    if slot is None:
                        slot = len(images)
                        images.append(item.image)
                    image_of.append(slot)
                    maps.append(resized)
                    group_pairs.append(pair)
                    values = {}
                    if self.localising:
                        wanted = [n for n in self.localising if n in pair.todo]
                        truths = self.boxes.get(str(pair.record["key"]), [])
                        class_index = int(pair.record["class_index"])
                        name = classifier.class_name(class_index) if classifier and classifier.categories else None
                        values = localise(
                            native,  # type: ignore[arg-type]
                            truths,
                            class_index,
                            name or pair.record.get("class_name"),
                            wanted,
                            self.options.box_threshold,
                        )
                    local.append(values)
            if errors:
                emit(errors, 0)
            if group_pairs:
                todo_perturbing = sorted({n for p in group_pairs for n in p.todo if n in self.perturbing})
                if scheduler is None or runner is None or not todo_perturbing:
                    emit([self._line(p, local[j], None, None) for j, p in enumerate(group_pairs)], 0)
                else:
                    x = runner.normalise(torch.stack(images))
                    index = torch.tensor(image_of, device=self.device)
                    samples = Samples(
                        x[index],
                        torch.stack(maps).to(self.device),
                        torch.tensor([int(p.record["class_index"]) for p in group_pairs], device=self.device),
                        [f"{p.record['key']}\0{p.record['method']}" for p in group_pairs],
                    )
                    plans = []
                    for entry in dict.fromkeys(METRICS[n].entry for n in todo_perturbing):
                        names = [n for n in todo_perturbing if METRICS[n].entry == entry]
                        plans.append(plan_factory(str(entry))(samples, names, self.options))
                    scheduler.add(Group(samples, plans), on_finish=finished(group_pairs, local))
                    scheduler.run()
            if stop is not None and stop.is_set():
                break
        if scheduler is not None:
            scheduler.run(final=True)

    # -- summary
    def summarise(self) -> dict[str, Any]:
        """Per method: n, mean and seeded 95% bootstrap interval of each metric, ranks, gaps to ``random``."""
        lines = rundir.load_manifest(self.metrics_path)
        by_method: dict[str, dict[str, dict[str, Any]]] = {}
        for record, _setup in self.records:
            line = lines.get(rundir.record_key(record))
            if line is None or line.get("status") != "ok":
                continue
            # a fixed --target class is summarised apart: gradcam.class281
            by_method.setdefault(rundir.record_key(record)[1], {})[str(record["key"])] = line
        stats = summary_stats(self.names)
        methods: dict[str, Any] = {}
        for method, rows in sorted(by_method.items()):
            entry: dict[str, Any] = {"n": len(rows), "metrics": {}}
            for stat, (source, scale, better) in stats.items():
                values = [float(r[source]) * scale for r in rows.values() if _is_number(r.get(source))]
                entry["metrics"][stat] = bootstrap(values, better, self._rng(method, stat))
            methods[method] = entry
        ranking = rank_methods(methods, stats)
        means = mean_ranks(methods, stats)
        for position, method in enumerate(ranking, 1):
            methods[method]["rank"] = position
            methods[method]["mean_rank"] = means[method]
        if "random" in by_method:
            control = by_method["random"]
            for method, rows in by_method.items():
                if method == "random":
                    continue
                gaps = {}
                for stat, (source, scale, better) in stats.items():
                    diffs = [
                        (float(r[source]) - float(control[k][source])) * scale
                        for k, r in rows.items()
                        if k in control and _is_number(r.get(source)) and _is_number(control[k].get(source))
                    ]
                    gaps[stat] = bootstrap(diffs, better, self._rng(method, "gap " + stat))
                methods[method]["gap_to_random"] = gaps
        return {
            "out_dir": str(self.out_dir),
            "metrics": self.names,
            "options": {
                "steps": self.options.steps,
                "baseline": self.options.baseline,
                "road_noise": self.options.road_noise,
                "seed": self.options.seed,
                "boxes_from": str(self.config.boxes_from) if self.config.boxes_from else None,
                "precision": self.config.precision,
                "bootstrap_samples": BOOTSTRAP_SAMPLES,
            },
            "models": sorted({s.model for s in self.setups.values()}),
            "ranking": ranking,
            "methods": methods,
        }

    def _rng(self, method: str, stat: str) -> np.random.Generator:
        return np.random.default_rng([self.options.seed, zlib.crc32(f"{method}\0{stat}".encode())])


#: summary statistic -> (line field, scale, better)
def summary_stats(names: Sequence[str]) -> dict[str, tuple[str, float, str]]:
    table = {
        "deletion": {"deletion_auc": ("deletion_auc", 1.0, "lower")},
        "insertion": {"insertion_auc": ("insertion_auc", 1.0, "higher")},
        "confidence": {
            "average_drop_pct": ("drop", 100.0, "lower"),
            "increase_in_confidence_pct": ("increase", 100.0, "higher"),
        },
        "road": {
            "road_morf": ("road_morf", 1.0, "lower"),
            "road_lerf": ("road_lerf", 1.0, "higher"),
            "road_combined": ("road_combined", 1.0, "higher"),
        },
        "pointing": {"pointing_pct": ("pointing_hit", 100.0, "higher")},
        "iou": {"iou": ("iou", 1.0, "higher")},
    }
    return {k: v for n in names for k, v in table[n].items()}


def bootstrap(values: Sequence[float], better: str, rng: np.random.Generator) -> dict[str, Any]:
    """Mean and percentile-bootstrap 95% interval of ``values`` (``BOOTSTRAP_SAMPLES`` resamples)."""
    if not values:
        return {"n": 0, "mean": None, "low": None, "high": None, "better": better}
    data = np.asarray(values, dtype=np.float64)
    if len(data) == 1:
        low = high = float(data[0])
    else:
        means = data[rng.integers(0, len(data), size=(BOOTSTRAP_SAMPLES, len(data)))].mean(axis=1)
        low, high = (float(v) for v in np.percentile(means, [2.5, 97.5]))
    return {
        "n": len(data),
        "mean": round(float(data.mean()), 6),
        "low": round(low, 6),
        "high": round(high, 6),
        "better": better,
    }


def rank_methods(methods: dict[str, Any], stats: dict[str, tuple[str, float, str]]) -> list[str]:
    """Methods best first: by the mean over the statistics of their rank on each (1 = best,
    ties sharing their mean rank); equal means by name."""
    means = mean_ranks(methods, stats)
    return sorted(methods, key=lambda m: (means[m], m))


def mean_ranks(methods: dict[str, Any], stats: dict[str, tuple[str, float, str]]) -> dict[str, float]:
    """Each method's mean rank over the statistics (what :func:`rank_methods` orders by)."""
    ranks: dict[str, list[float]] = {m: [] for m in methods}
    for stat, (_, _, better) in stats.items():
        scored = [(m, e["metrics"][stat]["mean"]) for m, e in methods.items() if e["metrics"][stat]["mean"] is not None]
        for method, value in scored:
            ahead = sum(1 for _, v in scored if (v < value if better == "lower" else v > value))
            ranks[method].append(ahead + (sum(1 for _, v in scored if v == value) + 1) / 2)
    return {m: round(mean_rank(r), 3) for m, r in ranks.items()}


def mean_rank(ranks: Sequence[float]) -> float:
    return sum(ranks) / len(ranks) if ranks else math.inf


def _value(tensor: torch.Tensor) -> float | None:
    value = float(tensor)
    return None if math.isnan(value) else round(value, 6)


def _is_number(value: Any) -> bool:
    """A metric value to average: a number (a pointing hit is a bool), not None or NaN."""
    return isinstance(value, (int, float)) and not (isinstance(value, float) and math.isnan(value))


def _rounded(values: Any) -> tuple[float, ...] | None:
    return tuple(round(float(v), 6) for v in values) if values else None


def _close(a: Sequence[float], b: Sequence[float]) -> bool:
    return len(a) == len(b) and all(abs(float(x) - float(y)) <= 1e-5 for x, y in zip(a, b, strict=True))


def _norm(value: Any) -> Any:
    """Compare JSON values as they round-trip (tuples as lists)."""
    return json.loads(json.dumps(value))


def _cwd_hint(setup: ModelSetup) -> str:
    if ":" in setup.model and not Path(setup.model).exists():
        return " (run camx evaluate from the folder camx explain ran in, or pass --model)"
    return " (pass --model/--weights to rebuild it)"


def evaluate(
    config: EvaluateConfig,
    progress: Callable[[list[dict[str, Any]], int], None] | None = None,
    stop: threading.Event | None = None,
) -> EvaluateResult:
    """Prepare and run ``config`` in one call (what ``camx evaluate`` does)."""
    return Evaluator(config).run(progress, stop)

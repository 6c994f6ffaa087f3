"""One ``camx evaluate`` run: faithfulness metrics over a finished ``camx explain`` run.

manifest lines (:func:`cam_cli.rundir.read_run`) -> rebuild each model
(:mod:`~cam_cli.jobs.evaluate.setups`) -> decode the images and load their maps
(DataLoader workers, :mod:`~cam_cli.jobs.evaluate.dataset`) -> perturbation plans of
many (image, method) pairs packed into full model batches
(:mod:`~cam_cli.jobs.evaluate.batches`) -> one line per pair through a journal into
``OUT/metrics.jsonl`` (:mod:`~cam_cli.jobs.evaluate.lines`) -> the summary
(``OUT/metrics-summary.json``, :mod:`~cam_cli.jobs.evaluate.summary`).

Each line records what shaped its values (the model and preprocessing, the map
file, the metric options). A re-run skips the lines whose values still hold,
computes only the metrics missing or shaped differently, and a killed run
resumes from the journal.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from cam_cli import rundir
from cam_cli.device import emulated_precision_note
from cam_cli.errors import InputError, OutputError, plural
from cam_cli.jobs.base import check_precision, journalled, open_device, prepare_process
from cam_cli.jobs.evaluate import detection
from cam_cli.jobs.evaluate.batches import SCORE_TOLERANCE, Scoring, SetupPass
from cam_cli.jobs.evaluate.config import EvaluateConfig, EvaluateResult
from cam_cli.jobs.evaluate.lines import Lines, Pair
from cam_cli.jobs.evaluate.randomise import RandomisationScorer, explain_cost, reexplainers
from cam_cli.jobs.evaluate.setups import Setups, weights_argument
from cam_cli.jobs.evaluate.summary import BOOTSTRAP_SAMPLES, add_mprt_verdicts, rows_by_method, summarise_methods
from cam_cli.metrics import METRICS, MetricOptions
from cam_cli.metrics.budget import over_budget
from cam_cli.metrics.localisation import GroundTruth, read_boxes
from cam_cli.metrics.masks import Region, masks_digest, match_keys, read_masks

#: the metric families computed from the map alone (and ground truth), without the model
MAP_ONLY = ("localisation", "region", "complexity")
#: the packages (module, distribution) a metric imports beyond camx's own (the ``metrics`` extra)
NEEDS = {
    "road": (("scipy", "SciPy"),),
    "irof": (("skimage", "scikit-image"),),
    "arcc": (("scipy", "SciPy"),),
}
#: the fields a manifest line needs for its map to be evaluated
NEEDED = ("key", "method", "map", "class_index")
MODEL_FIELDS = ("model", "input_size")

#: takes finished lines and the forward passes they took
Progress = Callable[[list[dict[str, Any]], int], None]


class Evaluator:
    """A prepared evaluation: manifest read, models rebuilt, nothing written yet."""

    def __init__(self, config: EvaluateConfig) -> None:
        prepare_process()
        self.config = config
        self.out_dir = config.out_dir
        self.names = _metric_names(config.metrics)
        self.localising = [m for m in self.names if METRICS[m].family in MAP_ONLY]
        self.perturbing = [m for m in self.names if METRICS[m].family == "perturbation"]
        self.randomising = [m for m in self.names if METRICS[m].family == "randomisation"]
        check_precision(config.precision)
        self.warnings: list[str] = []
        ok = self._ok_records()
        self.options = MetricOptions(
            steps=config.steps,
            baseline=config.baseline,
            road_noise=config.road_noise,
            seed=config.seed,
            box_threshold=config.box_threshold,
            topk=config.topk,
            complexity_eps=config.complexity_eps,
            flip_step=config.flip_step,
            patch_size=config.patch_size,
            regions=config.regions,
            corr_runs=config.corr_runs,
            corr_subset=config.corr_subset,
            mprt_order=config.mprt_order,
        )
        self.boxes, boxes_digest = self._read_boxes(ok)
        self.masks, regions_digest = self._read_masks(ok, boxes_digest)
        self.lines = Lines(config, self.names, self.options, boxes_digest, regions_digest)
        self.device = open_device(config.device)
        self.warnings += [n for n in [emulated_precision_note(self.device, config.precision)] if n]
        self.setups = Setups(config, ok)
        self.records = [(r, self.setups.of(r)) for r in ok]
        if "random-logit" in self.names and any(setup.reference for _, setup in self.records):
            raise InputError(
                f"{self.out_dir} explains one scalar, the similarity to a reference: random-logit needs another "
                "class to explain; leave it out of --metrics"
            )
        if self.perturbing or self.randomising:
            for setup in self.setups:
                self.setups.rebuild(setup, self.device)
        self.scorers = reexplainers(self.records, self.names, self.options, config)
        self._check_budget()
        # after the rebuild, so that a model that does not exist is named as such first
        metrics_name, summary_name = rundir.metrics_names(self._other_model(ok))
        self.metrics_path = self.out_dir / metrics_name
        self.summary_path = self.out_dir / summary_name
        self._pending: tuple[list[Pair], int] | None = None

    def _check_budget(self) -> None:
        """``InputError`` when a metric would cost more than ten times deletion/insertion per
        map on a model setup (at its input size; the metrics that explain again at what one
        explain of its methods costs), unless ``budget_ok``."""
        guarded = self.perturbing + self.randomising
        if self.config.budget_ok or not guarded:
            return
        for setup in self.setups:
            scorer = self.scorers.get(id(setup))
            mine = [r for r, s in self.records if s is setup]
            cost = explain_cost(scorer, mine) if scorer is not None and mine else 0.0
            blocks = len(scorer.blocks) if isinstance(scorer, RandomisationScorer) else 0
            refusal = over_budget(guarded, self.options, setup.size, cost, blocks)
            if refusal is not None:
                raise InputError(refusal)

    # -- reading the run
    def _ok_records(self) -> list[dict[str, Any]]:
        """The ok records of OUT by key (``not_evaluated`` counts the others); ``InputError``
        when there are none or they lack what evaluating needs."""
        records = rundir.read_run(self.out_dir).records
        ok, left = detection.evaluable([r for k, r in sorted(records.items()) if r.get("status") == "ok"])
        self.not_evaluated = len(records) - len(ok)
        if not ok:
            raise InputError(
                f"the manifest of {self.out_dir} has no ok lines to evaluate "
                f"({len(records) - left} failed{f', {left} without a detection map' if left else ''})"
            )
        self._check_fields(ok)
        detection.check_metrics(self.names, ok)
        return ok

    def _other_model(self, records: Sequence[dict[str, Any]]) -> str | None:
        """``MODEL-WEIGHTS`` when ``--model``/``--weights`` name a model other than the one
        that made the run's maps (refused without ``--with-other-model``), else None."""
        c = self.config
        if c.model is None and c.weights is None:
            return None
        for record in records:
            if record.get("model") is None:
                continue  # an older manifest: the overrides fill in what it lacks
            model = c.model or str(record["model"])
            weights = c.weights or (weights_argument(record) if model == record["model"] else "DEFAULT")
            built = str(record.get("weights")) in ("as built", "in file")  # a factory's or file's own weights
            if model == record["model"] and (built or weights == weights_argument(record)):
                continue
            if not c.with_other_model:
                raise InputError(
                    f"the maps of {self.out_dir} were made by {record['model']} (weights {record.get('weights')}), "
                    f"not {model} (weights {weights}): pass --with-other-model to score them with it on purpose "
                    f"(its metrics go to {rundir.metrics_names(f'{model}-{weights}')[0]}, apart from the run's own)"
                )
            return f"{model}-{weights}"
        return None

    def _check_fields(self, records: Sequence[dict[str, Any]]) -> None:
        missing = [f for f in NEEDED if any(r.get(f) is None for r in records)]
        overridable = [f for f in MODEL_FIELDS if any(r.get(f) is None for r in records if not _native(r, f))]
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

    def _read_boxes(self, records: Sequence[dict[str, Any]]) -> tuple[dict[str, list[GroundTruth]], str | None]:
        """The ground-truth boxes by record key and the digest of their file, when a
        localisation metric is asked for (or a region metric without ``--masks-from``)."""
        boxed = [
            m
            for m in self.names
            if METRICS[m].family == "localisation" or (METRICS[m].family == "region" and not self.config.masks_from)
        ]
        if not boxed:
            return {}, None
        if self.config.boxes_from is None and all(detection.own_truths(r) for r in records):
            return {}, detection.OWN_BOXES  # each detection's map against its own box
        if self.config.boxes_from is None:
            raise InputError(f"the metrics {', '.join(boxed)} need ground-truth boxes: pass --boxes-from")
        boxes = self._match_boxes(read_boxes(self.config.boxes_from), records)
        return boxes, hashlib.sha256(self.config.boxes_from.read_bytes()).hexdigest()[:16]

    def _read_masks(
        self, records: Sequence[dict[str, Any]], boxes_digest: str | None
    ) -> tuple[dict[str, list[Region]] | None, str | None]:
        """The ``--masks-from`` regions by record key (None: the region metrics use the
        boxes) and what identifies the regions, when a region metric is asked for."""
        if not any(METRICS[m].family == "region" for m in self.names):
            return None, None
        if self.config.masks_from is None:
            return None, f"boxes:{boxes_digest}"
        path = self.config.masks_from
        found = read_masks(path)
        keys = sorted({str(r["key"]) for r in records})
        matched, unmatched = match_keys(found, keys)
        if unmatched:
            self.warnings.append(f"--masks-from {path}: {plural(unmatched, 'mask')} of {len(found)} match no input")
        if len(matched) < len(keys):
            self.warnings.append(
                f"--masks-from {path}: {len(keys) - len(matched)} of {plural(len(keys), 'input')} have no mask "
                "(their region metrics are null)"
            )
        return matched, masks_digest(path)

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
                f"--boxes-from {self.config.boxes_from}: {len(matched)} of {plural(len(boxes), 'key')} "
                f"{'matches' if len(matched) == 1 else 'match'} an input of {self.out_dir} "
                f"({len(boxes) - len(matched)} match none)"
            )
        return matched

    def pending(self) -> tuple[list[Pair], int]:
        """The pairs still to compute (some metrics or all), and how many lines are complete."""
        if self._pending is None:
            self._pending = self.lines.pending(self.records, self.metrics_path)
        return self._pending

    # -- the run
    def run(self, progress: Progress | None = None, stop: threading.Event | None = None) -> EvaluateResult:
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
        prepare_process(self.device)
        busy = f"another camx evaluate is writing {self.metrics_path} right now; let it finish first"
        with journalled(self.metrics_path, lambda: [self.metrics_path, self.summary_path], busy) as journal:

            def emit(lines: list[dict[str, Any]], passes: int) -> None:
                journal.append(lines)
                for line in lines:
                    if line["status"] == "ok":
                        result.done += 1
                    else:
                        result.fail(f"{line['key']} ({line['method']})", line["error"])
                if progress is not None:
                    progress(lines, passes)

            mismatched = self._run_setups(pairs, self._scoring(emit, result), stop)
        if mismatched:
            self.warnings.append(
                f"for {plural(mismatched, 'line')} the rebuilt model's probability of the explained class differs "
                f"from the manifest's by more than {SCORE_TOLERANCE:.0%}: is it the model that made {self.out_dir}? "
                "(pass --model/--weights to choose it)"
            )
        result.summary = self.summarise()
        self._write_summary(result.summary)
        result.seconds = time.perf_counter() - started
        return result

    def _scoring(self, emit: Progress, result: EvaluateResult) -> Scoring:
        return Scoring(
            self.lines,
            self.out_dir,
            self.device,
            self.localising,
            self.perturbing,
            self.boxes,
            self.config.batch_size,
            self.config.workers,
            emit,
            result,
            randomising=self.randomising,
            scorers=self.scorers,
            masks=self.masks,
        )

    def _run_setups(self, pairs: list[Pair], scoring: Scoring, stop: threading.Event | None) -> int:
        """The pairs of each model setup in turn; how many lines' scores disagree with the manifest."""
        by_setup: dict[int, list[Pair]] = {}
        for pair in pairs:
            by_setup.setdefault(id(pair.setup), []).append(pair)
        mismatched = 0
        for group in by_setup.values():
            if stop is not None and stop.is_set():
                break
            setup_pass = SetupPass(scoring, group[0].setup, group)
            setup_pass.run(stop)
            mismatched += setup_pass.mismatched
        return mismatched

    # -- summary
    def summarise(self) -> dict[str, Any]:
        """Per method: n, mean and seeded 95% bootstrap interval of each metric, ranks, gaps to ``random``."""
        rows = rows_by_method((r for r, _ in self.records), rundir.load_manifest(self.metrics_path))
        methods, ranking = summarise_methods(rows, self.names, self.options.seed)
        if "mprt" in self.names:
            add_mprt_verdicts(methods, rows)
        return {
            "out_dir": str(self.out_dir),
            "metrics": self.names,
            "options": {
                "steps": self.options.steps,
                "baseline": self.options.baseline,
                "road_noise": self.options.road_noise,
                "seed": self.options.seed,
                **{k: getattr(self.options, k) for k in FAITHFULNESS_OPTIONS if _uses(self.names, k)},
                **({"mprt_order": self.options.mprt_order} if "mprt" in self.names else {}),
                "boxes_from": str(self.config.boxes_from) if self.config.boxes_from else None,
                "masks_from": str(self.config.masks_from) if self.config.masks_from else None,
                "precision": self.config.precision,
                "bootstrap_samples": BOOTSTRAP_SAMPLES,
            },
            "models": sorted({s.model for s in self.setups}),
            "ranking": ranking,
            "methods": methods,
        }

    def _write_summary(self, summary: dict[str, Any]) -> None:
        try:
            rundir.write_atomic(self.summary_path, (json.dumps(summary, indent=2) + "\n").encode("utf-8"))
        except OSError as exc:
            raise OutputError(f"cannot write {self.summary_path}: {exc.strerror or exc}") from None


#: the options of the faithfulness metrics, in the summary when a metric asked for uses them
FAITHFULNESS_OPTIONS = ("flip_step", "patch_size", "regions", "corr_runs", "corr_subset")


def _uses(names: Sequence[str], setting: str) -> bool:
    return any(setting in METRICS[n].settings for n in names)


def _native(record: dict[str, Any], field: str) -> bool:
    """Whether a detection line does without ``field`` (its images go in at their own size)."""
    return field == "input_size" and detection.is_detection(record)


def _metric_names(asked: Sequence[str]) -> list[str]:
    """The metrics asked for, in registry order; ``InputError`` for an unknown one or none."""
    unknown = [m for m in asked if m not in METRICS]
    if unknown or not asked:
        raise InputError(f"unknown metric {', '.join(unknown)}; choose from {', '.join(METRICS)}")
    for name in asked:
        for module, package in NEEDS.get(name, ()):
            if importlib.util.find_spec(module) is None:
                raise InputError(f"the metric {name} needs {package}: pip install 'camx[metrics]'")
    return [m for m in METRICS if m in asked]


def evaluate(
    config: EvaluateConfig,
    progress: Progress | None = None,
    stop: threading.Event | None = None,
) -> EvaluateResult:
    """Prepare and run ``config`` in one call (what ``camx evaluate`` does)."""
    return Evaluator(config).run(progress, stop)


__all__ = ["Evaluator", "evaluate"]

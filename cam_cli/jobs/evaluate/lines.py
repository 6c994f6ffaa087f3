"""The lines of ``OUT/metrics.jsonl``: what shaped each one's values, which earlier
lines still hold (a re-run computes only what is missing or shaped differently),
and making a line."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cam_cli import rundir
from cam_cli.jobs.evaluate.config import EvaluateConfig
from cam_cli.jobs.evaluate.setups import ModelSetup
from cam_cli.metrics import METRICS, MetricOptions

#: what may shape a metric's values (each metric's ``settings`` name some), in a line's order
SETTINGS = (
    "steps",
    "baseline",
    "road_noise",
    "seed",
    "boxes",
    "box_threshold",
    "flip_step",
    "patch_size",
    "regions",
    "corr_runs",
    "corr_subset",
    "region_source",
    "topk",
    "complexity_eps",
    "mprt_order",
)


@dataclass
class Pair:
    """One (input, method) line to evaluate, and what its values depend on.

    ``reuse``: the fields of the earlier line's metrics that still hold (and under
    ``_metrics`` their names); ``todo``: the metrics to compute; ``stat``: the map
    file's size and modification time.
    """

    record: dict[str, Any]
    setup: ModelSetup
    reuse: dict[str, Any]
    todo: list[str]
    stat: tuple[int, int] | None


class Lines:
    """How this run makes a ``metrics.jsonl`` line, and when an earlier one holds."""

    def __init__(
        self,
        config: EvaluateConfig,
        names: Sequence[str],
        options: MetricOptions,
        boxes_digest: str | None,
        regions_digest: str | None = None,
    ) -> None:
        self.config = config
        self.names = list(names)
        self.options = options
        self.boxes_digest = boxes_digest
        self.regions_digest = regions_digest  # the masks', or the boxes' as regions

    def common(self, record: dict[str, Any], setup: ModelSetup, stat: tuple[int, int] | None) -> dict[str, Any]:
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

    def settings(self, name: str) -> dict[str, Any]:
        """The settings that shape the values of the metric ``name`` in this run."""
        values = {
            "steps": self.options.steps,
            "baseline": self.options.baseline,
            "road_noise": self.options.road_noise,
            "seed": self.options.seed,
            "boxes": self.boxes_digest,
            "box_threshold": self.options.box_threshold,
            "region_source": self.regions_digest,
            "topk": self.options.topk,
            "complexity_eps": self.options.complexity_eps,
            "flip_step": self.options.flip_step,
            "patch_size": self.options.patch_size,
            "regions": self.options.regions,
            "corr_runs": self.options.corr_runs,
            "corr_subset": self.options.corr_subset,
            "mprt_order": self.options.mprt_order,
        }
        return {s: values[s] for s in METRICS[name].settings}

    def still_valid(self, old: dict[str, Any] | None, common: dict[str, Any]) -> list[str]:
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
            if all(_norm(old.get(s)) == _norm(v) for s, v in self.settings(name).items()):
                valid.append(name)
        return valid

    def pending(
        self, records: Sequence[tuple[dict[str, Any], ModelSetup]], metrics_path: Path
    ) -> tuple[list[Pair], int]:
        """The pairs still to compute (some metrics or all), and how many lines of
        ``metrics_path`` are complete."""
        earlier = rundir.load_manifest(metrics_path)
        pairs: list[Pair] = []
        skipped = 0
        for record, setup in records:
            stat = _stat(self.config.out_dir / str(record["map"]))
            old = earlier.get(rundir.record_key(record))
            valid = self.still_valid(old, self.common(record, setup, stat)) if stat else []
            todo = [n for n in self.names if n not in valid]
            if not todo:
                skipped += 1
                continue
            reuse = {}
            if old is not None:
                for name in valid:
                    reuse.update({f: old[f] for f in METRICS[name].fields})
                    reuse.update(self.settings(name))
                reuse["_metrics"] = valid
            pairs.append(Pair(record, setup, reuse, todo, stat))
        return pairs, skipped

    def line(self, pair: Pair, values: dict[str, Any] | None, error: str | None, score: float | None) -> dict[str, Any]:
        """The line of ``pair``: its values (``values`` and what it reuses) and what shaped
        them, or ``error``; ``score`` is the rebuilt model's probability of the class."""
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
        elif rundir.record_variant(record):  # --target topK: its own line too (rundir.record_key)
            line["target"] = record["target"]
        if error is None:
            assert values is not None
            line.update(self._values(pair, values))
        line.update(self.common(record, pair.setup, pair.stat))
        return line

    def _values(self, pair: Pair, values: dict[str, Any]) -> dict[str, Any]:
        """The metric fields of a line, its metrics' settings and the boxes file."""
        metrics = list(pair.reuse.get("_metrics", []))
        merged = {k: v for k, v in pair.reuse.items() if k != "_metrics"}
        for name in pair.todo:
            merged.update(self.settings(name))
            metrics.append(name)
        merged.update(values)
        part: dict[str, Any] = {"metrics": [m for m in METRICS if m in metrics]}
        for name in part["metrics"]:
            for f in METRICS[name].fields:
                part[f] = merged.get(f)
        part.update({s: merged[s] for s in SETTINGS if s in merged})
        if "boxes" in part and self.config.boxes_from is not None:
            part["boxes_from"] = str(self.config.boxes_from)
        if "region_source" in part and self.config.masks_from is not None:
            part["masks_from"] = str(self.config.masks_from)
        return part


def _stat(path: Path) -> tuple[int, int] | None:
    """The size and modification time of a map file; None when it cannot be read."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_size, st.st_mtime_ns)


def _norm(value: Any) -> Any:
    """Compare JSON values as they round-trip (tuples as lists)."""
    return json.loads(json.dumps(value))

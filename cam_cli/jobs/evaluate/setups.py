"""Rebuilding the models of a run: one :class:`ModelSetup` per distinct model,
weights, preprocessing and seed, shared by the records that name it, placed on
the device as every job places a model (:func:`cam_cli.jobs.base.place_model`).

A similarity run (``--target similar:REF``) is rebuilt with its reference: the
embedding model inside the same similarity head as explain made, the reference
embedded again from the path the manifest records once its sha256 is checked. Its
perturbed inputs are then scored by that similarity itself, not a softmax."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from cam_cli.errors import CamxError, InputError, ModelError
from cam_cli.jobs.base import ModelRunner, place_model
from cam_cli.jobs.evaluate.config import EvaluateConfig
from cam_cli.jobs.evaluate.pinning import refusal
from cam_cli.jobs.explain.reference import load_reference, with_reference
from cam_cli.models import Classifier, load_classifier

#: weights labels that mean a head of the run's own size (random, or from a checkpoint file)
CHECKPOINT_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")


@dataclass
class ModelSetup:
    """One way of rebuilding a model, shared by the records that name it.

    ``classifier``, ``runner`` and ``outputs`` (the number of logits) are set once it
    is rebuilt (only runs with perturbation metrics rebuild their models).
    """

    model: str
    weights: str
    input_size: int | None
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    output_key: str | None
    num_classes: int | None
    seed: int
    #: a CLIP model's prompts, one per class, as the manifest records them
    prompts: tuple[str, ...] | None = None
    #: a similarity run's reference as the manifest records it: kind, path, sha256, whether a ``.npy``
    reference: tuple[str, str, str, bool] | None = None
    classifier: Classifier | None = None
    runner: ModelRunner | None = None
    outputs: int = 0
    #: what the model does; a detection setup also keeps the run's --min-score
    task: str = "classification"
    min_score: float | None = None
    #: a readout-driven setup's scoring (``pin`` a group's samples in a free pass, giving each a
    #: token; ``score`` inputs by their tokens; ``native`` sizes:
    #: :class:`~cam_cli.jobs.evaluate.detection.DetectionScoring`); None: class probabilities
    scoring: Any = None

    @property
    def size(self) -> int:
        """The model's input size ``S``: the rebuilt model's, else the manifest's."""
        return self.classifier.input_size if self.classifier else int(self.input_size or 224)

    @property
    def scores_output(self) -> bool:
        """Whether a perturbed input is scored by the model's output as it is (a similarity
        run: the similarity itself), not by its class's softmax probability."""
        return self.reference is not None


class Setups:
    """The model setups of a run's records, by what rebuilds them."""

    def __init__(self, config: EvaluateConfig, records: Sequence[dict[str, Any]]) -> None:
        self.config = config
        self.by_key: dict[tuple[Any, ...], ModelSetup] = {}
        # The run's --seed (which seeds random weights) is recorded on some lines only (random's):
        # it holds for every line of the same model and weights.
        self.seeds: dict[tuple[Any, Any], int] = {}
        for r in records:
            if isinstance(r.get("seed"), int):
                self.seeds.setdefault((r.get("model"), r.get("weights")), int(r["seed"]))

    def __iter__(self) -> Iterator[ModelSetup]:
        return iter(self.by_key.values())

    def of(self, record: dict[str, Any]) -> ModelSetup:
        """The setup that rebuilds the model of ``record`` (the config's options win)."""
        c = self.config
        if record.get("task") == "detection":
            return self._detection(record)
        key = (
            c.model or str(record["model"]),
            c.weights or (weights_argument(record) if c.model in (None, record.get("model")) else "DEFAULT"),
            c.input_size or record.get("input_size"),
            tuple(c.mean) if c.mean else _rounded(record.get("mean")),
            tuple(c.std) if c.std else _rounded(record.get("std")),
            c.output_key if c.output_key is not None else record.get("output_key"),
            self._num_classes(record),
            self.seeds.get((record.get("model"), record.get("weights")), 0),
            tuple(record["prompts"]) if isinstance(record.get("prompts"), list) else None,
            _reference(record),
        )
        if key not in self.by_key:
            self.by_key[key] = ModelSetup(*key)  # type: ignore[arg-type]
        return self.by_key[key]

    def _detection(self, record: dict[str, Any]) -> ModelSetup:
        """The setup of a detection line: its model, weights, seed and --min-score."""
        c = self.config
        model = c.model or str(record["model"])
        weights = c.weights or (weights_argument(record) if model == record.get("model") else "DEFAULT")
        seed = self.seeds.get((record.get("model"), record.get("weights")), 0)
        key = ("detection", model, weights, seed, record.get("min_score"))
        if key not in self.by_key:
            self.by_key[key] = ModelSetup(model, weights, None, None, None, None, None, seed, task="detection",
                                          min_score=record.get("min_score"))  # fmt: skip
        return self.by_key[key]

    def _num_classes(self, record: dict[str, Any]) -> int | None:
        """``--num-classes``, else the record's when its head was random or came from a file."""
        c = self.config
        if c.num_classes is not None or c.model is not None or c.weights is not None:
            return c.num_classes
        if record.get("num_classes") == 0:  # an embedding model without its head, whatever its weights
            return 0
        label = str(record.get("weights") or "")
        if label.upper() == "NONE" or os.sep in label or label.endswith(CHECKPOINT_SUFFIXES):
            return record.get("num_classes")
        return None

    def rebuild(self, setup: ModelSetup, device: torch.device) -> None:
        """Load the model of ``setup`` and place it on ``device``; ``ModelError`` when it
        cannot be loaded or fails on a zero input (in channels-last and without)."""
        if setup.task == "detection":
            from cam_cli.jobs.evaluate.detection import rebuild_detector

            rebuild_detector(setup, device, self.config.precision)
            return
        classifier = self._load(setup)
        if setup.reference is not None:
            classifier = self._compared(setup, classifier, device)
        refused = refusal(classifier.readout, self.config.metrics, setup.model)  # a segmentation run's
        if refused is not None:
            raise InputError(refused)
        outputs = [0]

        def check(runner: ModelRunner) -> None:
            outputs[0] = _count_outputs(runner, classifier.input_size, setup.model)

        setup.runner = place_model(
            classifier.module,
            classifier.logits,
            classifier.mean,
            classifier.std,
            device,
            self.config.precision,
            check=check,
        )
        setup.classifier = classifier
        setup.outputs = outputs[0]

    def _load(self, setup: ModelSetup) -> Classifier:
        c = self.config
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
                seed=setup.seed,
                prompts=setup.prompts,
            )
        except CamxError as exc:
            raise ModelError(
                f"cannot rebuild the model {setup.model} of {c.out_dir}: {exc}{_cwd_hint(setup)}"
            ) from None
        except Exception as exc:  # user code (a factory) may fail any way
            message = " ".join(str(exc).split())[:200]
            raise ModelError(
                f"cannot rebuild the model {setup.model} of {c.out_dir}: {type(exc).__name__}: {message}"
            ) from None
        # the manifest's mean/std win where they differ from the model's own (explain's --mean/--std)
        if setup.mean and not c.mean and not _close(setup.mean, classifier.mean):
            classifier = replace(classifier, mean=tuple(setup.mean))  # type: ignore[arg-type]
        if setup.std and not c.std and not _close(setup.std, classifier.std):
            classifier = replace(classifier, std=tuple(setup.std))  # type: ignore[arg-type]
        return classifier

    def _compared(self, setup: ModelSetup, classifier: Classifier, device: torch.device) -> Classifier:
        """The embedding model of ``setup`` in its similarity head, the reference embedded again
        (``ModelError`` in one line when it is gone or changed)."""
        assert setup.reference is not None
        kind, path, sha256, npy = setup.reference
        try:
            reference = load_reference(kind, None if npy else Path(path), Path(path) if npy else None,  # type: ignore[arg-type]
                                       classifier, device, self.config.batch_size, expected=sha256)  # fmt: skip
        except CamxError as exc:
            raise ModelError(f"cannot rebuild the reference of {self.config.out_dir}: {exc}") from None
        return with_reference(classifier, reference)[0]


def _reference(record: dict[str, Any]) -> tuple[str, str, str, bool] | None:
    """What rebuilds a similarity run's reference (None: a class target)."""
    found = record.get("reference")
    if not isinstance(found, dict):
        return None
    kind, path, sha256 = (str(found.get(k) or "") for k in ("kind", "path", "sha256"))
    if kind not in ("similar", "dissimilar") or not path or len(sha256) != 64:
        raise ModelError(f"{record.get('key')}: the manifest's reference {found} is not one camx wrote")
    return kind, path, sha256, found.get("images") is None


def _count_outputs(runner: ModelRunner, size: int, model: str) -> int:
    """The number of logits the placed model gives for a zero ``size x size`` input;
    ``ModelError`` when it fails or gives no ``(1, K)`` logits."""
    try:
        with torch.inference_mode():
            logits = runner.forward(runner.normalise(torch.zeros(1, 3, size, size, dtype=torch.uint8)))
    except CamxError as exc:
        raise ModelError(f"the rebuilt model {model}: {exc}") from None
    except Exception as exc:
        message = " ".join(str(exc).split())[:200]
        raise ModelError(f"the rebuilt model {model} fails on a {size}x{size} input: {message}") from None
    if logits.ndim != 2:
        raise ModelError(f"the rebuilt model {model} gives outputs of shape {tuple(logits.shape)}, not logits")
    return int(logits.shape[1])


def weights_argument(record: dict[str, Any]) -> str:
    """What ``load_classifier`` takes for the weights a record names."""
    label = str(record.get("weights") or "DEFAULT")
    return "DEFAULT" if label in ("as built", "in file") else label


def _rounded(values: Any) -> tuple[float, ...] | None:
    return tuple(round(float(v), 6) for v in values) if values else None


def _close(a: Sequence[float], b: Sequence[float]) -> bool:
    return len(a) == len(b) and all(abs(float(x) - float(y)) <= 1e-5 for x, y in zip(a, b, strict=True))


def _cwd_hint(setup: ModelSetup) -> str:
    if ":" in setup.model and not Path(setup.model).exists():
        return " (run camx evaluate from the folder camx explain ran in, or pass --model)"
    return " (pass --model/--weights to rebuild it)"

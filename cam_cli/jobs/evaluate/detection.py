"""``camx evaluate`` over a detection run: every map explains one detection, which its
manifest line records (``det_box`` in the image's pixels, the label as ``class_index``,
the model's ``score``).

- **Which lines.** One per detection's map. A class-agnostic map (``eigencam``, ``fem``,
  ``random``) is scored for its image's top detection (the first of ``boxes_shown``), as a
  classifier's is for its top class; lines without a map (an image without detections)
  are not evaluated.
- **The model.** Rebuilt as ``explain`` loaded it, reporting detections down to the run's
  ``--min-score``; each image goes in at its own size, in [0, 1] (the model resizes and
  normalises it itself), and its maps stay at that size.
- **The score** of an input (a deletion step, a masked image, ROAD's imputed one) is that
  of the line's detection as the model finds it again there: the detection of the same
  label with the highest IoU, at least 0.5, with the recorded box; none found counts as 0
  (:class:`~cam_cli.models.detection_readout.DetectionReadout`, pinned to the lines).
- **Localisation** (pointing game, box IoU, the region metrics) without ``--boxes-from`` or
  ``--masks-from``: against the detection's own box, so no ground truth is needed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from cam_cli.errors import CamxError, InputError, ModelError
from cam_cli.metrics.localisation import GroundTruth
from cam_cli.models.detection_readout import DetectionReadout

TASK = "detection"
#: metrics that do not apply to detection runs, and why
REFUSED = {
    "mprt": "it compares maps of randomised classifiers made by camx's classifier methods",
    "random-logit": "it explains another class of a classifier's logits, and a detection has none",
}
#: what marks the lines' boxes as the detections' own (in place of a --boxes-from digest)
OWN_BOXES = "detections"


def is_detection(record: dict[str, Any]) -> bool:
    return record.get("task") == TASK


def evaluable(records: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], int]:
    """The lines to evaluate (a class-agnostic map of a detection run as a copy naming its
    image's top detection), and how many detection lines are left out (no map, or no
    detection to score an agnostic map for)."""
    kept: list[dict[str, Any]] = []
    left = 0
    for record in records:
        if not is_detection(record):
            kept.append(record)
        elif record.get("map") is None:
            left += 1
        elif record.get("det_box") is not None:
            kept.append(record)
        elif record.get("boxes_shown"):
            top = record["boxes_shown"][0]
            fields = ("class_index", "class_name", "score", "det_box")
            kept.append({**record, **{k: top.get(k) for k in fields}})
        else:
            left += 1
    return kept, left


def check_metrics(names: Sequence[str], records: Sequence[dict[str, Any]]) -> None:
    """``InputError`` for a metric that cannot score a detection run's lines."""
    if not any(is_detection(r) for r in records):
        return
    for name in names:
        if name in REFUSED:
            raise InputError(f"the metric {name} does not score detection runs: {REFUSED[name]}")


def own_truths(record: dict[str, Any]) -> list[GroundTruth]:
    """A detection line's own box as the ground truth its map is localised against."""
    box = record.get("det_box")
    if not is_detection(record) or not isinstance(box, list) or len(box) != 4:
        return []
    x0, y0, x1, y1 = (float(v) for v in box)
    return [GroundTruth((x0, y0, x1, y1))]


@dataclass
class DetectionScoring:
    """How a detection setup's inputs are scored: each sample's token (:meth:`pin`) pins the
    readout to its line's detection, and :meth:`score` gives each input the score of that
    detection's match. ``native``: images and maps stay at their own size."""

    module: nn.Module
    readout: DetectionReadout = field(default_factory=DetectionReadout)
    native: ClassVar[bool] = True

    def pin(self, records: Sequence[dict[str, Any]], images: torch.Tensor) -> torch.Tensor:
        """The free pass of a group of samples (``records``, their unperturbed ``images``): the
        token of each ``(N,)``, naming its target in the readout for :meth:`score`. A detection
        line's target is the detection its manifest line records, so no pass is needed."""
        return self.readout.pin_targets(
            [torch.tensor(r["det_box"], dtype=torch.float32) for r in records],
            [torch.tensor([int(r["class_index"])]) for r in records],
        )

    def score(self, x: torch.Tensor | list[torch.Tensor], tokens: torch.Tensor) -> torch.Tensor:
        """``(n,)``: the matched score of each input's detection. Inputs of one size go
        through the model together, so that no image is padded to another's size."""
        rows = list(x)
        out = torch.zeros(len(rows))
        by_size: dict[tuple[int, ...], list[int]] = {}
        for j, row in enumerate(rows):
            by_size.setdefault(tuple(row.shape), []).append(j)
        for index in by_size.values():
            with self.readout.pinned(tokens[index]):
                found = self.readout(self.module([rows[j] for j in index]))
            out[index] = found[:, 0].float().cpu()
        return out


def rebuild_detector(setup: Any, device: torch.device, precision: str) -> None:
    """Load the detector of ``setup`` (its model, weights and seed), let it report detections
    down to the run's ``--min-score``, and place it on ``device`` with its scoring."""
    from cam_cli.jobs.base import ModelRunner
    from cam_cli.models.detection import load_detector, lower_threshold

    if precision != "fp32":
        raise InputError("--precision: detection runs are evaluated in fp32 only")
    try:
        detector = load_detector(setup.model, setup.weights, seed=setup.seed)
    except CamxError as exc:
        raise ModelError(f"cannot rebuild the detection model {setup.model}: {exc}") from None
    if setup.min_score is not None:
        lower_threshold(detector.module, float(setup.min_score))
    module = detector.module.to(device)

    def forward(x: torch.Tensor) -> Any:
        return module(list(x))

    zero = torch.zeros((1, 3, 1, 1), device=device)
    setup.runner = ModelRunner(module, device, forward, zero, zero + 255.0)  # [0, 1] images
    setup.scoring = DetectionScoring(module)

"""What a detection map explains: the score of one detection, as the model reports it.

A detection model returns, per image, a dict of ``boxes`` ``(D, 4)``, ``labels`` ``(D,)``
and ``scores`` ``(D,)``. Its :class:`DetectionReadout` turns a batch of them into targets
``(N, R)``: per image the scores of the R detections its maps explain (zeros past an
image's own). The free pass of a batch chooses them (``select``) and fixes each one's box
and label; a pass over perturbed copies (Score-CAM's masked inputs, Ablation-CAM, the
metrics of ``camx evaluate``) runs inside ``pinned(rows)``, where row ``i`` is a copy of
image ``rows[i]`` and each of its targets is *matched* (:func:`matched_scores`): the
detection of the same label with the highest IoU, at least 0.5, with the original box;
none found counts as score 0.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any, ClassVar

import torch

from cam_cli.errors import ModelError
from cam_cli.models.readout import Readout

#: a detection of a perturbed input stands for an original one from this IoU on
MATCH_IOU = 0.5

#: which detections of one image become targets: ``(scores (D,), labels (D,))`` -> indices ``(R,)``
Select = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def matched_scores(output: dict[str, torch.Tensor], boxes: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The score each original detection (``boxes`` ``(R, 4)``, ``labels`` ``(R,)``) keeps in
    another pass's ``output``: that of the detection of the same label with the highest IoU
    (``torchvision.ops.box_iou``), at least :data:`MATCH_IOU`, with the original box; 0 where
    none. ``(R,)``, differentiable through the scores (which detection matches needs no
    gradient). Among equal IoUs the first (the highest scoring) wins."""
    from torchvision.ops import box_iou

    scores = output["scores"]
    found = output["boxes"].detach()
    if len(boxes) == 0 or len(found) == 0:
        return scores.new_zeros((len(boxes),))
    iou = box_iou(boxes.to(found.device, torch.float32), found.float())  # (R, D)
    same = labels.to(found.device).view(-1, 1) == output["labels"].view(1, -1)
    iou = iou.masked_fill(~same, -1.0)
    best = iou.argmax(dim=1)
    kept = iou.gather(1, best.view(-1, 1)).view(-1) >= MATCH_IOU
    return torch.where(kept, scores[best], scores.new_zeros(()))


def _stacked(rows: Sequence[torch.Tensor]) -> torch.Tensor:
    """Rows of different lengths as ``(N, R)``, zeros past each row's end."""
    width = max((len(r) for r in rows), default=0)
    if not rows:
        return torch.zeros((0, 0))
    return torch.stack([torch.cat([r, r.new_zeros(width - len(r))]) for r in rows])


class DetectionReadout(Readout):
    """Targets ``(N, R)``: per image the scores of its chosen detections, highest first."""

    task: ClassVar[str] = "detection"
    score_name: ClassVar[str] = "detection score"

    def __init__(self, select: Select | None = None) -> None:
        super().__init__()
        self.select = select
        #: per image of the last free pass, its targets' boxes ``(R_i, 4)`` and labels ``(R_i,)`` (CPU)
        self.boxes: list[torch.Tensor] = []
        self.labels: list[torch.Tensor] = []
        #: per image of the last free pass, its targets' scores ``(R_i,)`` (detached, CPU)
        self.found: list[torch.Tensor] = []
        self._pin: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None

    def pin_targets(self, boxes: Sequence[torch.Tensor], labels: Sequence[torch.Tensor]) -> torch.Tensor:
        """Add what a free pass would have fixed, per "image" its targets' boxes ``(R, 4)`` and
        labels ``(R,)`` (the detections a manifest records, for ``camx evaluate``); the rows
        ``pinned`` takes for them ``(len(boxes),)``."""
        start = len(self.boxes)
        self.boxes.extend(b.float().view(-1, 4).cpu() for b in boxes)
        self.labels.extend(v.long().view(-1).cpu() for v in labels)
        return torch.arange(start, len(self.boxes))

    def __call__(self, output: Any) -> torch.Tensor:
        if not isinstance(output, (list, tuple)) or not all(isinstance(o, dict) and "scores" in o for o in output):
            raise ModelError("a detection model must return a list of dicts with boxes, labels and scores")
        if self._pin is not None:
            boxes, labels = self._pin
            if len(boxes) != len(output):
                raise ModelError("a pinned detection pass got a batch that does not match its detections")
            rows = [matched_scores(o, b, v) for o, b, v in zip(output, boxes, labels, strict=True)]
        else:
            chosen = [self._chosen(o) for o in output]
            self.boxes = [o["boxes"][i].detach().float().cpu() for o, i in zip(output, chosen, strict=True)]
            self.labels = [o["labels"][i].detach().cpu() for o, i in zip(output, chosen, strict=True)]
            rows = [o["scores"][i] for o, i in zip(output, chosen, strict=True)]
            self.found = [r.detach().float().cpu() for r in rows]
        return _stacked(rows)

    def _chosen(self, output: dict[str, torch.Tensor]) -> torch.Tensor:
        scores = output["scores"].detach()
        if self.select is None:
            return torch.arange(len(scores), device=scores.device)
        return self.select(scores, output["labels"])

    @contextlib.contextmanager
    def pinned(self, rows: torch.Tensor | None = None) -> Iterator[None]:
        saved = self._pin
        index = range(len(self.boxes)) if rows is None else [int(i) for i in rows.tolist()]
        if any(not 0 <= i < len(self.boxes) for i in index):
            raise ModelError("a pinned detection pass names an image the free pass did not see")
        self._pin = ([self.boxes[i] for i in index], [self.labels[i] for i in index])
        try:
            yield
        finally:
            self._pin = saved

    def ranking(self, targets: torch.Tensor) -> torch.Tensor:
        return targets

    def scores(self, targets: torch.Tensor) -> torch.Tensor:
        """A detection's score is the model's own (no softmax over the targets)."""
        return targets.float()

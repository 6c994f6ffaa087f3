"""``--target``: which targets each image's maps explain.

A model's output is read as targets ``(N, T)`` by its readout (:mod:`cam_cli.models.readout`):
a classifier's logits, or per class the logits of its predicted region for a segmentation
model. ``topK`` takes the K targets the readout ranks highest (a classifier: the K largest
logits; segmentation: the K classes covering the most pixels, background left out); an
index or a class name takes that target."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from cam_cli.errors import ModelError
from cam_cli.methods.base import ClassChooser
from cam_cli.models import Classifier


@dataclass(frozen=True)
class TargetSpec:
    """``--target`` resolved against the model: top-K classes or one fixed class."""

    text: str
    top: int = 1
    index: int | None = None

    @property
    def count(self) -> int:
        return 1 if self.index is not None else self.top

    def chooser(self, ranking: Callable[[torch.Tensor], torch.Tensor] | None = None) -> ClassChooser:
        """Targets ``(N, R)`` from a batch's ``(N, T)``; ``topK`` ranks them by ``ranking``
        (the readout's; None: by themselves)."""
        if self.index is not None:
            index = self.index
            return lambda logits: torch.full((logits.shape[0], 1), index, dtype=torch.long, device=logits.device)
        top = self.top
        if ranking is None:
            return lambda logits: logits.topk(top, dim=1).indices
        rank = ranking
        return lambda logits: rank(logits).topk(top, dim=1).indices


def parse_target(text: str, classifier: Classifier, num_classes: int) -> TargetSpec:
    value = text.strip()
    lowered = value.lower()
    if lowered.startswith("top") and lowered[3:].isdigit():
        k = int(lowered[3:])
        if not 1 <= k <= num_classes:
            raise ModelError(f"--target {text}: K must be between 1 and {num_classes}")
        return TargetSpec(lowered, top=k)
    if value.lstrip("-").isdigit():
        index = int(value)
        if not 0 <= index < num_classes:
            raise ModelError(f"--target {text}: class index out of range 0..{num_classes - 1}")
        return TargetSpec(str(index), index=index)  # 007 and 7 are one target
    names = classifier.categories or []
    for exact in (True, False):
        for i, name in enumerate(names):
            if (name == value) if exact else (name.lower() == lowered):
                return TargetSpec(str(i), index=i)  # recorded by index, however named
    if not names:
        raise ModelError(f"--target {text!r}: this model has no class names; give an index or --labels FILE")
    import difflib

    close = difflib.get_close_matches(value, names, n=3)
    hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
    raise ModelError(f"--target {text!r} is not a class of this model{hint}")

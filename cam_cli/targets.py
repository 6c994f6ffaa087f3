"""``--target``: which classes each image's maps explain."""

from __future__ import annotations

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

    def chooser(self) -> ClassChooser:
        if self.index is not None:
            index = self.index
            return lambda logits: torch.full((logits.shape[0], 1), index, dtype=torch.long, device=logits.device)
        top = self.top
        return lambda logits: logits.topk(top, dim=1).indices


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

"""What a map explains: the *targets* of a model's output, one scalar per target and image.

A :class:`Readout` turns whatever the model returns into targets ``(N, T)``: the scalars
that maps explain (a class's logit, the logits of the pixels a segmentation model assigns
to a class, one detection's score). The run resolves ``--target`` against them per image
(``ranking``), the methods differentiate or perturb column ``t`` of them, the writer names
outputs after the target's class, and the manifest records its score and ``details``.

The base class is the classifier's: the targets are the logits, ranked by themselves,
scored by their softmax, with nothing more to record; classifier runs are unchanged by it.

A readout may depend on the unperturbed image (a segmentation target sums its logits
over the *predicted* region). Then the first (free) pass of a batch fixes what it needs,
and passes over perturbed copies (Score-CAM's masked inputs, Ablation-CAM, the metrics)
run inside ``pinned(rows)``, where row ``i`` of their batch is read as a copy of image
``rows[i]`` of that first pass.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, ClassVar

import torch
from torch import nn

from cam_cli.models.base import extract_logits


class Readout:
    """Classification: the targets are the model's logits ``(N, C)``."""

    #: the task the model does, as ``camx models`` and the manifest name it
    task: ClassVar[str] = "classification"
    #: what a target's ``score`` is, for the docs and the manifest
    score_name: ClassVar[str] = "softmax probability"
    #: the keys of ``details`` that a manifest line repeats for its first target
    record_fields: ClassVar[tuple[str, ...]] = ()

    def __init__(self, output_key: str | None = None) -> None:
        self.output_key = output_key

    def __call__(self, output: Any) -> torch.Tensor:
        """The targets ``(N, T)`` of the model's output for a batch."""
        return extract_logits(output, self.output_key)

    def read(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The targets of ``module``'s pass over batch ``x`` (a readout may watch the pass)."""
        return self(module(x))

    @contextlib.contextmanager
    def pinned(self, rows: torch.Tensor | None = None) -> Iterator[None]:
        """Passes inside read row ``i`` as a copy of image ``rows[i]`` of the last free pass
        (``None``: the same images in the same order). Nothing to pin for a classifier."""
        yield

    def ranking(self, targets: torch.Tensor) -> torch.Tensor:
        """``(N, T)`` values that ``--target topK`` takes the K largest of; ``-inf`` where a
        target cannot be explained for that image."""
        return targets

    def scores(self, targets: torch.Tensor) -> torch.Tensor:
        """The score recorded for each target ``(N, T)`` (also what the metrics follow)."""
        return targets.float().softmax(dim=1)

    def details(self, classes: torch.Tensor) -> list[list[dict[str, Any]]] | None:
        """Per image and explained target (``classes`` ``(N, R)``), what the manifest records
        beyond its class and score; ``None`` when nothing (a classifier)."""
        return None

    def refusal(self, method: str) -> str | None:
        """Why ``method`` cannot explain these targets (``None``: it can), said before the run."""
        return None

    def absent(self, classes: torch.Tensor) -> list[str | None]:
        """Per image, why the targets ``classes`` ``(N, R)`` cannot be explained (``None``: they can)."""
        return [None] * len(classes)

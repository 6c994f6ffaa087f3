"""Gradients through a two-stage detector's box branch for the explained detections only.

The box branch of torchvision's R-CNN models (``roi_heads``: RoI pooling over the feature
levels, the box head, the box predictor) scores every proposal, up to 1000 an image; one
detection's score is one row of it. Autograd's backward through the branch is dense: the box
head's input gradient is a (proposals x features) product although one row an image is non-zero,
the RoI pooling's backward fills every level, and the convolutions of every FPN level then run
backward over zeros, once per explained rank.

:func:`sparse_box_gradients` runs the branch's forward once without a graph and, in each
backward pass, recomputes only the rows whose gradient is non-zero, pooling from the features
the pass saw, and hands gradients only to the levels those rows read (the others get none, so
autograd skips their convolutions). The box head is row-wise (each proposal's logits depend on
its own pooled features only), so the gradient is the same: only the order of float sums
differs. First derivatives only (camx refuses second-order methods on detectors).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn


class _Branch:
    """One forward's box branch: the modules, and what recomputing some of its rows needs."""

    def __init__(self, heads: _Heads, names: list[str], proposals: list[torch.Tensor], shapes: Any) -> None:
        self.heads, self.names, self.proposals, self.shapes = heads, names, proposals, shapes

    def scores(self, levels: Sequence[torch.Tensor], rows: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """``(class_logits, box_regression)`` of every proposal, or of ``rows`` (sorted) of them."""
        proposals = self.proposals if rows is None else self._subset(rows)
        pooled = self.heads.pool(dict(zip(self.names, levels, strict=True)), proposals, self.shapes)
        return tuple(self.heads.predictor(self.heads.head(pooled)))

    def _subset(self, rows: torch.Tensor) -> list[torch.Tensor]:
        """Per image, its proposals among ``rows`` (indices into all images' proposals in turn)."""
        subset, start = [], 0
        for boxes in self.proposals:
            end = start + len(boxes)
            subset.append(boxes[rows[(rows >= start) & (rows < end)] - start])
            start = end
        return subset


class _SparseBranch(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, branch: _Branch, *levels: torch.Tensor) -> tuple[torch.Tensor, ...]:  # type: ignore[override]
        ctx.branch = branch
        ctx.save_for_backward(*levels)
        return branch.scores(levels)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        levels = ctx.saved_tensors
        live = torch.stack([g.ne(0).flatten(1).any(dim=1) for g in grads]).any(dim=0)
        rows = live.nonzero().flatten()
        if len(rows) == 0:
            return (None,) * (1 + len(levels))
        inputs = [level.detach().requires_grad_(True) for level in levels]
        with torch.enable_grad():
            outputs = ctx.branch.scores(inputs, rows)
        found = torch.autograd.grad(outputs, inputs, [g[rows] for g in grads], allow_unused=True)
        return (None, *(g if g is not None and bool(g.any()) else None for g in found))


class _Heads(nn.Module):
    """Stands in for ``roi_heads.box_roi_pool`` during a pass: returns the predictor's outputs,
    made by :class:`_SparseBranch` (``box_head`` and ``box_predictor`` stand in as identities)."""

    def __init__(self, pool: nn.Module, head: nn.Module, predictor: nn.Module) -> None:
        super().__init__()
        self.pool, self.head, self.predictor = pool, head, predictor

    def forward(self, features: dict[str, torch.Tensor], proposals: list[torch.Tensor], shapes: Any) -> Any:
        wanted = getattr(self.pool, "featmap_names", None)
        names = [name for name in features if wanted is None or name in wanted]
        branch = _Branch(self, names, proposals, shapes)
        return _SparseBranch.apply(branch, *(features[name] for name in names))


def applies(module: nn.Module, layer: str) -> bool:
    """Whether ``module`` has an R-CNN box branch that the layer ``layer`` comes before."""
    heads = getattr(module, "roi_heads", None)
    parts = ("box_roi_pool", "box_head", "box_predictor")
    return (
        heads is not None
        and all(isinstance(getattr(heads, p, None), nn.Module) for p in parts)
        and not (layer == "roi_heads" or layer.startswith("roi_heads."))
    )


@contextlib.contextmanager
def sparse_box_gradients(module: nn.Module, layer: str) -> Iterator[None]:
    """Inside: ``module``'s box branch (when :func:`applies`) differentiates only the rows of
    the scores a backward pass asks for; restored on exit, exceptions included."""
    if not applies(module, layer):
        yield
        return
    heads: Any = module.roi_heads
    saved = (heads.box_roi_pool, heads.box_head, heads.box_predictor)
    heads.box_roi_pool = _Heads(*saved)
    heads.box_head = heads.box_predictor = nn.Identity()
    try:
        yield
    finally:
        heads.box_roi_pool, heads.box_head, heads.box_predictor = saved

"""What the perturbation metrics share: the samples they score, the plan of
perturbed inputs each metric asks for, and the scheduler that packs the
perturbed inputs of many samples and metrics into full model batches.

A metric never calls the model itself. For a group of ``N`` samples it returns
a :class:`Plan`: how many perturbed inputs it needs, how to build any slice of
them (on demand, so that memory holds one model batch of them at a time), and
how to turn their scores into per-sample values. :class:`Scheduler` takes the
plans of successive groups, cuts their inputs into batches of exactly
``batch_size`` (inputs of several samples, steps and metrics side by side), and
hands each plan its scores. The score of an input is the softmax probability of
its sample's explained class (:func:`class_probability`), unless the scheduler is given a
``score`` of its own: then a sample's "class" is a token that score reads (a readout whose
targets depend on the unperturbed image pins them: a segmentation run's region, a detection
run's detection, :mod:`cam_cli.jobs.evaluate.pinning` and :mod:`cam_cli.jobs.evaluate.detection`),
or the model's output is itself the score (the similarity to a reference of an embedding
run, :func:`output_score`).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

import torch

#: logits ``(n, C)`` of a batch of normalised images ``(n, 3, S, S)``
Forward = Callable[[torch.Tensor], torch.Tensor]
#: the score ``(n,)`` of each input of a batch, from the inputs (``(n, 3, S, S)``, or a list of
#: ``(3, H, W)`` where their sizes differ) and what each is scored by ``(n,)``: its sample's
#: class, or a token the scorer reads (a readout that pins each sample's target)
Score = Callable[[torch.Tensor | list[torch.Tensor], torch.Tensor], torch.Tensor]


@dataclass
class Samples:
    """A group of ``N`` (image, map) pairs to score.

    ``images``: ``(N, 3, S, S)`` normalised model inputs; ``maps``: ``(N, S, S)``
    in [0, 1] at the model's input size; ``classes``: ``(N,)`` the explained
    class of each; ``ids``: a stable name per sample (seeds the noisy metrics, so
    that a value does not depend on which samples share its batch); ``remaps``:
    ``(N, S, S)`` each map made again by its own method from ``images * maps`` (what
    ARCC's coherency compares with; None where no metric needs it).
    """

    images: torch.Tensor
    maps: torch.Tensor
    classes: torch.Tensor
    ids: list[str] = field(default_factory=list)
    remaps: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if not self.ids:
            self.ids = [str(i) for i in range(self.images.shape[0])]

    def __len__(self) -> int:
        return int(self.images.shape[0])


class Plan(Protocol):
    """The perturbed inputs one metric needs for one :class:`Samples` group."""

    #: how many perturbed inputs
    count: int

    def build(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs ``start:stop`` as ``(n, 3, S, S)`` and the class to score each by ``(n,)``."""
        ...

    def finish(self, scores: torch.Tensor, base: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-sample values ``{field: (N,)}`` from the scores ``(count,)`` of its inputs
        and ``base`` ``(N,)``, the probability of each unperturbed image."""
        ...


class Group:
    """One :class:`Samples` group's inputs for several metrics, as one plan.

    The first ``N`` inputs are the unperturbed images (their scores are the
    ``base`` every metric compares with, computed once), then each metric's
    inputs in turn. ``finish`` gives ``{"score": base, **each metric's values}``.
    """

    def __init__(self, samples: Samples, plans: Iterable[Plan]) -> None:
        self.samples = samples
        self.plans = list(plans)
        self.offsets = [len(samples)]
        for plan in self.plans:
            self.offsets.append(self.offsets[-1] + plan.count)
        self.count = self.offsets[-1]

    def build(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        inputs: list[torch.Tensor] = []
        classes: list[torch.Tensor] = []
        n = len(self.samples)
        if start < n:
            inputs.append(self.samples.images[start : min(stop, n)])
            classes.append(self.samples.classes[start : min(stop, n)])
        for plan, begin, end in zip(self.plans, self.offsets, self.offsets[1:], strict=False):
            lo, hi = max(start, begin), min(stop, end)
            if lo < hi:
                x, c = plan.build(lo - begin, hi - begin)
                inputs.append(x)
                classes.append(c)
        if len(inputs) == 1:
            return inputs[0], classes[0]
        return torch.cat(inputs), torch.cat(classes)

    def finish(self, scores: torch.Tensor) -> dict[str, torch.Tensor]:
        base = scores[: len(self.samples)]
        values: dict[str, torch.Tensor] = {"score": base}
        for plan, begin, end in zip(self.plans, self.offsets, self.offsets[1:], strict=False):
            values.update(plan.finish(scores[begin:end], base))
        return values


def class_probability(logits: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """Softmax probability ``(n,)`` of ``classes`` ``(n,)`` in ``logits`` ``(n, C)``, in float32."""
    return torch.softmax(logits.float(), dim=1).gather(1, classes.view(-1, 1).to(logits.device)).squeeze(1)


def class_output(outputs: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """Output ``(n,)`` of ``classes`` ``(n,)`` in ``outputs`` ``(n, C)`` as it is, in float32
    (a similarity: already the score)."""
    return outputs.float().gather(1, classes.view(-1, 1).to(outputs.device)).squeeze(1)


def output_score(forward: Forward) -> Score:
    """A :data:`Score` that reads each input's output as it is (:func:`class_output`)."""

    def score(x: torch.Tensor | list[torch.Tensor], classes: torch.Tensor) -> torch.Tensor:
        assert isinstance(x, torch.Tensor), "an embedding model's inputs share one size"
        return class_output(forward(x), classes).cpu()

    return score


@dataclass
class _Pending:
    plan: Group
    scores: torch.Tensor
    done: int = 0
    on_finish: Callable[[dict[str, torch.Tensor]], None] | None = None
    result: dict[str, torch.Tensor] | None = None


class Scheduler:
    """Full batches of perturbed inputs across plans, in the order the plans came.

    ``add`` queues a plan; ``run(final=False)`` scores every full batch the queue
    holds and keeps the rest (less than one batch) for the next plans;
    ``run(final=True)`` also scores the remainder. A plan's ``on_finish`` is
    called with its values once all its inputs are scored. ``passes`` counts the
    inputs scored (forward passes of one image), ``batches`` the model calls.
    ``score`` (when given) scores each batch instead of :func:`class_probability`
    of ``forward``.
    """

    def __init__(self, forward: Forward, batch_size: int, score: Score | None = None) -> None:
        self.forward = forward
        self.batch_size = batch_size
        #: scores a batch (default: the softmax probability of each input's class)
        self.score: Score = score or self._probability
        self.queue: deque[_Pending] = deque()
        self.queued = 0
        self.passes = 0
        self.batches = 0

    def add(self, plan: Group, on_finish: Callable[[dict[str, torch.Tensor]], None] | None = None) -> _Pending:
        pending = _Pending(plan, torch.empty(plan.count, dtype=torch.float32), on_finish=on_finish)
        self.queue.append(pending)
        self.queued += plan.count
        if plan.count == 0:
            self._retire()
        return pending

    def _probability(self, x: torch.Tensor | list[torch.Tensor], classes: torch.Tensor) -> torch.Tensor:
        assert isinstance(x, torch.Tensor), "a classifier's inputs share one size"
        return class_probability(self.forward(x), classes)

    def run(self, final: bool = False) -> None:
        while self.queued >= self.batch_size or (final and self.queued > 0):
            self._one_batch(min(self.batch_size, self.queued))
        self._retire()

    def _one_batch(self, size: int) -> None:
        parts: list[tuple[_Pending, int, int]] = []
        inputs: list[torch.Tensor] = []
        classes: list[torch.Tensor] = []
        need = size
        for pending in self.queue:
            if need == 0:
                break
            start = pending.done  # each plan appears once per batch
            left = pending.plan.count - start
            if left <= 0:
                continue
            take = min(left, need)
            x, c = pending.plan.build(start, start + take)
            inputs.append(x)
            classes.append(c)
            parts.append((pending, start, start + take))
            need -= take
        batch = joined(inputs)
        c = classes[0] if len(classes) == 1 else torch.cat(classes)
        with torch.inference_mode():
            scores = self.score(batch, c).float().cpu()
        self.passes += len(batch)
        self.batches += 1
        offset = 0
        for pending, start, stop in parts:
            pending.scores[start:stop] = scores[offset : offset + stop - start]
            pending.done = stop
            offset += stop - start
        self.queued -= len(batch)
        self._retire()

    def _retire(self) -> None:
        while self.queue and self.queue[0].done >= self.queue[0].plan.count:
            pending = self.queue.popleft()
            pending.result = pending.plan.finish(pending.scores)
            if pending.on_finish is not None:
                pending.on_finish(pending.result)


def joined(inputs: list[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
    """Inputs ``(n_i, 3, H_i, W_i)`` as one batch: concatenated, or where their sizes differ
    (a detection model's images at their own sizes) the list of their ``(3, H, W)`` rows."""
    if len(inputs) == 1:
        return inputs[0]
    if len({tuple(x.shape[1:]) for x in inputs}) == 1:
        return torch.cat(inputs)
    return [row for x in inputs for row in x]


def run_plans(
    samples: Samples, plans: Iterable[Plan], forward: Forward, batch_size: int, score: Score | None = None
) -> dict[str, torch.Tensor]:
    """Score ``plans`` for ``samples`` (sharing batches): ``{"score": (N,), field: (N,), ...}``."""
    scheduler = Scheduler(forward, batch_size, score)
    entry = scheduler.add(Group(samples, plans))
    scheduler.run(final=True)
    assert entry.result is not None
    return entry.result

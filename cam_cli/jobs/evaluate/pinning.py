"""Scoring perturbed inputs for a readout whose targets depend on the unperturbed image
(:mod:`cam_cli.models.readout`): a free pass, then pinned passes.

A segmentation target sums a class's logits over the pixels the model assigns to it *on
the unperturbed image*. A perturbed copy (a deletion step, ROAD's imputed image) must be
read over that same region, not over what the model predicts for the copy. So, for a
setup whose readout pins (it overrides :meth:`Readout.pinned`):

* each loaded batch of images gets one **free pass** (:meth:`PinnedScores.fix`): the
  readout fixes what it needs (the predicted masks), and :meth:`PinnedScores.absent`
  says which pairs' classes cannot be scored on them (a class on no pixel);
* the scheduler's batches carry, instead of the explained class, a **tag** per input
  (:meth:`PinnedScores.tags`) naming its image and class; each batch is scored inside
  ``readout.pinned(rows)``, row ``i`` read as a copy of image ``rows[i]`` of the last
  free pass. A batch whose images are not all in the last free pass (the scheduler packs
  inputs of several loaded batches together) first gets a free pass over its own images.

The score of an input is the readout's (:meth:`Readout.scores` inside the pinned pass: for
segmentation the mean probability of the class over the original region), the same
quantity ``camx explain`` records as the target's ``score``. A classifier's readout does
not pin, and its setups are scored as before (softmax probability, no tags).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from cam_cli.models.readout import Readout

#: the randomisation metrics, which explain again (on randomised weights, or another class)
RANDOMISING = ("mprt", "random-logit")


def pins(readout: Readout | None) -> bool:
    """Whether ``readout``'s targets depend on the unperturbed image (it overrides ``pinned``)."""
    return readout is not None and type(readout).pinned is not Readout.pinned


def refusal(readout: Readout | None, names: Sequence[str], model: str) -> str | None:
    """Why the metrics ``names`` cannot score a run of ``model`` (None: they can)."""
    asked = [n for n in names if n in RANDOMISING]
    if not asked or not pins(readout):
        return None
    assert readout is not None
    return (
        f"{' and '.join(asked)} cannot score {readout.task} runs ({model}): they explain again on randomised "
        "weights or for a random other class, whose target would need the trained model's predicted "
        "region pinned through every method's passes (leave them out of --metrics)"
    )


class PinnedScores:
    """The free passes and pinned scores of one setup whose readout pins.

    ``forward`` gives the readout's targets of a normalised batch (the runner's; calling it
    outside ``pinned`` is a free pass). Images are kept on the device until every sample
    of theirs is scored (:meth:`release`). ``passes`` and ``batches`` count the images and
    model calls of the free passes.
    """

    def __init__(self, forward: Callable[[torch.Tensor], torch.Tensor], readout: Readout) -> None:
        self.forward = forward
        self.readout = readout
        self.images: dict[int, torch.Tensor] = {}  # image id -> (3, S, S) normalised
        self.samples: dict[int, tuple[int, int]] = {}  # tag -> (image id, class)
        self.fixed: dict[int, int] = {}  # image id -> its row in the last free pass
        self._next_image = 0
        self._next_tag = 0
        self.passes = 0
        self.batches = 0

    def fix(self, images: torch.Tensor) -> list[int]:
        """The free pass over ``images`` ``(M, 3, S, S)`` (normalised); their image ids."""
        ids = list(range(self._next_image, self._next_image + len(images)))
        self._next_image += len(images)
        self.images.update(zip(ids, images, strict=True))
        self._free(ids)
        return ids

    def absent(self, ids: Sequence[int], image_of: Sequence[int], classes: Sequence[int]) -> list[str | None]:
        """Per sample (image ``ids[image_of[j]]``, class ``classes[j]``), why the last free pass
        leaves nothing to score (None: it can be scored). ``ids``: those of :meth:`fix`."""
        reasons: list[str | None] = [None] * len(classes)
        columns: dict[int, list[int]] = {}  # per image, its samples in turn
        for j, slot in enumerate(image_of):
            columns.setdefault(slot, []).append(j)
        for k in range(max((len(c) for c in columns.values()), default=0)):
            # a readout answers per image: one sample of each image per call, the k-th (an image
            # with fewer repeats its last, whose answer is not used)
            chosen = []
            for slot in range(len(ids)):
                members = columns.get(slot, [])
                chosen.append(classes[members[min(k, len(members) - 1)]] if members else 0)
            answer = self.readout.absent(torch.tensor(chosen).view(-1, 1))
            for slot, members in columns.items():
                if k < len(members):
                    reasons[members[k]] = answer[slot]
        return reasons

    def tags(self, ids: Sequence[int], classes: Sequence[int], device: torch.device) -> torch.Tensor:
        """``(N,)`` one tag per sample of image ``ids[j]`` and class ``classes[j]``, on ``device``."""
        tags = list(range(self._next_tag, self._next_tag + len(classes)))
        self._next_tag += len(classes)
        self.samples.update(zip(tags, zip(ids, classes, strict=True), strict=True))
        return torch.tensor(tags, dtype=torch.long, device=device)

    def __call__(self, x: torch.Tensor | list[torch.Tensor], tags: torch.Tensor) -> torch.Tensor:
        """The scores ``(n,)`` of inputs ``x`` ``(n, 3, S, S)``, perturbed copies of their tags' images."""
        assert isinstance(x, torch.Tensor), "a segmentation model's inputs share one size"
        samples = [self.samples[t] for t in tags.tolist()]
        images = [image for image, _ in samples]
        if any(i not in self.fixed for i in images):
            self._free(list(dict.fromkeys(images)))
        rows = torch.tensor([self.fixed[i] for i in images], device=x.device)
        classes = torch.tensor([c for _, c in samples], device=x.device).view(-1, 1)
        with self.readout.pinned(rows):
            scores = self.readout.scores(self.forward(x))
        return scores.float().gather(1, classes.to(scores.device)).squeeze(1).cpu()

    def release(self, tags: torch.Tensor) -> None:
        """Forget the samples ``tags`` (all scored), and their images."""
        for tag in tags.tolist():
            image, _ = self.samples.pop(tag)
            self.images.pop(image, None)

    def _free(self, ids: list[int]) -> None:
        with torch.inference_mode():
            self.forward(torch.stack([self.images[i] for i in ids]))
        self.passes += len(ids)
        self.batches += 1
        self.fixed = {image: row for row, image in enumerate(ids)}

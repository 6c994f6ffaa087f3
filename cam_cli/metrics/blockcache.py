"""The trained bottom of a model, computed once for MPRT.

At each depth MPRT explains the same images again with only some blocks randomised;
what the forward pass computes before the first randomised block starts is what the
trained model computed. :class:`BlockCache` keeps each block's output from a trained
pass over an input and, when the same input comes back, gives those outputs back
instead of running the blocks again (the kept tensor itself: one that the model then
changes in place is dropped after that pass, and its block runs again from then on).

A block is given back only when that is exactly what it would compute and nothing needs
it run: it is not randomised, it ran once in the trained pass and returned a tensor, it
finished before the first randomised block started (a forward pass can only have used
what ran before), nothing inside it is watched (a hook or a swapped forward: a method
reading a layer there gets it run), and every watched module outside it started after it
finished or contains it with only output hooks (so that the graph from what a method
reads to the score is built). An input that needs its gradient (guided backpropagation,
FullGrad) and any other input (Score-CAM's masked images, augmentations) run in full.
The values are the same as without the cache; only the passes through kept blocks are
skipped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from cam_cli.metrics.randomisation import Randomiser


@dataclass
class _Trained:
    """One input's trained pass: each block's output, when each module started and finished."""

    x: torch.Tensor
    outputs: dict[int, torch.Tensor] = field(default_factory=dict)
    starts: dict[int, int] = field(default_factory=dict)
    ends: dict[int, int] = field(default_factory=dict)
    calls: dict[int, int] = field(default_factory=dict)
    #: each kept output's version counter (an in-place change moves it)
    versions: dict[int, int] = field(default_factory=dict)
    #: the blocks something watched in that pass (what they gave may not be what they compute)
    watched: set[int] = field(default_factory=set)


class BlockCache:
    """Kept block outputs for the inputs the randomiser's model is called with while
    attached (``with cache:``): a pass of the trained model over a new input records, a
    pass over an input seen before gives back what it may."""

    def __init__(self, module: nn.Module, randomiser: Randomiser) -> None:
        self.root = module
        self.randomiser = randomiser
        self.modules = [m for m in module.modules() if m is not module]
        index = {id(m): j for j, m in enumerate(self.modules)}
        #: a block that is the whole model (a single layer) leaves nothing to keep
        self.inert = any(id(block) not in index for _, block in randomiser.blocks)
        self.blocks = [] if self.inert else [index[id(block)] for _, block in randomiser.blocks]
        self.is_block = set(self.blocks)
        inside = [_ids(self.modules[b]) for b in self.blocks]
        #: per module, the blocks it holds (itself included), and the block it lies in (-1: none)
        block_ids = [id(self.modules[b]) for b in self.blocks]
        self.holds = [{i for i, b in enumerate(block_ids) if b in ids} for ids in map(_ids, self.modules)]
        self.within = [next((i for i, ids in enumerate(inside) if id(m) in ids), -1) for m in self.modules]
        self.kept: list[_Trained] = []
        self.expected: list[torch.Tensor] = []
        self.handles: list[Any] = []
        self.passing: list[Any] = []
        self.standing: list[tuple[nn.Module, _Trained, int]] = []
        self.clock = 0
        #: block passes given back instead of run
        self.skipped = 0

    def __enter__(self) -> BlockCache:
        if self.inert:
            return self
        # plain functions, not bound methods: a copy of the model (Score-CAM folds its batch
        # norms into one) then shares them instead of copying this cache with it
        before = lambda m, args, kwargs: self._before(m, args, kwargs)  # noqa: E731
        after = lambda *_: self._after()  # noqa: E731
        self.handles.append(self.root.register_forward_pre_hook(before, with_kwargs=True))
        self.handles.append(self.root.register_forward_hook(after, always_call=True))
        return self

    def __exit__(self, *_: object) -> None:
        self._after()
        for handle in self.handles:
            handle.remove()
        self.handles, self.kept, self.expected = [], [], []

    def expect(self, x: torch.Tensor) -> None:
        """Record the trained passes over ``x`` ``(n, ...)`` and its slices (the inputs worth
        keeping; other trained passes, Score-CAM's masked images among them, run as they are)."""
        if not any(_same(x, e) for e in self.expected):
            self.expected.append(x.detach())

    def _before(self, _: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self._after()
        x = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
        if x is None or x.requires_grad:
            return
        trained = next((t for t in self.kept if _same(t.x, x)), None)
        if trained is not None:
            self._stand_in(trained)
        elif not any(self.randomiser.randomised) and any(_slice_of(x, e) for e in self.expected):
            self._record(x)

    def _after(self, *_: object) -> None:
        for block, trained, j in self.standing:
            del block.forward
            if _version(trained.outputs[j]) != trained.versions[j]:  # changed in place: no longer kept
                del trained.outputs[j]
        for handle in self.passing:
            handle.remove()
        self.standing, self.passing = [], []

    def _record(self, x: torch.Tensor) -> None:
        """Watch every module through this trained pass over ``x``."""
        trained = _Trained(x.detach().clone())
        trained.watched = self._disturbed()
        self.clock = 0
        for j, module in enumerate(self.modules):
            self.passing.append(module.register_forward_pre_hook(self._started(trained, j)))
            self.passing.append(module.register_forward_hook(self._finished(trained, j)))
        self.kept.append(trained)

    def _disturbed(self) -> set[int]:
        """The blocks whose output a hook or a swapped forward may change now: those with one
        inside, and those inside a module with an input hook or a forward of its own."""
        found = set()
        for j, module in enumerate(self.modules):
            if _watched(module):
                found.add(self.within[j])
                if module._forward_pre_hooks or "forward" in module.__dict__:
                    found |= self.holds[j]
        return found - {-1}

    def _started(self, trained: _Trained, j: int) -> Any:
        def hook(*_: object) -> None:
            self.clock += 1
            trained.starts.setdefault(j, self.clock)
            trained.calls[j] = trained.calls.get(j, 0) + 1

        return hook

    def _finished(self, trained: _Trained, j: int) -> Any:
        def hook(_: nn.Module, __: Any, output: Any) -> None:
            self.clock += 1
            trained.ends[j] = self.clock
            if j in self.is_block and isinstance(output, torch.Tensor):
                trained.outputs[j] = output.detach().clone()  # the model may change it in place later
                trained.versions[j] = _version(trained.outputs[j])

        return hook

    def _stand_in(self, trained: _Trained) -> None:
        """Give back the kept output of every block this pass may skip."""
        randomised = self.randomiser.randomised
        first = min((trained.starts.get(self.blocks[i], 0) for i, r in enumerate(randomised) if r), default=math.inf)
        watched = [j for j, m in enumerate(self.modules) if _watched(m)]
        for i, j in enumerate(self.blocks):
            end = trained.ends.get(j, math.inf)
            if randomised[i] or i in trained.watched or trained.calls.get(j) != 1 or j not in trained.outputs:
                continue
            if end >= first:
                continue
            if all(self._clear(i, end, w, trained) for w in watched):
                block, kept = self.modules[j], trained.outputs[j]
                block.forward = lambda *_, kept=kept, **__: self._given(kept)  # type: ignore[method-assign]
                self.standing.append((block, trained, j))

    def _clear(self, i: int, end: float, w: int, trained: _Trained) -> bool:
        """Whether the watched module ``w`` lets block ``i`` (finished at ``end``) be skipped."""
        if self.within[w] == i:
            return False
        if i in self.holds[w]:  # w contains the block: its output is still computed, from it
            module = self.modules[w]
            return not module._forward_pre_hooks and "forward" not in module.__dict__
        return end < trained.starts.get(w, 0)

    def _given(self, kept: torch.Tensor) -> torch.Tensor:
        self.skipped += 1
        return kept.clone() if kept.is_inference() else kept  # an inference tensor has no version to watch


def _ids(module: nn.Module) -> set[int]:
    return {id(m) for m in module.modules()}


def _version(t: torch.Tensor) -> int:
    return -1 if t.is_inference() else int(t._version)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal tensors (a few values compared first: most inputs differ at once)."""
    if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
        return False
    first = (0,) * (a.dim() - 1)  # a view of the first row: no copy
    return torch.equal(a[first], b[first]) and torch.equal(a, b)


def _slice_of(x: torch.Tensor, whole: torch.Tensor) -> bool:
    """Whether ``x`` is ``whole[i : i + len(x)]`` for some ``i``."""
    if x.dim() == 0 or x.shape[1:] != whole.shape[1:] or x.shape[0] > whole.shape[0]:
        return False
    return any(_same(x, whole[i : i + x.shape[0]]) for i in range(whole.shape[0] - x.shape[0] + 1))


def _watched(module: nn.Module) -> bool:
    """A hook on ``module`` or a forward of its own swapped in."""
    hooks = module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
    return bool(hooks or getattr(module, "_backward_pre_hooks", None) or "forward" in module.__dict__)

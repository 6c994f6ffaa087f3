"""Explaining again inside ``camx evaluate``: the maps of the scored pairs made once more
by camx's own methods on the rebuilt model, for the metrics that need them (registry
entries with ``reexplains``): the randomisation checks (the model randomised, another
class: :mod:`~cam_cli.jobs.evaluate.randomise`) and ARCC (the image multiplied by its map).

Each distinct (input, class) is explained once, with every method that needs it in the
same passes (one :class:`~cam_cli.methods.BatchExplainer` per set of methods, prepared
on the weights as they are now). Every forward pass of the model made here is counted
(a hook on the module, around the explains), so that evaluate's figure of forward passes is true."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch

from cam_cli.jobs.evaluate.lines import Pair
from cam_cli.jobs.evaluate.setups import ModelSetup
from cam_cli.jobs.explain.session import build_explainer, resolve_for
from cam_cli.methods import BatchExplainer, MethodOptions, Setup
from cam_cli.probe import run_probe
from cam_cli.render import upsample_normalise

#: methods whose maps are not of a class (DFF's concepts): no values that explain again (None)
UNSUPPORTED = frozenset({"dff"})


@dataclass(frozen=True)
class Recipe:
    """How a pair's map was made, as far as its methods' explainer depends on it."""

    layer: str | None
    aug_smooth: bool
    options: MethodOptions


def recipe_of(record: dict[str, Any], seed: int) -> Recipe:
    """The layer, smoothing and method options a manifest line records (defaults where it does not)."""
    values = {f.name: record[f.name] for f in fields(MethodOptions) if f.name in record and f.name != "seed"}
    return Recipe(record.get("layer"), bool(record.get("aug_smooth")), MethodOptions(seed=seed, **values))


class Reexplainer:
    """The methods of one setup's pairs, run again; ``passes`` and ``batches`` count the
    images and the calls of the model's forward made by :meth:`maps`."""

    def __init__(self, setup: ModelSetup, seed: int, batch_size: int) -> None:
        assert setup.classifier is not None and setup.runner is not None
        self.setup, self.seed, self.batch_size = setup, seed, batch_size
        runner = setup.runner
        runner.module.to("cpu")
        self.probe = run_probe(setup.classifier, channels_last=runner.channels_last)
        runner.module.to(runner.device)
        self.passes = 0
        self.batches = 0

    def explainer(self, names: list[str], recipe: Recipe) -> BatchExplainer:
        """The methods ``names`` prepared on the model's weights as they are now."""
        runner, classifier = self.setup.runner, self.setup.classifier
        assert runner is not None and classifier is not None
        _, layers, _ = resolve_for(classifier, self.probe, names, recipe.layer, "top1")
        target = layers[0] if layers else None
        setup = Setup(self.probe, target, runner.module, runner.forward, runner.device, tuple(layers))
        return build_explainer(names, recipe.options, setup, recipe.aug_smooth, self.batch_size)

    def maps(self, names: list[str], recipe: Recipe, x: torch.Tensor, classes: torch.Tensor) -> dict[str, np.ndarray]:
        """Each method's maps ``(n, S, S)`` in [0, 1] of the class ``classes[i]`` of image ``x[i]``."""
        size = int(x.shape[-1])
        out: dict[str, list[np.ndarray]] = {n: [] for n in names}
        explainer = self.explainer(names, recipe)
        with self._counted():  # the explains' passes (not a method's check when prepared)
            for start in range(0, int(x.shape[0]), self.batch_size):
                chosen = classes[start : start + self.batch_size].view(-1, 1)
                result = explainer.explain(x[start : start + self.batch_size], _fixed(chosen))
                for name in names:
                    raw = result.maps[name][:, 0].detach().float()
                    out[name].append(upsample_normalise(raw, size, size).cpu().numpy())
        return {n: np.concatenate(parts) for n, parts in out.items()}

    def own_maps(self, recipe: Recipe, methods: Sequence[str], inputs: torch.Tensor, input_of: Sequence[int],
                 classes: Sequence[int]) -> np.ndarray:  # fmt: skip
        """``(n, S, S)``: for pair ``j``, the map by ``methods[j]`` of ``inputs[input_of[j]]`` for
        ``classes[j]``. Each distinct (input, class) is explained once, by every method that
        needs it in the same passes (rows needing the same methods share an explainer)."""
        rows: dict[tuple[int, int], int] = {}
        row_of = [rows.setdefault((i, c), len(rows)) for i, c in zip(input_of, classes, strict=True)]
        wanted: dict[int, set[str]] = {}
        for method, row in zip(methods, row_of, strict=True):
            wanted.setdefault(row, set()).add(method)
        together: dict[frozenset[str], list[int]] = {}
        for row, needed in wanted.items():
            together.setdefault(frozenset(needed), []).append(row)
        keys = list(rows)
        found: dict[tuple[str, int], np.ndarray] = {}
        for names, order in together.items():
            x = inputs[torch.tensor([keys[r][0] for r in order], device=inputs.device)]
            chosen = torch.tensor([keys[r][1] for r in order], device=inputs.device)
            made = self.maps(sorted(names), recipe, x, chosen)
            found.update(((name, r), made[name][k]) for name in names for k, r in enumerate(order))
        return np.stack([found[(m, r)] for m, r in zip(methods, row_of, strict=True)])

    def groups(self, pairs: Sequence[Pair], names: Sequence[str]) -> dict[Recipe, list[int]]:
        """The indices of the pairs that need one of ``names`` and a method that supports it, by recipe."""
        groups: dict[Recipe, list[int]] = {}
        for j, pair in enumerate(pairs):
            if any(n in pair.todo for n in names) and pair.record["method"] not in UNSUPPORTED:
                groups.setdefault(recipe_of(pair.record, self.seed), []).append(j)
        return groups

    def remade(self, pairs: Sequence[Pair], images: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
        """ARCC's ``(n, S, S)``: each pair's map made again by its own method from its image
        ``images[j]`` multiplied by its map ``maps[j]`` (NaN for an unsupported method)."""
        out = torch.full(maps.shape, float("nan"), dtype=torch.float32)
        masked = images * maps.unsqueeze(1).to(images.dtype)
        for recipe, members in self.groups(pairs, ["arcc"]).items():
            methods = [str(pairs[j].record["method"]) for j in members]
            classes = [int(pairs[j].record["class_index"]) for j in members]
            chosen = masked[torch.tensor(members, device=masked.device)]
            made = self.own_maps(recipe, methods, chosen, range(len(members)), classes)
            out[torch.tensor(members)] = torch.from_numpy(made)
        return out.to(maps.device)

    def cost(self, records: Sequence[dict[str, Any]]) -> int:
        """Forward-pass equivalents (a backward counted as two) of one explain of one image
        with every method of ``records``, as the trained model's explainer reports them."""
        total = 0
        groups: dict[Recipe, set[str]] = {}
        for record in records:
            groups.setdefault(recipe_of(record, self.seed), set()).add(str(record["method"]))
        for recipe, names in groups.items():
            methods = self.explainer(sorted(names), recipe).methods
            total += 1 + 2 * any(m.needs_gradient for m in methods) + sum(m.passes_per_image for m in methods)
        return total

    @contextmanager
    def _counted(self) -> Iterator[None]:
        """Count the images and calls of the model's forward while inside."""
        assert self.setup.runner is not None

        def count(_: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            first = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
            if first is not None:
                self.passes += int(first.shape[0]) if first.dim() else 1
                self.batches += 1

        handle = self.setup.runner.module.register_forward_pre_hook(count, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()


def _fixed(classes: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """A class chooser that explains ``classes`` ``(n, 1)`` whatever the logits."""
    return lambda logits: classes.to(logits.device)

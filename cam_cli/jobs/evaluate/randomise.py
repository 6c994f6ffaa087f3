"""The randomisation metrics of one model setup (``mprt``, ``random-logit``): the maps of
the scored pairs made again by camx's own methods, from the trained model, from the model
randomised block by block (:class:`~cam_cli.metrics.randomisation.Randomiser`, in place,
put back before anything else uses it) and for a random other class, and compared.

Every method of a batch of images runs in the same passes (one
:class:`~cam_cli.methods.BatchExplainer` per depth, prepared again on the randomised
weights, since some methods read weights when prepared: CAM's head, Score-CAM's folded
batch norms, FullGrad's biases). One map per depth of the run's first input is kept
for the report's strip (``OUT/mprt/KEY.METHOD.npy``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from cam_cli import rundir
from cam_cli.errors import InputError
from cam_cli.jobs.evaluate.config import EvaluateConfig
from cam_cli.jobs.evaluate.lines import Pair
from cam_cli.jobs.evaluate.setups import ModelSetup
from cam_cli.jobs.explain.session import build_explainer, resolve_for
from cam_cli.methods import BatchExplainer, MethodOptions, Setup
from cam_cli.metrics import MetricOptions
from cam_cli.metrics.randomisation import Randomiser, final, other_class, spearman, ssim
from cam_cli.probe import run_probe
from cam_cli.render import upsample_normalise

NAMES = ("mprt", "random-logit")
#: methods whose maps are not of a class (DFF's concepts): no randomisation values (None)
UNSUPPORTED = frozenset({"dff"})
#: randomisation metrics that would cost more than this many times deletion and insertion are refused
BUDGET_FACTOR = 10
#: the side of the maps kept for the report's strip
STRIP_SIZE = 48


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


class RandomisationScorer:
    """``mprt`` and ``random-logit`` values of the pairs of one setup, batch by batch."""

    def __init__(self, setup: ModelSetup, names: Sequence[str], options: MetricOptions, out_dir: Path,
                 batch_size: int) -> None:  # fmt: skip
        assert setup.classifier is not None and setup.runner is not None
        self.setup, self.names, self.options = setup, list(names), options
        self.out_dir, self.batch_size = out_dir, batch_size
        runner = setup.runner
        runner.module.to("cpu")
        self.probe = run_probe(setup.classifier, channels_last=runner.channels_last)
        runner.module.to(runner.device)
        self.randomiser = Randomiser(runner.module, options.seed, options.mprt_order)
        self.strip_key: str | None = None

    @property
    def blocks(self) -> list[str]:
        return self.randomiser.names

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
        explainer = self.explainer(names, recipe)
        size = int(x.shape[-1])
        out: dict[str, list[np.ndarray]] = {n: [] for n in names}
        for start in range(0, int(x.shape[0]), self.batch_size):
            chosen = classes[start : start + self.batch_size].view(-1, 1)
            result = explainer.explain(x[start : start + self.batch_size], _fixed(chosen))
            for name in names:
                raw = result.maps[name][:, 0].detach().float()
                out[name].append(upsample_normalise(raw, size, size).cpu().numpy())
        return {n: np.concatenate(parts) for n, parts in out.items()}

    def cost(self, records: Sequence[dict[str, Any]]) -> int:
        """Forward-pass equivalents (a backward counted as two) of one explain of one image
        with every method of ``records``, as the trained model's explainer reports them."""
        total = 0
        groups: dict[Recipe, set[str]] = {}
        for record in records:
            groups.setdefault(recipe_of(record, self.options.seed), set()).add(str(record["method"]))
        for recipe, names in groups.items():
            methods = self.explainer(sorted(names), recipe).methods
            total += 1 + 2 * any(m.needs_gradient for m in methods) + sum(m.passes_per_image for m in methods)
        return total

    def score(self, pairs: Sequence[Pair], images: torch.Tensor, values: Sequence[dict[str, Any]]) -> None:
        """Add the randomisation values of ``pairs`` (image ``images[i]`` each, normalised)
        to ``values`` (one dict per pair)."""
        groups: dict[Recipe, list[int]] = {}
        for j, pair in enumerate(pairs):
            if any(n in pair.todo for n in self.names) and pair.record["method"] not in UNSUPPORTED:
                groups.setdefault(recipe_of(pair.record, self.options.seed), []).append(j)
        for recipe, members in groups.items():
            self._score_group(recipe, [pairs[j] for j in members], images[members], [values[j] for j in members])

    def _score_group(self, recipe: Recipe, pairs: list[Pair], x: torch.Tensor, values: list[dict[str, Any]]) -> None:
        methods = sorted({str(p.record["method"]) for p in pairs})
        classes = torch.tensor([int(p.record["class_index"]) for p in pairs], device=x.device)
        original = self._own(self.maps(methods, recipe, x, classes), pairs)
        if any("mprt" in p.todo for p in pairs):
            self._mprt(methods, recipe, x, classes, pairs, original, values)
        if any("random-logit" in p.todo for p in pairs):
            count = self.setup.outputs
            keys = [f"{p.record['key']}\0{p.record['method']}" for p in pairs]
            off = [
                other_class(self.options.seed, k, int(c), count) for k, c in zip(keys, classes.tolist(), strict=True)
            ]
            other = self._own(self.maps(methods, recipe, x, torch.tensor(off, device=x.device)), pairs)
            for j, value in enumerate(ssim(original, other)):
                values[j].update(random_logit_ssim=_round(value), random_logit_class=off[j])

    def _own(self, maps: dict[str, np.ndarray], pairs: list[Pair]) -> np.ndarray:
        """Each pair's map ``(n, S, S)`` from the maps of every method."""
        return np.stack([maps[str(p.record["method"])][j] for j, p in enumerate(pairs)])

    def _mprt(self, methods: list[str], recipe: Recipe, x: torch.Tensor, classes: torch.Tensor, pairs: list[Pair],
              original: np.ndarray, values: list[dict[str, Any]]) -> None:  # fmt: skip
        depths = len(self.blocks)
        rho = np.zeros((len(pairs), depths))
        structural = np.zeros((len(pairs), depths))
        strip = self._strip_rows(pairs)
        frames = [[_small(original[j])] for j in strip]
        try:
            for depth in range(1, depths + 1):
                self.randomiser.set_depth(depth)
                randomised = self._own(self.maps(methods, recipe, x, classes), pairs)
                rho[:, depth - 1] = spearman(original, randomised)
                structural[:, depth - 1] = ssim(original, randomised)
                for frame, j in zip(frames, strip, strict=True):
                    frame.append(_small(randomised[j]))
        finally:
            self.randomiser.restore()
        order = self.options.mprt_order
        for j, value in enumerate(values):
            curve_rho, curve_ssim = [_round(v) for v in rho[j]], [_round(v) for v in structural[j]]
            value.update(mprt_spearman=final(curve_rho, order), mprt_ssim=final(curve_ssim, order))
            value.update(mprt_spearman_curve=curve_rho, mprt_ssim_curve=curve_ssim, mprt_blocks=self.blocks)
        for frame, j in zip(frames, strip, strict=True):
            path = self.out_dir / rundir.mprt_strip_name(str(pairs[j].record["key"]), str(pairs[j].record["method"]))
            path.parent.mkdir(parents=True, exist_ok=True)
            rundir.write_npy(path, np.stack(frame).astype(np.float16))

    def _strip_rows(self, pairs: list[Pair]) -> list[int]:
        """The pairs of the setup's first input (the report's strip shows its maps)."""
        if self.strip_key is None:
            self.strip_key = str(pairs[0].record["key"])
        return [j for j, p in enumerate(pairs) if str(p.record["key"]) == self.strip_key]


def _fixed(classes: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """A class chooser that explains ``classes`` ``(n, 1)`` whatever the logits."""
    return lambda logits: classes.to(logits.device)


def _small(image: np.ndarray) -> np.ndarray:
    tensor = torch.from_numpy(np.ascontiguousarray(image))[None, None].float()
    return F.interpolate(tensor, size=(STRIP_SIZE, STRIP_SIZE), mode="area")[0, 0].numpy()


def _round(value: float) -> float | None:
    return None if not np.isfinite(value) else round(float(value), 6)


def randomisation_scorers(
    records: Sequence[tuple[dict[str, Any], ModelSetup]], names: Sequence[str], options: MetricOptions,
    config: EvaluateConfig,
) -> dict[int, RandomisationScorer]:  # fmt: skip
    """A scorer per rebuilt setup (by ``id``), each checked against the budget unless ``config.budget_ok``."""
    if not names:
        return {}
    by_setup: dict[int, tuple[ModelSetup, list[dict[str, Any]]]] = {}
    for record, setup in records:
        by_setup.setdefault(id(setup), (setup, []))[1].append(record)
    scorers = {}
    for key, (setup, mine) in by_setup.items():
        scorer = RandomisationScorer(setup, names, options, config.out_dir, config.batch_size)
        if not config.budget_ok:
            check_budget(scorer, mine, names, options.steps)
        scorers[key] = scorer
    return scorers


def check_budget(scorer: RandomisationScorer, records: Sequence[dict[str, Any]], names: Sequence[str],
                 steps: int) -> None:  # fmt: skip
    """``InputError`` when the randomisation metrics would take more than ``BUDGET_FACTOR`` times
    the forward passes of deletion and insertion (``2 * steps + 1`` per map) on the same maps."""
    first = min(str(r["key"]) for r in records)
    image = [r for r in records if str(r["key"]) == first]
    explains = 1 + ("mprt" in names) * len(scorer.blocks) + ("random-logit" in names)
    cost = explains * scorer.cost(image)
    budget = BUDGET_FACTOR * len(image) * (2 * steps + 1)
    if cost > budget:
        raise InputError(
            f"{' and '.join(names)} would take about {cost} forward passes an image ({explains} explains of "
            f"{len(image)} methods, {len(scorer.blocks)} blocks), more than {BUDGET_FACTOR}x deletion and "
            f"insertion's {budget // BUDGET_FACTOR}: pass --budget-ok to run them anyway, or fewer methods"
        )

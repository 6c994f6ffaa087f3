"""The randomisation metrics of one model setup (``mprt``, ``random-logit``): the maps of
the scored pairs made again by camx's own methods
(:class:`~cam_cli.jobs.evaluate.reexplain.Reexplainer`), from the trained model, from the
model randomised block by block (:class:`~cam_cli.metrics.randomisation.Randomiser`, in
place, put back before anything else uses it) and for a random other class, and compared.

Every method of a batch of images runs in the same passes, each image once per depth
(prepared again on the randomised weights, since some methods read weights when
prepared: CAM's head, Score-CAM's folded batch norms, FullGrad's biases). One map per
depth of the run's first input is kept for the report's strip (``OUT/mprt/KEY.METHOD.npy``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from cam_cli import rundir
from cam_cli.jobs.evaluate.config import EvaluateConfig
from cam_cli.jobs.evaluate.lines import Pair
from cam_cli.jobs.evaluate.reexplain import Recipe, Reexplainer
from cam_cli.jobs.evaluate.setups import ModelSetup
from cam_cli.metrics import METRICS, MetricOptions
from cam_cli.metrics.blockcache import BlockCache
from cam_cli.metrics.randomisation import Against, Randomiser, final, other_class, ssim

NAMES = ("mprt", "random-logit")
#: the side of the maps kept for the report's strip
STRIP_SIZE = 48


class RandomisationScorer(Reexplainer):
    """``mprt`` and ``random-logit`` values of the pairs of one setup, batch by batch (and
    the maps ARCC needs: a :class:`Reexplainer` with a :class:`Randomiser`)."""

    def __init__(self, setup: ModelSetup, names: Sequence[str], options: MetricOptions, out_dir: Path,
                 batch_size: int) -> None:  # fmt: skip
        super().__init__(setup, options.seed, batch_size)
        assert setup.runner is not None
        self.names, self.options, self.out_dir = [n for n in names if n in NAMES], options, out_dir
        self.randomiser = Randomiser(setup.runner.module, options.seed, options.mprt_order)
        self.strip_key: str | None = None
        self.cache: BlockCache | None = None

    @property
    def blocks(self) -> list[str]:
        return self.randomiser.names

    def score(self, pairs: Sequence[Pair], images: torch.Tensor, image_of: Sequence[int],
              values: Sequence[dict[str, Any]]) -> None:  # fmt: skip
        """Add the randomisation values of ``pairs`` (image ``images[image_of[j]]`` each,
        normalised) to ``values`` (one dict per pair)."""
        for recipe, members in self.groups(pairs, self.names).items():
            chosen = [pairs[j] for j in members]
            self._score_group(recipe, chosen, images, [image_of[j] for j in members], [values[j] for j in members])

    def _score_group(self, recipe: Recipe, pairs: list[Pair], images: torch.Tensor, image_of: list[int],
                     values: list[dict[str, Any]]) -> None:  # fmt: skip
        assert self.setup.runner is not None
        self.cache = BlockCache(self.setup.runner.module, self.randomiser)  # the trained bottom, computed once
        try:
            with self.cache:
                self._compare(recipe, pairs, images, image_of, values)
        finally:
            self.cache = None

    def maps(self, names: list[str], recipe: Recipe, x: torch.Tensor, classes: torch.Tensor) -> dict[str, np.ndarray]:
        if self.cache is not None:
            self.cache.expect(x)
        return super().maps(names, recipe, x, classes)

    def _compare(self, recipe: Recipe, pairs: list[Pair], images: torch.Tensor, image_of: list[int],
                 values: list[dict[str, Any]]) -> None:  # fmt: skip
        methods = [str(p.record["method"]) for p in pairs]
        classes = [int(p.record["class_index"]) for p in pairs]
        original = self.own_maps(recipe, methods, images, image_of, classes)
        if any("mprt" in p.todo for p in pairs):
            self._mprt(recipe, pairs, images, image_of, original, values)
        if any("random-logit" in p.todo for p in pairs):
            count = self.setup.outputs
            keys = [f"{p.record['key']}\0{p.record['method']}" for p in pairs]
            off = [other_class(self.options.seed, k, c, count) for k, c in zip(keys, classes, strict=True)]
            other = self.own_maps(recipe, methods, images, image_of, off)
            for j, value in enumerate(ssim(original, other)):
                values[j].update(random_logit_ssim=_round(value), random_logit_class=off[j])

    def _mprt(self, recipe: Recipe, pairs: list[Pair], images: torch.Tensor, image_of: list[int],
              original: np.ndarray, values: list[dict[str, Any]]) -> None:  # fmt: skip
        methods = [str(p.record["method"]) for p in pairs]
        classes = [int(p.record["class_index"]) for p in pairs]
        depths = len(self.blocks)
        rho = np.zeros((len(pairs), depths))
        structural = np.zeros((len(pairs), depths))
        strip = self._strip_rows(pairs)
        trained = Against(original)  # its ranks and window means, once for every depth
        frames = [[_small(original[j])] for j in strip]
        try:
            for depth in range(1, depths + 1):
                self.randomiser.set_depth(depth)
                randomised = self.own_maps(recipe, methods, images, image_of, classes)
                rho[:, depth - 1] = trained.spearman(randomised)
                structural[:, depth - 1] = trained.ssim(randomised)
                for frame, j in zip(frames, strip, strict=True):
                    frame.append(_small(randomised[j]))
        finally:
            self.randomiser.restore()
        self._record(pairs, rho, structural, values)
        for frame, j in zip(frames, strip, strict=True):
            path = self.out_dir / rundir.mprt_strip_name(str(pairs[j].record["key"]), str(pairs[j].record["method"]))
            path.parent.mkdir(parents=True, exist_ok=True)
            rundir.write_npy(path, np.stack(frame).astype(np.float16))

    def _record(self, pairs: list[Pair], rho: np.ndarray, structural: np.ndarray,
                values: list[dict[str, Any]]) -> None:  # fmt: skip
        """Each pair's MPRT curves ``(n, depths)`` and the values its verdict reads, in ``values``."""
        order = self.options.mprt_order
        for j, value in enumerate(values):
            curve_rho, curve_ssim = [_round(v) for v in rho[j]], [_round(v) for v in structural[j]]
            value.update(mprt_spearman=final(curve_rho, order), mprt_ssim=final(curve_ssim, order))
            value.update(mprt_spearman_curve=curve_rho, mprt_ssim_curve=curve_ssim, mprt_blocks=self.blocks)

    def _strip_rows(self, pairs: list[Pair]) -> list[int]:
        """The pairs of the setup's first input (the report's strip shows its maps)."""
        if self.strip_key is None:
            self.strip_key = str(pairs[0].record["key"])
        return [j for j, p in enumerate(pairs) if str(p.record["key"]) == self.strip_key]


def _small(image: np.ndarray) -> np.ndarray:
    tensor = torch.from_numpy(np.ascontiguousarray(image))[None, None].float()
    return F.interpolate(tensor, size=(STRIP_SIZE, STRIP_SIZE), mode="area")[0, 0].numpy()


def _round(value: float) -> float | None:
    return None if not np.isfinite(value) else round(float(value), 6)


def reexplainers(
    records: Sequence[tuple[dict[str, Any], ModelSetup]], names: Sequence[str], options: MetricOptions,
    config: EvaluateConfig,
) -> dict[int, Reexplainer]:  # fmt: skip
    """A re-explainer per rebuilt setup (by ``id``) when a metric of ``names`` explains again:
    a :class:`RandomisationScorer` when one of them is a randomisation metric."""
    if not any(METRICS[n].reexplains for n in names):
        return {}
    setups = {id(setup): setup for _, setup in records}
    if any(n in NAMES for n in names):
        return {k: RandomisationScorer(s, names, options, config.out_dir, config.batch_size) for k, s in setups.items()}
    return {k: Reexplainer(s, options.seed, config.batch_size) for k, s in setups.items()}


def explain_cost(scorer: Reexplainer, records: Sequence[dict[str, Any]]) -> float:
    """Forward-pass equivalents of one explain of one map: the explain of the first input
    of ``records`` with every method, shared by its maps."""
    first = min(str(r["key"]) for r in records)
    image = [r for r in records if str(r["key"]) == first]
    return scorer.cost(image) / len(image)

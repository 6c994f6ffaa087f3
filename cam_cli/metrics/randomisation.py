"""Randomisation sanity checks: the model parameter randomisation test (MPRT, Adebayo
et al. 2018, "Sanity Checks for Saliency Maps") and the random-logit test (Sixt et al.
2020, "When Explanations Lie").

MPRT randomises a model block by block, from the top (the head) down, and asks how
similar each method's map of the randomised model is to its map of the trained one. A
map that hardly changes shows the image, not what the model learnt. Here:

* a **block** (:func:`model_blocks`) is a structural unit: each child of the model
  that holds parameters, where a ``Sequential`` or ``ModuleList`` child is opened one
  level into its own children (ResNet: ``fc``, ``layer4.2``, ``layer4.1`` ... ``conv1``;
  EfficientNet: ``classifier``, ``features.8`` ... ``features.0``). A wrapper with a
  single child is looked through. The blocks are listed top first.
* a block is **randomised** by calling ``reset_parameters`` of every submodule that has
  one (each layer's own initialiser: Kaiming-uniform convolutions and linear layers,
  BatchNorm back to weight 1, bias 0 and fresh running statistics), on a CPU copy, under
  its own seed drawn from the run's seed and the block's index (so the randomised weights
  do not depend on the device, the batch or the order of the run). Parameters of modules
  without an initialiser stay as trained.
* **cascading** order randomises blocks ``1..d`` for depth ``d`` (the paper's main test);
  **independent** randomises block ``d`` alone.
* similarity: Spearman's rank correlation of the two maps' pixels (average ranks for
  ties, as ``scipy.stats.spearmanr``) and SSIM (``skimage.metrics.structural_similarity``
  on the two 2-D maps, 7x7 window, ``data_range=1``: camx maps span [0, 1]; computed for
  every pair at once in torch, equal to skimage's to about 1e-12).
"""

from __future__ import annotations

import copy
import math
import zlib
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cam_cli.metrics.options import MPRT_ORDERS as ORDERS

#: SSIM's window side and constants (skimage's defaults, data range 1)
SSIM_WINDOW = 7
SSIM_K1 = 0.01
SSIM_K2 = 0.03


def model_blocks(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's blocks, top (head) first, as ``(qualified name, module)``."""
    prefix, root = "", module
    while True:
        children = [(n, c) for n, c in root.named_children() if _resettable(c)]
        if len(children) != 1 or isinstance(children[0][1], (nn.Sequential, nn.ModuleList)):
            break
        prefix, root = f"{prefix}{children[0][0]}.", children[0][1]
        if _has_reset(root):  # a single layer: the model is that layer
            return [(prefix[:-1], root)]
    blocks: list[tuple[str, nn.Module]] = []
    for name, child in root.named_children():
        if isinstance(child, (nn.Sequential, nn.ModuleList)):
            blocks += [(f"{prefix}{name}.{n}", c) for n, c in child.named_children() if _resettable(c)]
        elif _resettable(child):
            blocks.append((f"{prefix}{name}", child))
    return blocks[::-1]


def _has_reset(module: nn.Module) -> bool:
    return callable(getattr(module, "reset_parameters", None))


def _resettable(module: nn.Module) -> bool:
    """Whether randomising ``module`` changes anything: a submodule with an initialiser and state."""
    return any(_has_reset(m) and any(True for _ in m.parameters(recurse=False)) for m in module.modules())


def block_seed(seed: int, index: int) -> int:
    """The seed block ``index`` (0 = top) is randomised under, from the run's ``seed``."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def random_state(block: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """``block``'s state after each submodule's ``reset_parameters``, drawn on the CPU under ``seed``."""
    clone = copy.deepcopy(block).to("cpu")
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        for sub in clone.modules():
            reset = getattr(sub, "reset_parameters", None)
            if callable(reset):
                reset()
    return {k: v.detach().clone() for k, v in clone.state_dict().items()}


class Randomiser:
    """A model randomised in place, block by block, and put back.

    ``set_depth(d)``: the trained weights for ``d = 0``; the top ``d`` blocks randomised
    (cascading) or block ``d`` alone (independent). ``restore()`` puts every trained
    weight back (call it before the model serves anything else).
    """

    def __init__(self, module: nn.Module, seed: int, order: str = "cascading") -> None:
        if order not in ORDERS:
            raise ValueError(f"unknown MPRT order {order!r}; choose from {', '.join(ORDERS)}")
        self.order = order
        self.blocks = model_blocks(module)
        self.trained = [{k: v.detach().clone() for k, v in b.state_dict().items()} for _, b in self.blocks]
        self.random = [random_state(b, block_seed(seed, i)) for i, (_, b) in enumerate(self.blocks)]
        self.randomised = [False] * len(self.blocks)

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.blocks]

    def set_depth(self, depth: int) -> None:
        for i, (_, block) in enumerate(self.blocks):
            want = i < depth if self.order == "cascading" else i == depth - 1
            if want != self.randomised[i]:
                block.load_state_dict(self.random[i] if want else self.trained[i])
                self.randomised[i] = want

    def restore(self) -> None:
        self.set_depth(0)


def ranks(values: torch.Tensor) -> torch.Tensor:
    """Average ranks (1-based; tied values share the mean of their positions, as
    ``scipy.stats.rankdata``) along the last axis of ``values`` ``(N, P)``, in float64."""
    ordered, order = values.sort(dim=1)
    starts = torch.ones_like(ordered, dtype=torch.bool)
    starts[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    group = starts.long().cumsum(dim=1) - 1
    position = torch.arange(1, values.shape[1] + 1, dtype=torch.float64, device=values.device).expand_as(group)
    sums = torch.zeros_like(position).scatter_add_(1, group, position)
    counts = torch.zeros_like(position).scatter_add_(1, group, torch.ones_like(position))
    mean = (sums / counts.clamp(min=1)).gather(1, group)
    return torch.empty_like(mean).scatter_(1, order, mean)


def spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman's rank correlation of each pair of maps ``(N, ...)``: ``(N,)``, NaN for a flat map."""
    return Against(a).spearman(b)


def ssim(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """SSIM of each pair of 2-D maps ``(N, H, W)`` in [0, 1]: ``(N,)``, in float64 (see :class:`Against`)."""
    return Against(a).ssim(b)


class Against:
    """Spearman's rank correlation and SSIM of maps against fixed maps ``(N, H, W)`` (MPRT's
    trained maps, compared at every depth: their ranks and window means are computed once).

    SSIM is ``skimage.metrics.structural_similarity(x, y, data_range=1)`` for every pair at
    once: a 7 x 7 uniform window (as two 1-D passes), the sample covariance (``49 / 48``),
    ``K1 = 0.01``, ``K2 = 0.03``, and the mean over the pixels at least 3 from the border
    (skimage crops its filtered image by the window's half width, so its border mode never
    counts)."""

    def __init__(self, maps: np.ndarray) -> None:
        self.maps = maps
        self.rank, self.spread = _centred_ranks(maps)
        self.windows: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # SSIM's, on first use

    def spearman(self, other: np.ndarray) -> np.ndarray:
        rank, spread = _centred_ranks(other)
        denominator = (self.spread * spread).sqrt()
        rho = (self.rank * rank).sum(dim=1) / denominator
        return torch.where(denominator > 0, rho, torch.nan).numpy()

    def ssim(self, other: np.ndarray) -> np.ndarray:
        if self.windows is None:
            x = torch.from_numpy(np.ascontiguousarray(self.maps, dtype=np.float64)).unsqueeze(1)
            self.windows = x, _window_mean(x), _window_mean(x * x)
        x, ux, uxx = self.windows
        y = torch.from_numpy(np.ascontiguousarray(other, dtype=np.float64)).unsqueeze(1)
        uy, uyy, uxy = _window_mean(y), _window_mean(y * y), _window_mean(x * y)
        norm = SSIM_WINDOW**2 / (SSIM_WINDOW**2 - 1)
        vx, vy, vxy = norm * (uxx - ux * ux), norm * (uyy - uy * uy), norm * (uxy - ux * uy)
        c1, c2 = SSIM_K1**2, SSIM_K2**2
        index = (2 * ux * uy + c1) * (2 * vxy + c2) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
        return index.flatten(1).mean(dim=1).numpy()


def _centred_ranks(maps: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Each map's average ranks less their mean ``(N, P)``, and their sums of squares ``(N,)``."""
    rank = ranks(torch.from_numpy(np.ascontiguousarray(maps)).reshape(len(maps), -1))
    rank -= rank.mean(dim=1, keepdim=True)
    return rank, (rank * rank).sum(dim=1)


def _window_mean(t: torch.Tensor) -> torch.Tensor:
    """The mean over each full 7 x 7 window of ``(N, 1, H, W)``: ``(N, 1, H - 6, W - 6)``."""
    return F.avg_pool2d(F.avg_pool2d(t, (1, SSIM_WINDOW), stride=1), (SSIM_WINDOW, 1), stride=1)


def other_class(seed: int, sample: str, explained: int, classes: int) -> int:
    """The random class other than ``explained`` that random-logit explains for ``sample``,
    drawn from ``seed`` and the sample's name (so it does not depend on its batch)."""
    rng = np.random.default_rng([seed, zlib.crc32(sample.encode("utf-8"))])
    draw = int(rng.integers(0, classes - 1))
    return draw + 1 if draw >= explained else draw


def final(curve: Sequence[float | None], order: str) -> float | None:
    """The similarity an MPRT verdict reads: after every block is randomised (cascading),
    the mean over the blocks (independent)."""
    values = [v for v in curve if v is not None and not math.isnan(v)]
    if not values:
        return None
    return values[-1] if order == "cascading" else float(np.mean(values))

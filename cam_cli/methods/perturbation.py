"""The perturbation family: channel weights from extra forward passes, no backward.

Both methods run after the hooked pass, with the hook off, in inference mode
(``Method.after_pass``), and batch their passes across the channels *and* the
images of a batch, so the model always sees full batches of ``--batch-size``;
each chunk is built when it runs, so memory stays flat. One pass gives the
scores of every explained class (``--target topK``) at once. This module holds
what both share and Score-CAM; Ablation-CAM is in :mod:`cam_cli.methods.ablation`.

- Score-CAM (Wang et al., CVPR Workshops 2020), as pytorch-grad-cam 1.5.7's
  ``ScoreCAM``: ``M_k = minmax(upsample(A_k))`` (bilinear, ``align_corners=True``,
  min-max per image and channel with 1e-8 in the denominator), ``s_k = y_c(x * M_k)``
  with ``x`` the normalised input and ``y_c`` the logit, ``w = softmax_k(s)``.

Both finish as every channel-weight method does (``Method.maps``): ``sum_k w_k A_k``
or, with ``eigen_smooth``, its first principal component; then ReLU.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cam_cli.errors import ModelError
from cam_cli.methods.base import Capture, Method, Setup, Stopped

#: pytorch-grad-cam's epsilon in Score-CAM's per-channel min-max
MASK_EPS = 1e-8


def tick(capture: Capture, passes: int) -> None:
    """Count ``passes`` forward passes done; raise :class:`Stopped` when the run is stopping."""
    if capture.on_passes is not None:
        capture.on_passes(passes)
    if capture.stop is not None and capture.stop.is_set():
        raise Stopped


def chunks(capture: Capture, step: int) -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor]]:
    """``(start, end, image, channel)`` over the ``N * K`` (image, channel) rows, ``step`` at a time;
    ``image`` and ``channel`` are ``(B,)`` index tensors on the features' device."""
    n, k = capture.features.shape[:2]
    step = max(1, int(step))
    device = capture.features.device
    for start in range(0, n * k, step):
        end = min(start + step, n * k)
        rows = torch.arange(start, end, device=device)
        yield start, end, rows.div(k, rounding_mode="floor"), rows.remainder(k)


def fill_scores(capture: Capture, step: int, score: Callable[[int, int, torch.Tensor, torch.Tensor], torch.Tensor]
                ) -> torch.Tensor:  # fmt: skip
    """The ``(N, R, K)`` scores of the ``N * K`` (image, channel) rows, ``score(start, end, image,
    channel)`` giving ``(B, R)`` for each chunk of ``step`` rows. The rows are image-major, so
    when the run stops between two chunks the first images may have all their rows: the
    :class:`Stopped` raised then carries their scores, and those images can still be finished."""
    n, k = capture.features.shape[:2]
    ranks = capture.classes.shape[1]
    scores = torch.empty(n * k, ranks, device=capture.features.device, dtype=torch.float32)
    done = 0
    try:
        for start, end, image, channel in chunks(capture, step):
            scores[start:end] = score(start, end, image, channel).to(scores.device)
            done = end
            tick(capture, end - start)
    except Stopped:
        finished = done // k
        raise Stopped(scores=scores[: finished * k].view(finished, k, ranks).transpose(1, 2)) from None
    return scores.view(n, k, ranks).transpose(1, 2)


def finish_stopped(method: Method, capture: Capture, stopped: Stopped, cache: Callable[[Capture, torch.Tensor], None]
                   ) -> Stopped:  # fmt: skip
    """``stopped``, with the maps of the images its scores cover (``cache`` puts those scores
    where the method's ``weights`` read them, on the narrowed capture)."""
    if stopped.scores is None or not len(stopped.scores):
        return Stopped()
    part = capture.first(len(stopped.scores))
    cache(part, stopped.scores)
    return Stopped(maps=Method.maps(method, part))


def feature_channels(probe: Any, target: Any) -> int:
    """K, the channels of the target layer's feature map, as the probe saw it (0 when unknown)."""
    record = probe.find(target.label) if probe is not None and hasattr(probe, "find") else None
    if record is None:
        return 0
    shape = tuple(record.shape)
    if target.layout == "nhwc" or target.layout == "tokens":
        return int(shape[-1])
    return int(shape[1])


@contextlib.contextmanager
def standing_in(module: nn.Module, forward: Callable[..., Any]) -> Iterator[None]:
    """``module(...)`` calls ``forward`` instead for the duration: the run's own forward
    (autocast, reading the logits out of the output) then drives a part of the network."""
    saved = module.__dict__.get("forward")
    module.forward = forward  # type: ignore[method-assign]
    try:
        yield
    finally:
        if saved is None:
            del module.forward
        else:
            module.forward = saved  # type: ignore[method-assign]


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    """``x``'s memory format (channels-last runs stay channels-last)."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


#: how a chunk's masks are changed for one of several samples: ``(masks (B, 1, S, S), sample (B,),
#: channel (B,))`` -> the masks to multiply the input with (in place allowed)
Perturb = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def score_cam_masks(flat: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """pytorch-grad-cam's Score-CAM masks: ``(B, 1, h, w)`` activations -> bilinear
    (``align_corners=True``) to ``size``, then min-max per row with ``MASK_EPS``."""
    masks = F.interpolate(flat, size=size, mode="bilinear", align_corners=True)  # (B, 1, S, S)
    low = masks.amin(dim=(2, 3), keepdim=True)
    high = masks.amax(dim=(2, 3), keepdim=True)
    return masks.sub_(low).div_(high - low + MASK_EPS)


def torchcam_masks(flat: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """torchcam 0.5.0's Score-CAM masks: min-max per row at the feature resolution
    (``(A - min) / (max - min + 1e-8)``), then bilinear (``align_corners=False``) to ``size``."""
    low = flat.amin(dim=(2, 3), keepdim=True)
    shifted = flat - low
    normalised = shifted / (shifted.amax(dim=(2, 3), keepdim=True) + MASK_EPS)
    return F.interpolate(normalised, size=size, mode="bilinear", align_corners=False)


def accumulator(device: torch.device) -> torch.dtype:
    """float64 for sums of many float32 values, where the device has it (not MPS)."""
    return torch.float32 if device.type == "mps" else torch.float64


def masked_scores(capture: Capture) -> torch.Tensor:
    """Score-CAM's ``s`` ``(N, R, K)``: the logits of the explained classes on ``x * M_k``.

    Each chunk holds ``batch_size`` masked images, of one image's channels or of
    several images', so only ``(B, 3, S, S)`` is ever built. A stop between chunks
    keeps the scores of the images whose rows are all done (:func:`fill_scores`).
    """
    assert capture.x is not None and capture.forward is not None
    x, features, classes, forward = capture.x, capture.features, capture.classes, capture.forward
    n, k, h, w = features.shape
    size = (int(x.shape[-2]), int(x.shape[-1]))
    flat = features.reshape(n * k, 1, h, w)
    layout = _memory_format(x)

    def score(start: int, end: int, image: torch.Tensor, _: torch.Tensor) -> torch.Tensor:
        masks = score_cam_masks(flat[start:end], size)
        rows = x.index_select(0, image.to(x.device))
        batch = torch.empty(rows.shape, dtype=x.dtype, device=x.device, memory_format=layout)
        torch.mul(rows, masks.to(x.device, x.dtype), out=batch)  # straight into the model's memory format
        with capture.pinned(image):  # a segmentation target keeps the original image's mask
            logits = forward(batch).float()
        return logits.gather(1, classes.index_select(0, image).to(logits.device))

    return fill_scores(capture, capture.batch_size, score)


def sampled_scores(
    capture: Capture,
    samples: int = 1,
    perturb: Perturb | None = None,
    make_masks: Callable[[torch.Tensor, tuple[int, int]], torch.Tensor] = score_cam_masks,
) -> torch.Tensor:
    """Score-CAM's scores averaged over ``samples`` versions of every mask: ``(N, R, K)``,
    the mean over ``s`` of the explained classes' logits on ``x * perturb(M_k, s)``.

    The ``N * samples * K`` masked images, in that order (image, sample, channel), run in
    chunks of ``batch_size`` built when they run; with one sample and no ``perturb`` the
    chunks are Score-CAM's own. Sums are kept in float64, so identical samples average
    to exactly their value. With one sample, no ``perturb`` and Score-CAM's masks, it is
    :func:`masked_scores` (whose stop keeps the images already scored).
    """
    if samples <= 1 and perturb is None and make_masks is score_cam_masks:
        return masked_scores(capture)
    assert capture.x is not None and capture.forward is not None
    x, features, classes = capture.x, capture.features, capture.classes
    n, k, h, w = features.shape
    ranks = classes.shape[1]
    samples = max(1, int(samples))
    size = (int(x.shape[-2]), int(x.shape[-1]))
    flat = features.reshape(n * k, 1, h, w)
    sums = torch.zeros(n * k, ranks, device=features.device, dtype=accumulator(features.device))
    layout = _memory_format(x)
    per_image = samples * k
    step = max(1, int(capture.batch_size))
    for start in range(0, n * per_image, step):
        end = min(start + step, n * per_image)
        rows = torch.arange(start, end, device=features.device)
        image = rows.div(per_image, rounding_mode="floor")
        sample = rows.div(k, rounding_mode="floor").remainder(samples)
        channel = rows.remainder(k)
        source = image * k + channel
        masks = make_masks(flat.index_select(0, source), size)
        if perturb is not None:
            masks = perturb(masks, sample, channel)
        picked = x.index_select(0, image.to(x.device))
        batch = torch.empty(picked.shape, dtype=x.dtype, device=x.device, memory_format=layout)
        torch.mul(picked, masks.to(x.device, x.dtype), out=batch)  # straight into the model's memory format
        with capture.pinned(image):
            logits = capture.forward(batch).float()
        chosen = logits.gather(1, classes.index_select(0, image).to(logits.device)).to(sums.device)
        sums.index_add_(0, source, chosen.to(sums.dtype))
        tick(capture, end - start)
    return (sums / samples).float().view(n, k, ranks).transpose(1, 2)


def fold_batch_norms(module: nn.Module) -> nn.Module | None:
    """A copy of ``module`` with every BatchNorm2d that follows a Conv2d folded into it
    (``torch.fx``'s ``fuse``: the same function, rounded differently, ~1e-7 relative), in the
    module's memory format and frozen; ``None`` where there is nothing to fold or no trace."""
    if not any(isinstance(m, nn.BatchNorm2d) for m in module.modules()):
        return None
    from torch.fx.experimental.optimization import fuse

    try:
        folded = fuse(module, inplace=False)
    except Exception:  # not traceable: the model runs as it is
        return None
    if sum(isinstance(m, nn.BatchNorm2d) for m in folded.modules()) == sum(
        isinstance(m, nn.BatchNorm2d) for m in module.modules()
    ):
        return None
    weights = [p for p in module.parameters() if p.dim() == 4]
    if (
        weights
        and all(p.is_contiguous(memory_format=torch.channels_last) for p in weights)
        and not all(p.is_contiguous() for p in weights)
    ):
        folded = folded.to(memory_format=torch.channels_last)
    return folded.requires_grad_(False).eval()


class ScoreCAM(Method):
    """Wang et al. 2020: ``w = softmax_k(y_c(x * minmax(upsample(A_k))))``; ``1 + K`` passes per image.

    The masked passes run on a copy of the model with its batch norms folded into the
    convolutions before them (one memory pass less per layer, about 10% of a CPU forward),
    through the run's own forward (autocast, reading the logits)."""

    name = "scorecam"
    after_pass = True
    module: nn.Module | None = None
    folded: nn.Module | None = None

    def prepare(self, setup: Setup) -> None:
        if setup.target is None:
            raise ModelError("scorecam needs a target layer")
        self.module = setup.module
        self.passes_per_image = feature_channels(setup.probe, setup.target)
        self.folded = fold_batch_norms(setup.module)
        probe_input, logits = getattr(setup.probe, "input", None), getattr(setup.probe, "logits", None)
        folded = self.folded
        if folded is not None and probe_input is not None and logits is not None:
            try:  # the folded copy must give the model's own logits, or it is not used
                with torch.inference_mode(), standing_in(setup.module, lambda t, *_, **__: folded(t)):
                    again = setup.forward(probe_input.to(setup.device)).float()
                expected = logits.detach().float().to(again.device)
                scale = float(expected.abs().max()) + 1.0
                if again.shape != expected.shape or not torch.allclose(again, expected, rtol=1e-3, atol=1e-3 * scale):
                    self.folded = None
            except Exception:
                self.folded = None

    def scores(self, capture: Capture) -> torch.Tensor:
        """The channel scores ``(N, R, K)`` the weights are the softmax of."""
        return masked_scores(capture)

    def maps(self, capture: Capture) -> torch.Tensor:
        def keep(on: Capture, scores: torch.Tensor) -> None:
            on._cache[(self.name, "scores")] = scores

        try:
            if self.folded is not None and self.module is not None:
                folded = self.folded
                with standing_in(self.module, lambda t, *_, **__: folded(t)):
                    keep(capture, self.scores(capture))
            else:
                keep(capture, self.scores(capture))
        except Stopped as stopped:  # the images whose passes are all done are finished all the same
            raise finish_stopped(self, capture, stopped, keep) from None
        return super().maps(capture)

    def weights(self, capture: Capture, r: int) -> torch.Tensor:
        return torch.softmax(capture._cache[(self.name, "scores")][:, r], dim=1)

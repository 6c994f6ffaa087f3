"""Methods that average over many versions of the input or of the masks: Smooth
Grad-CAM++ (noisy inputs), SS-CAM (noisy masks) and IS-CAM (masks scaled step by step).

All three run passes of their own after the hooked pass (``Method.after_pass``), in
chunks of ``--batch-size`` that mix the images of a batch, counted and stoppable as
Score-CAM's are (:mod:`cam_cli.methods.perturbation`). Their defaults are torchcam
0.5.0's. The noise is seeded by ``--seed`` and drawn per sample (Smooth Grad-CAM++)
or per sample and channel (SS-CAM) from a seed of its own, on the device the run
uses: every image of a run sees the same draws, so a map depends neither on the
batch an image falls in nor on the batch size (CPU and CUDA draw different numbers).

- Smooth Grad-CAM++ (Omeiza et al. 2019): Grad-CAM++ with the derivatives ``g``,
  ``g^2``, ``g^3`` replaced by their means over ``N`` copies of the normalised input
  with Gaussian noise ``x + N(0, std^2)`` (``N`` forward and backward passes an image),
  and ``A`` the plain input's activation. With ``std = 0`` it is Grad-CAM++ exactly.
- SS-CAM (Wang et al. 2020): Score-CAM's scores averaged over ``N`` noisy masks
  ``M_k + N(0, std^2)`` (noise at the input's resolution, shared by the three colour
  channels, no clipping), ``N * K`` passes an image. With ``std = 0`` it is Score-CAM exactly.
- IS-CAM (Naidu et al. 2020): Score-CAM's scores averaged over the masks
  ``c_i * M_k``, ``c_i = sum_{j<=i} j / N`` for ``i = 1..N`` (the authors' cumulative
  sum, as torchcam), with torchcam's masks; ``N * K`` passes an image.
"""

from __future__ import annotations

from typing import Any

import torch

from cam_cli.errors import ModelError
from cam_cli.methods.base import ActivationCapture, Capture, Method, MethodOptions, Setup, to_feature_map
from cam_cli.methods.gradient import plus_plus_weights
from cam_cli.methods.perturbation import (
    ScoreCAM,
    _memory_format,
    accumulator,
    sampled_scores,
    tick,
    torchcam_masks,
)

MASK64 = (1 << 64) - 1


def _splitmix(value: int) -> int:
    value = (value + 0x9E3779B97F4A7C15) & MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & MASK64
    return value ^ (value >> 31)


def draw_seed(seed: int, *indices: int) -> int:
    """The seed of one draw, from ``--seed`` and the draw's indices (splitmix64): draws of
    different indices are independent, and a draw does not depend on which others are made."""
    value = _splitmix(seed & MASK64)
    for index in indices:
        value = _splitmix(value ^ (index & MASK64))
    return value >> 1  # below 2**63


def _generator(device: torch.device) -> torch.Generator:
    try:
        return torch.Generator(device=device)
    except RuntimeError:  # a device without generators of its own
        return torch.Generator()


def _normal_(out: torch.Tensor, std: float, generator: torch.Generator) -> torch.Tensor:
    """``out`` filled with ``N(0, std^2)`` from ``generator`` (drawn on its device)."""
    if generator.device == out.device:
        return out.normal_(0.0, std, generator=generator)
    return out.copy_(torch.empty(out.shape, device=generator.device).normal_(0.0, std, generator=generator))


class SmoothGradCAMPlusPlus(Method):
    """Omeiza et al. 2019: Grad-CAM++ (Chattopadhyay et al. 2018, as pytorch-grad-cam) with the
    derivatives averaged over ``N`` noisy copies of the input; ``1 + N`` passes an image."""

    name = "smoothgradcam++"
    after_pass = True
    samples_default = 4
    std_default = 0.3
    module: Any = None

    def __init__(self, options: MethodOptions | None = None) -> None:
        super().__init__(options)
        self.samples = self.options.noise_samples or self.samples_default
        self.std = self.std_default if self.options.noise_std is None else float(self.options.noise_std)
        self._noise: dict[tuple[Any, ...], torch.Tensor] = {}

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "noise_samples": self.samples, "noise_std": self.std, "seed": self.options.seed}

    def prepare(self, setup: Setup) -> None:
        if setup.target is None:
            raise ModelError(f"{self.name} needs a target layer")
        self.module = setup.module
        find = getattr(setup.probe, "find", None)
        record = find(setup.target.label) if find is not None else None
        if record is not None and not setup.probe.reaches(record):
            raise ModelError(
                f"the model's backward pass does not reach layer {setup.target.label}, so there is no gradient "
                "to follow; choose another --layer"
            )

    def noise(self, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """The ``N`` noise images ``(N, C, S, S)`` float32, sample ``s`` drawn from its own seed."""
        key = (shape, str(device))
        if key not in self._noise:
            bank = torch.zeros((self.samples, *shape), device=device)
            if self.std > 0:
                generator = _generator(device)
                for s in range(self.samples):
                    generator.manual_seed(draw_seed(self.options.seed, s))
                    _normal_(bank[s], self.std, generator)
            self._noise = {key: bank}
        return self._noise[key]

    def maps(self, capture: Capture) -> torch.Tensor:
        m1, m2, m3 = self.mean_derivatives(capture)
        capture._cache[(self.name, "derivatives")] = (m1, m2, m3)
        return super().maps(capture)

    def weights(self, capture: Capture, r: int) -> torch.Tensor:
        m1, m2, m3 = capture._cache[(self.name, "derivatives")]
        return plus_plus_weights(m1[:, r], m2[:, r], m3[:, r], capture.features)

    def mean_derivatives(self, capture: Capture) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The means over the noisy copies of ``g``, ``g^2`` and ``g^3``, each ``(N, R, K, h, w)``
        float32; the ``N_images * samples`` copies run in chunks of ``batch_size``."""
        assert capture.x is not None and capture.forward is not None
        x, classes, target = capture.x, capture.classes, capture.target
        n, ranks = classes.shape
        samples = self.samples
        device = capture.features.device
        noise = self.noise(tuple(x.shape[1:]), x.device)
        layout = _memory_format(x)
        step = max(1, int(capture.batch_size))
        with torch.inference_mode(False), torch.enable_grad(), ActivationCapture(self.module, target, True) as hooked:
            sums = torch.zeros((3, n, ranks, *capture.features.shape[1:]), device=device, dtype=accumulator(device))
            for start in range(0, n * samples, step):
                end = min(start + step, n * samples)
                rows = torch.arange(start, end)
                image, sample = rows.div(samples, rounding_mode="floor"), rows.remainder(samples)
                noisy = x.index_select(0, image.to(x.device)).float() + noise.index_select(0, sample.to(x.device))
                batch = noisy.to(x.dtype).contiguous(memory_format=layout)
                with capture.pinned(image):  # a segmentation target keeps the original image's mask
                    out = capture.forward(batch)
                activation = hooked.activation
                if activation is None:
                    hooked.feature_map()  # raises: the layer was not reached
                assert activation is not None
                if not out.requires_grad:
                    raise ModelError(
                        f"the model's output does not depend on layer {target.label}; choose another --layer"
                    )
                logits = out.float()
                chosen = classes.index_select(0, image.to(classes.device)).to(logits.device)
                for r in range(ranks):
                    score = logits.gather(1, chosen[:, r : r + 1]).sum()
                    (grad,) = torch.autograd.grad(score, activation, retain_graph=r < ranks - 1)
                    g = to_feature_map(grad.detach(), target).float().to(device)
                    g2 = g * g
                    where = image.to(device)
                    for p, power in enumerate((g, g2, g2 * g)):
                        sums[p, :, r].index_add_(0, where, power.to(sums.dtype))
                del out, logits, activation
                tick(capture, end - start)
        means = (sums / samples).float()
        return means[0], means[1], means[2]


class SSCAM(ScoreCAM):
    """Wang et al. 2020 (SS-CAM): Score-CAM's scores averaged over ``N`` noisy masks
    ``M_k + N(0, std^2)``; ``1 + N * K`` passes an image."""

    name = "sscam"
    samples_default = 35
    std_default = 2.0

    def __init__(self, options: MethodOptions | None = None) -> None:
        super().__init__(options)
        self.samples = self.options.noise_samples or self.samples_default
        self.std = self.std_default if self.options.noise_std is None else float(self.options.noise_std)

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "noise_samples": self.samples, "noise_std": self.std, "seed": self.options.seed}

    def perturb(self, masks: torch.Tensor, sample: torch.Tensor, channel: torch.Tensor) -> torch.Tensor:
        """``masks`` ``(B, 1, S, S)`` plus the noise of each row's (sample, channel)."""
        if self.std == 0:
            return masks
        generator = _generator(masks.device)
        noise = torch.empty_like(masks)
        for row, (s, k) in enumerate(zip(sample.tolist(), channel.tolist(), strict=True)):
            generator.manual_seed(draw_seed(self.options.seed, s, k))
            _normal_(noise[row], self.std, generator)
        return masks.add_(noise)

    def scores(self, capture: Capture) -> torch.Tensor:
        return sampled_scores(capture, self.samples, self.perturb)


class ISCAM(ScoreCAM):
    """Naidu et al. 2020 (IS-CAM): Score-CAM's scores averaged over the masks ``c_i * M_k``,
    ``c_i = sum_{j=1..i} j / N``, with torchcam's masks; ``1 + N * K`` passes an image."""

    name = "iscam"
    samples_default = 10

    def __init__(self, options: MethodOptions | None = None) -> None:
        super().__init__(options)
        self.samples = self.options.noise_samples or self.samples_default
        self.coefficients: list[float] = []
        total = 0.0
        for i in range(1, self.samples + 1):
            total += i / self.samples
            self.coefficients.append(total)

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "noise_samples": self.samples}

    def perturb(self, masks: torch.Tensor, sample: torch.Tensor, channel: torch.Tensor) -> torch.Tensor:
        scale = torch.tensor([self.coefficients[s] for s in sample.tolist()], dtype=masks.dtype, device=masks.device)
        return masks.mul_(scale.view(-1, 1, 1, 1))

    def scores(self, capture: Capture) -> torch.Tensor:
        return sampled_scores(capture, self.samples, self.perturb, torchcam_masks)

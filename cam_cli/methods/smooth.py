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

import contextlib
from typing import Any

import torch

from cam_cli.errors import ModelError
from cam_cli.methods.base import (
    ActivationCapture,
    Capture,
    Method,
    MethodOptions,
    Setup,
    TargetLayer,
    to_feature_map,
)
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
        #: the copies of each image that run: ``samples``, or 1 (the plain input) where the
        #: gradient at the layers does not depend on the input (:func:`constant_gradient`)
        self.copies = self.samples
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
        targets = list(setup.targets or (setup.target,))
        self.copies = 1 if self.std > 0 and constant_gradient(setup, targets) else self.samples
        self.passes_per_image = self.copies

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
        key = (self.name, "derivatives")
        if key not in capture._cache:  # several --layer: every layer's from the same noisy passes
            group = capture.group or [capture]
            for member, derivatives in zip(group, self.mean_derivatives(group), strict=True):
                member._cache[key] = derivatives
        return super().maps(capture)

    def weights(self, capture: Capture, r: int) -> torch.Tensor:
        m1, m2, m3 = capture._cache[(self.name, "derivatives")]
        return plus_plus_weights(m1[:, r], m2[:, r], m3[:, r], capture.features)

    def mean_derivatives(self, group: list[Capture]) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Per hooked layer, the means over the noisy copies of ``g``, ``g^2`` and ``g^3``, each
        ``(N, R, K, h, w)`` float32. The ``N_images * samples`` copies (image-major) run in
        chunks of ``batch_size``, each one forward pass and one backward pass per rank, which
        starts at the hooked layers (their outputs are the leaves, the parameters are frozen)."""
        first = group[0]
        assert first.x is not None and first.forward is not None
        n, ranks = first.classes.shape
        step = max(1, int(first.batch_size))
        with torch.inference_mode(False), torch.enable_grad(), contextlib.ExitStack() as stack:
            sums = [torch.zeros((3, n, ranks, *c.features.shape[1:]), device=c.features.device,
                                dtype=accumulator(c.features.device)) for c in group]  # fmt: skip
            hooks = [stack.enter_context(ActivationCapture(self.module, c.target, True, len(group) > 1)) for c in group]
            for start in range(0, n * self.copies, step):
                end = min(start + step, n * self.copies)
                batch, image = self.noisy_copies(first, start, end)
                with first.pinned(image):  # a segmentation target keeps the original image's mask
                    out = first.forward(batch)
                leaves = [self.leaf(hooked, out) for hooked in hooks]
                logits = out.float()
                chosen = first.classes.index_select(0, image.to(first.classes.device)).to(logits.device)
                for r in range(ranks):
                    score = logits.gather(1, chosen[:, r : r + 1]).sum()
                    grads = torch.autograd.grad(score, leaves, retain_graph=r < ranks - 1)
                    for total, grad, hooked in zip(sums, grads, hooks, strict=True):
                        add_powers(total[:, :, r], to_feature_map(grad.detach(), hooked.target), image)
                del out, logits, leaves
                tick(first, end - start)
        return [tuple((total / self.copies).float().unbind(0)) for total in sums]  # type: ignore[misc]

    def noisy_copies(self, capture: Capture, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows ``start:end`` of the (image, sample) copies: ``x[image] + noise[sample]`` in the
        input's dtype and memory format, and the image index of each row ``(B,)``."""
        x = capture.x
        assert x is not None
        rows = torch.arange(start, end)
        image, sample = rows.div(self.copies, rounding_mode="floor"), rows.remainder(self.copies)
        copies = x.index_select(0, image.to(x.device)).float()
        if self.copies == self.samples:  # else the plain input: the noise would not change the gradient
            copies.add_(self.noise(tuple(x.shape[1:]), x.device).index_select(0, sample.to(x.device)))
        return copies.to(x.dtype).contiguous(memory_format=_memory_format(x)), image

    @staticmethod
    def leaf(hooked: ActivationCapture, out: torch.Tensor) -> torch.Tensor:
        """The hooked layer's output of the pass just run, the leaf its backward ends at."""
        if hooked.activation is None:
            hooked.feature_map()  # raises: the layer was not reached
        assert hooked.activation is not None
        if not out.requires_grad:
            raise ModelError(
                f"the model's output does not depend on layer {hooked.target.label}; choose another --layer"
            )
        return hooked.activation


def constant_gradient(setup: Setup, targets: list[TargetLayer]) -> bool:
    """Whether the gradient of the outputs at the ``targets`` is the same for every input, so
    that noisy copies cannot change it: the layers after them are affine in them (global
    average pooling and linear layers, as after ResNet's ``layer4``). Both of: the backward
    pass from the outputs to the layers uses nothing that depends on them (the gradient does
    not itself require grad), and the probe's input and a noisy copy of it give the same
    gradient bit for bit. Any failure: False (every copy runs)."""
    probe_input = getattr(setup.probe, "input", None)
    if probe_input is None:
        return False
    x = probe_input.to(setup.device)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(0)).to(x.device, x.dtype)
    try:
        plain, noisy = _output_gradients(setup, targets, x), _output_gradients(setup, targets, x + noise)
    except Exception:  # the layer not reached, a model without a second derivative: no shortcut
        return False
    if plain is None or noisy is None:
        return False
    return all(torch.equal(a, b) for a, b in zip(plain, noisy, strict=True))


def _output_gradients(setup: Setup, targets: list[TargetLayer], x: torch.Tensor) -> list[torch.Tensor] | None:
    """``d sum(outputs) / d A`` at each target for the input ``x``; None where it depends on ``A``
    through the graph (it requires grad) or the outputs are not ``(N, C)`` scores of the layers."""
    with torch.inference_mode(False), torch.enable_grad(), contextlib.ExitStack() as stack:
        hooks = [stack.enter_context(ActivationCapture(setup.module, t, True, len(targets) > 1)) for t in targets]
        out = setup.forward(x)
        leaves = [hooked.activation for hooked in hooks]
        if out.dim() != 2 or not out.requires_grad or any(leaf is None for leaf in leaves):
            return None
        grads = torch.autograd.grad(out.float().sum(), leaves, create_graph=True)  # type: ignore[arg-type]
    if any(g.requires_grad for g in grads):
        return None
    return [g.detach() for g in grads]


def add_powers(total: torch.Tensor, g: torch.Tensor, image: torch.Tensor) -> None:
    """``total`` ``(3, N, K, h, w)`` += ``g``, ``g^2``, ``g^3`` of each row ``(B, K, h, w)``
    at its image's index (powers in float32, summed in ``total``'s dtype)."""
    g = g.float().to(total.device)
    g2 = g * g
    where = image.to(total.device)
    for p, power in enumerate((g, g2, g2 * g)):
        total[p].index_add_(0, where, power.to(total.dtype))


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

    def prepare(self, setup: Setup) -> None:
        super().prepare(setup)
        self.passes_per_image *= self.samples

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

    def prepare(self, setup: Setup) -> None:
        super().prepare(setup)
        self.passes_per_image *= self.samples

    def scores(self, capture: Capture) -> torch.Tensor:
        return sampled_scores(capture, self.samples, self.perturb, torchcam_masks)

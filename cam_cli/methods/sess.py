"""SESS (Tursun et al., SESS: Saliency Enhancing with Scaling and Sliding, ECCV 2022), as
pytorch-grad-cam 1.5.7's ``SESS`` with its defaults.

A meta-method: the normalised input ``(S, S)`` is resized (bilinear) so that its shorter
side is each of the scales ``w + round(2w/7) * i``, ``i < --sess-scales`` (``w`` = the
shorter side of the input, the window); a ``w x w`` window slides over every scaled image
with stride ``w`` (the last window of a row or column shifted back inside). Each patch is
explained by a base method (``--sess-base``, Grad-CAM by default) for the image's class,
and scored by that class's softmax probability ``s_p``. The patch's map, upsampled to the
window and min-max'ed, times ``s_p / max_p s_p``, is pasted into a zero canvas of its
scale, resized (bilinear) back to ``(S, S)``; the fused map is, per pixel, the mean of the
pasted maps over the patches with a positive value there, then a Gaussian blur (11 x 11,
sigma 5, borders reflected).

camx differs in how it gets there, not in the map: the score of a patch comes from the
same forward pass as its base map (pytorch-grad-cam runs every patch twice, once to score
and once to explain), the patches of all the images of a batch share full chunks of
``--batch-size``, and the pasting reads only the window's pixels (no canvas of the scale
is built). With pytorch-grad-cam's other defaults (no pre-filtering, threshold 0, mean
pooling), the weights only scale each patch's contribution, so they can be applied once
every patch is scored.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from cam_cli.errors import ModelError
from cam_cli.methods.base import ActivationCapture, Capture, Method, MethodOptions, Setup, Stopped, to_feature_map
from cam_cli.methods.perturbation import _memory_format, tick
from cam_cli.methods.registry import SESS_BASES, load

#: OpenCV's bilinear table for one axis: source rows ``(dst,)`` low and high, and their weights
Table = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def linear_table(source: int, target: int) -> Table:
    """``cv2.resize``'s ``INTER_LINEAR`` coefficients from ``source`` to ``target`` pixels:
    ``x = float32((d + 0.5) * source / target - 0.5)``, clamped to the edges. The same
    arithmetic as OpenCV's, so a weight that is exactly 0 there is 0 here (SESS's fusion
    counts the pixels a patch reaches, so a stray 1e-8 would change the mean)."""
    scale = 1.0 / (target / source)
    position = ((torch.arange(target, dtype=torch.float64) + 0.5) * scale - 0.5).float()
    low = torch.floor(position)
    frac = position - low
    low_index = low.long()
    frac = torch.where(low_index < 0, torch.zeros_like(frac), frac)
    low_index = low_index.clamp(min=0)
    top = low_index >= source - 1
    frac = torch.where(top, torch.zeros_like(frac), frac)
    low_index = torch.where(top, torch.full_like(low_index, source - 1), low_index)
    high_index = (low_index + 1).clamp(max=source - 1)
    return low_index, high_index, 1.0 - frac, frac


def resize_linear(maps: torch.Tensor, rows: Table, cols: Table) -> torch.Tensor:
    """``(..., h, w)`` resized along both axes with the tables (columns first, as OpenCV)."""
    c0, c1, cw0, cw1 = (t.to(maps.device) for t in cols)
    across = maps.index_select(-1, c0) * cw0 + maps.index_select(-1, c1) * cw1
    r0, r1, rw0, rw1 = (t.to(maps.device) for t in rows)
    return across.index_select(-2, r0) * rw0[:, None] + across.index_select(-2, r1) * rw1[:, None]


def window_starts(length: int, step: int, window: int) -> list[int]:
    """The first pixels of the windows along one axis: every ``step`` from 0, the last one
    shifted back so that it ends at the border."""
    starts = []
    for start in range(0, length, step):
        if start + window >= length:
            starts.append(max(length - window, 0))
            break
        starts.append(start)
    return starts


def scaled_size(height: int, width: int, scale: int) -> tuple[int, int]:
    """torchvision's ``resize(x, scale)``: the shorter side becomes ``scale``."""
    if width <= height:
        return int(scale * height / width), scale
    return scale, int(scale * width / height)


def gaussian_blur(maps: torch.Tensor, size: int = 11, sigma: float = 5.0) -> torch.Tensor:
    """``cv2.GaussianBlur(m, (size, size), sigma)`` on ``(N, R, H, W)``: a separable kernel,
    borders reflected without repeating the edge (OpenCV's default)."""
    offsets = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    kernel = torch.exp(-(offsets**2) / (2 * sigma**2))
    kernel = (kernel / kernel.sum()).float().to(maps.device)
    n, r, h, w = maps.shape
    flat = maps.reshape(n * r, 1, h, w)
    half = size // 2
    flat = F.conv2d(F.pad(flat, (half, half, 0, 0), mode="reflect"), kernel.view(1, 1, 1, size))
    flat = F.conv2d(F.pad(flat, (0, 0, half, half), mode="reflect"), kernel.view(1, 1, size, 1))
    return flat.reshape(n, r, h, w)


class Layout:
    """Where SESS's patches of one ``(H, W)`` input come from: per patch its scale's index and
    its window's corner ``(x1, y1)``, in pytorch-grad-cam's order (scale, row, column)."""

    def __init__(self, height: int, width: int, scales: int) -> None:
        self.window = window = min(height, width)
        step = int(round(window * 2.0 / 7.0))
        self.sizes = [scaled_size(height, width, window + step * i) for i in range(scales)]
        self.patches: list[tuple[int, int, int]] = []
        for index, (sh, sw) in enumerate(self.sizes):
            for y1 in window_starts(sh, window, window):
                self.patches.extend((index, x1, y1) for x1 in window_starts(sw, window, window))
        #: per scale, the tables from the scaled image back to the input
        self.back = [(linear_table(sh, height), linear_table(sw, width)) for sh, sw in self.sizes]
        self.height, self.width = height, width

    def __len__(self) -> int:
        return len(self.patches)

    def paste(self, maps: torch.Tensor, patches: list[int]) -> torch.Tensor:
        """Patch maps ``(B, R, w, w)`` put in their scale's zero canvas and resized to the
        input: ``(B, R, H, W)``, reading only the window (padded by a zero row and column)."""
        padded = F.pad(maps, (1, 1, 1, 1))
        rows, cols = [], []
        for p in patches:
            index, x1, y1 = self.patches[p]
            (r0, r1, rw0, rw1), (c0, c1, cw0, cw1) = self.back[index]
            edge = self.window + 1
            rows.append(((r0 - y1 + 1).clamp(0, edge), (r1 - y1 + 1).clamp(0, edge), rw0, rw1))
            cols.append(((c0 - x1 + 1).clamp(0, edge), (c1 - x1 + 1).clamp(0, edge), cw0, cw1))
        b, r = maps.shape[:2]
        device = maps.device
        c0, c1, cw0, cw1 = (torch.stack(t).to(device) for t in zip(*cols, strict=True))  # (B, W)
        wide = padded.shape[-2]
        pick = lambda i: padded.gather(3, i[:, None, None, :].expand(b, r, wide, -1))  # noqa: E731
        across = pick(c0) * cw0[:, None, None, :] + pick(c1) * cw1[:, None, None, :]  # (B, R, w+2, W)
        r0, r1, rw0, rw1 = (torch.stack(t).to(device) for t in zip(*rows, strict=True))  # (B, H)
        pick = lambda i: across.gather(2, i[:, None, :, None].expand(b, r, -1, self.width))  # noqa: E731
        return pick(r0) * rw0[:, None, :, None] + pick(r1) * rw1[:, None, :, None]


class SESS(Method):
    """Tursun et al. 2022: a base method's maps of patches at several scales, weighted by the
    patches' scores, pasted back and fused (see the module); ``1 + P`` passes an image, ``P``
    the patches (122 at 224 pixels with the 12 scales of the default)."""

    name = "sess"
    after_pass = True
    scales_default = 12
    base_default = "gradcam"
    module: Any = None
    layout: Layout | None = None

    def __init__(self, options: MethodOptions | None = None) -> None:
        super().__init__(options)
        self.scales = self.options.sess_scales or self.scales_default
        self.base_name = self.options.sess_base or self.base_default
        self.base: Method | None = None

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "sess_base": self.base_name, "sess_scales": self.scales}

    def prepare(self, setup: Setup) -> None:
        if setup.target is None:
            raise ModelError("sess needs a target layer")
        if len(setup.targets) > 1:
            raise ModelError("sess reads one --layer (its base method's); give one")
        if self.base_name not in SESS_BASES:
            raise ModelError(f"sess: --sess-base {self.base_name} is not one of {', '.join(SESS_BASES)}")
        self.base = load(self.base_name)(self.options)
        self.base.prepare(setup)
        self.module = setup.module
        probe_input = getattr(setup.probe, "input", None)
        if probe_input is not None:
            self.passes_per_image = len(self.layout_for(int(probe_input.shape[-2]), int(probe_input.shape[-1])))

    def layout_for(self, height: int, width: int) -> Layout:
        if self.layout is None or (self.layout.height, self.layout.width) != (height, width):
            self.layout = Layout(height, width, self.scales)
        return self.layout

    def maps(self, capture: Capture) -> torch.Tensor:
        assert capture.x is not None and capture.forward is not None
        x = capture.x
        n, ranks = capture.classes.shape
        layout = self.layout_for(int(x.shape[-2]), int(x.shape[-1]))
        count = len(layout)
        device = capture.features.device
        sums = torch.zeros(n, ranks, layout.height, layout.width, device=device)
        counts = torch.zeros_like(sums)
        scores = torch.zeros(n * count, ranks, device=device)
        step = max(1, int(capture.batch_size))
        done = 0
        try:
            for start in range(0, n * count, step):
                end = min(start + step, n * count)
                image = torch.arange(start, end, device=device).div(count, rounding_mode="floor")
                patches = [row % count for row in range(start, end)]
                chunk_scores, normalised = self.explain_patches(capture, layout, image, patches)
                scores[start:end] = chunk_scores
                pasted = layout.paste(normalised * chunk_scores[:, :, None, None], patches)
                sums.index_add_(0, image, pasted)
                counts.index_add_(0, image, (pasted > 0).float())
                done = end
                tick(capture, end - start)
        except Stopped:
            finished = done // count
            if not finished:
                raise Stopped() from None
            raise Stopped(maps=self.fuse(sums[:finished], counts[:finished], scores[: finished * count])) from None
        return self.fuse(sums, counts, scores)

    @staticmethod
    def fuse(sums: torch.Tensor, counts: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """The mean over the patches reaching each pixel, over the best patch's score, blurred."""
        n, ranks = sums.shape[:2]
        best = scores.view(n, -1, ranks).amax(dim=1)[:, :, None, None]
        mean = torch.where(counts > 0, sums / counts.clamp(min=1), torch.zeros_like(sums))
        mean = torch.where(best > 0, mean / best.clamp(min=torch.finfo(best.dtype).tiny), mean)
        return gaussian_blur(mean)

    def explain_patches(
        self, capture: Capture, layout: Layout, image: torch.Tensor, patches: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One chunk: each patch's score ``(B, R)`` (the softmax probability of its image's
        classes) and its base map upsampled to the window and min-max'ed ``(B, R', w, w)``."""
        assert capture.x is not None and capture.forward is not None and self.base is not None
        x, target, window = capture.x, capture.target, layout.window
        grad = self.base.needs_gradient
        with torch.inference_mode(False), torch.enable_grad() if grad else torch.no_grad():
            batch = self.cut(x, layout, image.tolist(), patches)
            with ActivationCapture(self.module, target, grad) as hooked:
                out = capture.forward(batch)
                activation = hooked.activation
                if activation is None:
                    hooked.feature_map()  # raises: the layer was not reached
                assert activation is not None
                logits = out.detach().float()
                classes = capture.classes.index_select(0, image.to(capture.classes.device)).to(logits.device)
                part = Capture(target, to_feature_map(activation.detach(), target).float(), logits, classes,
                               logits.argmax(dim=1, keepdim=True), activation if grad else None,
                               out if grad else None)  # fmt: skip
                raw = self.base.maps(part).detach().float()
        scores = logits.softmax(dim=1).gather(1, classes).clamp(min=0).to(raw.device)
        up = resize_linear(raw, linear_table(raw.shape[-2], window), linear_table(raw.shape[-1], window))
        low = up.amin(dim=(2, 3), keepdim=True)
        span = up.amax(dim=(2, 3), keepdim=True) - low
        normalised = torch.where(span > 0, (up - low) / torch.where(span > 0, span, 1.0), torch.zeros_like(up))
        return scores, normalised

    @staticmethod
    def cut(x: torch.Tensor, layout: Layout, images: list[int], patches: list[int]) -> torch.Tensor:
        """The chunk's patches ``(B, C, w, w)``, each image scaled once per scale the chunk uses
        (bilinear, antialiased as torchvision's ``resize``), in ``x``'s memory format."""
        scaled: dict[tuple[int, int], torch.Tensor] = {}
        window = layout.window
        out = []
        for n, p in zip(images, patches, strict=True):
            index, x1, y1 = layout.patches[p]
            key = (n, index)
            if key not in scaled:
                size = layout.sizes[index]
                one = x[n : n + 1]
                scaled[key] = one if tuple(one.shape[-2:]) == size else F.interpolate(
                    one, size=size, mode="bilinear", align_corners=False, antialias=True
                )  # fmt: skip
            out.append(scaled[key][:, :, y1 : y1 + window, x1 : x1 + window])
        return torch.cat(out).contiguous(memory_format=_memory_format(x))


__all__ = ["SESS", "Layout", "gaussian_blur", "linear_table"]

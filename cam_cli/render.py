"""From raw low-resolution maps to normalised maps and jet overlays.

Pure tensor functions: they run on whatever device their inputs are on, so the
whole post-processing of a batch stays on the GPU when there is one.
"""

from __future__ import annotations

import functools

import cv2
import numpy as np
import torch
import torch.nn.functional as F

EPSILON = 1e-7


@functools.lru_cache(maxsize=8)
def jet_lut(device: torch.device) -> torch.Tensor:
    """OpenCV's ``COLORMAP_JET`` as a ``(256, 3)`` uint8 RGB table on ``device``.

    OpenCV returns BGR; the table is flipped to RGB here, once.
    """
    ramp = np.arange(256, dtype=np.uint8).reshape(256, 1)
    bgr = cv2.applyColorMap(ramp, cv2.COLORMAP_JET).reshape(256, 3)
    return torch.from_numpy(np.ascontiguousarray(bgr[:, ::-1])).to(device)


def upsample_normalise(maps: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bilinear upsampling (``align_corners=False``) then min-max to [0, 1].

    ``maps``: ``(K, h, w)`` raw maps of one image.  Returns ``(K, height, width)``
    float32, ``(M - min) / (max - min)`` computed at the output size, so the
    hottest pixel is exactly 1 and the coldest 0; a flat map gives zeros.

    The reference libraries divide by ``max - min + 1e-7``; that absolute
    epsilon shifts maps of small range (Grad-CAM of random or tiny models,
    range ~1e-3) by ~1e-4, so it is applied only where the range is zero.
    """
    up = F.interpolate(
        maps[:, None].float(), size=(height, width), mode="bilinear", align_corners=False
    )[:, 0]
    low = up.amin(dim=(1, 2), keepdim=True)
    span = up.amax(dim=(1, 2), keepdim=True) - low
    span = torch.where(span > 0, span, torch.full_like(span, EPSILON))
    return (up - low).div_(span)


def colorize(maps: torch.Tensor) -> torch.Tensor:
    """Jet heatmaps of ``(K, H, W)`` maps in [0, 1]: ``(K, H, W, 3)`` uint8 RGB.

    The index is ``uint8(255 * map)`` (truncation, as OpenCV users write it).
    """
    index = (maps * 255).clamp_(0, 255).to(torch.uint8).long()
    return jet_lut(maps.device)[index]


def blend(image: torch.Tensor, heat: torch.Tensor, alpha: float) -> torch.Tensor:
    """``alpha * heat + (1 - alpha) * image``, rounded, as uint8.

    ``image``: ``(H, W, 3)`` uint8; ``heat``: ``(K, H, W, 3)`` uint8.
    """
    mixed = heat.float().mul_(alpha).add_(image.float().mul_(1.0 - alpha))
    return mixed.round_().clamp_(0, 255).to(torch.uint8)


def draw_box(overlay: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """Draw a white rectangle with a black edge around ``box`` (x0, y0, x1, y1 exclusive)."""
    x0, y0, x1, y1 = box
    thickness = max(1, round(min(overlay.shape[:2]) / 200))
    out = np.ascontiguousarray(overlay)
    cv2.rectangle(out, (x0, y0), (x1 - 1, y1 - 1), (0, 0, 0), thickness + 2)
    cv2.rectangle(out, (x0, y0), (x1 - 1, y1 - 1), (255, 255, 255), thickness)
    return out


def localisation_box(norm_map: np.ndarray, threshold: float) -> tuple[int, int, int, int] | None:
    """The CAM paper's weakly supervised localisation box.

    Threshold the map at ``threshold`` times its maximum, keep the largest
    8-connected component, return its bounding box ``(x0, y0, x1, y1)`` in
    pixels (x1, y1 exclusive), or ``None`` when nothing passes.
    """
    mask = (norm_map >= threshold * float(norm_map.max())).astype(np.uint8)
    count, _, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    if count <= 1:
        return None
    largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    x, y, w, h = (int(v) for v in stats[largest, :4])
    return (x, y, x + w, y + h)

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

#: a raw map whose range is below this fraction of its magnitude is flat
FLAT_RTOL = 1e-6


def is_flat(raw: np.ndarray) -> bool:
    """Whether a raw map ``(h, w)`` is constant (its range below ``FLAT_RTOL`` of its magnitude):
    it then normalises to zeros and explains nothing."""
    low, high = float(raw.min()), float(raw.max())
    return high - low <= FLAT_RTOL * max(abs(low), abs(high))


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
    hottest pixel is exactly 1 and the coldest 0. A flat raw map (a 1x1 layer,
    a constant) gives zeros: its range is judged before upsampling, whose
    rounding would otherwise be stretched into stripes.

    The reference libraries divide by ``max - min + 1e-7``; that absolute
    epsilon shifts maps of small range (Grad-CAM of random or tiny models,
    range ~1e-3) by ~1e-4, so it is applied only where the range is zero.
    """
    up = F.interpolate(maps[:, None].float(), size=(height, width), mode="bilinear", align_corners=False)[:, 0]
    low = up.amin(dim=(1, 2), keepdim=True)
    span = up.amax(dim=(1, 2), keepdim=True) - low
    raw = maps.float()
    raw_low, raw_high = raw.amin(dim=(1, 2)), raw.amax(dim=(1, 2))
    flat = (raw_high - raw_low <= FLAT_RTOL * torch.maximum(raw_low.abs(), raw_high.abs())).view(-1, 1, 1)
    span = torch.where(flat | (span <= 0), torch.full_like(span, float("inf")), span)
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


def render_on_device(maps: torch.Tensor, image: torch.Tensor, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """The whole post-processing of one image with tensor ops on ``maps.device`` (GPU path).

    ``maps``: ``(K, h, w)`` raw maps; ``image``: ``(H, W, 3)`` uint8 RGB.
    Returns normalised maps ``(K, H, W)`` float32 and overlays ``(K, H, W, 3)``
    uint8 **BGR** (ready for OpenCV's encoders), as numpy arrays.
    """
    height, width = int(image.shape[0]), int(image.shape[1])
    norm = upsample_normalise(maps, height, width)
    overlay = blend(image.to(norm.device, non_blocking=True), colorize(norm), alpha).flip(-1)
    return norm.cpu().numpy(), overlay.cpu().numpy()


#: pixels a strip of the CPU render works on at once: its temporaries stay a few MB
#: whatever the image's size (a 10000x10000 overlay is coloured and blended 104 rows at a time)
STRIP_PIXELS = 1 << 20


def upsample_normalise_opencv(raw: np.ndarray, height: int, width: int) -> np.ndarray:
    """One raw map ``(h, w)`` upsampled to ``(height, width)`` float32 and min-maxed to [0, 1]
    in place (the CPU twin of :func:`upsample_normalise`, one full-size array and no other).

    ``cv2.resize`` with ``INTER_LINEAR`` samples at half-pixel centres exactly like
    ``F.interpolate(..., align_corners=False)``. It runs on the whole map at once: its
    SIMD kernels round differently from a row-by-row reimplementation, and resizing
    strips would change the sampling positions, so only this keeps the maps as they were.
    """
    up = cv2.resize(np.ascontiguousarray(raw, dtype=np.float32), (width, height), interpolation=cv2.INTER_LINEAR)
    low = float(up.min())
    span = float(up.max()) - low
    raw_low, raw_high = float(raw.min()), float(raw.max())
    if span <= 0 or raw_high - raw_low <= FLAT_RTOL * max(abs(raw_low), abs(raw_high)):
        span = float("inf")  # a flat raw map: zeros, not stretched rounding
    np.subtract(up, low, out=up)
    np.divide(up, np.float32(span), out=up)
    return up


def overlay_opencv(norm: np.ndarray, image: np.ndarray, alpha: float, out: np.ndarray | None = None) -> np.ndarray:
    """The jet overlay of a normalised map ``(H, W)`` on ``image`` ``(H, W, 3)`` uint8 RGB:
    ``(H, W, 3)`` uint8 **BGR** (into ``out`` when given), made in strips of rows.

    Every step is per pixel (colour index ``uint8(255 * map)``, ``applyColorMap``,
    ``addWeighted``), so strips give the same bytes as the whole image at once, with
    temporaries of ``STRIP_PIXELS`` pixels instead of four full-size ones.
    """
    height, width = norm.shape
    if out is None:
        out = np.empty((height, width, 3), dtype=np.uint8)
    rows = max(1, STRIP_PIXELS // max(1, width))
    for top in range(0, height, rows):
        part = slice(top, min(height, top + rows))
        index = np.multiply(norm[part], 255.0, dtype=np.float32).astype(np.uint8)
        heat = cv2.applyColorMap(index, cv2.COLORMAP_JET)
        bgr = cv2.cvtColor(image[part], cv2.COLOR_RGB2BGR)
        cv2.addWeighted(heat, alpha, bgr, 1.0 - alpha, 0.0, dst=out[part])
    return out


def render_with_opencv(maps: np.ndarray, image: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """The same post-processing as ``render_on_device`` with OpenCV's SIMD kernels (CPU path),
    for ``K`` maps at once (:func:`upsample_normalise_opencv` and :func:`overlay_opencv`
    give one map's, with less memory). Agrees with the device path to 1e-6 on the maps
    and to one grey level on the overlays (rounding).
    """
    height, width = image.shape[:2]
    norms = np.empty((maps.shape[0], height, width), dtype=np.float32)
    overlays = np.empty((maps.shape[0], height, width, 3), dtype=np.uint8)
    for k in range(maps.shape[0]):
        norms[k] = upsample_normalise_opencv(maps[k], height, width)
        overlay_opencv(norms[k], image, alpha, out=overlays[k])
    return norms, overlays


def gradient_picture(gradient: np.ndarray, height: int, width: int) -> np.ndarray:
    """A guided gradient as its papers show it: ``(3, S, S)`` float (RGB) -> ``(height, width, 3)``
    uint8 **BGR**. pytorch-grad-cam's ``deprocess_image`` (Keras Grad-CAM's): centred on grey,
    ``0.5 + 0.1 (G - mean) / (std + 1e-5)`` over all its values, clipped to [0, 1], then resized
    (bilinear) to the image and scaled to 0..255 (truncated)."""
    g = np.asarray(gradient, dtype=np.float32).transpose(1, 2, 0)
    g = g - g.mean()
    g = g / (g.std() + 1e-5)
    picture = np.clip(g * 0.1 + 0.5, 0, 1).astype(np.float32)
    if picture.shape[:2] != (height, width):
        picture = cv2.resize(picture, (width, height), interpolation=cv2.INTER_LINEAR)
    return np.ascontiguousarray((picture * 255).astype(np.uint8)[:, :, ::-1])


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
    pixels (x1, y1 exclusive), or ``None`` for a map without a positive peak.
    """
    peak = float(norm_map.max()) if norm_map.size else float("nan")
    if not np.isfinite(peak) or peak <= 0:
        return None  # a flat (all-zero) map has no evidence to localise
    mask = (norm_map >= threshold * peak).astype(np.uint8)
    count, _, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    if count <= 1:
        return None
    largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    x, y, w, h = (int(v) for v in stats[largest, :4])
    return (x, y, x + w, y + h)

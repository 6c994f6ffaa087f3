"""The inputs of one model setup: each image decoded and resized as ``explain``
does, with the maps of its (input, method) pairs read and resized to ``S x S``
(or, for a model that takes images at their own size, both kept at that size)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from cam_cli.errors import DecodeError
from cam_cli.images import DEFAULT_MAX_PIXELS, InputImage, decode_image
from cam_cli.jobs.data import ImageDataset

if TYPE_CHECKING:
    from cam_cli.jobs.evaluate.lines import Pair


@dataclass
class MapItem:
    """One input image and the maps of its pairs, as the DataLoader's workers made them."""

    index: int
    image: torch.Tensor | None  # (3, S, S) uint8 (native: (3, H, W))
    maps: list[torch.Tensor | None]  # (S, S) float32 per pair (native: (H, W))
    natives: list[np.ndarray | None]  # (H, W) float32 per pair, for the localisation metrics
    errors: list[str | None]


class MapDataset(torch.utils.data.Dataset[MapItem]):
    """One input image per item, decoded and resized as ``explain`` does, with
    the maps of its pairs read and resized bilinearly to ``S x S``; ``natives``
    keeps each map at its own resolution too (for the localisation metrics).
    ``size`` None: each image and its maps stay at the image's own size (detection)."""

    def __init__(
        self,
        out_dir: Path,
        inputs: Sequence[InputImage],
        pairs: Sequence[Sequence[Pair]],
        size: int | None,
        natives: bool,
        interpolation: str,
    ) -> None:
        self.out_dir = out_dir
        self.images = ImageDataset(inputs, size or 1, DEFAULT_MAX_PIXELS, interpolation)
        self.pairs = pairs
        self.size = size
        self.natives = natives

    def __len__(self) -> int:
        return len(self.images)

    def _image(self, index: int) -> tuple[torch.Tensor | None, str | None]:
        """The model's input ``(3, S, S)`` (native: ``(3, H, W)``) uint8, or why it cannot be read."""
        if self.size is not None:
            item = self.images[index]
            return item.image, item.error
        try:
            array = decode_image(self.images.images[index].path, DEFAULT_MAX_PIXELS)
        except DecodeError as exc:
            return None, str(exc)
        return torch.from_numpy(array).permute(2, 0, 1).contiguous(), None

    def __getitem__(self, index: int) -> MapItem:
        image, failure = self._image(index)
        found = MapItem(index, image, [], [], [])
        for pair in self.pairs[index]:
            native, error = None, None
            if failure is not None:
                error = f"cannot read the input image {pair.record.get('input')}: {failure}"
            else:
                try:
                    native = read_map(self.out_dir, str(pair.record["map"]))
                except ValueError as exc:
                    error = str(exc)
            found.maps.append(None if native is None or image is None else self._resized(native, image.shape[-2:]))
            found.natives.append(native if self.natives else None)
            found.errors.append(error)
        return found

    def _resized(self, native: np.ndarray, size: Sequence[int]) -> torch.Tensor:
        """``(H, W)`` -> the image's ``size`` ``(S, S)``, bilinear with ``align_corners=False``."""
        batch = torch.from_numpy(native)[None, None]  # (1, 1, H, W)
        if tuple(native.shape) == tuple(size):
            return batch[0, 0].clone()
        return F.interpolate(batch, size=tuple(size), mode="bilinear", align_corners=False)[0, 0]


def read_map(out_dir: Path, rel: str) -> np.ndarray:
    """The ``(H, W)`` float32 map ``OUT/rel``; ``ValueError`` with a one-line reason."""
    path = out_dir / rel
    try:
        array = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise ValueError(f"map file {path} not found") from None
    except (OSError, ValueError, EOFError) as exc:
        reason = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise ValueError(f"cannot read map file {path}: {reason}") from None
    if array.ndim != 2 or array.size == 0 or not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"map file {path} holds a {array.dtype} array of shape {array.shape}, not a 2-D float map")
    array = np.ascontiguousarray(array, dtype=np.float32)
    if not np.isfinite(array).all():
        raise ValueError(f"map file {path} holds non-finite values")
    return array


def collate(items: list[MapItem]) -> list[MapItem]:
    """A batch is the list of its items (images of one size, maps of many)."""
    return items

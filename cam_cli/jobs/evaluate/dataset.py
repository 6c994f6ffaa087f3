"""The inputs of one model setup: each image decoded and resized as ``explain``
does, with the maps of its (input, method) pairs read and resized to ``S x S``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from cam_cli.images import DEFAULT_MAX_PIXELS, InputImage
from cam_cli.jobs.data import ImageDataset

if TYPE_CHECKING:
    from cam_cli.jobs.evaluate.lines import Pair


@dataclass
class MapItem:
    """One input image and the maps of its pairs, as the DataLoader's workers made them."""

    index: int
    image: torch.Tensor | None  # (3, S, S) uint8
    maps: list[torch.Tensor | None]  # (S, S) float32 per pair
    natives: list[np.ndarray | None]  # (H, W) float32 per pair, for the localisation metrics
    errors: list[str | None]


class MapDataset(torch.utils.data.Dataset[MapItem]):
    """One input image per item, decoded and resized as ``explain`` does, with
    the maps of its pairs read and resized bilinearly to ``S x S``; ``natives``
    keeps each map at its own resolution too (for the localisation metrics)."""

    def __init__(
        self,
        out_dir: Path,
        inputs: Sequence[InputImage],
        pairs: Sequence[Sequence[Pair]],
        size: int,
        natives: bool,
        interpolation: str,
    ) -> None:
        self.out_dir = out_dir
        self.images = ImageDataset(inputs, size, DEFAULT_MAX_PIXELS, interpolation)
        self.pairs = pairs
        self.size = size
        self.natives = natives

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> MapItem:
        item = self.images[index]
        found = MapItem(index, item.image, [], [], [])
        for pair in self.pairs[index]:
            native, error = None, None
            if item.error is not None:
                error = f"cannot read the input image {pair.record.get('input')}: {item.error}"
            else:
                try:
                    native = read_map(self.out_dir, str(pair.record["map"]))
                except ValueError as exc:
                    error = str(exc)
            found.maps.append(None if native is None else self._resized(native))
            found.natives.append(native if self.natives else None)
            found.errors.append(error)
        return found

    def _resized(self, native: np.ndarray) -> torch.Tensor:
        """``(H, W)`` -> ``(S, S)``, bilinear with ``align_corners=False``."""
        batch = torch.from_numpy(native)[None, None]  # (1, 1, H, W)
        return F.interpolate(batch, size=(self.size, self.size), mode="bilinear", align_corners=False)[0, 0]


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

"""Inputs as batches: decode and resize in DataLoader worker processes.

A failed decode is not fatal: it travels in the batch as ``(index, reason)``.
"""

from __future__ import annotations

import contextlib
import ctypes
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torchvision.transforms.v2.functional as TF
from torch.utils.data import Dataset
from torchvision.transforms import InterpolationMode

from cam_cli.errors import DecodeError
from cam_cli.images import InputImage, decode_image

_PR_SET_PDEATHSIG = 1


@dataclass
class Item:
    index: int
    image: torch.Tensor | None  # (3, S, S) uint8, resized for the model
    original: torch.Tensor | None  # (H, W, 3) uint8, as the viewer shows it
    error: str | None


class ImageDataset(Dataset[Item]):
    """Decodes and resizes one image per item; failures become ``Item.error``."""

    def __init__(
        self, images: Sequence[InputImage], size: int, max_pixels: int, interpolation: str = "bilinear"
    ) -> None:
        self.interpolation = InterpolationMode(interpolation)
        self.images = images
        self.size = size
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Item:
        try:
            array = decode_image(self.images[index].path, self.max_pixels)
        except DecodeError as exc:
            return Item(index, None, None, str(exc))
        original = torch.from_numpy(array)
        chw = original.permute(2, 0, 1)
        # The whole image, no centre crop, so the map covers all of it.
        resized = TF.resize(chw, [self.size, self.size], interpolation=self.interpolation, antialias=True)
        if self.interpolation is InterpolationMode.BICUBIC:  # bicubic overshoots: keep uint8 in range
            resized = resized.clamp_(0, 255)
        return Item(index, resized.contiguous(), original, None)


@dataclass
class Batch:
    indices: list[int]  # dataset indices of the decoded images, in batch order
    images: torch.Tensor | None  # (B, 3, S, S) uint8
    originals: list[torch.Tensor]
    errors: list[tuple[int, str]]

    def pin_memory(self) -> Batch:
        if self.images is not None:
            self.images = self.images.pin_memory()
        return self


def collate(items: list[Item]) -> Batch:
    good = [item for item in items if item.error is None]
    return Batch(
        indices=[item.index for item in good],
        images=torch.stack([item.image for item in good]) if good else None,  # type: ignore[misc]
        originals=[item.original for item in good],  # type: ignore[misc]
        errors=[(item.index, item.error) for item in items if item.error is not None],
    )


def ignore_stop_signals(_: int) -> None:
    import signal

    # The main process stops the run; SIGTERM to the process group (SLURM, systemd)
    # must not kill workers under it, or the loader raises instead of a clean stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # If the main process is killed outright (SIGKILL, OOM killer), a worker can block
    # for ever on a lock the dead parent held: have the kernel end it with its parent.
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)

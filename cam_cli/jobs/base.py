"""The skeleton every camx job runs on: ``explain`` and ``evaluate`` both

* prepare the process (:func:`prepare_process`: imported objects out of the GC, and on
  the CPU glibc's allocator tuned);
* place the model with one precision and memory-format policy (:class:`ModelRunner`:
  channels-last on the CPU and CUDA unless the model fails in it, autocast for
  ``--precision fp16/bf16``, inputs normalised on the device);
* stream their inputs through a DataLoader of decoding workers (:func:`loader`);
* append their lines to a journal that is folded into its file whatever happens,
  temporaries cleared (:func:`journalled`);
* count time per stage (:class:`Timings`) and stop on an event, reporting progress
  through callbacks given to their ``run``.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from cam_cli import rundir
from cam_cli.device import (
    PRECISIONS,
    freeze_imported_objects,
    resolve_device,
    tune_allocator,
    use_channels_last,
    use_ieee_fp32,
)
from cam_cli.errors import CamxError, OutputError
from cam_cli.jobs.data import ignore_stop_signals


def prepare_process(device: torch.device | None = None) -> None:
    """Once a job is being prepared: freeze what the imports made out of the GC's
    passes; on the CPU, where activations live in host memory, tune the allocator."""
    freeze_imported_objects()
    if device is not None and device.type == "cpu":
        tune_allocator()


def open_device(spec: str) -> torch.device:
    """``--device`` resolved; on CUDA, float32 made IEEE float32 (no TF32) and the device
    made current (or the loader's pinning thread opens a context on GPU 0)."""
    device = resolve_device(spec)
    if device.type == "cuda":
        use_ieee_fp32()
        if device.index is not None:
            torch.cuda.set_device(device)
    return device


def check_precision(precision: str) -> torch.dtype | None:
    """The autocast dtype of ``--precision`` (None for fp32); ``CamxError`` for an unknown one."""
    if precision not in PRECISIONS:
        raise CamxError(f"unknown precision {precision!r}")
    return PRECISIONS[precision]


def autocast(logits: Callable[[torch.Tensor], torch.Tensor], device: torch.device, precision: str) -> Callable[
    [torch.Tensor], torch.Tensor
]:  # fmt: skip
    """``logits`` under autocast for ``--precision fp16/bf16``; itself for fp32.

    Only the model runs in reduced precision: the methods compute the maps from its
    activations and gradients in float32, outside autocast.
    """
    dtype = check_precision(precision)
    if dtype is None:
        return logits

    def forward(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=device.type, dtype=dtype):
            return logits(x)

    return forward


@dataclass
class ModelRunner:
    """A model placed on its device the way every job places it.

    ``channels_last`` is the policy's choice (:func:`cam_cli.device.use_channels_last`)
    unless the model failed in it; ``forward`` gives float logits under the run's
    autocast; ``normalise`` turns a uint8 batch ``(B, 3, S, S)`` into the model's
    input on the device, in the model's memory format.
    """

    module: torch.nn.Module
    device: torch.device
    forward: Callable[[torch.Tensor], torch.Tensor]
    mean: torch.Tensor  # (1, 3, 1, 1) on the device, in 0..255 units
    std: torch.Tensor
    channels_last: bool = False

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.device, non_blocking=True).float().sub_(self.mean).div_(self.std)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x


def place_model(
    module: torch.nn.Module,
    logits: Callable[[torch.Tensor], torch.Tensor],
    mean: Iterable[float],
    std: Iterable[float],
    device: torch.device,
    precision: str,
    channels_last: bool | None = None,
    check: Callable[[ModelRunner], Any] | None = None,
) -> ModelRunner:
    """Move ``module`` to ``device`` in the memory format of the one policy.

    ``channels_last``: the format already chosen (``explain``'s probe tried it), else
    the policy's (:func:`cam_cli.device.use_channels_last`). ``check`` (when given)
    runs the placed model once; a model that fails in channels-last is put back in the
    default format and checked again, and a failure there propagates.
    """
    module = module.to(device)
    if channels_last is None:
        channels_last = use_channels_last(device)
    module.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    scale = torch.tensor(255.0, device=device)
    runner = ModelRunner(
        module,
        device,
        autocast(logits, device, precision),
        torch.tensor(list(mean), device=device).view(1, 3, 1, 1) * scale,
        torch.tensor(list(std), device=device).view(1, 3, 1, 1) * scale,
        channels_last,
    )
    if check is not None and channels_last:
        try:
            check(runner)
            return runner
        except Exception:  # a view of a permuted tensor, a custom op: run in the default format
            module.to(memory_format=torch.contiguous_format)
            runner.channels_last = False
    if check is not None:
        check(runner)
    return runner


def default_workers() -> int:
    """Decoding workers: the cores the model leaves over, at least one, at most 8."""
    return max(1, min(8, (os.cpu_count() or 2) - 1))


def loader(
    dataset: Dataset[Any],
    batch_size: int,
    workers: int,
    collate: Callable[[list[Any]], Any],
    pin: bool = False,
) -> DataLoader[Any]:
    """Batches of ``dataset`` made by ``workers`` decoding processes (0: in this one).

    Workers ignore SIGINT/SIGTERM (the main process stops the run cleanly) and die
    with their parent."""
    workers = workers if len(dataset) else 0  # type: ignore[arg-type]
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=pin,
        worker_init_fn=ignore_stop_signals if workers else None,
        prefetch_factor=2 if workers else None,
        persistent_workers=False,
    )


@contextmanager
def journalled(
    target: Path,
    temporaries: Callable[[], Iterable[Path]],
    busy: str | None = None,
) -> Iterator[rundir.Journal]:
    """The journal of ``target`` (a manifest, ``metrics.jsonl``) for the job's lines.

    Whatever happens inside (an error, a stop), what was journalled is folded into
    ``target``, the journal's lock is released after that, and the temporaries of the
    paths ``temporaries()`` names are removed. ``busy`` replaces the message when
    another process holds the journal.
    """
    try:
        journal = rundir.Journal(target)
    except OutputError:
        if busy is None:
            raise
        raise OutputError(busy) from None
    except OSError as exc:
        raise OutputError(f"cannot write to {target.parent}: {exc.strerror or exc}") from None
    try:
        yield journal
    finally:
        try:  # whatever happened, keep what was completed
            rundir.finalise_manifest(target, {})
        except OSError as exc:
            raise OutputError(f"cannot write {target}: {exc.strerror or exc}") from None
        finally:
            journal.close()  # the lock goes with it, once the journal is folded in
            rundir.remove_temporaries(temporaries())


class Timings:
    """Seconds per stage, added from the main thread and the writer threads."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._lock = threading.Lock()

    def add(self, stage: str, seconds: float) -> None:
        with self._lock:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds


@dataclass
class Tally:
    """What a job did, counted in its units (inputs, lines): the part every job's
    result shares."""

    total: int
    done: int = 0
    skipped: int = 0
    failed: int = 0
    seconds: float = 0.0
    failures: list[tuple[str, str]] = field(default_factory=list)

    def fail(self, where: str, reason: str) -> None:
        self.failed += 1
        self.failures.append((where, reason))

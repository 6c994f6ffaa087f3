"""Running as one of many processes: ``--shard K/N`` or ``torchrun``.

Under ``torchrun`` (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` set) each rank
takes shard ``RANK + 1`` of ``WORLD_SIZE``, uses ``cuda:LOCAL_RANK`` when CUDA
is asked for (or ``auto`` finds it), writes its own manifest part, and rank 0
merges the parts into ``manifest.jsonl`` once every rank is done (a barrier
over ``torch.distributed``: gloo on CPU, nccl on GPU).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from cam_cli import rundir
from cam_cli.errors import CamxError


@dataclass
class DistributedRun:
    shard: tuple[int, int]
    device: str
    rank: int | None = None
    world_size: int = 1

    @property
    def is_torchrun(self) -> bool:
        return self.rank is not None

    def finish(self, out_dir: Path, summary: Any, interrupt_code: int) -> int:
        """Wait for every rank; rank 0 then joins the manifest parts into
        ``manifest.jsonl`` and turns ``summary`` into the whole run's.

        Returns the exit status for an interrupted run (``interrupt_code``, or
        under torchrun that of the first interrupted rank).
        """
        if not self.is_torchrun:
            return interrupt_code
        import torch.distributed as dist

        dist.barrier()  # every rank has written its manifest part
        if self.rank == 0:
            n = self.world_size
            parts = [out_dir / f"manifest.shard-{i}-of-{n}.jsonl" for i in range(1, n + 1)]
            rundir.merge_manifests(out_dir, [p for p in parts if p.exists()], out_dir / "manifest.jsonl")
            summary.manifest = str(out_dir / "manifest.jsonl")
        mine = {
            "total": summary.total,
            "done": summary.done,
            "skipped": summary.skipped,
            "failed": summary.failed,
            "flat": summary.flat,
            "seconds": summary.seconds,
            "interrupt_code": interrupt_code if summary.interrupted else None,
        }
        everyone: list[Any] = [None] * self.world_size
        dist.all_gather_object(everyone, mine)  # also waits for rank 0's merge
        if self.rank == 0:
            for name in ("total", "done", "skipped", "failed", "flat"):
                setattr(summary, name, sum(part[name] for part in everyone))
            summary.seconds = max(part["seconds"] for part in everyone)
            codes = [part["interrupt_code"] for part in everyone if part["interrupt_code"] is not None]
            summary.interrupted = bool(codes)
            return codes[0] if codes else interrupt_code
        return interrupt_code


def _torchrun_env() -> tuple[int, int, int] | None:
    try:
        world = int(os.environ["WORLD_SIZE"])
        rank = int(os.environ["RANK"])
    except (KeyError, ValueError):
        return None
    if world <= 1:
        return None
    return rank, world, int(os.environ.get("LOCAL_RANK", "0"))


@contextmanager
def distributed_context(shard: tuple[int, int] | None, device: str) -> Iterator[DistributedRun]:
    env = _torchrun_env()
    if env is None:
        yield DistributedRun(shard or (1, 1), device)
        return
    if shard is not None:
        raise CamxError("--shard cannot be combined with torchrun: the ranks shard the inputs")
    import torch.distributed as dist

    rank, world, local_rank = env
    use_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        device = f"cuda:{local_rank}"
    backend = "nccl" if use_cuda else "gloo"
    dist.init_process_group(backend=backend, timeout=timedelta(hours=6))
    try:
        if use_cuda:
            torch.cuda.set_device(local_rank)
        yield DistributedRun((rank + 1, world), device, rank, world)
    finally:
        dist.destroy_process_group()

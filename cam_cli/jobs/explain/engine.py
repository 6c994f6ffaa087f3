"""The run engine: stream batches from the loader through the model and into the
writer threads, with a bounded queue of pending batches (memory stays flat in
the number of images), timings per stage, and a clean stop.

Records reach the manifest journal once an image's files are complete, so a
killed run resumes where it stopped.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

from cam_cli import rundir
from cam_cli.images import InputImage
from cam_cli.jobs.base import ModelRunner, Tally, Timings
from cam_cli.jobs.data import Batch
from cam_cli.jobs.explain.writer import MethodResult, Writer, writer_pool
from cam_cli.methods import BatchExplainer
from cam_cli.methods.base import Stopped
from cam_cli.rundir.plan import ResumePlan
from cam_cli.targets import TargetSpec

MAX_PENDING_BATCHES = 2

Progress = Callable[[list[dict[str, Any]]], None]


@dataclass
class Summary(Tally):
    """What a run did, counted in inputs; ``as_dict`` is the ``--json`` output."""

    out_dir: str = ""
    manifest: str = ""
    interrupted: bool = False
    #: (input, method) maps that came out constant, hence all zero after min-max
    flat: int = 0
    methods: list[str] = field(default_factory=list)
    #: seconds spent per stage. Main thread: start (reading manifests, opening the
    #: journal), wait_for_data, model, wait_for_writes (the bounded queue is full),
    #: final_writes (the last batches' writes), finish (manifest, clean-up).
    #: Writer threads: postprocess_write (wall time, summed over the threads).
    #: extra_passes: the part of model spent in methods' own passes (Score-CAM, Ablation-CAM)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def images_per_second(self) -> float:
        return self.done / self.seconds if self.seconds > 0 else 0.0

    def count(self, records: list[dict[str, Any]]) -> None:
        """Count one input's records of this run: done when every method is ``ok``."""
        self.flat += sum(1 for r in records if r.get("flat"))
        errors = [r for r in records if r["status"] != "ok"]
        if errors:
            first = errors[0]
            reason = f"{first['method']}: {first['error']}" if len(self.methods) > 1 else first["error"]
            self.fail(first["input"], reason)
        else:
            self.done += 1

    def as_dict(self) -> dict[str, Any]:
        return {
            "total": self.total,
            "done": self.done,
            "skipped": self.skipped,
            "failed": self.failed,
            "flat": self.flat,
            "interrupted": self.interrupted,
            "methods": self.methods,
            "seconds": round(self.seconds, 3),
            "images_per_second": round(self.images_per_second, 3),
            "out_dir": self.out_dir,
            "manifest": self.manifest,
            "timings": {stage: round(seconds, 3) for stage, seconds in self.timings.items()},
        }


@dataclass
class Engine:
    """Everything a run loop needs; ``run`` streams ``todo`` through it."""

    explainer: BatchExplainer
    target: TargetSpec
    plan: ResumePlan
    writer: Writer
    runner: ModelRunner
    timings: Timings

    def explain_batch(self, todo: list[InputImage], batch: Batch) -> list[tuple[InputImage, torch.Tensor,
                                                                               list[MethodResult]]]:  # fmt: skip
        """The model's part of one batch: every method the batch's inputs still need. When the run
        stopped during a method's own passes, the jobs of the batch's finished images only."""
        assert batch.images is not None
        keys = [todo[i].key for i in batch.indices]
        wanted = {m for key in keys for m in self.plan.missing[key]}
        choose = self.target.chooser(self.explainer.readout.ranking)
        result = self.explainer.explain(self.runner.normalise(batch.images), choose, wanted)
        specific = {m.name for m in self.explainer.methods if m.info.class_specific}
        per_method = {}
        for method in self.explainer.methods:
            if method.name not in wanted:
                continue
            gradients = result.gradients.get(method.name)
            per_method[method.name] = (
                result.maps[method.name].detach(),
                result.classes_of(method).cpu().tolist(),
                result.scores_of(method).cpu().tolist(),
                result.details_of(method),
                None if gradients is None else gradients.detach(),
            )
        jobs = []
        for j, index in enumerate(batch.indices[: len(result.logits)]):
            image = todo[index]
            results = []
            for name in self.plan.missing[image.key]:
                maps, classes, scores, details, images = per_method[name]
                gradient = None if images is None else images[j]
                detail = None if details is None else details[j]
                results.append(MethodResult(name, maps[j], classes[j], scores[j], detail, gradient))
                if result.absent is not None and name in specific:  # a target with nothing to explain
                    results[-1].error = result.absent[j]
            jobs.append((image, batch.originals[j], results))
        return jobs

    def decode_errors(self, todo: list[InputImage], batch: Batch) -> list[list[dict[str, Any]]]:
        """The ``error`` records of the batch's inputs that could not be decoded."""
        return [
            [self.plan.record(todo[i], m, status="error", error=message) for m in self.plan.missing[todo[i].key]]
            for i, message in batch.errors
        ]

    def timed_batch(self, todo: list[InputImage], batch: Batch) -> list[tuple[InputImage, torch.Tensor,
                                                                            list[MethodResult]]]:  # fmt: skip
        """:meth:`explain_batch`, its time added to ``model`` (and ``extra_passes``, its part)."""
        computed = time.perf_counter()
        extra = self.explainer.extra_seconds
        try:
            return self.explain_batch(todo, batch)
        finally:
            self.timings.add("model", time.perf_counter() - computed)
            if self.explainer.extra_seconds > extra:  # included in "model"
                self.timings.add("extra_passes", self.explainer.extra_seconds - extra)

    def run(
        self, todo: list[InputImage], loader: Any, journal: rundir.Journal, summary: Summary, on_cpu: bool,
        progress: Progress | None, stop: threading.Event | None,
    ) -> None:  # fmt: skip
        pool = writer_pool(on_cpu)
        add = self.timings.add
        self.explainer.stop = stop  # methods with passes of their own stop between them
        in_flight: deque[tuple[list[list[dict[str, Any]]], list[Future[list[dict[str, Any]]]]]] = deque()

        def drain(limit: int) -> None:
            while len(in_flight) > limit:
                ready, futures = in_flight.popleft()
                for future in futures:
                    ready.append(future.result())
                journal.append(record for records in ready for record in records)
                for records in ready:
                    summary.count(records)
                if progress is not None:
                    progress([record for records in ready for record in records])

        try:
            batches = iter(loader)
            while True:
                waited = time.perf_counter()
                batch = next(batches, None)
                add("wait_for_data", time.perf_counter() - waited)
                if batch is None:
                    break
                ready = self.decode_errors(todo, batch)
                futures: list[Future[list[dict[str, Any]]]] = []
                if batch.images is not None:
                    try:
                        jobs = self.timed_batch(todo, batch)
                    except Stopped:  # a method's own passes saw the stop before any image was finished:
                        summary.interrupted = True  # drop this batch, keep the rest
                        break
                    futures = [pool.submit(self.writer.write_image, *job) for job in jobs]
                in_flight.append((ready, futures))
                waited = time.perf_counter()
                drain(MAX_PENDING_BATCHES)
                add("wait_for_writes", time.perf_counter() - waited)
                if stop is not None and stop.is_set():
                    summary.interrupted = True
                    break
            waited = time.perf_counter()
            drain(0)
            add("final_writes", time.perf_counter() - waited)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

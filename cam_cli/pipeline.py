"""One ``camx explain`` run: discover -> decode (DataLoader workers) -> batch ->
device -> explain -> post-process and write (thread pool) -> manifest.

Memory stays flat in the number of images: images stream through a bounded
number of batches, and each record reaches the manifest journal once its files
are complete, so a killed run resumes where it stopped.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from cam_cli import io, render
from cam_cli.data import default_workers, make_loader
from cam_cli.device import PRECISIONS, resolve_device, tune_allocator, use_ieee_fp32
from cam_cli.errors import CamxError, InputError, ModelError, OutputError
from cam_cli.layers import cam_head, resolve_target, run_probe
from cam_cli.methods import CAM, GradCAM
from cam_cli.methods.base import TargetLayer
from cam_cli.models import load_classifier
from cam_cli.targets import parse_target

MAX_PENDING_BATCHES = 2
JPEG_MAX_SIDE = 65500
DEVICE_RENDER_MAX_PIXELS = 1 << 24


class ImageFailed(Exception):
    """This image cannot be explained (its reason is the message); the run goes on."""


@dataclass
class ExplainConfig:
    """Everything ``camx explain`` is asked to do (the CLI's options, parsed)."""

    inputs: Sequence[Path]
    out_dir: Path
    listed: Sequence[Path] = ()
    method: str = "gradcam"
    model: str = "resnet50"
    weights: str = "DEFAULT"
    num_classes: int | None = None
    labels: Path | None = None
    layer: str | None = None
    target: str = "top1"
    alpha: float = 0.4
    fmt: str = "jpg"
    input_size: int | None = None
    mean: Sequence[float] | None = None
    std: Sequence[float] | None = None
    output_key: str | None = None
    device: str = "auto"
    batch_size: int = 16
    workers: int | None = None
    precision: str = "fp32"
    overwrite: bool = False
    shard: tuple[int, int] = (1, 1)
    max_pixels: int = io.DEFAULT_MAX_PIXELS
    boxes: bool = False
    box_threshold: float = 0.2
    draw_boxes: bool = False


@dataclass
class Summary:
    """What a run did; ``as_dict`` is the ``--json`` output."""

    total: int
    done: int = 0
    skipped: int = 0
    failed: int = 0
    seconds: float = 0.0
    out_dir: str = ""
    manifest: str = ""
    interrupted: bool = False
    failures: list[tuple[str, str]] = field(default_factory=list)
    #: seconds spent per stage. Main thread: start (reading manifests, opening the
    #: journal), wait_for_data, model, wait_for_writes (the bounded queue is full),
    #: final_writes (the last batches' writes), finish (manifest, clean-up).
    #: Writer threads: postprocess_write (wall time, summed over the threads)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def images_per_second(self) -> float:
        return self.done / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "total": self.total,
            "done": self.done,
            "skipped": self.skipped,
            "failed": self.failed,
            "interrupted": self.interrupted,
            "seconds": round(self.seconds, 3),
            "images_per_second": round(self.images_per_second, 3),
            "out_dir": self.out_dir,
            "manifest": self.manifest,
            "timings": {stage: round(seconds, 3) for stage, seconds in self.timings.items()},
        }


# ------------------------------------------------------------------------ the run


def output_names(key: str, method: str, fmt: str, count: int) -> list[tuple[str, str]]:
    """(overlay, map) paths relative to OUT for each of ``count`` targets."""
    if count == 1:
        return [(f"{key}.{method}.{fmt}", f"{key}.{method}.npy")]
    return [(f"{key}.{method}.top{r}.{fmt}", f"{key}.{method}.top{r}.npy") for r in range(1, count + 1)]


def _encode(bgr: np.ndarray, fmt: str) -> bytes:
    """Encode a ``(H, W, 3)`` uint8 BGR overlay as JPEG (quality 95) or PNG."""
    if fmt == "jpg" and max(bgr.shape[:2]) > JPEG_MAX_SIDE:
        raise OutputError(
            f"a {bgr.shape[1]}x{bgr.shape[0]} overlay is too large for JPEG "
            f"(at most {JPEG_MAX_SIDE} pixels a side); use --format png"
        )
    params = [cv2.IMWRITE_JPEG_QUALITY, 95] if fmt == "jpg" else [cv2.IMWRITE_PNG_COMPRESSION, 1]
    ok, buffer = cv2.imencode(f".{fmt}", bgr, params)
    if not ok:
        raise OutputError(f"OpenCV could not encode a {bgr.shape} overlay as {fmt}")
    return buffer.tobytes()


def _refuse_writing_over_inputs(config: ExplainConfig, images: Sequence[io.InputImage]) -> None:
    """OUT may not be an input folder, and no output may land on an input image."""
    out = os.path.realpath(config.out_dir)
    for item in config.inputs:
        if item.is_dir() and os.path.realpath(item) == out:
            raise InputError(
                f"the output folder {config.out_dir} is the input folder {item}: outputs would mix with "
                "the images and be read as inputs next time; choose another -o"
            )
    inputs = {os.path.realpath(image.path): image.path for image in images}
    for image in images:
        for rel in output_names(image.key, config.method, config.fmt, 1)[0]:
            target = os.path.join(out, rel)
            if target in inputs:
                raise InputError(
                    f"the output {target} would overwrite the input image {inputs[target]}; choose another -o"
                )


class Explainer:
    """A prepared run: model loaded and probed, inputs found, nothing written yet."""

    def __init__(self, config: ExplainConfig) -> None:
        self.config = config
        self.timings: dict[str, float] = {}
        self._timings_lock = threading.Lock()
        self._pending: tuple[list[io.InputImage], int] | None = None
        self._carried: dict[io.RecordKey, dict[str, Any]] = {}
        listed = list(config.listed)
        found = io.discover(config.inputs, listed, exclude=config.out_dir)
        k, n = config.shard
        self.all_images = found
        self.images = io.select_shard(found, k, n) if n > 1 else found
        _refuse_writing_over_inputs(config, found)
        self.device = resolve_device(config.device)
        if config.precision not in PRECISIONS:
            raise CamxError(f"unknown precision {config.precision!r}")
        if self.device.type == "cuda":
            use_ieee_fp32()
            if self.device.index is not None:  # or the loader's pinning thread opens a context on GPU 0
                torch.cuda.set_device(self.device)
        self.classifier = load_classifier(
            config.model,
            config.weights,
            config.num_classes,
            config.labels,
            config.input_size,
            config.mean,
            config.std,
            config.output_key,
        )
        probe = run_probe(self.classifier)
        num_classes = int(probe.logits.shape[1])
        if self.classifier.categories is not None and len(self.classifier.categories) != num_classes:
            raise ModelError(f"{len(self.classifier.categories)} class names for a model with {num_classes} outputs")
        self.target_layer: TargetLayer = resolve_target(probe, config.layer)
        self.target = parse_target(config.target, self.classifier, num_classes)
        module = self.classifier.module.to(self.device)
        if self.device.type == "cuda":
            module = module.to(memory_format=torch.channels_last)
        if config.method == "cam":
            head = cam_head(probe, self.target_layer)
            self.method: CAM | GradCAM = CAM(
                self._logits, module, self.target_layer, head.weight.to(self.device), head.pre_activation
            )
        elif config.method == "gradcam":
            self.method = GradCAM(self._logits, module, self.target_layer)
            # once on the probe's input, so that a layer the output does not depend on fails now, not mid-run
            if probe.input is not None:
                self.method.explain(probe.input.to(self.device), self.target.chooser())
        else:
            raise CamxError(f"unknown method {config.method!r}")
        del probe
        io.check_writable(config.out_dir)
        name = "manifest.jsonl" if n == 1 else f"manifest.shard-{k}-of-{n}.jsonl"
        self.manifest = config.out_dir / name
        self.mean = torch.tensor(self.classifier.mean, device=self.device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(self.classifier.std, device=self.device).view(1, 3, 1, 1) * 255

    def _add_time(self, stage: str, seconds: float) -> None:
        with self._timings_lock:
            self.timings[stage] = self.timings.get(stage, 0.0) + seconds

    # -- settings that decide whether an earlier record can be reused
    def _settings(self) -> dict[str, Any]:
        """What shaped an input's outputs; recorded in its manifest line and compared on resume."""
        config = self.config
        settings: dict[str, Any] = {
            "method": config.method,
            "model": self.classifier.name,
            "weights": self.classifier.weights,
            "layer": self.target_layer.label,
            "target": self.target.text,
            "input_size": self.classifier.input_size,
            "mean": [round(v, 6) for v in self.classifier.mean],
            "std": [round(v, 6) for v in self.classifier.std],
            "precision": config.precision,
            "alpha": config.alpha,
        }
        if config.boxes or config.draw_boxes:
            settings["box_threshold"] = config.box_threshold
        if config.draw_boxes:
            settings["draw_boxes"] = True
        return settings

    def _is_complete(self, record: dict[str, Any] | None) -> bool:
        if record is None or record.get("status") != "ok":
            return False
        settings = self._settings()
        if any(record.get(k) != v for k, v in settings.items()):
            return False
        if record.get("draw_boxes", False) != settings.get("draw_boxes", False):
            return False
        if (self.config.boxes or self.config.draw_boxes) and "box" not in record:
            return False
        targets = record.get("targets") or []
        if not targets or len(targets) != self.target.count:
            return False
        for target in targets:  # class names follow --labels
            if target.get("class_name") != self.classifier.class_name(int(target.get("class_index", -1))):
                return False
        paths = [t.get(k) for t in targets for k in ("overlay", "map")]
        fmt_suffix = f".{self.config.fmt}"
        return all(isinstance(p, str) and (self.config.out_dir / p).is_file() for p in paths) and all(
            t["overlay"].endswith(fmt_suffix) for t in targets
        )

    def _earlier_records(self) -> dict[io.RecordKey, dict[str, Any]]:
        """Records of every manifest in OUT (other shards' parts included), this run's own on top."""
        records: dict[io.RecordKey, dict[str, Any]] = {}
        others = sorted(self.config.out_dir.glob("manifest.shard-*-of-*.jsonl"))
        for path in [self.config.out_dir / "manifest.jsonl", *others]:
            if path != self.manifest:
                records.update(io.load_manifest(path))
        records.update(io.load_manifest(self.manifest))
        return records

    def pending(self) -> tuple[list[io.InputImage], int]:
        """Inputs still to do, and how many earlier complete outputs are kept.

        Computed once (it reads the manifests and checks every output file).
        Complete records found in another manifest of OUT (a shard part, the
        merged manifest) are carried into this run's manifest.
        """
        if self._pending is None:
            todo = list(self.images)
            if not self.config.overwrite:
                records = self._earlier_records()
                todo = []
                for image in self.images:
                    record = records.get((image.key, self.config.method))
                    if self._is_complete(record):
                        assert record is not None
                        self._carried[io.record_key(record)] = record
                    else:
                        todo.append(image)
            self._pending = (todo, len(self.images) - len(todo))
        return self._pending

    def _record(self, image: io.InputImage, **fields: Any) -> dict[str, Any]:
        record: dict[str, Any] = {
            "input": str(image.path),
            "key": image.key,
            "status": "ok",
            "error": None,
            "overlay": None,
            "map": None,
            "class_index": None,
            "class_name": None,
            "score": None,
            **self._settings(),
            "width": None,
            "height": None,
        }
        record.update(fields)
        return record

    def _postprocess_and_write(
        self,
        image: io.InputImage,
        maps: torch.Tensor,
        original: torch.Tensor,
        classes: list[int],
        scores: list[float],
    ) -> dict[str, Any]:
        """Upsample, normalise, colour and write one image's maps; returns its record."""
        config = self.config
        started = time.perf_counter()
        height, width = int(original.shape[0]), int(original.shape[1])
        # On the GPU a render needs ~40 bytes a pixel of device memory per writer: very large
        # images go through OpenCV on the CPU instead. On the CPU, numpy: no torch calls in writers.
        on_cpu = maps.device.type == "cpu" or height * width > DEVICE_RENDER_MAX_PIXELS
        raw = (maps.numpy() if maps.device.type == "cpu" else maps.cpu().numpy()) if on_cpu else None
        finite = bool(np.isfinite(raw).all()) if raw is not None else bool(torch.isfinite(maps).all())
        if not (finite and all(math.isfinite(s) for s in scores)):
            raise ImageFailed(
                "the model gave non-finite values (NaN or inf) for this image; check --weights, --mean and --std"
            )
        if raw is not None:
            norm_np, overlay_np = render.render_with_opencv(raw, original.numpy(), config.alpha)
        else:
            with torch.inference_mode():
                norm_np, overlay_np = render.render_on_device(maps, original, config.alpha)
        names = output_names(image.key, config.method, config.fmt, len(classes))
        targets = []
        for r, (overlay_rel, map_rel) in enumerate(names):
            entry: dict[str, Any] = {
                "rank": r + 1,
                "class_index": classes[r],
                "class_name": self.classifier.class_name(classes[r]),
                "score": round(scores[r], 6),
                "overlay": overlay_rel,
                "map": map_rel,
            }
            picture = overlay_np[r]
            if config.boxes or config.draw_boxes:  # a drawn box is recorded too
                box = render.localisation_box(norm_np[r], config.box_threshold)
                entry["box"] = list(box) if box is not None else None
                if config.draw_boxes and box is not None:
                    picture = render.draw_box(picture.copy(), box)
            encoded = _encode(picture, config.fmt)  # may refuse this image: nothing written yet
            io.write_atomic(config.out_dir / map_rel, io.npy_bytes(norm_np[r]))
            io.write_atomic(config.out_dir / overlay_rel, encoded)
            targets.append(entry)
        self._add_time("postprocess_write", time.perf_counter() - started)
        first = targets[0]
        extra = {"box": first["box"]} if config.boxes or config.draw_boxes else {}
        return self._record(
            image,
            overlay=first["overlay"],
            map=first["map"],
            class_index=first["class_index"],
            class_name=first["class_name"],
            score=first["score"],
            width=width,
            height=height,
            targets=targets,
            **extra,
        )

    def _forward(self, images: torch.Tensor) -> Any:
        x = images.to(self.device, non_blocking=True).float().sub_(self.mean).div_(self.std)
        if self.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        return self.method.explain(x, self.target.chooser())

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        """The model's forward, under autocast for ``--precision fp16/bf16``.

        Only the model runs in reduced precision: the methods compute the maps
        from its activations and gradients in float32, outside autocast.
        """
        dtype = PRECISIONS[self.config.precision]
        if dtype is None:
            return self.classifier.logits(x)
        with torch.autocast(device_type=self.device.type, dtype=dtype):
            return self.classifier.logits(x)

    def run(
        self,
        progress: Callable[[list[dict[str, Any]]], None] | None = None,
        stop: threading.Event | None = None,
    ) -> Summary:
        """Explain every pending input; safe to interrupt through ``stop``."""
        config = self.config
        on_cpu = self.device.type == "cpu"
        if on_cpu:  # the model's activations live in host memory only on the CPU
            tune_allocator()
        started = time.perf_counter()
        todo, skipped = self.pending()
        summary = Summary(
            total=len(self.images),
            skipped=skipped,
            out_dir=str(config.out_dir),
            manifest=str(self.manifest),
        )
        try:
            config.out_dir.mkdir(parents=True, exist_ok=True)
            journal = io.Journal(self.manifest)
            # Records live in the journal on disk, not in memory: memory stays flat
            # however many images there are; the manifest is rebuilt from it at the end.
            if self._carried:
                journal.append(self._carried.values())
        except OSError as exc:
            raise OutputError(f"cannot write to {config.out_dir}: {exc.strerror or exc}") from None
        workers = default_workers() if config.workers is None else config.workers
        loader = make_loader(
            todo, self.classifier.input_size, config.max_pixels, config.batch_size, workers, self.device.type == "cuda"
        )
        pool = ThreadPoolExecutor(
            max_workers=max(2, min(8, os.cpu_count() or 2)),
            thread_name_prefix="camx-writer",
            # On a GPU there are no intra-op threads to keep from stalling: writers run at normal priority.
            initializer=_yield_to_the_model if on_cpu and os.environ.get("CAMX_WRITER_NICE", "1") != "0" else None,
        )
        in_flight: deque[tuple[list[dict[str, Any]], list[tuple[io.InputImage, Future[dict[str, Any]]]]]] = deque()

        def drain(limit: int) -> None:
            while len(in_flight) > limit:
                ready, futures = in_flight.popleft()
                for image, future in futures:
                    try:
                        ready.append(future.result())
                    except ImageFailed as exc:
                        ready.append(self._record(image, status="error", error=str(exc)))
                    except OSError as exc:  # the disk, not the image: stop, keeping what is done
                        raise OutputError(f"cannot write outputs of {image.path}: {exc.strerror or exc}") from None
                    except Exception as exc:  # this image's outputs only (e.g. too large for JPEG)
                        reason = " ".join(str(exc).split())[:300] or type(exc).__name__
                        ready.append(self._record(image, status="error", error=f"cannot render outputs: {reason}"))
                journal.append(ready)
                for record in ready:
                    if record["status"] == "ok":
                        summary.done += 1
                    else:
                        summary.failed += 1
                        summary.failures.append((record["input"], record["error"]))
                if progress is not None:
                    progress(ready)

        self._add_time("start", time.perf_counter() - started)
        try:
            batches = iter(loader)
            while True:
                waited = time.perf_counter()
                batch = next(batches, None)
                self._add_time("wait_for_data", time.perf_counter() - waited)
                if batch is None:
                    break
                ready: list[dict[str, Any]] = [
                    self._record(todo[i], status="error", error=message) for i, message in batch.errors
                ]
                futures: list[tuple[io.InputImage, Future[dict[str, Any]]]] = []
                if batch.images is not None:
                    computed = time.perf_counter()
                    explanation = self._forward(batch.images)
                    maps = explanation.maps.detach()
                    classes = explanation.classes.cpu().tolist()
                    scores = explanation.scores.cpu().tolist()
                    self._add_time("model", time.perf_counter() - computed)
                    for j, index in enumerate(batch.indices):
                        image = todo[index]
                        futures.append(
                            (
                                image,
                                pool.submit(
                                    self._postprocess_and_write,
                                    image,
                                    maps[j],
                                    batch.originals[j],
                                    classes[j],
                                    scores[j],
                                ),
                            )
                        )
                in_flight.append((ready, futures))
                waited = time.perf_counter()
                drain(MAX_PENDING_BATCHES)
                self._add_time("wait_for_writes", time.perf_counter() - waited)
                if stop is not None and stop.is_set():
                    summary.interrupted = True
                    break
            waited = time.perf_counter()
            drain(0)
            self._add_time("final_writes", time.perf_counter() - waited)
        finally:
            finishing = time.perf_counter()
            # whatever happened, keep what was completed
            pool.shutdown(wait=True, cancel_futures=True)
            try:
                io.finalise_manifest(self.manifest, {})
            except OSError as exc:
                raise OutputError(f"cannot write {self.manifest}: {exc.strerror or exc}") from None
            finally:
                journal.close()  # the lock goes with it, once the journal is folded in
            io.remove_temporaries(  # all of this shard's, also those an interrupted --overwrite left
                config.out_dir / rel
                for image in self.images
                for pair in output_names(image.key, config.method, config.fmt, self.target.count)
                for rel in pair
            )
            self._add_time("finish", time.perf_counter() - finishing)
        summary.seconds = time.perf_counter() - started
        summary.timings = dict(self.timings)
        return summary


def explain(
    config: ExplainConfig,
    progress: Callable[[list[dict[str, Any]]], None] | None = None,
    stop: threading.Event | None = None,
) -> Summary:
    """Prepare and run ``config`` in one call (what ``camx explain`` does)."""
    return Explainer(config).run(progress, stop)

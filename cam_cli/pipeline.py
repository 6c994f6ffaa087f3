"""One ``camx explain`` run: discover -> decode (DataLoader workers) -> batch ->
device -> explain -> post-process and write (thread pool) -> manifest.

Memory stays flat in the number of images: images stream through a bounded
number of batches, and each record reaches the manifest journal once its files
are complete, so a killed run resumes where it stopped.
"""

from __future__ import annotations

import contextlib
import ctypes
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
import torchvision.transforms.v2.functional as TF
from torch.utils.data import DataLoader, Dataset

from cam_cli import io, render
from cam_cli.errors import CamxError, DecodeError, DeviceError, InputError, ModelError, OutputError
from cam_cli.layers import cam_head, resolve_target, run_probe
from cam_cli.methods import CAM, GradCAM
from cam_cli.methods.base import ClassChooser, TargetLayer
from cam_cli.models import Classifier, load_classifier

PRECISIONS = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}
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


# ----------------------------------------------------------------------- devices


def resolve_device(spec: str) -> torch.device:
    """``auto`` picks cuda, then mps, then cpu; an absent device is an error."""
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise DeviceError(f"unknown device {spec!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device {spec} requested but CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(f"device {spec} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
    elif device.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise DeviceError(f"device {spec} requested but MPS is not available on this machine")
    elif device.type != "cpu":
        raise DeviceError(f"unsupported device {spec!r}; use auto, cpu, cuda, cuda:N or mps")
    return device


_PR_SET_PDEATHSIG = 1
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


def tune_allocator() -> bool:
    """Keep glibc malloc from mapping and unmapping every large activation.

    Batch activations are above glibc's mmap threshold, so by default every
    layer maps fresh zeroed pages and returns them afterwards (hundreds of
    thousands of page faults per batch). Serving them from the heap and not
    trimming it (the effect of ``MALLOC_MMAP_MAX_=0`` and a high
    ``MALLOC_TRIM_THRESHOLD_``) makes CPU inference markedly faster. Applies to
    this process and to DataLoader workers forked after it; a no-op off glibc.
    Returns whether the settings were applied.
    """
    global _allocator_tuned
    if _allocator_tuned is not None:
        return _allocator_tuned
    _allocator_tuned = False
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL("libc.so.6")
            _allocator_tuned = bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30))
        except (OSError, AttributeError):
            _allocator_tuned = False
    return _allocator_tuned


_allocator_tuned: bool | None = None


def use_ieee_fp32() -> None:
    """Make float32 mean IEEE float32 on CUDA.

    cuDNN runs float32 convolutions in TF32 by default on Ampere and later
    GPUs (about 1e-3 relative error), which would make ``--precision fp32``
    maps differ from the CPU's by far more than float32 rounding. Matrix
    products already default to full float32.
    """
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is not None and hasattr(conv, "fp32_precision"):
        conv.fp32_precision = "ieee"
    else:  # torch before 2.9
        torch.backends.cudnn.allow_tf32 = False


def default_workers() -> int:
    """Decoding workers: the cores the model leaves over, at least one, at most 8."""
    return max(1, min(8, (os.cpu_count() or 2) - 1))


# ------------------------------------------------------------------------ targets


@dataclass(frozen=True)
class TargetSpec:
    """``--target`` resolved against the model: top-K classes or one fixed class."""

    text: str
    top: int = 1
    index: int | None = None

    @property
    def count(self) -> int:
        return 1 if self.index is not None else self.top

    def chooser(self) -> ClassChooser:
        if self.index is not None:
            index = self.index
            return lambda logits: torch.full((logits.shape[0], 1), index, dtype=torch.long, device=logits.device)
        top = self.top
        return lambda logits: logits.topk(top, dim=1).indices


def parse_target(text: str, classifier: Classifier, num_classes: int) -> TargetSpec:
    value = text.strip()
    lowered = value.lower()
    if lowered.startswith("top") and lowered[3:].isdigit():
        k = int(lowered[3:])
        if not 1 <= k <= num_classes:
            raise ModelError(f"--target {text}: K must be between 1 and {num_classes}")
        return TargetSpec(lowered, top=k)
    if value.lstrip("-").isdigit():
        index = int(value)
        if not 0 <= index < num_classes:
            raise ModelError(f"--target {text}: class index out of range 0..{num_classes - 1}")
        return TargetSpec(str(index), index=index)  # 007 and 7 are one target
    names = classifier.categories or []
    for exact in (True, False):
        for i, name in enumerate(names):
            if (name == value) if exact else (name.lower() == lowered):
                return TargetSpec(str(i), index=i)  # recorded by index, however named
    if not names:
        raise ModelError(f"--target {text!r}: this model has no class names; give an index or --labels FILE")
    import difflib

    close = difflib.get_close_matches(value, names, n=3)
    hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
    raise ModelError(f"--target {text!r} is not a class of this model{hint}")


# ------------------------------------------------------------------------ loading


@dataclass
class Item:
    index: int
    image: torch.Tensor | None  # (3, S, S) uint8, resized for the model
    original: torch.Tensor | None  # (H, W, 3) uint8, as the viewer shows it
    error: str | None


class ImageDataset(Dataset[Item]):
    """Decodes and resizes one image per item; failures become ``Item.error``."""

    def __init__(self, images: Sequence[io.InputImage], size: int, max_pixels: int) -> None:
        self.images = images
        self.size = size
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Item:
        try:
            array = io.decode_image(self.images[index].path, self.max_pixels)
        except DecodeError as exc:
            return Item(index, None, None, str(exc))
        original = torch.from_numpy(array)
        chw = original.permute(2, 0, 1)
        # The whole image, no centre crop, so the map covers all of it.
        resized = TF.resize(chw, [self.size, self.size], antialias=True)
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


def _ignore_sigint(_: int) -> None:
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


def _yield_to_the_model() -> None:
    """Lowest CPU priority for a writer thread (Linux: a thread's own nice value).

    The model's intra-op threads synchronise at every operator, so a writer that
    pre-empts one of them stalls all of them. At nice 19 writers mostly run in
    the gaps the model leaves (data waits, serial sections); when they fall
    behind, the bounded queue of pending batches makes the main thread wait,
    and they catch up.
    """
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)


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
        loader = DataLoader(
            ImageDataset(todo, self.classifier.input_size, config.max_pixels),
            batch_size=config.batch_size,
            shuffle=False,
            num_workers=workers if todo else 0,
            collate_fn=collate,
            pin_memory=self.device.type == "cuda",
            worker_init_fn=_ignore_sigint if workers else None,
            prefetch_factor=2 if workers and todo else None,
            persistent_workers=False,
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

"""The writer stage: per (image, method) a finite check, render, encode and atomic
write, giving the method's manifest record. Runs in writer threads while the
next batch computes."""

from __future__ import annotations

import contextlib
import math
import os
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from cam_cli import render, rundir
from cam_cli.errors import OutputError
from cam_cli.images import InputImage
from cam_cli.rundir.plan import ResumePlan

JPEG_MAX_SIDE = 65500
DEVICE_RENDER_MAX_PIXELS = 1 << 24


class ImageFailed(Exception):
    """This (image, method) cannot be explained (its reason is the message); the run goes on."""


@dataclass
class MethodResult:
    """One method's raw maps of one image: ``maps`` ``(R, h, w)``, a class and score per map;
    ``gradients`` ``(R, 3, S, S)``: the image behind each map (guided methods), else None."""

    method: str
    maps: torch.Tensor
    classes: list[int]
    scores: list[float]
    #: per map, what the method says of it beyond its class (DFF: the concept and its top classes)
    details: list[dict[str, Any]] | None = None
    gradients: torch.Tensor | None = None
    #: why this image's target cannot be explained (a segmentation class covering no pixel)
    error: str | None = None


def encode(bgr: np.ndarray, fmt: str) -> bytes:
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


def yield_to_the_model() -> None:
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


def writer_pool(on_cpu: bool) -> ThreadPoolExecutor:
    """Writer threads; niced when the model runs on the CPU (no intra-op threads to stall on a GPU)."""
    nice = on_cpu and os.environ.get("CAMX_WRITER_NICE", "1") != "0"
    return ThreadPoolExecutor(
        max_workers=max(2, min(8, os.cpu_count() or 2)),
        thread_name_prefix="camx-writer",
        initializer=yield_to_the_model if nice else None,
    )


@dataclass
class Writer:
    plan: ResumePlan
    out_dir: Path
    fmt: str
    alpha: float
    boxes: bool
    draw_boxes: bool
    box_threshold: float
    add_time: Callable[[str, float], None]
    #: the fields of the first target's details that the manifest line repeats (the readout's)
    target_fields: tuple[str, ...] = ()

    def write_image(self, image: InputImage, original: torch.Tensor, results: list[MethodResult]) -> list[dict]:
        """Every method's outputs of one image; one record per method (``error`` ones included)."""
        started = time.perf_counter()
        records = []
        for result in results:
            if result.error is not None:
                records.append(self.plan.record(image, result.method, status="error", error=result.error))
                continue
            try:
                records.append(self._write(image, original, result))
            except ImageFailed as exc:
                records.append(self.plan.record(image, result.method, status="error", error=str(exc)))
            except OSError as exc:  # the disk, not the image: stop, keeping what is done
                raise OutputError(f"cannot write outputs of {image.path}: {exc.strerror or exc}") from None
            except Exception as exc:  # this image's outputs only (e.g. too large for JPEG)
                reason = " ".join(str(exc).split())[:300] or type(exc).__name__
                error = f"cannot render outputs: {reason}"
                records.append(self.plan.record(image, result.method, status="error", error=error))
        self.add_time("postprocess_write", time.perf_counter() - started)
        return records

    def _write(self, image: InputImage, original: torch.Tensor, result: MethodResult) -> dict[str, Any]:
        maps, classes, scores = result.maps, result.classes, result.scores
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
        render_map = self._renderer(maps, raw, original)
        flat_maps = (raw if raw is not None else maps.detach().cpu().numpy()) if len(maps) else None
        gradients = None if result.gradients is None else result.gradients.detach().float().cpu().numpy()
        gradient_names = self.plan.gradient_names(image.key, result.method)
        if gradient_names is not None and gradients is None:
            raise ImageFailed(f"{result.method} gave no gradient image")
        targets: list[dict[str, Any]] = []
        pictures: list[bytes] = []
        staged: list[Path] = []  # each map's .npy, written once rendered, renamed into place at the end
        try:
            for r, (overlay_rel, map_rel) in enumerate(self.plan.names(image.key, result.method)):
                entry = self._entry(r, classes, scores, overlay_rel, map_rel, result.details)
                if gradient_names is not None:
                    entry["gradient"] = gradient_names[r]
                if flat_maps is not None and render.is_flat(flat_maps[r]):
                    entry["flat"] = True
                norm, overlay = render_map(r)
                # guided methods show their gradient image, not the map over the image
                picture = overlay if gradients is None else render.gradient_picture(gradients[r], height, width)
                if self.boxes or self.draw_boxes:  # a drawn box is recorded too
                    box = render.localisation_box(norm, self.box_threshold)
                    entry["box"] = list(box) if box is not None else None
                    if self.draw_boxes and box is not None:
                        picture = render.draw_box(picture.copy(), box)
                pictures.append(encode(picture, self.fmt))  # may refuse this image: nothing in place yet
                staged.append(rundir.stage_npy(self.out_dir / map_rel, norm))
                targets.append(entry)
                del norm, overlay, picture
            for r, entry in enumerate(targets):
                os.replace(staged[r], self.out_dir / entry["map"])
                if gradients is not None and "gradient" in entry:
                    rundir.write_npy(self.out_dir / entry["gradient"], gradients[r])
                rundir.write_atomic(self.out_dir / entry["overlay"], pictures[r])
        except BaseException:
            for tmp in staged:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
            raise
        return self._record(image, result.method, targets, width, height)

    def _renderer(
        self, maps: torch.Tensor, raw: np.ndarray | None, original: torch.Tensor
    ) -> Callable[[int], tuple[np.ndarray, np.ndarray]]:
        """``render_map(r)``: map ``r``'s normalised map ``(H, W)`` float32 and overlay ``(H, W, 3)``
        BGR. On the CPU one map at a time, its overlay in one buffer reused for every map, so a
        huge image holds one full-size float32 map and one overlay besides itself."""
        if raw is None:
            with torch.inference_mode():
                norms, overlays = render.render_on_device(maps, original, self.alpha)
            return lambda r: (norms[r], overlays[r])
        image = original.numpy()
        buffer = np.empty((*image.shape[:2], 3), dtype=np.uint8)

        def render_map(r: int) -> tuple[np.ndarray, np.ndarray]:
            norm = render.upsample_normalise_opencv(raw[r], image.shape[0], image.shape[1])
            return norm, render.overlay_opencv(norm, image, self.alpha, out=buffer)

        return render_map

    def _entry(
        self, r: int, classes: list[int], scores: list[float], overlay_rel: str, map_rel: str,
        details: list[dict[str, Any]] | None,
    ) -> dict[str, Any]:  # fmt: skip
        entry: dict[str, Any] = {
            "rank": r + 1,
            "class_index": classes[r],
            "class_name": self.plan.class_name(classes[r]),
            "score": round(scores[r], 6),
            "overlay": overlay_rel,
            "map": map_rel,
        }
        if details is not None:
            entry.update(details[r])
            if "concept_classes" in entry:
                entry["concept_class_names"] = [self.plan.class_name(c) for c in entry["concept_classes"]]
        return entry

    def _record(self, image: InputImage, method: str, targets: list[dict[str, Any]], width: int,
                height: int) -> dict[str, Any]:  # fmt: skip
        first = targets[0]
        extra = {"box": first["box"]} if self.boxes or self.draw_boxes else {}
        if "gradient" in first:
            extra["gradient"] = first["gradient"]
        extra.update({name: first[name] for name in self.target_fields if name in first})
        if any(t.get("flat") for t in targets):
            extra["flat"] = True  # constant before min-max: an all-zero map that explains nothing
        return self.plan.record(
            image,
            method,
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

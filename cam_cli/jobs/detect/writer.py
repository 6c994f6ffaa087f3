"""Writing a detection run's outputs: per image and method, one overlay and map per
detection (its box and label drawn on the overlay) and one manifest line each."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from cam_cli import render, rundir
from cam_cli.images import InputImage
from cam_cli.jobs.detect.plan import NONE_VARIANT, DetectionPlan, detection_variant
from cam_cli.jobs.explain.writer import encode
from cam_cli.methods.detection import Detections


def draw_detection(picture: np.ndarray, box: list[float], caption: str) -> np.ndarray:
    """``picture`` (BGR uint8) with ``box`` (x1, y1, x2, y2) outlined and ``caption`` above it."""
    out = np.ascontiguousarray(picture.copy())
    x1, y1, x2, y2 = (round(v) for v in box)
    thickness = max(1, round(min(out.shape[:2]) / 250))
    cv2.rectangle(out, (x1, y1), (x2, y2), (0, 0, 0), thickness + 2)
    cv2.rectangle(out, (x1, y1), (x2, y2), (255, 255, 255), thickness)
    scale = max(0.4, min(out.shape[:2]) / 600)
    (w, h), base = cv2.getTextSize(caption, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
    top = y1 - h - base - 2 if y1 - h - base - 2 >= 0 else y1
    cv2.rectangle(out, (x1, top), (x1 + w + 4, top + h + base + 2), (255, 255, 255), -1)
    cv2.putText(out, caption, (x1 + 2, top + h + 1), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 1, cv2.LINE_AA)
    return out


@dataclass
class DetectionWriter:
    plan: DetectionPlan
    out_dir: Path
    alpha: float
    class_name: Callable[[int], str | None]

    def _describe(self, detections: Detections, r: int) -> dict[str, Any]:
        label = int(detections.labels[r])
        return {
            "class_index": label,
            "class_name": self.class_name(label),
            "score": round(float(detections.scores[r]), 6),
            "det_box": [round(float(v), 2) for v in detections.boxes[r]],
        }

    def _caption(self, entry: dict[str, Any]) -> str:
        return f"{entry['class_name'] or entry['class_index']} {entry['score']:.2f}"

    def write_image(self, image: InputImage, original: torch.Tensor, detections: Detections,
                    maps: dict[str, torch.Tensor]) -> list[dict[str, Any]]:  # fmt: skip
        """Every method's lines for one image (an ``error`` line where its maps are not finite)."""
        records: list[dict[str, Any]] = []
        rgb = original.numpy()
        height, width = rgb.shape[:2]
        described = [self._describe(detections, r) for r in range(len(detections))]
        for method in self.plan.missing[image.key]:
            raw = maps.get(method)
            array = None if raw is None else raw.cpu().numpy()
            if (array is not None and not np.isfinite(array).all()) or not all(math.isfinite(d["score"])
                                                                                for d in described):  # fmt: skip
                error = "the model gave non-finite values (NaN or inf) for this image; check --weights"
                records.append(self.plan.record(image, method, status="error", error=error))
                continue
            names = self.plan.names(image.key, method)
            base = {"width": width, "height": height, "detections": len(detections)}
            if method in self.plan.agnostic:
                assert array is not None
                records.append(self._agnostic(image, method, rgb, array[0], names[0], described, base))
                continue
            if not described:
                records.append(self.plan.line(image, method, NONE_VARIANT, **base))
                continue
            assert array is not None
            norms, overlays = render.render_with_opencv(array, rgb, self.alpha)
            for r, entry in enumerate(described):
                overlay_rel, map_rel = names[r]
                picture = draw_detection(overlays[r], entry["det_box"], self._caption(entry))
                rundir.write_npy(self.out_dir / map_rel, norms[r])
                rundir.write_atomic(self.out_dir / overlay_rel, encode(picture, self.plan.fmt))
                fields = {**entry, **base, "detection": r, "overlay": overlay_rel, "map": map_rel}
                if render.is_flat(array[r]):
                    fields["flat"] = True
                records.append(self.plan.line(image, method, detection_variant(r), **fields))
        return records

    def _agnostic(self, image: InputImage, method: str, rgb: np.ndarray, array: np.ndarray, names: tuple[str, str],
                  described: list[dict[str, Any]], base: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
        """One map for the image; the overlay shows every chosen detection's box."""
        norms, overlays = render.render_with_opencv(array[None], rgb, self.alpha)
        picture = overlays[0]
        for entry in described:
            picture = draw_detection(picture, entry["det_box"], self._caption(entry))
        overlay_rel, map_rel = names
        rundir.write_npy(self.out_dir / map_rel, norms[0])
        rundir.write_atomic(self.out_dir / overlay_rel, encode(picture, self.plan.fmt))
        fields: dict[str, Any] = {**base, "overlay": overlay_rel, "map": map_rel, "boxes_shown": described}
        if render.is_flat(array):
            fields["flat"] = True
        return self.plan.record(image, method, **fields)

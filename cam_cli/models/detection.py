"""torchvision's detection models by name (``fasterrcnn_resnet50_fpn``, ``retinanet_*``,
``fcos_*``, ``ssd*``, and the boxes of ``maskrcnn_*`` / ``keypointrcnn_*``).

They take a list of images in [0, 1] at their own sizes and resize them internally
(``GeneralizedRCNNTransform``); in eval mode they return, per image, a dict of
``boxes`` ``(D, 4)`` (x1, y1, x2, y2 in the image's own pixels), ``labels`` and
``scores``. The default target layer is chosen from the structure
(:func:`default_layer`).
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torchvision
from torch import nn

from cam_cli.errors import ModelError, WeightsError
from cam_cli.models.base import (
    apply_state_dict,
    checkpoint_dir,
    load_state_dict,
    looks_like_path,
    seeded,
    unreadable,
    weights_only_loading,
)
from cam_cli.models.torchvision_models import _chosen_weights, _weights_enum

TASK = "detection"


def detection_models() -> list[str]:
    """Every detection model torchvision registers."""
    return sorted(torchvision.models.list_models(module=torchvision.models.detection))


def is_detection_model(name: str) -> bool:
    return name.strip() in detection_models()


@dataclass
class Detector:
    """A frozen detection model in eval mode and what names its outputs.

    ``categories``: class names by label index (COCO's for torchvision's weights,
    ``__background__`` first), or None."""

    module: nn.Module
    name: str
    weights: str
    categories: list[str] | None

    def class_name(self, label: int) -> str | None:
        names = self.categories
        return names[label] if names is not None and 0 <= label < len(names) else None

    def label_index(self, text: str) -> int | None:
        """The label a class name (any case) or index names; None when none."""
        value = text.strip()
        if value.isdigit():
            return int(value)
        for i, name in enumerate(self.categories or []):
            if name.lower() == value.lower():
                return i
        return None


def _load_pretrained(name: str, chosen: Any) -> nn.Module:
    target = checkpoint_dir() / os.path.basename(chosen.url)
    try:
        with weights_only_loading(), contextlib.redirect_stdout(sys.stderr):
            return torchvision.models.get_model(name, weights=chosen, progress=False)
    except Exception as exc:
        if target.exists():
            raise WeightsError(f"cannot read cached weights {target}: {unreadable(target, exc)}") from None
        raise WeightsError(
            f"cannot download weights {chosen} for {name} (offline?): put "
            f"{target.name} in {target.parent} or pass --weights PATH"
        ) from None


def _build(name: str) -> nn.Module:
    """``name`` without any weights (its backbone's ImageNet weights included)."""
    return torchvision.models.get_model(name, weights=None, weights_backbone=None)


def load_detector(name: str, weights: str = "DEFAULT", seed: int = 0) -> Detector:
    """``name`` with ``--weights``: DEFAULT, an enum member's name, NONE (random, seeded
    with ``seed``) or a checkpoint path (a state dict of the whole model)."""
    name = name.strip()
    if not is_detection_model(name):
        raise ModelError(f"unknown detection model {name!r}; `camx models` lists them")
    enum = _weights_enum(name)
    default = enum.DEFAULT if enum is not None else None
    spec = weights.strip()
    chosen = _chosen_weights(name, enum, default, spec)
    categories = list(default.meta["categories"]) if default is not None else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if chosen is not None:
            module, label = _load_pretrained(name, chosen), str(chosen)
            categories = list(chosen.meta["categories"])
        elif spec.upper() == "NONE":
            with seeded(seed):
                module, label = _build(name), "NONE"
        else:
            path = Path(spec)
            if not looks_like_path(spec) and not path.exists():
                raise WeightsError(f"unknown weights {spec!r} for {name}")
            state = load_state_dict(path)
            module, label = _build(name), str(path)
            apply_state_dict(module, state, str(path))
    module.eval()
    for parameter in module.parameters():
        parameter.requires_grad_(False)
    return Detector(module, name, label, categories)


def lower_threshold(module: nn.Module, min_score: float) -> None:
    """Let the model report detections down to ``min_score`` (its own threshold may be
    higher: 0.05 for Faster R-CNN, 0.2 for FCOS); the run filters by ``min_score``."""
    owner = getattr(module, "roi_heads", module)
    current = getattr(owner, "score_thresh", None)
    if isinstance(current, float) and min_score < current:
        owner.score_thresh = min_score


def default_layer(module: nn.Module) -> tuple[str, str]:
    """The default target layer and why, from the model's structure.

    An FPN backbone (Faster/Mask/Keypoint R-CNN, RetinaNet, FCOS): the deepest stage
    of its body, the last layer it returns to the FPN. The FPN's top-down pathway
    carries it into every pyramid level, so every detection depends on it; a finer
    level would miss the detections made on coarser ones. An SSD backbone: the first
    feature map handed to the head (VGG's ``features``, MobileNet's ``features.0``),
    from which every later map is computed, for the same reason."""
    backbone = getattr(module, "backbone", None)
    body = getattr(backbone, "body", None)
    returned = getattr(body, "return_layers", None)
    if isinstance(returned, dict) and returned:
        last = list(returned)[-1]
        return f"backbone.body.{last}", "the deepest backbone stage: every FPN level, so every detection, depends on it"
    features = getattr(backbone, "features", None)
    if isinstance(features, nn.Sequential):
        name = "backbone.features.0" if type(backbone).__name__.startswith("SSDLite") else "backbone.features"
        return name, "the first feature map the SSD head reads: every later one, so every detection, depends on it"
    raise ModelError(f"{type(module).__name__}: no FPN or SSD backbone to choose a layer from; give --layer")


#: :func:`default_layer` of each model, for ``camx models`` (which builds none); a test
#: checks every entry against the built model
DEFAULT_LAYERS = {
    "fasterrcnn_mobilenet_v3_large_320_fpn": "backbone.body.16",
    "fasterrcnn_mobilenet_v3_large_fpn": "backbone.body.16",
    "ssd300_vgg16": "backbone.features",
    "ssdlite320_mobilenet_v3_large": "backbone.features.0",
}


def listed_default_layer(name: str) -> str:
    """The default layer of ``name`` without building it (FPN models on a ResNet: ``layer4``)."""
    return DEFAULT_LAYERS.get(name, "backbone.body.layer4")


def describe_detection_models(pattern: str | None = None) -> list[dict[str, Any]]:
    """``camx models`` rows of the detection models (``pattern``: fnmatch on the name)."""
    import fnmatch

    return [
        {"model": name, "task": TASK, "cam": False, "layer": listed_default_layer(name), "input_size": None,
         "reason": "a detector: one map per detection (gradient and class-agnostic methods)"}
        for name in detection_models()
        if pattern is None or fnmatch.fnmatch(name, pattern)
    ]  # fmt: skip


def layer_shapes(module: nn.Module, size: tuple[int, int] = (320, 480)) -> list[tuple[str, str, tuple[int, ...]]]:
    """Every submodule whose output is a 4-d tensor in one pass over a grey image of
    ``size``: ``(name, type, shape)`` in the order they run."""
    import torch

    found: list[tuple[str, str, tuple[int, ...]]] = []
    seen: set[str] = set()
    handles = []
    for name, sub in module.named_modules():
        if not name or name == "transform":
            continue

        def hook(m: nn.Module, _: Any, out: Any, name: str = name) -> None:
            if isinstance(out, torch.Tensor) and out.dim() == 4 and name not in seen:
                seen.add(name)
                found.append((name, type(m).__name__, tuple(out.shape)))

        handles.append(sub.register_forward_hook(hook))
    try:
        with torch.inference_mode():
            module([torch.full((3, *size), 0.5)])
    finally:
        for handle in handles:
            handle.remove()
    return found

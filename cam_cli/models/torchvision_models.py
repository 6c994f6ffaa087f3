"""torchvision's classifiers by name (``resnet50``), looked up with
``torchvision.models.get_model`` and ``get_model_weights``."""

from __future__ import annotations

import contextlib
import os
import pickle
import sys
import warnings
from pathlib import Path
from typing import Any

import torchvision
from torch import nn

from cam_cli.errors import ModelError, WeightsError
from cam_cli.models.base import (
    DEFAULT_INPUT_SIZE,
    IMAGENET_MEAN,
    IMAGENET_STD,
    LoadedModel,
    apply_state_dict,
    checkpoint_dir,
    load_state_dict,
    looks_like_path,
    num_classes_in,
    unreadable,
    weights_only_loading,
)


def classification_models() -> list[str]:
    """Every classification model torchvision registers (not detection etc.)."""
    return sorted(torchvision.models.list_models(module=torchvision.models))


def _weights_enum(name: str) -> Any:
    try:
        return torchvision.models.get_model_weights(name)
    except (ValueError, KeyError):
        return None


def _transform_params(weights: Any) -> tuple[int, tuple[float, ...], tuple[float, ...]]:
    transform = weights.transforms()
    size = getattr(transform, "crop_size", None) or transform.resize_size  # segmentation: no crop
    return int(size[0]), tuple(transform.mean), tuple(transform.std)


def _build(name: str, size: int, **kwargs: Any) -> nn.Module:
    """``get_model`` without weights; a ViT (which has an ``image_size``) is built for ``size``."""
    try:
        module = torchvision.models.get_model(name, weights=None, **kwargs)
        if isinstance(getattr(module, "image_size", None), int) and module.image_size != size:
            module = torchvision.models.get_model(name, weights=None, image_size=size, **kwargs)
    except (AssertionError, RuntimeError, TypeError, ValueError) as exc:
        message = " ".join(str(exc).split())[:200]
        raise ModelError(f"cannot build {name} for {size}x{size} inputs: {message}") from None
    return module


def _chosen_weights(name: str, enum: Any, default: Any, spec: str) -> Any:
    """The weights enum member ``--weights`` names (``DEFAULT`` or a member's name), or
    ``None`` for ``NONE`` and a path."""
    if spec.upper() == "DEFAULT":
        if default is None:
            raise WeightsError(f"{name} has no pretrained weights in torchvision; use --weights NONE or a path")
        return default
    if spec.upper() == "NONE" or looks_like_path(spec):
        return None
    if enum is None:
        raise WeightsError(f"unknown weights {spec!r} for {name}")
    member = spec.split(".")[-1]
    try:
        return enum[member]
    except KeyError:
        valid = ", ".join(["DEFAULT", "NONE", *(w.name for w in enum)])
        raise WeightsError(
            f"unknown weights {spec!r} for {name}; expected one of {valid}, or a path to a .pth file"
        ) from None


def _load_pretrained(name: str, chosen: Any, num_classes: int | None, input_size: int | None) -> LoadedModel:
    """``name`` with torchvision's weights ``chosen``, from torch.hub's cache or downloaded."""
    if num_classes is not None and num_classes != len(chosen.meta["categories"]):
        raise WeightsError(
            f"--num-classes {num_classes} does not match {chosen} "
            f"({len(chosen.meta['categories'])} classes); pass fine-tuned weights as a path"
        )
    target = checkpoint_dir() / os.path.basename(chosen.url)
    try:
        # torch.hub announces a download on stdout, which belongs to --json: send it to stderr
        with weights_only_loading(), contextlib.redirect_stdout(sys.stderr):
            module = torchvision.models.get_model(name, weights=chosen, progress=False)
    except pickle.UnpicklingError as exc:
        if "unsupported global" not in str(exc).lower():
            raise WeightsError(f"cannot read cached weights {target}: not a PyTorch checkpoint") from None
        raise WeightsError(
            f"refusing to load {target}: it holds objects other than tensors, and loading it could "
            "run code (torch.load with weights_only=True rejected it)"
        ) from None
    except Exception as exc:
        if target.exists():
            raise WeightsError(f"cannot read cached weights {target}: {unreadable(target, exc)}") from None
        raise WeightsError(
            f"cannot download weights {chosen} for {name} (offline?): put "
            f"{target.name} in {target.parent} or pass --weights PATH"
        ) from None
    size, mean, std = _transform_params(chosen)
    fixed = getattr(module, "image_size", None)
    if isinstance(fixed, int) and input_size is not None and input_size != fixed:
        raise ModelError(
            f"{name} with pretrained weights takes {fixed}x{fixed} inputs only (its position "
            f"embeddings are learnt for that size): drop --input-size {input_size}, or use --weights NONE"
        )
    return LoadedModel(module, str(chosen), size, mean, std, list(chosen.meta["categories"]))


def load_torchvision(name: str, weights: str, num_classes: int | None, input_size: int | None = None) -> LoadedModel:
    enum = _weights_enum(name)
    default = enum.DEFAULT if enum is not None else None
    size, mean, std = (
        _transform_params(default) if default is not None else (DEFAULT_INPUT_SIZE, IMAGENET_MEAN, IMAGENET_STD)
    )
    spec = weights.strip()
    chosen = _chosen_weights(name, enum, default, spec)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if chosen is not None:
            return _load_pretrained(name, chosen, num_classes, input_size)
        kwargs: dict[str, Any] = {}
        if num_classes is not None:
            kwargs["num_classes"] = num_classes
        size = input_size or size
        if spec.upper() == "NONE":
            return LoadedModel(_build(name, size, **kwargs), "NONE", size, mean, std)
        path = Path(spec)
        state = load_state_dict(path)
        module = _build(name, size, **kwargs)
        found = num_classes_in(state, module)
        if num_classes is None and found is not None and found != num_classes_in(module.state_dict(), module):
            module = _build(name, size, num_classes=found)
        apply_state_dict(module, state, str(path))
        return LoadedModel(module, str(path), size, mean, std)

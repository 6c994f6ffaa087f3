"""``package.module:factory``: a callable (or a module object) that gives an ``nn.Module``."""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from typing import Any

from torch import nn

from cam_cli.errors import ModelError
from cam_cli.models.base import LoadedModel, apply_state_dict, is_keyword, load_state_dict


def load_factory(spec: str, weights: str) -> LoadedModel:
    module_name, _, attr = spec.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        mod = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or module_name
        where = (
            f"{module_name} is imported from the current folder ({os.getcwd()}) or PYTHONPATH"
            if missing.split(".")[0] == module_name.split(".")[0]
            else f"{module_name} needs {missing!r}, which is not installed"
        )
        raise ModelError(f"cannot import {module_name!r} for --model {spec}: {exc} ({where})") from None
    except Exception as exc:  # an import runs user code: any failure is reported
        raise ModelError(f"cannot import {module_name!r} for --model {spec}: {exc}") from None
    factory: Any = mod
    for part in attr.split("."):
        factory = getattr(factory, part, None)
        if factory is None:
            raise ModelError(f"{module_name} has no attribute {attr!r} (from --model {spec})")
    try:
        built = factory() if callable(factory) and not isinstance(factory, nn.Module) else factory
    except Exception as exc:
        raise ModelError(f"--model {spec}: the factory failed: {exc}") from None
    if not isinstance(built, nn.Module):
        raise ModelError(f"--model {spec} returned {type(built).__name__}, not a torch.nn.Module")
    label = "as built"
    if not is_keyword(weights, "DEFAULT") and not is_keyword(weights, "NONE"):
        apply_state_dict(built, load_state_dict(Path(weights)), weights)
        label = weights
    if isinstance(getattr(built, "pretrained_cfg", None), dict) and "timm" in sys.modules:
        # a timm model built by a factory: its own preprocessing, not ImageNet's
        from cam_cli.models.timm_models import timm_preprocessing

        size, mean, std, interpolation, notes = timm_preprocessing(built, None)
        return LoadedModel(built, label, size, mean, std, interpolation=interpolation, notes=notes)
    return LoadedModel(built, label)

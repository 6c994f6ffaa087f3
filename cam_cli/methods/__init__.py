"""The CAM methods camx offers. The registry (:mod:`cam_cli.methods.registry`,
torch-free) names them; the contract (:mod:`cam_cli.methods.base`), the batch
explainer (:mod:`cam_cli.methods.explain`) and the implementations are imported
on first use, so ``camx methods`` and the registry never load torch."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from cam_cli.methods.registry import METHODS, info, load, method_names, parse_methods

if TYPE_CHECKING:
    from cam_cli.methods.base import ClassChooser, Explanation, Method, MethodOptions, Setup, TargetLayer
    from cam_cli.methods.explain import BatchExplainer, MultiExplanation

_LAZY = {
    "BatchExplainer": "cam_cli.methods.explain",
    "MultiExplanation": "cam_cli.methods.explain",
    "ClassChooser": "cam_cli.methods.base",
    "Explanation": "cam_cli.methods.base",
    "Method": "cam_cli.methods.base",
    "MethodOptions": "cam_cli.methods.base",
    "Setup": "cam_cli.methods.base",
    "TargetLayer": "cam_cli.methods.base",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def create(name: str, options: MethodOptions | None = None) -> Method:
    """A new (unprepared) method by registry name."""
    method: Method = load(name)(options)
    return method


__all__ = [
    "METHODS",
    "BatchExplainer",
    "ClassChooser",
    "Explanation",
    "Method",
    "MethodOptions",
    "MultiExplanation",
    "Setup",
    "TargetLayer",
    "create",
    "info",
    "load",
    "method_names",
    "parse_methods",
]

"""Looking inside a model: the probe pass (:mod:`~cam_cli.probe.probe`), the hook
that captures a layer (:mod:`~cam_cli.probe.capture`), choosing and listing target
layers (:mod:`~cam_cli.probe.layers`), the head after them
(:mod:`~cam_cli.probe.head`) and the table of torchvision's models
(:mod:`~cam_cli.probe.catalog`). Below :mod:`cam_cli.methods`: nothing here
imports a method."""

from __future__ import annotations

from cam_cli.probe.capture import ActivationCapture, Layout, TargetLayer, resolve_module, to_feature_map
from cam_cli.probe.head import CamHead, cam_head, head_description
from cam_cli.probe.layers import (
    LayerRow,
    default_target,
    layers_label,
    list_layers,
    resolve_target,
    resolve_targets,
    target_for,
)
from cam_cli.probe.probe import Probe, Record, run_probe

__all__ = [
    "ActivationCapture",
    "CamHead",
    "LayerRow",
    "Layout",
    "Probe",
    "Record",
    "TargetLayer",
    "cam_head",
    "default_target",
    "head_description",
    "layers_label",
    "list_layers",
    "resolve_module",
    "resolve_target",
    "resolve_targets",
    "run_probe",
    "target_for",
    "to_feature_map",
]

"""The CAM methods camx offers, by the name used on the command line."""

from __future__ import annotations

from cam_cli.methods.base import Explanation, TargetLayer
from cam_cli.methods.cam import CAM
from cam_cli.methods.gradcam import GradCAM

METHODS = ("gradcam", "cam")

__all__ = ["CAM", "METHODS", "Explanation", "GradCAM", "TargetLayer"]

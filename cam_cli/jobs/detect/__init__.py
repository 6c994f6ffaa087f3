"""``camx explain`` over a detection model: one map per detection (:mod:`.run`)."""

from cam_cli.jobs.detect.run import DetectionRun

__all__ = ["DetectionRun"]

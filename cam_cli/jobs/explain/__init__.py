"""``camx explain``: maps and overlays for every input and method."""

from __future__ import annotations

from cam_cli.jobs.explain.run import ExplainConfig, Explainer, Summary, explain

__all__ = ["ExplainConfig", "Explainer", "Summary", "explain"]

"""``camx evaluate``: faithfulness and localisation metrics over a finished run."""

from __future__ import annotations

from cam_cli.jobs.evaluate.run import EvaluateConfig, EvaluateResult, Evaluator, evaluate, mean_ranks, rank_methods

__all__ = ["EvaluateConfig", "EvaluateResult", "Evaluator", "evaluate", "mean_ranks", "rank_methods"]

"""``camx evaluate``: faithfulness and localisation metrics over a finished run.

:mod:`~cam_cli.jobs.evaluate.run` ties the parts together: the options and result
(:mod:`~cam_cli.jobs.evaluate.config`), the models rebuilt
(:mod:`~cam_cli.jobs.evaluate.setups`), images and maps loaded
(:mod:`~cam_cli.jobs.evaluate.dataset`), the lines and what is done already
(:mod:`~cam_cli.jobs.evaluate.lines`), one setup's pairs scored
(:mod:`~cam_cli.jobs.evaluate.batches`), the methods run again for the metrics that need
it (:mod:`~cam_cli.jobs.evaluate.reexplain`, :mod:`~cam_cli.jobs.evaluate.randomise`) and the summary
(:mod:`~cam_cli.jobs.evaluate.summary`).
"""

from __future__ import annotations

from cam_cli.jobs.evaluate.config import EvaluateConfig, EvaluateResult
from cam_cli.jobs.evaluate.run import Evaluator, evaluate
from cam_cli.jobs.evaluate.summary import mean_ranks, rank_methods, shared_ranks

__all__ = [
    "EvaluateConfig",
    "EvaluateResult",
    "Evaluator",
    "evaluate",
    "mean_ranks",
    "rank_methods",
    "shared_ranks",
]

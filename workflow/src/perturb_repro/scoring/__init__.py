"""Scoring predictions with cell-eval: the input contract and the scoring step.

``score``, ``read_metrics`` and ``metric_value`` are loaded lazily so that
``python -m perturb_repro.scoring.celleval`` does not import its own module twice.
"""

from __future__ import annotations

from typing import Any

from perturb_repro.scoring.contract import check_prediction, check_truth

__all__ = ["check_prediction", "check_truth", "metric_value", "read_metrics", "score"]

_LAZY = {"score", "read_metrics", "metric_value", "main"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from perturb_repro.scoring import celleval

        return getattr(celleval, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

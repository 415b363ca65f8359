"""Replicate seeds in a paper table: a run's spread over seeds, and how a cell prints it.

A replicated run's metrics.csv / perturbench.csv (perturb_repro.scoring.replicates) hold, per metric, each
statistic S as the mean over seeds, ``S_seed_std`` (the std over seeds of the per-seed S) and ``n_seeds``. A
one-run file has neither column: one seed, no spread.
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from perturb_repro.scoring.replicates import N_SEEDS_COLUMN, SEED_STD_DDOF, SEED_STD_SUFFIX
from perturb_repro.tables.printed import format_value

__all__ = ["SEED_COLUMNS", "format_reproduced", "format_tolerance", "seed_spread"]

# A reproduced table's columns about seeds and tolerances (added with replicate seeds; readers may meet older files)
SEED_COLUMNS = ("reproduced_std", "n_seeds", "tolerance", "tolerance_from")

_TOLERANCE_LABELS = {"cell": "cell", "reported_std": "paper ± std", "table_default": "table default"}


def seed_spread(metrics: pd.DataFrame, metric: str, statistic: str) -> tuple[float, int]:
    """(std over seeds of ``statistic`` of ``metric``, number of seeds) in a metrics frame indexed by metric:
    (NaN, 1) for a one-run file."""
    if N_SEEDS_COLUMN not in metrics.columns or metric not in metrics.index:
        return math.nan, 1
    n_seeds = metrics.at[metric, N_SEEDS_COLUMN]
    std_column = statistic + SEED_STD_SUFFIX
    std = float(metrics.at[metric, std_column]) if std_column in metrics.columns else math.nan
    return std, int(n_seeds) if pd.notna(n_seeds) else 1


def format_reproduced(value: Any, seed_std: Any, n_seeds: Any, reported: str) -> str:
    """``value`` at the printed precision + 2 digits; with two or more seeds ``mean ± std (n seeds)``."""
    text = format_value(value, reported)
    if pd.notna(n_seeds) and int(n_seeds) >= 2 and text != "n/a":
        text += f" ± {format_value(seed_std, reported)} ({int(n_seeds)} seeds)"
    return text


def format_tolerance(tolerance: Any, source: Any) -> str:
    """A compared cell's within-noise tolerance and its origin, e.g. ``0.012 (paper ± std)``; empty if not compared."""
    if pd.isna(tolerance):
        return ""
    return f"{float(tolerance):g} ({_TOLERANCE_LABELS.get(str(source), str(source))})"


STD_NOTE = f"sample std over seeds (ddof {SEED_STD_DDOF})"

"""Model comparison data for the report: leaderboards and per-subgroup means.

A leaderboard row is one (dataset, model, metric): the run's mean over test conditions (for a run
replicated over seeds: the mean over seeds of that mean, with the std over seeds), whether the model is
one of the simple baselines, and whether it beats the best simple baseline of its dataset on that
metric -- the question Ahlmann-Eltze et al. (2025) made the first one to ask, after finding that
linear baselines match deep models on perturbation prediction.

Metric directions come from their owners: cell-eval's metric registry (``best_value`` ONE = higher
is better, ZERO = lower) and PerturBench's metric kinds in :mod:`perturb_repro.scoring.perturbench`
(similarity = higher, distance = lower; every rank = lower, 0 = the matching condition ranks first).
"""

from __future__ import annotations

import math
import os
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from perturb_repro.errors import PipelineInputError
from perturb_repro.io import read_csv_checked

PathLike = str | os.PathLike

# Columns of an aggregate over replicate seeds (perturb_repro.scoring.replicates, issue 17.1): per statistic S
# the std over seeds is `S_seed_std`, and `n_seeds` counts them. A one-run metrics.csv has neither.
SEED_STD_SUFFIX = "_seed_std"
N_SEEDS_COLUMN = "n_seeds"

HIGHER, LOWER = "higher", "lower"

LEADERBOARD_COLUMNS: tuple[str, ...] = (
    "dataset", "model", "model_type", "baseline", "metric", "direction", "value", "seed_std", "n_seeds",
    "best_baseline", "best_baseline_value", "margin", "beats_baseline",
)

# beats_baseline values: better than the best simple baseline by more than the run's seed std / worse / within it
BEATS, LOSES, TIE, WITHIN_NOISE, NOT_ASSESSED = "yes", "no", "tie", "within seed noise", "n/a"

SUBGROUP_COLUMNS: tuple[str, ...] = ("dataset", "model", "subgroup", "metric", "mean", "n_conditions")

# per-condition files name the condition column differently: cell-eval `perturbation`, PerturBench `condition`
_CONDITION_COLUMNS = ("perturbation", "condition")


@lru_cache(maxsize=None)
def metric_direction(metric: str) -> str | None:
    """``"higher"`` or ``"lower"`` (is better) for a cell-eval or PerturBench metric; None if unknown."""
    from perturb_repro.scoring import perturbench

    if any(metric.endswith(suffix) for suffix in perturbench.RANK_SUFFIXES):
        return LOWER
    if metric in perturbench.METRICS:
        return HIGHER if perturbench.METRICS[metric][2] == "similarity" else LOWER
    from cell_eval.metrics import metrics_registry

    try:
        best = metrics_registry.get_metric(metric).best_value.name
    except (KeyError, ValueError, AttributeError):
        return None
    return {"ONE": HIGHER, "ZERO": LOWER}.get(best)


def read_run_summary(paths: Iterable[PathLike | None]) -> pd.DataFrame:
    """One run's summaries (metrics.csv, perturbench.csv) as a frame indexed by metric.

    Columns ``value`` (the ``mean`` column: over conditions, and over seeds for a replicated run),
    ``seed_std`` (``mean_seed_std``, NaN for one run) and ``n_seeds`` (1 for one run). Absent paths
    (None or no file) are skipped; the first file wins for a metric both define.
    """
    rows: dict[str, dict[str, float]] = {}
    for path in paths:
        if path is None or str(path) == "" or not Path(path).is_file():
            continue
        frame = read_csv_checked(path, ("metric", "mean"))
        std_column = "mean" + SEED_STD_SUFFIX
        for record in frame.to_dict("records"):
            name = str(record["metric"])
            if name in rows:
                continue
            n_seeds = record.get(N_SEEDS_COLUMN, 1)
            rows[name] = {
                "value": pd.to_numeric(record["mean"], errors="coerce"),
                "seed_std": pd.to_numeric(record.get(std_column, math.nan), errors="coerce"),
                "n_seeds": int(n_seeds) if pd.notna(n_seeds) else 1,
            }
    out = pd.DataFrame.from_dict(rows, orient="index", columns=["value", "seed_std", "n_seeds"])
    out.index.name = "metric"
    return out.astype({"value": float, "seed_std": float, "n_seeds": int})


def _verdict(row: Mapping[str, Any]) -> str:
    if row["baseline"] or not math.isfinite(row["margin"]):
        return NOT_ASSESSED
    std = row["seed_std"]
    if row["n_seeds"] >= 2 and math.isfinite(std) and abs(row["margin"]) <= std:
        return WITHIN_NOISE
    if row["margin"] == 0:
        return TIE  # e.g. two models ranking the matching condition equally
    return BEATS if row["margin"] > 0 else LOSES


def leaderboard(
    runs: Sequence[Mapping[str, Any]], metrics: Sequence[str], baseline_types: Sequence[str]
) -> pd.DataFrame:
    """Models x metrics per dataset, with the best simple baseline and whether each model beats it.

    Args:
        runs: Mappings with ``dataset``, ``model``, optional ``model_type`` (default: the model key)
            and ``summaries`` (paths of metrics.csv / perturbench.csv; absent files skipped).
        metrics: Metrics to show, in column order; one no run of a dataset has is left out for it.
        baseline_types: Model types that count as simple baselines (control mean, additive, linear).

    Returns:
        Long frame, columns :data:`LEADERBOARD_COLUMNS`. ``margin`` is how much better the model is than
        the best baseline (positive = better, whatever the metric's direction); ``beats_baseline`` is
        ``yes``/``no``/``tie``/``within seed noise`` (|margin| <= the model's std over seeds)/``n/a`` (a baseline,
        no baseline value, or a metric without a known direction).
    """
    records = []
    for run in runs:
        summary = read_run_summary(run.get("summaries", ()))
        model_type = str(run.get("model_type") or run["model"])
        for metric in metrics:
            if metric not in summary.index:
                continue
            records.append(
                {
                    "dataset": str(run["dataset"]),
                    "model": str(run["model"]),
                    "model_type": model_type,
                    "baseline": model_type in baseline_types,
                    "metric": metric,
                    "direction": metric_direction(metric),
                    **summary.loc[metric].to_dict(),
                }
            )
    frame = pd.DataFrame.from_records(records, columns=list(LEADERBOARD_COLUMNS[:9]))
    frame["best_baseline"], frame["best_baseline_value"], frame["margin"] = None, math.nan, math.nan
    for (_, metric), group in frame.groupby(["dataset", "metric"], sort=False):
        direction = group["direction"].iloc[0]
        pool = group[group["baseline"] & np.isfinite(group["value"].astype(float))]
        if direction is None or pool.empty:
            continue
        best = pool.loc[pool["value"].idxmax() if direction == HIGHER else pool["value"].idxmin()]
        sign = 1.0 if direction == HIGHER else -1.0
        frame.loc[group.index, "best_baseline"] = best["model"]
        frame.loc[group.index, "best_baseline_value"] = best["value"]
        frame.loc[group.index, "margin"] = sign * (group["value"] - best["value"])
    frame["margin"] = frame["margin"].astype(float)
    frame["beats_baseline"] = [_verdict(r) for r in frame.to_dict("records")]
    return frame[list(LEADERBOARD_COLUMNS)]


# --------------------------------------------------------------------------------------------------
# Subgroups


def read_split_table(path: PathLike) -> pd.DataFrame:
    """The test rows of a split.csv: ``condition``, the group columns, ``subgroup``."""
    frame = read_csv_checked(path, ("condition", "split", "subgroup"), dtype=str, keep_default_na=False)
    return frame[frame["split"] == "test"].drop(columns=["split"]).reset_index(drop=True)


def _subgroup_label(subgroup: str, groups: Mapping[str, str]) -> str:
    """GEARS subgroups as they are (combo_seen0 ...); covariate-transfer ones per covariate value."""
    name = subgroup or "(no subgroup)"
    return name if not groups else f"{name} · " + ", ".join(f"{k}={v}" for k, v in groups.items())


def subgroup_means(
    dataset: str, split_csv: PathLike, per_condition: Mapping[str, Sequence[PathLike | None]], metrics: Sequence[str]
) -> pd.DataFrame:
    """Mean of each metric per (model, test subgroup), from the runs' per-condition files.

    Subgroups come from ``split.csv`` (GEARS: combo_seen0/1/2, unseen_single; PerturBench covariate
    transfer: the held-out subgroup per covariate value, e.g. ``cell_type=A172``). A per-condition row
    is matched by its condition and the group columns split.csv has.

    Args:
        dataset: Dataset key (the frame's ``dataset`` column).
        split_csv: The dataset's split.csv.
        per_condition: Model -> its per-condition files (cell-eval's per_condition.csv, PerturBench's
            perturbench_per_condition.csv); absent files are skipped.
        metrics: Metrics to average (a metric no file of a model has is left out for that model).

    Returns:
        Columns :data:`SUBGROUP_COLUMNS`; ``n_conditions`` counts the finite values averaged.

    Raises:
        PipelineInputError: If a per-condition row names a condition that is not a test row of split.csv.
    """
    split = read_split_table(split_csv)
    group_columns = [c for c in split.columns if c not in ("condition", "subgroup")]
    keys = ["condition", *group_columns]
    labels = {
        tuple(row[k] for k in keys): _subgroup_label(row["subgroup"], {c: row[c] for c in group_columns})
        for row in split.to_dict("records")
    }
    records = []
    for model, paths in per_condition.items():
        done: set[str] = set()
        for path in paths:
            if path is None or str(path) == "" or not Path(path).is_file():
                continue
            frame = pd.read_csv(path)
            condition_column = next((c for c in _CONDITION_COLUMNS if c in frame.columns), None)
            if condition_column is None:
                raise PipelineInputError(str(path), "perturbation", "column is missing (no condition column)")
            missing_groups = [c for c in group_columns if c not in frame.columns]
            if missing_groups:
                raise PipelineInputError(str(path), missing_groups[0], f"column is missing (split.csv {split_csv} groups by it)")
            frame = frame.rename(columns={condition_column: "condition"})
            row_keys = list(zip(*(frame[k].astype(str) for k in keys)))
            unknown = [k for k in row_keys if k not in labels]
            if unknown:
                raise PipelineInputError(str(path), "perturbation", f"{unknown[0]} is not a test row of {split_csv}")
            frame["subgroup"] = [labels[k] for k in row_keys]
            for metric in metrics:
                if metric in done or metric not in frame.columns:
                    continue
                done.add(metric)
                values = pd.to_numeric(frame[metric], errors="coerce")
                for subgroup, vals in values.groupby(frame["subgroup"], sort=True):
                    finite = vals[np.isfinite(vals)]
                    records.append(
                        {"dataset": dataset, "model": model, "subgroup": subgroup, "metric": metric,
                         "mean": float(finite.mean()) if len(finite) else math.nan, "n_conditions": int(len(finite))}
                    )
    return pd.DataFrame.from_records(records, columns=list(SUBGROUP_COLUMNS))


__all__ = ["leaderboard", "metric_direction", "read_run_summary", "read_split_table", "subgroup_means"]

"""One model entry's replicate runs (one per seed) aggregated into the files one run writes.

PRiMeFlow (section 4) trains every model "using five random seeds, and we report the mean and standard
deviation". A model entry with ``seeds`` (two or more) is trained, sampled and scored once per seed under
``results/{dataset}/{model}/seeds/{seed}/``; :func:`aggregate_seed_files` writes, at the model's own paths:

* the **summary** (``metrics.csv`` from cell-eval, ``perturbench.csv`` from PerturBench): one row per metric with
  the per-seed file's columns, each numeric column the mean over seeds of that seed's value (the mean of the
  per-seed means, of the per-seed medians, ...); then ``n_seeds`` and, per statistic column ``S``,
  ``S_seed_std``: the standard deviation over seeds of the per-seed ``S`` (ddof=1, :data:`SEED_STD_DDOF`).
  Text columns (perturbench.csv's ``settings``) must be equal in every seed and are kept, except the scorer's
  own ``seed`` inside ``settings`` (each replicate scores with its own: rule ``score_perturbench``), which the
  aggregate lists per seed.
* the **per-condition** table (``per_condition.csv`` / ``perturbench_per_condition.csv``): one row per
  (condition[, group]) as in one seed's file, each metric the mean over seeds.
* the **by-seed** long table (``metrics_by_seed.csv`` / ``perturbench_by_seed.csv``): ``seed``, then each seed's
  summary rows verbatim, and ``source`` (the per-seed file): what a leaderboard draws seed error bars from.

NaN is not skipped: a seed whose value is NaN makes that cell's mean and std NaN (a value undefined in one
replicate is not averaged away), so ``n_seeds`` is the number of seeds behind every finite aggregate.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from perturb_repro.errors import PipelineInputError
from perturb_repro.io import write_csvs

SEED_STD_DDOF = 1  # sample std over seeds; PRiMeFlow does not say which (ambiguity noted in config/README.md)
SEED_STD_SUFFIX = "_seed_std"
N_SEEDS_COLUMN = "n_seeds"
SEED_COLUMN = "seed"
SOURCE_COLUMN = "source"
METRIC_COLUMN = "metric"
SETTINGS_COLUMN = "settings"  # perturbench.csv's: the scorer's options (JSON)
SETTINGS_SEED = "seed"  # the scorer's seed inside settings: one per replicate
SUMMARY_TEXT_COLUMNS = (METRIC_COLUMN, SETTINGS_COLUMN)
# statistic columns that get a seed std (counts do not: they are the same per seed unless a metric went NaN)
STATISTIC_COLUMNS = ("mean", "std", "min", "q25", "median", "q75", "max")
_NA = ["", "NaN", "nan", "null"]


@dataclass(frozen=True)
class ScoreFiles:
    """A scorer's file names in one run directory and the condition column of its per-condition table."""

    summary: str
    per_condition: str
    by_seed: str
    condition_column: str


SCORERS: dict[str, ScoreFiles] = {
    "celleval": ScoreFiles("metrics.csv", "per_condition.csv", "metrics_by_seed.csv", "perturbation"),
    "perturbench": ScoreFiles("perturbench.csv", "perturbench_per_condition.csv", "perturbench_by_seed.csv", "condition"),
}


def _read(path: str, text_columns: Sequence[str]) -> pd.DataFrame:
    """A scorer CSV: text columns verbatim (a condition "NA" stays "NA"), every other column float."""
    if not Path(path).is_file():
        raise PipelineInputError(path, "<file>", "does not exist")
    try:
        header = list(pd.read_csv(path, nrows=0).columns)
        text = [c for c in header if c in text_columns]
        frame = pd.read_csv(path, dtype={c: str for c in text}, keep_default_na=False,
                            na_values={c: _NA for c in header if c not in text})
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise PipelineInputError(path, "<file>", f"cannot be parsed as CSV: {exc}") from exc
    for column in header:
        if column in text:
            continue
        try:
            frame[column] = frame[column].astype(float)
        except (ValueError, TypeError) as exc:
            raise PipelineInputError(path, column, f"has a non-numeric value: {exc}") from exc
    return frame


def _check_same(frames: Mapping[str, pd.DataFrame], keys: list[str], what: str) -> None:
    """Every seed's file has the first file's columns and the same key rows in the same order."""
    first_path, first = next(iter(frames.items()))
    for path, frame in frames.items():
        if list(frame.columns) != list(first.columns):
            raise PipelineInputError(path, "columns", f"{list(frame.columns)} differ from {first_path}'s {list(first.columns)}")
        missing = [k for k in keys if k not in frame.columns]
        if missing:
            raise PipelineInputError(path, missing[0], "column is missing")
        rows, expected = frame[keys].to_numpy().tolist(), first[keys].to_numpy().tolist()
        if rows != expected:
            extra = sorted(map(str, {tuple(r) for r in rows} ^ {tuple(r) for r in expected}))[:5]
            raise PipelineInputError(path, keys[0], f"{what} rows differ from {first_path}'s (e.g. {extra or 'order'})")


def _stack(frames: Mapping[str, pd.DataFrame], numeric: list[str]) -> np.ndarray:
    """(seeds, rows, columns) float array of the numeric columns."""
    return np.stack([frame[numeric].to_numpy(dtype=np.float64) for frame in frames.values()])


def aggregate_summaries(summaries: Mapping[int, str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The aggregate summary and the by-seed long table of seed -> per-seed summary CSV (see the module doc)."""
    if len(summaries) < 1:
        raise PipelineInputError("seeds", "summaries", "no per-seed file to aggregate")
    frames = {str(path): _read(str(path), SUMMARY_TEXT_COLUMNS) for path in summaries.values()}
    _check_same(frames, [METRIC_COLUMN], "metric")
    first = next(iter(frames.values()))
    settings = _common_settings(frames) if SETTINGS_COLUMN in first.columns else None
    numeric = [c for c in first.columns if c not in SUMMARY_TEXT_COLUMNS]
    values = _stack(frames, numeric)
    out = pd.DataFrame({METRIC_COLUMN: first[METRIC_COLUMN].to_numpy()})
    for j, column in enumerate(numeric):
        out[column] = values[:, :, j].mean(axis=0)  # NaN in any seed -> NaN (module doc)
    out[N_SEEDS_COLUMN] = len(frames)
    for column in (c for c in STATISTIC_COLUMNS if c in numeric):
        per_seed = values[:, :, numeric.index(column)]
        out[column + SEED_STD_SUFFIX] = (per_seed.std(axis=0, ddof=SEED_STD_DDOF) if len(frames) > SEED_STD_DDOF
                                         else np.full(per_seed.shape[1], math.nan))
    if settings is not None:
        out[SETTINGS_COLUMN] = settings
    long = pd.concat(
        [frame.assign(**{SEED_COLUMN: int(seed), SOURCE_COLUMN: str(path)})
         for seed, (path, frame) in zip(summaries, frames.items())], ignore_index=True,
    )
    long = long[[SEED_COLUMN, *first.columns, SOURCE_COLUMN]]
    return out, long


def _common_settings(frames: Mapping[str, pd.DataFrame]) -> np.ndarray:
    """perturbench.csv's ``settings`` (JSON), equal in every seed except the scorer's own ``seed`` (one per
    replicate: rule ``score_perturbench``), which the aggregate lists in seed order."""
    parsed = [[_settings(v) for v in frame[SETTINGS_COLUMN]] for frame in frames.values()]

    def without_seed(cell):
        return {k: v for k, v in cell.items() if k != SETTINGS_SEED} if isinstance(cell, dict) else cell

    common = [[without_seed(cell) for cell in cells] for cells in parsed]
    for path, cells in zip(frames, common):
        if cells != common[0]:
            raise PipelineInputError(path, SETTINGS_COLUMN, "differs between seeds (the seeds were scored with other settings)")
    return np.array([json.dumps({**cell, SETTINGS_SEED: [cells[i].get(SETTINGS_SEED) for cells in parsed]}, sort_keys=True)
                     if isinstance(cell, dict) else cell for i, cell in enumerate(common[0])], dtype=object)


def _settings(text) -> dict | str:
    try:
        value = json.loads(text)
    except (TypeError, ValueError):
        return text  # not JSON: compared as text
    return value if isinstance(value, dict) else text


def aggregate_per_condition(tables: Mapping[int, str], key_columns: Sequence[str]) -> pd.DataFrame:
    """Per (condition[, group]) row, the mean over seeds of every metric column (same columns as one seed's)."""
    frames = {str(path): _read(str(path), key_columns) for path in tables.values()}
    keys = [c for c in next(iter(frames.values())).columns if c in key_columns]
    if not keys:
        raise PipelineInputError(next(iter(frames)), key_columns[0], "column is missing")
    _check_same(frames, keys, "condition")
    first = next(iter(frames.values()))
    numeric = [c for c in first.columns if c not in keys]
    out = first[keys].copy()
    means = _stack(frames, numeric).mean(axis=0)
    for j, column in enumerate(numeric):
        out[column] = means[:, j]
    return out[list(first.columns)]


def aggregate_seed_files(
    scorer: str, seeds: Sequence[int], summaries: Sequence[str], per_conditions: Sequence[str],
    group_by: Sequence[str], out_summary: str, out_per_condition: str, out_by_seed: str,
) -> None:
    """Write the three aggregate files of one scorer (:data:`SCORERS`) from its per-seed files (seed order)."""
    if scorer not in SCORERS:
        raise PipelineInputError("aggregate_seed_files", "scorer", f"unknown {scorer!r} (one of {sorted(SCORERS)})")
    if not (len(seeds) == len(summaries) == len(per_conditions)) or len(set(seeds)) != len(seeds):
        raise PipelineInputError("aggregate_seed_files", "seeds", f"{list(seeds)} do not pair with {len(summaries)} "
                                 f"summaries and {len(per_conditions)} per-condition files, or repeat")
    summary, long = aggregate_summaries(dict(zip(seeds, summaries)))
    per_condition = aggregate_per_condition(dict(zip(seeds, per_conditions)),
                                            [SCORERS[scorer].condition_column, *group_by])
    write_csvs((summary, out_summary), (per_condition, out_per_condition), (long, out_by_seed), index=False)

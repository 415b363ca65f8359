"""PerturBench scoring in shards of covariate groups, merged into the file one run writes.

PerturBench scores each covariate group on its own (its conditions against that group's true controls, ranks
among that group's conditions); only the PCA of ``mmd_pca`` is fitted on the whole truth. So a shard -- the
groups ``k = shard, shard + shards, ...`` of the sorted group keys -- reads its groups' cells (files opened lazily,
X and layers on disk, only those rows of X brought into memory), fits the PCA on every truth cell in row blocks read from
disk (the same blocks, hence the same numbers, as one run), and writes its groups' per-condition rows. The merge
puts the rows in one run's order and summarises them: ``merge_perturbench`` == ``score_perturbench``
(``tests/test_sharded_scoring.py``). Without ``group_by`` there is one group: shard 0 holds it, the rest are empty.
"""

from __future__ import annotations

import os
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from perturb_repro.errors import PipelineInputError
from perturb_repro.io import write_csv
from perturb_repro.scoring.perturbench import (
    CONDITION_COLUMN,
    Options,
    fit_pca,
    group_keys,
    hvg_mask,
    metric_columns,
    perturbench_metrics_by_group,
    write_outputs,
)


def shard_groups(keys: list[str], shard: int, shards: int) -> set[str]:
    """Groups of shard ``shard`` of ``shards``: every ``shards``-th of the sorted keys, starting at ``shard``."""
    if not 0 <= shard < shards:
        raise PipelineInputError("score_perturbench_shard()", "shard", f"must be in 0..{shards - 1}, got {shard}")
    return set(sorted(keys)[shard::shards])


def _subset(lazy, keys: np.ndarray, groups: set[str]) -> ad.AnnData:
    """The cells of ``groups`` (controls included) of a lazily opened file, in memory (X, obs, var, uns)."""
    from perturb_repro.data.backed import rows_in_memory

    return rows_in_memory(lazy, np.flatnonzero(np.isin(keys, list(groups))))


def score_perturbench_shard(
    pred_path: str | os.PathLike, truth_path: str | os.PathLike, control_label: str, shard: int, shards: int,
    out_csv: str | os.PathLike, pert_col: str = "condition", seed: int = 0, n_deg: int = 50,
    pca_components: int = 50, options: Options | dict | None = None,
) -> None:
    """Per-condition PerturBench rows of one shard's groups (header only when the shard has none)."""
    from perturb_repro.scoring.contract import check_prediction, group_columns

    opts = options if isinstance(options, Options) else Options.from_config(options)
    pred_path, truth_path, out_csv = Path(pred_path), Path(truth_path), Path(out_csv)
    if out_csv.exists():
        out_csv.unlink()
    for path in (pred_path, truth_path):
        if not path.is_file():
            raise PipelineInputError(path, "(file)", "does not exist")
    from perturb_repro.data.backed import LazyH5ad

    truth, pred = LazyH5ad(truth_path), LazyH5ad(pred_path)  # X and layers stay on disk
    try:
        group_by = group_columns(truth)
        labels = truth.obs[pert_col].astype(str).to_numpy()
        t_keys = group_keys(truth.obs, group_by)
        groups = shard_groups(sorted(set(t_keys[labels != control_label])), int(shard), int(shards))
        if not groups:
            write_csv(pd.DataFrame(columns=[CONDITION_COLUMN, *group_by, *metric_columns()]), out_csv, index=False)
            return
        pca = fit_pca(truth.X, np.arange(truth.n_obs), int(pca_components), hvg_mask(truth, str(truth_path)),
                      int(opts.block_size))
        sub_truth = _subset(truth, t_keys, groups)
        sub_pred = _subset(pred, group_keys(pred.obs, group_by), groups)
    finally:
        truth.close()
        pred.close()
    check_prediction(sub_pred, sub_truth, pert_col, control_label, str(pred_path), str(truth_path), group_by)
    frame = perturbench_metrics_by_group(
        sub_pred, sub_truth, control_label, group_by, pert_col=pert_col, seed=seed, n_deg=n_deg,
        pca_components=pca_components, pred_source=str(pred_path), truth_source=str(truth_path), options=opts,
        groups=groups, pca=pca,
    )
    write_csv(frame, out_csv, index=False)


def _read_shard(path: Path, label_columns: list[str]) -> pd.DataFrame:
    """A shard CSV: label columns as text (a time point "8" stays "8"), metrics as floats (empty = NaN)."""
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    expected = [*label_columns, *metric_columns()]
    if list(frame.columns) != expected:
        raise PipelineInputError(path, "columns", f"expected {expected[:4]}..., got {list(frame.columns)[:4]}...")
    for column in metric_columns():
        try:
            frame[column] = frame[column].replace("", "nan").astype(np.float64)
        except ValueError as err:
            raise PipelineInputError(path, column, f"not a number ({err})") from err
    return frame


def merge_perturbench(
    shard_csvs: list[str | os.PathLike], truth_path: str | os.PathLike, control_label: str,
    out_per_condition: str | os.PathLike, out_summary: str | os.PathLike, pert_col: str = "condition",
    seed: int = 0, n_deg: int = 50, pca_components: int = 50, options: Options | dict | None = None,
) -> pd.DataFrame:
    """The shards' rows in one run's order (groups sorted, conditions sorted within each), summarised and written.

    Fails, naming the shard, if the shards do not hold every (condition, group) of the truth exactly once.
    """
    from perturb_repro.scoring.contract import group_columns

    opts = options if isinstance(options, Options) else Options.from_config(options)
    from perturb_repro.data.backed import LazyH5ad

    with LazyH5ad(truth_path) as truth:
        group_by = group_columns(truth)
        labels = truth.obs[pert_col].astype(str).to_numpy()
        keys = group_keys(truth.obs, group_by)
    is_test = labels != control_label
    wanted = set(zip(labels[is_test], keys[is_test]))
    label_columns = [CONDITION_COLUMN, *group_by]
    frames = [_read_shard(Path(p), label_columns) for p in shard_csvs]
    merged = pd.concat(frames, ignore_index=True)
    have = list(zip(merged[CONDITION_COLUMN], group_keys(merged, group_by)))
    if len(have) != len(set(have)) or set(have) != wanted:
        missing, extra = sorted(wanted - set(have))[:3], sorted(set(have) - wanted)[:3]
        raise PipelineInputError(
            str(shard_csvs[0]), "condition",
            f"shards do not hold each (condition, group) of {truth_path} once: missing {missing}, extra {extra}, "
            f"{len(have) - len(set(have))} repeated",
        )
    merged["_key"] = group_keys(merged, group_by)
    merged = merged.sort_values(["_key", CONDITION_COLUMN], kind="stable").drop(columns="_key").reset_index(drop=True)
    return write_outputs(merged, Path(out_per_condition), Path(out_summary), opts, seed, n_deg, pca_components)

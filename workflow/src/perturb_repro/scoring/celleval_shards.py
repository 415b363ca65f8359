"""cell-eval in shards of test conditions plus one cross-condition pass, merged into one run's files.

``score_shard`` scores a contiguous slice of the (condition, *group) keys sorted by group (with the controls of its
groups) and writes the summary the cross-condition metrics need (:mod:`perturb_repro.scoring.celleval_cross`);
``score_cross`` computes those metrics over all conditions from the shards' summaries (no cells), and
``merge_shards`` writes the ``metrics.csv`` / ``per_condition.csv`` one :func:`perturb_repro.scoring.celleval.score`
call writes (``tests/test_sharded_scoring.py``). Files are opened lazily
(:class:`perturb_repro.data.backed.LazyH5ad`): only a shard's rows of X come into memory.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from perturb_repro.errors import PipelineInputError
from perturb_repro.io import remove_outputs, write_csv, write_csvs
from perturb_repro.scoring.celleval import (
    CONDITION_COLUMN,
    _metrics_table,
    _open_lazy,
    _per_condition_table,
    _read_celleval_csv,
    _MetricErrorCollector,
    _run_worker,
    profile_metrics,
    is_cross_condition,
)
from perturb_repro.scoring.contract import check_prediction, group_columns

logger = logging.getLogger(__name__)


def _condition_keys(truth: ad.AnnData, pert_col: str, control_label: str, group_by: tuple[str, ...]) -> list[tuple]:
    """Sorted (condition, *group) keys of the truth's non-control cells."""
    labels = truth.obs[pert_col].astype(str).to_numpy()
    groups = truth.obs[list(group_by)].astype(str).to_numpy().tolist() if group_by else [[] for _ in labels]
    return sorted({(c, *g) for c, g in zip(labels, groups) if c != control_label})


def shard_keys(keys: list[tuple], shard: int, n_shards: int) -> list[tuple]:
    """The ``shard``-th of ``n_shards`` contiguous, near-equal slices of the (condition, *group) keys sorted by
    group, then condition (deterministic): a shard spans few groups, so it needs only their controls."""
    if not 0 <= shard < n_shards:
        raise PipelineInputError("score_shard()", "shard", f"must be in 0..{n_shards - 1}, got {shard}")
    bounds = np.linspace(0, len(keys), n_shards + 1).round().astype(int)
    return sorted(keys, key=lambda k: (k[1:], k[0]))[bounds[shard] : bounds[shard + 1]]


def _cell_keys(adata: ad.AnnData, pert_col: str, group_by: tuple[str, ...]) -> list[tuple]:
    labels = adata.obs[pert_col].astype(str).to_numpy()
    groups = adata.obs[list(group_by)].astype(str).to_numpy().tolist() if group_by else [[] for _ in labels]
    return [(c, *g) for c, g in zip(labels, groups)]


def _subset(path: Path, pert_col: str, control_label: str, group_by: tuple[str, ...], keep: set, out: Path) -> None:
    """Write the cells of ``keep`` (condition, *group) keys plus the control cells of their groups to ``out``
    (every control without ``group_by``: cell-eval scores a group's conditions against that group's controls).

    Read backed, so only the selected rows come into memory.
    """
    from perturb_repro.data.backed import LazyH5ad, rows_in_memory

    with LazyH5ad(path) as adata:  # X and layers on disk (cell-eval reads X only)
        labels = adata.obs[pert_col].astype(str).to_numpy()
        cell_keys = _cell_keys(adata, pert_col, group_by)
        groups = {k[1:] for k in keep}
        mask = np.array([k in keep or (c == control_label and k[1:] in groups) for k, c in zip(cell_keys, labels)], dtype=bool)
        sub = rows_in_memory(adata, np.flatnonzero(mask))
    sub.write_h5ad(out)


def score_shard(
    pred_path: str | os.PathLike,
    truth_path: str | os.PathLike,
    pert_col: str,
    control_label: str,
    shard: int,
    n_shards: int,
    results_out: str | os.PathLike,
    summary_out: str | os.PathLike,
    profile: str = "full",
    num_threads: int = 1,
    workdir: str | os.PathLike | None = None,
) -> None:
    """cell-eval on one shard of the test conditions (with the controls of their groups); writes its results.csv
    and its cross-condition summary.

    The shard's keys are :func:`shard_keys` of the truth's sorted (condition, *group) keys. ``results_out`` is
    cell-eval's per-condition table for those conditions (label columns, then the profile's metrics but the
    summary-based cross-condition ones, :mod:`perturb_repro.scoring.celleval_cross`); ``summary_out`` holds what
    :func:`score_cross` computes those from over all shards. ``de_spearman_sig`` is recomputed by
    :func:`merge_shards`. An empty shard (more shards than conditions) writes a header-only table and an
    empty summary.
    """
    from perturb_repro.scoring.celleval_cross import write_summaries

    pred_path, truth_path = Path(pred_path), Path(truth_path)
    results_out, summary_out = Path(results_out), Path(summary_out)
    remove_outputs(results_out, summary_out)
    results_out.parent.mkdir(parents=True, exist_ok=True)
    truth_obs = _open_lazy(truth_path)
    group_by = tuple(group_columns(truth_obs))
    keys = shard_keys(_condition_keys(truth_obs, pert_col, control_label, group_by), shard, n_shards)
    truth_obs.close()
    if not keys:
        write_csv(pd.DataFrame(columns=[CONDITION_COLUMN, *group_by]), results_out, index=False)
        write_summaries([], summary_out, list(group_by))
        return
    if workdir is not None:
        Path(workdir).mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="celleval_shard.", dir=workdir))
    try:
        _subset(pred_path, pert_col, control_label, group_by, set(keys), scratch / "pred.h5ad")
        _subset(truth_path, pert_col, control_label, group_by, set(keys), scratch / "truth.h5ad")
        sub_pred, sub_truth = ad.read_h5ad(scratch / "pred.h5ad"), ad.read_h5ad(scratch / "truth.h5ad")
        check_prediction(sub_pred, sub_truth, pert_col, control_label, str(pred_path), str(truth_path), list(group_by))
        del sub_pred, sub_truth
        outdir, info = _run_worker(scratch / "pred.h5ad", scratch / "truth.h5ad", pert_col, control_label, profile,
                                   num_threads, scratch, list(group_by), summary_out=scratch / "summary.h5ad")
        if info.get("metric_errors"):
            logger.warning("cell-eval could not compute some metrics for shard %d of %s: %s", shard, pred_path, info["metric_errors"])
        expected = set(keys) if group_by else {k[0] for k in keys}
        _per_condition_table(_read_celleval_csv(outdir / "results.csv", CONDITION_COLUMN, group_by), expected, group_by)
        # cell-eval's own CSV (polars: NaN written as NaN, null as empty), so the merge keeps both apart
        _publish(outdir / "results.csv", results_out)
        _publish(scratch / "summary.h5ad", summary_out)
    except BaseException:
        remove_outputs(results_out, summary_out)  # both or neither
        raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _publish(src: Path, dst: Path) -> None:
    """Copy a finished scratch file into place atomically (a reader never sees half a file)."""
    shutil.copyfile(src, dst.with_suffix(dst.suffix + ".tmp"))
    os.replace(dst.with_suffix(dst.suffix + ".tmp"), dst)


def score_cross(
    summary_paths: list[str | os.PathLike],
    truth_path: str | os.PathLike,
    pert_col: str,
    control_label: str,
    results_out: str | os.PathLike,
    profile: str = "full",
) -> None:
    """The profile's summary-based cross-condition metrics over all conditions, from every shard's summary
    (:func:`perturb_repro.scoring.celleval_cross.cross_metrics`); writes a per-condition CSV (label columns only
    when the profile has none). Reads the summaries (conditions x genes) and the truth's obs, no cells."""
    from perturb_repro.scoring.celleval_cross import cross_metrics, from_summary

    results_out = Path(results_out)
    remove_outputs(results_out)
    for path in (*map(Path, summary_paths), Path(truth_path)):
        if not path.is_file():
            raise PipelineInputError(path, "(file)", "does not exist")
    truth = _open_lazy(truth_path)
    group_by = tuple(group_columns(truth))
    keys = _condition_keys(truth, pert_col, control_label, group_by)
    truth.close()
    labels = [CONDITION_COLUMN, *group_by]
    if not any(from_summary(m) for m in profile_metrics(profile)):
        write_csv(pd.DataFrame(columns=labels), results_out, index=False)
        return
    collector = _MetricErrorCollector()
    logging.getLogger("cell_eval").addHandler(collector)
    try:
        frame = cross_metrics(list(summary_paths), control_label, profile)
    finally:
        logging.getLogger("cell_eval").removeHandler(collector)
    if collector.messages:
        logger.warning("cell-eval could not compute some metrics for %s: %s", results_out, collector.messages)
    expected = set(keys) if group_by else {k[0] for k in keys}
    with tempfile.TemporaryDirectory() as scratch:
        frame.write_csv(Path(scratch) / "results.csv")  # written and checked as cell-eval's own results.csv
        _per_condition_table(_read_celleval_csv(Path(scratch) / "results.csv", CONDITION_COLUMN, group_by), expected, group_by)
        results_out.parent.mkdir(parents=True, exist_ok=True)
        _publish(Path(scratch) / "results.csv", results_out)


def _de_spearman_sig(frame: pd.DataFrame, group_by: tuple[str, ...]) -> pd.Series:
    """cell-eval's de_spearman_sig from the per-condition significant-gene counts, per group (one cell-eval run).

    ``DESpearmanSignificant``: the conditions with >= 1 significant real gene, Spearman (polars ``pl.corr``)
    of their real vs predicted counts; 1.0 when no condition has one. The same value on every row.
    """
    import polars as pl

    for column in ("de_nsig_counts_real", "de_nsig_counts_pred"):
        if column not in frame.columns:
            raise RuntimeError(f"de_spearman_sig cannot be merged from shards without {column}")
    out = pd.Series(np.nan, index=frame.index)
    parts = frame.groupby(list(group_by), sort=False).groups.values() if group_by else [frame.index]
    for index in parts:
        sub = frame.loc[index]
        sub = sub[sub["de_nsig_counts_real"] > 0]
        if len(sub) == 0:
            out.loc[index] = 1.0
            continue
        corr = pl.DataFrame({"len": sub["de_nsig_counts_real"].to_numpy(), "len_pred": sub["de_nsig_counts_pred"].to_numpy()})
        value = corr.select(pl.corr(pl.col("len"), pl.col("len_pred"), method="spearman")).to_numpy().flatten()[0]
        out.loc[index] = float(value) if value is not None else np.nan
    return out


def _metric_order(profile: str):
    """Sort key putting results.csv columns in the order cell-eval writes them (its pipeline's metric order)."""
    names = profile_metrics(profile)

    def key(column: str) -> int:  # used with a stable sort: sub-metrics keep their order of appearance
        matches = [i for i, n in enumerate(names) if column == n or column.startswith(n + "_")]
        return max(matches, key=lambda i: len(names[i])) if matches else len(names)

    return key


def merge_shards(
    shard_results: list[str | os.PathLike],
    cross_results: str | os.PathLike,
    truth_path: str | os.PathLike,
    pert_col: str,
    control_label: str,
    metrics_out: str | os.PathLike,
    per_condition_out: str | os.PathLike,
    profile: str = "full",
) -> None:
    """Merge :func:`score_shard` tables (+ :func:`score_cross`) into the files :func:`score` writes.

    per_condition.csv: the shards' rows, with every cross-condition column taken from the whole-set pass,
    sorted as :func:`score` sorts them, columns in cell-eval's order for ``profile`` (a metric that
    cell-eval failed to compute in some shard, e.g. clustering_agreement on too few centroids, is NaN there).
    metrics.csv: recomputed from that table exactly as cell-eval computes ``agg_results.csv``
    (polars ``describe()`` of the per-condition table without its label columns), then converted as
    :func:`score` converts it. Exact for every metric: per-condition metrics are the same numbers as one
    run's, cross-condition ones come from one run over all conditions.
    """
    import polars as pl

    metrics_out, per_condition_out = Path(metrics_out), Path(per_condition_out)
    remove_outputs(metrics_out, per_condition_out)
    truth_obs = _open_lazy(truth_path)
    group_by = tuple(group_columns(truth_obs))
    keys = _condition_keys(truth_obs, pert_col, control_label, group_by)
    truth_obs.close()
    labels = [CONDITION_COLUMN, *group_by]

    def read(path) -> "pl.DataFrame":  # cell-eval's CSV as cell-eval wrote it: NaN and null stay distinct
        return pl.read_csv(path, schema_overrides={c: pl.Utf8 for c in labels}, infer_schema_length=None)

    frames = [f for f in (read(p) for p in shard_results) if f.height]
    if not frames:
        raise RuntimeError(f"no shard of {shard_results} holds a condition")
    merged = pl.concat(frames, how="diagonal_relaxed")
    # cross-condition columns come from the whole-set pass only (absent there = cell-eval could not compute them)
    merged = merged.drop([c for c in merged.columns if c not in labels and is_cross_condition(c)])
    cross = read(cross_results)
    if len(cross.columns) > len(labels):
        merged = merged.join(cross, on=labels, how="left")
    if "de_spearman_sig" in profile_metrics(profile):
        merged = merged.with_columns(pl.Series("de_spearman_sig", _de_spearman_sig(merged.to_pandas(), tuple(group_by)).to_numpy()))
    order = _metric_order(profile)
    metric_names = sorted((c for c in merged.columns if c not in labels), key=order)
    merged = merged.select(labels + metric_names)
    expected = set(keys) if group_by else {k[0] for k in keys}
    with tempfile.TemporaryDirectory() as scratch:
        merged.write_csv(Path(scratch) / "results.csv")
        # cell-eval's agg_results.csv: results.drop("perturbation").describe() (here also the group columns)
        merged.drop(labels).describe().write_csv(Path(scratch) / "agg_results.csv")
        per_condition = _per_condition_table(
            _read_celleval_csv(Path(scratch) / "results.csv", CONDITION_COLUMN, group_by), expected, group_by
        )
        metrics = _metrics_table(_read_celleval_csv(Path(scratch) / "agg_results.csv", "statistic"), per_condition, group_by)
    write_csvs((metrics, metrics_out), (per_condition, per_condition_out), index=False)

"""cell-eval's cross-condition metrics from per-shard summaries, so no job holds every condition's cells.

Three of cell-eval's metrics compare each condition with all the others (``cell_eval/metrics/_anndata.py``):

* ``discrimination_score_<metric>`` ranks each predicted pseudobulk effect among all real ones: it needs the
  pseudobulks (``PerturbationAnndataPair._bulk_anndata``: polars group means) of every condition and the control;
* ``clustering_agreement`` clusters the condition centroids (``ClusteringAgreement._centroid_ann``: float64
  numpy means): it needs those centroids;
* ``pearson_edistance`` correlates the conditions' e-distances to their controls (``edistance``): each e-distance
  needs only that condition's cells and the controls, the correlation needs them all.

A shard job (which holds its conditions and all controls of their groups) writes :func:`summarise` of
cell-eval's own pair: both pseudobulk tables, both centroid tables and both e-distances per condition, a few
rows per condition. :func:`cross_metrics` then rebuilds, per covariate group, a pair whose rows are those
pseudobulks (resp. centroids) and runs cell-eval's own metric pipeline on it (the mean of one row is that row,
so every pseudobulk and centroid is the one a single run computes), and takes ``pearsonr`` of the e-distances
as ``edistance`` does. Memory: conditions x genes, instead of every predicted and true cell (Replogle: ~0.1 GB
instead of ~97 GB). ``tests/test_sharded_scoring.py`` checks the merged files equal one cell-eval run.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Iterable

import anndata as ad
import numpy as np
import pandas as pd

from perturb_repro.io import write_h5ad

if TYPE_CHECKING:
    import polars as pl


CONDITION = "perturbation"  # cell-eval's condition column in results.csv
KIND = "kind"
# the metric families computed from summaries (prefixes of cell-eval metric names)
FROM_SUMMARY = ("discrimination_score", "pearson_edistance", "clustering_agreement")
_BULK, _CENTROID = "bulk", "centroid"


def from_summary(metric: str) -> bool:
    """Whether a cell-eval metric is computed by :func:`cross_metrics` (shard jobs skip it)."""
    return metric.startswith(FROM_SUMMARY)


def _edistances(pair, metric: str = "euclidean") -> tuple[np.ndarray, np.ndarray]:
    """Per-condition e-distances to the controls, real and predicted, in ``pair.perts`` order: cell-eval's
    ``edistance`` (cell_eval/metrics/_anndata.py, 0.8.2) before its final ``pearsonr``, line for line."""
    import sklearn.metrics as skm

    sigma = {which: skm.pairwise_distances(pair.ctrl_matrix(which=which), metric=metric).mean() for which in ("real", "pred")}

    def one(x, y, sigma_y):
        return 2 * skm.pairwise_distances(x, y, metric=metric).mean() - skm.pairwise_distances(x, metric=metric).mean() - sigma_y

    d_real, d_pred = np.zeros(pair.perts.size), np.zeros(pair.perts.size)
    for i, cells in enumerate(pair.iter_cell_arrays()):
        d_real[i] = one(cells.pert_real, cells.ctrl_real, sigma["real"])
        d_pred[i] = one(cells.pert_pred, cells.ctrl_pred, sigma["pred"])
    return d_real, d_pred


class _AnyLabel:
    """A control label equal to no condition: ``_centroid_ann`` then keeps the control's centroid too."""

    def __eq__(self, other):
        return False

    def __ne__(self, other):
        return True

    __hash__ = object.__hash__


def summarise(pair, group: dict[str, str], metrics: Iterable[str]) -> ad.AnnData:
    """What :func:`cross_metrics` needs of one cell-eval pair (one shard's cells of one covariate group).

    Rows: the pseudobulks (real, pred) of the pair's conditions and control, as cell-eval computes them, and
    their centroids when ``clustering_agreement`` is among ``metrics``; obs ``edistance_real``/``_pred`` on the
    real pseudobulk rows of the conditions when ``pearson_edistance`` is.
    """
    from cell_eval.metrics._anndata import ClusteringAgreement

    metrics = list(metrics)
    parts, obs, dtypes = [], [], set()
    for which, adata in (("real", pair.real), ("pred", pair.pred)):
        keys, values = pair._bulk_anndata(adata, pair.pert_col)
        dtypes.add(str(values.dtype))  # polars keeps float32 means float32: rebuilt in that dtype
        parts.append(np.asarray(values, dtype=np.float64))  # exact for float32
        obs.append(pd.DataFrame({CONDITION: keys.astype(str), KIND: f"{_BULK}_{which}"}))
        if any(m.startswith("clustering_agreement") for m in metrics):
            centroids = ClusteringAgreement._centroid_ann(adata, pair.pert_col, control_pert=_AnyLabel())
            parts.append(np.asarray(centroids.X, dtype=np.float64))
            obs.append(pd.DataFrame({CONDITION: centroids.obs[pair.pert_col].astype(str).to_numpy(),
                                     KIND: f"{_CENTROID}_{which}"}))
    frame = pd.concat(obs, ignore_index=True)
    frame["bulk_dtype"] = np.result_type(*dtypes).name
    for column, value in group.items():
        frame[column] = value
    frame["edistance_real"] = frame["edistance_pred"] = np.nan
    if any(m.startswith("pearson_edistance") for m in metrics):
        d_real, d_pred = _edistances(pair)
        rows = frame.index[frame[KIND] == f"{_BULK}_real"]
        where = dict(zip(frame.loc[rows, CONDITION], rows))
        for condition, real, pred in zip(pair.perts.astype(str), d_real, d_pred):
            frame.loc[where[condition], ["edistance_real", "edistance_pred"]] = real, pred
    frame.index = [f"s{i}" for i in range(len(frame))]
    return ad.AnnData(X=np.vstack(parts), obs=frame, var=pd.DataFrame(index=pair.genes.astype(str)))


def write_summaries(summaries: list[ad.AnnData], path: str | Path, group_by: list[str]) -> None:
    """One shard's summaries (one per covariate group) as one h5ad (atomic)."""
    if summaries:
        combined = ad.concat(summaries, index_unique="-", merge="first")
        combined.obs_names = [f"s{i}" for i in range(combined.n_obs)]
    else:
        combined = ad.AnnData(obs=pd.DataFrame(columns=[CONDITION, KIND, "bulk_dtype", *group_by]))
    combined.uns["group_by"] = list(group_by)
    write_h5ad(combined, path)


def _sides(rows: ad.AnnData, kind: str, pert_col: str, dtype: str) -> tuple[ad.AnnData, ad.AnnData]:
    """Real and predicted AnnData whose 'cells' are the summary rows of ``kind`` (one per condition and the
    control), sorted by condition, in ``dtype``: a cell-eval pair of them gives the single run's pseudobulks."""

    def side(which):
        sub = rows[rows.obs[KIND] == f"{kind}_{which}"]
        sub = sub[np.argsort(sub.obs[CONDITION].to_numpy(), kind="stable")]
        obs = pd.DataFrame({pert_col: sub.obs[CONDITION].to_numpy()}, index=[f"{which}{i}" for i in range(sub.n_obs)])
        return ad.AnnData(X=np.asarray(sub.X, dtype=dtype), obs=obs, var=pd.DataFrame(index=rows.var_names))

    return side("real"), side("pred")


def cross_metrics(summary_paths: list[str | Path], control: str, profile: str) -> pl.DataFrame:
    """The profile's summary-based cross-condition metrics (:data:`FROM_SUMMARY`) per (condition, *group), as
    cell-eval's results.csv columns: one cell-eval metric pipeline per group on the pseudobulk (discrimination)
    and centroid (clustering) pairs, ``pearsonr`` of the e-distances. A metric cell-eval fails to compute
    (e.g. clustering_agreement on too few centroids) is absent, as in a single run."""
    import polars as pl
    from cell_eval._pipeline import MetricPipeline
    from cell_eval._types import PerturbationAnndataPair
    from scipy.stats import pearsonr

    parts = [ad.read_h5ad(p) for p in summary_paths]
    group_by = list(parts[0].uns.get("group_by", [])) if parts else []
    parts = [p for p in parts if p.n_obs]
    if not parts:
        return pl.DataFrame(schema={c: pl.Utf8 for c in (CONDITION, *group_by)})
    rows = ad.concat(parts, index_unique="-", merge="first")
    rows.obs_names = [f"s{i}" for i in range(rows.n_obs)]
    # the control's rows come from every shard of its group (the same cells, so the same values): keep the first
    keys = rows.obs[[CONDITION, KIND, *group_by]].astype(str).agg("\t".join, axis=1)
    rows = rows[~keys.duplicated().to_numpy()]
    wanted = [m for m in MetricPipeline(profile=profile)._metrics if from_summary(m)]
    pert_col = "condition"
    frames = []
    groups = rows.obs[group_by].astype(str).drop_duplicates().to_dict("records") if group_by else [{}]
    for group in groups:
        mask = np.ones(rows.n_obs, dtype=bool)
        for column, value in group.items():
            mask &= rows.obs[column].astype(str).to_numpy() == value
        sub = rows[mask]
        dtype = str(sub.obs["bulk_dtype"].iloc[0])
        results = []
        for kind, names in ((_BULK, [m for m in wanted if m.startswith("discrimination_score")]),
                            (_CENTROID, [m for m in wanted if m.startswith("clustering_agreement")])):
            if not names:
                continue
            real, pred = _sides(sub, kind, pert_col, dtype if kind == _BULK else "float64")
            pipeline = MetricPipeline(profile=profile)
            pipeline.skip_metrics([m for m in pipeline._metrics if m not in names])
            pipeline.compute_anndata_metrics(PerturbationAnndataPair(real=real, pred=pred, control_pert=control,
                                                                     pert_col=pert_col))
            if pipeline.get_results().height:
                results.append(pipeline.get_results())
        conditions = sorted(set(sub.obs.loc[sub.obs[KIND] == f"{_BULK}_real", CONDITION]) - {control})
        if "pearson_edistance" in wanted:
            real_rows = sub.obs[(sub.obs[KIND] == f"{_BULK}_real") & (sub.obs[CONDITION] != control)]
            real_rows = real_rows.set_index(CONDITION).loc[conditions]
            value = pearsonr(real_rows["edistance_real"].to_numpy(), real_rows["edistance_pred"].to_numpy()).correlation
            results.append(pl.DataFrame({CONDITION: conditions, "pearson_edistance": [float(value)] * len(conditions)}))
        frame = pl.DataFrame({CONDITION: conditions})
        for result in results:
            frame = frame.join(result.with_columns(pl.col(CONDITION).cast(pl.Utf8)), on=CONDITION, how="left")
        frames.append(frame.with_columns([pl.lit(v).alias(c) for c, v in group.items()]))
    combined = pl.concat(frames, how="diagonal_relaxed")
    metrics = [c for c in combined.columns if c not in (CONDITION, *group_by)]
    return combined.select([CONDITION, *group_by, *metrics])

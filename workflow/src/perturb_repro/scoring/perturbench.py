"""PerturBench's evaluation metrics (as used by PRiMeFlow), re-implemented from its definitions.

Reference: altoslabs/perturbench, upstream commit ``9f03fc0`` (2026-01-08, "Rename op3 configs"),
files ``src/perturbench/analysis/benchmarks/{metrics,aggregation,evaluation}.py``,
``src/perturbench/analysis/embed_cells.py`` and ``src/perturbench/modelcore/models/base.py``
(``test_step`` / ``on_test_end``: the path that writes PerturBench's ``summary.csv``).
No PerturBench code is used or copied; every quantity is computed here with numpy/scipy (plus
scanpy's own ``rank_genes_groups``, which is the DE test PerturBench calls).

Per non-control condition ``p`` (predicted cells ``P_p``, true cells ``T_p``, true control cells
``C``; PerturBench replaces the prediction's control cells by the reference's, ``base.py:test_step``,
so the control is always the *true* control here):

``cosine_logfc``  (aggregation ``logfc``, metric ``cosine``; ``aggregation.py:_logfc_helper``)
    ``lfc(X_p) = log2(mean(X_p) + 0.1) - log2(mean(C) + 0.1)`` per gene, on ``.X`` as given
    (log-normalised; ``exp=False``: no ``expm1``), NaN -> 0; score = cosine(lfc(P_p), lfc(T_p)).
``rmse_average``  (``average`` / ``rmse``; ``aggregation.py:_average_adata``)
    ``sqrt(mean_genes((mean(P_p) - mean(T_p))**2))``.
``mmd_gex``  (``none`` / ``mmd``; ``metrics.py:compute_metric``)
    geomloss ``SamplesLoss(loss="energy", p=2)`` on the cells' gene vectors, i.e. with uniform
    weights ``E|x-y| - E|x-x'|/2 - E|y-y'|/2`` (V-statistic, diagonal included, distances taken as
    ``sqrt(max(d**2, 1e-8))`` like geomloss's tensorised backend) = half the energy distance.
    Computed exactly in float64 with numpy. geomloss itself works in float32 via
    ``|x|^2 + |y|^2 - 2x.y``, so its zero self-distances come out as sqrt(round-off) rather than
    1e-4; its self terms are slightly too large, so its MMD is slightly too low (by ~2e-4 on
    40-gene toy data, more with more genes), which this exact computation does not reproduce.
``mmd_pca``  (``pca`` / ``mmd``; ``aggregation.py:_pca_helper``, ``embed_cells.py:train_pca``)
    the same energy MMD after projecting every cell onto PCs fitted on the **truth AnnData (all of
    its cells: the test conditions plus the control cells)**, never on the prediction:
    ``(x - mean_truth) @ loadings.T``. Like ``sc.tl.pca`` (which PerturBench calls with defaults),
    the PCA uses only ``var["highly_variable"]`` genes when the truth has that column.
``deg_recall``  (``scores`` / ``top_k_recall``; ``aggregation.py:_differential_expression_helper``)
    scanpy ``rank_genes_groups(groupby=condition, reference=control,
    method="t-test_overestim_var")`` t-scores, +-inf -> 0, for truth (true cells vs true control)
    and for the prediction (predicted cells vs true control); recall =
    ``|top_k(|score_pred|) & top_k(|score_truth|)| / k`` with ``k = n_deg`` (PerturBench: 50),
    over all genes. The denominator is ``k`` even when fewer genes exist (as in PerturBench).

Rank metrics (``metrics.py:rank_helper``, ``evaluation.py:evaluate_rank``): the pairwise matrix
``M[i, j] = metric(prediction of condition i, truth of condition j)`` is built for all pairs.

* ``<metric>_rank`` -- PerturBench's ``rank`` (the value its summary reports as ``*_rank_*`` and
  PRiMeFlow tabulates): for each **true** condition ``j``, the position of prediction ``j`` among
  all predictions ordered by ``M[:, j]`` (best first), divided by ``n - 1``.
* ``<metric>_rank_transpose`` -- PerturBench's ``rank_transpose`` (``rank_helper(mat.T)``): for
  each **predicted** condition ``i``, the position of truth ``i`` among all truths ordered by
  ``M[i, :]``, divided by ``n - 1``.

0 = the matching condition is best, 1 = worst, ~0.5 = random. "Best" is the largest value for
similarities (cosine, recall) and the smallest for distances (RMSE, MMD); NaN sorts last.
PerturBench shuffles (unseeded) before sorting to break ties; here the shuffle is seeded
(``seed``) and the sort stable, so ties are broken uniformly at random but reproducibly. With a
single condition the rank is 0 (PerturBench skips the division then). The per-condition value of a
metric is the diagonal ``M[p, p]``, which is exactly PerturBench's ``compare_perts`` value.

PerturBench evaluates each covariate (e.g. cell line) separately: with ``group_by`` (the truth's
``uns['group_by']``) :func:`perturbench_metrics_by_group` scores each group against its own true
controls, ranks among that group's conditions, and the summary is over all (condition, group) rows.
"""

from __future__ import annotations

import logging
import os
import warnings
import zlib
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from perturb_repro.errors import PipelineInputError
from perturb_repro.io import write_csv

logger = logging.getLogger(__name__)

# our column name -> (PerturBench aggregation, PerturBench metric, "similarity" | "distance")
METRICS: dict[str, tuple[str, str, str]] = {
    "cosine_logfc": ("logfc", "cosine", "similarity"),
    "rmse_average": ("average", "rmse", "distance"),
    "mmd_gex": ("none", "mmd", "distance"),
    "mmd_pca": ("pca", "mmd", "distance"),
    "deg_recall": ("scores", "top_k_recall", "similarity"),
}
RANK_SUFFIXES = ("_rank", "_rank_transpose")
CONDITION_COLUMN = "condition"
SUMMARY_COLUMNS = ("metric", "count", "mean", "std", "min", "q25", "median", "q75", "max")
LOGFC_PSEUDOCOUNT = 0.1  # aggregation.py: aggregate_adata(pseudocount=0.1)
DE_METHOD = "t-test_overestim_var"  # aggregation.py: aggregate_adata(de_method=...)
_DIST_CLAMP = 1e-8  # geomloss: distances = sqrt(clamp_min(squared_distances, 1e-8))
_BLOCK = 2048  # rows per block in pairwise-distance sums


def metric_columns() -> list[str]:
    """All per-condition metric columns, in output order."""
    return [name + suffix for name in METRICS for suffix in ("",) + RANK_SUFFIXES]


def perturbench_summary_name(column: str) -> str:
    """PerturBench's ``summary.csv`` row name for one of our columns (``metric_[rank_]aggregation``)."""
    for name, (aggr, metric, _) in METRICS.items():
        if column == name:
            return f"{metric}_{aggr}"
        if column.startswith(name + "_rank"):
            return f"{metric}{column[len(name):]}_{aggr}"
    raise KeyError(column)


# --------------------------------------------------------------------------- input checks


def _labels(adata: ad.AnnData, pert_col: str, control_label: str, source: str) -> np.ndarray:
    if pert_col not in adata.obs.columns:
        raise PipelineInputError(source, f"obs['{pert_col}']", "perturbation column missing")
    labels = adata.obs[pert_col]
    if labels.isna().any():
        raise PipelineInputError(source, f"obs['{pert_col}']", f"{int(labels.isna().sum())} cell(s) have no condition label")
    return labels.astype(str).to_numpy()


def _dense(x) -> np.ndarray:
    return np.asarray(x.toarray() if sp.issparse(x) else x, dtype=np.float64)


def _validate(
    pred: ad.AnnData,
    truth: ad.AnnData,
    control_label: str,
    pert_col: str,
    pred_source: str,
    truth_source: str,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Check the pair of AnnData objects; return (pred labels, truth labels, sorted conditions)."""
    truth_labels = _labels(truth, pert_col, control_label, truth_source)
    pred_labels = _labels(pred, pert_col, control_label, pred_source)
    if not np.any(truth_labels == control_label):
        raise PipelineInputError(truth_source, f"obs['{pert_col}']", f"control label {control_label!r} not found")

    if truth.var_names.has_duplicates:
        raise PipelineInputError(truth_source, "var_names", "duplicated gene names")
    if not pred.var_names.equals(truth.var_names):
        missing = truth.var_names.difference(pred.var_names)
        extra = pred.var_names.difference(truth.var_names)
        if len(missing) or len(extra) or pred.n_vars != truth.n_vars:
            problem = (
                f"genes differ from {truth_source}: {len(missing)} missing (e.g. {list(missing[:3])}), "
                f"{len(extra)} extra (e.g. {list(extra[:3])})"
            )
        else:
            problem = f"same genes as {truth_source} but in another order"
        raise PipelineInputError(pred_source, "var_names", problem)

    truth_conds = set(truth_labels) - {control_label}
    pred_conds = set(pred_labels) - {control_label}
    if not truth_conds:
        raise PipelineInputError(truth_source, f"obs['{pert_col}']", "no non-control condition to score")
    if truth_conds != pred_conds:
        raise PipelineInputError(
            pred_source,
            f"obs['{pert_col}']",
            f"conditions differ from {truth_source}: not predicted {sorted(truth_conds - pred_conds)[:5]}, "
            f"not in truth {sorted(pred_conds - truth_conds)[:5]}",
        )
    # scanpy's t-test needs >= 2 cells per group (variance); so do the energy self-terms
    for labels, source in ((truth_labels, truth_source), (pred_labels, pred_source)):
        names, counts = np.unique(labels, return_counts=True)
        few = [n for n, c in zip(names, counts) if c < 2 and n != control_label]
        if few:
            raise PipelineInputError(source, f"obs['{pert_col}']", f"condition(s) with fewer than 2 cells: {few[:5]}")
    if np.count_nonzero(truth_labels == control_label) < 2:
        raise PipelineInputError(truth_source, f"obs['{pert_col}']", "fewer than 2 control cells")
    for adata, source in ((truth, truth_source), (pred, pred_source)):
        x = adata.X.data if sp.issparse(adata.X) else np.asarray(adata.X)
        if not np.all(np.isfinite(x)):
            raise PipelineInputError(source, "X", "non-finite value(s) (NaN or inf)")
    return pred_labels, truth_labels, sorted(truth_conds)


# --------------------------------------------------------------------------- aggregations


def _group_means(x: np.ndarray, labels: np.ndarray, conditions: list[str]) -> np.ndarray:
    return np.stack([x[labels == c].mean(axis=0) for c in conditions])


def _logfc(means: np.ndarray, control_mean: np.ndarray) -> np.ndarray:
    """aggregation.py:_logfc_helper with ctrl given and exp=False."""
    with np.errstate(divide="ignore", invalid="ignore"):
        lfc = np.log2(means + LOGFC_PSEUDOCOUNT) - np.log2(control_mean + LOGFC_PSEUDOCOUNT)
    return np.nan_to_num(lfc, nan=0.0, posinf=np.inf, neginf=-np.inf)


def _fit_pca(x_truth: np.ndarray, n_comps: int, mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """PCA fitted on the truth cells: (centering mean over all genes, loadings (k, n_genes)).

    Loadings of genes outside ``mask`` are 0, as in ``sc.tl.pca`` with a highly-variable mask.
    """
    mean = x_truth.mean(axis=0)
    cols = np.flatnonzero(mask) if mask is not None else np.arange(x_truth.shape[1])
    xc = x_truth[:, cols] - mean[cols]
    k = min(n_comps, xc.shape[0], xc.shape[1])
    if k < n_comps:
        logger.warning("pca_components=%d capped to %d (truth has %d cells x %d PCA genes)", n_comps, k, *xc.shape)
    _, _, vt = np.linalg.svd(xc, full_matrices=False)
    loadings = np.zeros((k, x_truth.shape[1]))
    loadings[:, cols] = vt[:k]
    return mean, loadings


def _t_scores(x: np.ndarray, labels: np.ndarray, conditions: list[str], control_label: str, genes: pd.Index) -> np.ndarray:
    """scanpy t-test_overestim_var scores of each condition vs control, +-inf -> 0; (n_cond, n_genes)."""
    import scanpy as sc

    adata = ad.AnnData(
        X=x,
        obs=pd.DataFrame({"_group": pd.Categorical(labels)}, index=[str(i) for i in range(len(labels))]),
        var=pd.DataFrame(index=genes),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sc.tl.rank_genes_groups(
            adata,
            groupby="_group",
            groups=conditions,
            reference=control_label,
            method=DE_METHOD,
            use_raw=False,
            n_genes=adata.n_vars,
            key_added="_de",
        )
    result = adata.uns["_de"]  # recarrays: one field per group, genes sorted by score
    out = np.empty((len(conditions), len(genes)))
    for i, cond in enumerate(conditions):
        scores = pd.Series(np.asarray(result["scores"][cond], dtype=np.float64), index=np.asarray(result["names"][cond]))
        out[i] = scores.reindex(genes).to_numpy()
    out[np.isinf(out)] = 0.0
    return out


# --------------------------------------------------------------------------- pairwise metrics


def _cosine_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return (a @ b.T) / np.outer(np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1))


def _rmse_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    sq = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * (a @ b.T)
    return np.sqrt(np.maximum(sq, 0.0) / a.shape[1])


def _mean_distance(x: np.ndarray, y: np.ndarray) -> float:
    """Mean over all pairs of sqrt(max(|x_i - y_j|^2, 1e-8)), in row blocks."""
    yy = (y * y).sum(1)
    total = 0.0
    for start in range(0, x.shape[0], _BLOCK):
        xb = x[start : start + _BLOCK]
        sq = (xb * xb).sum(1)[:, None] + yy[None, :] - 2.0 * (xb @ y.T)
        total += float(np.sqrt(np.maximum(sq, _DIST_CLAMP)).sum())
    return total / (x.shape[0] * y.shape[0])


def _energy_matrix(pred_sets: list[np.ndarray], truth_sets: list[np.ndarray]) -> np.ndarray:
    """M[i, j] = geomloss energy loss between predicted set i and true set j."""
    self_pred = np.array([_mean_distance(p, p) for p in pred_sets])
    self_truth = np.array([_mean_distance(t, t) for t in truth_sets])
    out = np.empty((len(pred_sets), len(truth_sets)))
    for i, p in enumerate(pred_sets):
        for j, t in enumerate(truth_sets):
            out[i, j] = _mean_distance(p, t) - 0.5 * self_pred[i] - 0.5 * self_truth[j]
    return out


def _top_k_sets(scores: np.ndarray, k: int, genes: pd.Index) -> list[set[int]]:
    """Indices of the k genes with largest |score| per row.

    PerturBench pivots DE results with genes as columns (sorted by name) and takes
    ``np.argsort(|s|)[::-1][:k]``; the same order is used here, with a stable sort so ties resolve
    deterministically (later name first among equal |score|).
    """
    order = np.argsort(np.asarray(genes, dtype=str), kind="stable")
    sets = []
    for row in scores:
        top = np.argsort(np.abs(row[order]), kind="stable")[::-1][:k]
        sets.append(set(order[top].tolist()))
    return sets


def _recall_matrix(pred_sets: list[set[int]], truth_sets: list[set[int]], k: int) -> np.ndarray:
    return np.array([[len(p & t) / k for t in truth_sets] for p in pred_sets], dtype=np.float64)


# --------------------------------------------------------------------------- ranks


def _rng(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), zlib.crc32(name.encode())]))


def rank_columns(mat: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    """PerturBench's ``rank_helper``: for each column j, rank of row j among all rows of column j.

    Rows are shuffled with ``rng`` and then sorted stably (best first: descending for
    ``"similarity"``, ascending for ``"distance"``; NaN last); the 0-based position of row ``j``
    is divided by ``n - 1`` (``n`` = number of rows; 0 when ``n == 1``).
    """
    if kind not in ("similarity", "distance"):
        raise ValueError(f"kind must be 'similarity' or 'distance', got {kind!r}")
    n_rows, n_cols = mat.shape
    ranks = np.zeros(n_cols)
    for j in range(n_cols):
        perm = rng.permutation(n_rows)
        values = mat[perm, j]
        key = -values if kind == "similarity" else values  # NaN stays NaN: argsort puts it last
        order = perm[np.argsort(key, kind="stable")]
        ranks[j] = float(np.flatnonzero(order == j)[0])
    return ranks / (n_rows - 1) if n_rows > 1 else ranks


# --------------------------------------------------------------------------- public API


def perturbench_metrics(
    pred: ad.AnnData,
    truth: ad.AnnData,
    control_label: str,
    pert_col: str = "condition",
    seed: int = 0,
    n_deg: int = 50,
    pca_components: int = 50,
    *,
    pred_source: str = "prediction",
    truth_source: str = "truth",
) -> pd.DataFrame:
    """Score a prediction with PerturBench's metrics (see the module docstring for definitions).

    Args:
        pred: Predicted cells, labelled in ``obs[pert_col]``, same genes (same order) as ``truth``
            and the same non-control conditions. Its control cells, if any, are ignored: the
            truth's control cells are used for both sides, as PerturBench does.
        truth: Real cells of the scored conditions plus real control cells; log-normalised ``.X``.
        control_label: Label of the control cells in ``obs[pert_col]``.
        pert_col: ``obs`` column holding condition labels in both objects.
        seed: Seed of the tie-breaking shuffle in the rank metrics.
        n_deg: ``k`` of the DEG recall (PerturBench: 50).
        pca_components: Number of PCs for ``mmd_pca`` (PerturBench's ``Evaluation.aggregate``
            default is 100, ``aggregate_adata``'s 30; PRiMeFlow reports 30).
        pred_source, truth_source: Names used in error messages (file paths when read from disk).

    Returns:
        One row per non-control condition (sorted), column ``condition`` then
        :func:`metric_columns` (``<metric>``, ``<metric>_rank``, ``<metric>_rank_transpose``).
        NaN is kept (e.g. cosine of an all-zero logFC).

    Raises:
        PipelineInputError: Naming the object/file and field on bad input.
    """
    if isinstance(n_deg, bool) or not isinstance(n_deg, (int, np.integer)) or n_deg < 1:
        raise PipelineInputError("perturbench_metrics()", "n_deg", f"must be an integer >= 1, got {n_deg!r}")
    if isinstance(pca_components, bool) or not isinstance(pca_components, (int, np.integer)) or pca_components < 1:
        raise PipelineInputError(
            "perturbench_metrics()", "pca_components", f"must be an integer >= 1, got {pca_components!r}"
        )
    pred_labels, truth_labels, conditions = _validate(pred, truth, control_label, pert_col, pred_source, truth_source)
    genes = truth.var_names

    x_truth = _dense(truth.X)
    is_ctrl = truth_labels == control_label
    x_ctrl = x_truth[is_ctrl]
    keep = pred_labels != control_label
    x_pred = _dense(pred.X[np.flatnonzero(keep)])
    pred_labels = pred_labels[keep]

    pred_sets = [x_pred[pred_labels == c] for c in conditions]
    truth_sets = [x_truth[truth_labels == c] for c in conditions]
    pred_means = np.stack([s.mean(axis=0) for s in pred_sets])
    truth_means = np.stack([s.mean(axis=0) for s in truth_sets])
    ctrl_mean = x_ctrl.mean(axis=0)

    mats: dict[str, np.ndarray] = {}
    mats["cosine_logfc"] = _cosine_matrix(_logfc(pred_means, ctrl_mean), _logfc(truth_means, ctrl_mean))
    mats["rmse_average"] = _rmse_matrix(pred_means, truth_means)
    mats["mmd_gex"] = _energy_matrix(pred_sets, truth_sets)

    mask = None
    if "highly_variable" in truth.var.columns:
        mask = truth.var["highly_variable"].to_numpy(dtype=bool)
        if not mask.any():
            raise PipelineInputError(truth_source, "var['highly_variable']", "no gene is marked highly variable")
    pc_mean, loadings = _fit_pca(x_truth, pca_components, mask)
    mats["mmd_pca"] = _energy_matrix(
        [(s - pc_mean) @ loadings.T for s in pred_sets], [(s - pc_mean) @ loadings.T for s in truth_sets]
    )

    # DE: predicted (resp. true) cells of every condition against the true control cells
    ctrl_lab = np.full(x_ctrl.shape[0], control_label, dtype=object)
    pred_scores = _t_scores(
        np.vstack([x_pred, x_ctrl]), np.concatenate([pred_labels.astype(object), ctrl_lab]), conditions, control_label, genes
    )
    truth_scores = _t_scores(
        np.vstack([np.vstack(truth_sets), x_ctrl]),
        np.concatenate([np.repeat(np.array(conditions, dtype=object), [len(s) for s in truth_sets]), ctrl_lab]),
        conditions,
        control_label,
        genes,
    )
    k = int(n_deg)
    mats["deg_recall"] = _recall_matrix(_top_k_sets(pred_scores, k, genes), _top_k_sets(truth_scores, k, genes), k)

    out = pd.DataFrame({CONDITION_COLUMN: conditions})
    for name, (_, _, kind) in METRICS.items():
        mat = mats[name]
        out[name] = np.diag(mat)
        out[name + "_rank"] = rank_columns(mat, kind, _rng(seed, name + "_rank"))
        out[name + "_rank_transpose"] = rank_columns(mat.T, kind, _rng(seed, name + "_rank_transpose"))
    return out


def perturbench_metrics_by_group(
    pred: ad.AnnData, truth: ad.AnnData, control_label: str, group_by: list[str], **kwargs
) -> pd.DataFrame:
    """:func:`perturbench_metrics` once per group (PerturBench evaluates each covariate separately).

    Each group's predicted and true cells are scored against that group's true controls; ranks are
    among the conditions of that group. Rows are (condition, group) pairs with the group columns
    after ``condition``. Without ``group_by`` this is :func:`perturbench_metrics`.
    """
    if not group_by:
        return perturbench_metrics(pred, truth, control_label, **kwargs)
    pert_col = kwargs.get("pert_col", "condition")
    t_keys = truth.obs[group_by].astype(str).agg("\t".join, axis=1).to_numpy()
    p_keys = pred.obs[group_by].astype(str).agg("\t".join, axis=1).to_numpy()
    is_test = truth.obs[pert_col].astype(str).to_numpy() != control_label
    frames = []
    for key in sorted(set(t_keys[is_test])):
        frame = perturbench_metrics(pred[p_keys == key], truth[t_keys == key], control_label, **kwargs)
        for j, (column, value) in enumerate(zip(group_by, key.split("\t"))):
            frame.insert(1 + j, column, value)
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def summarise(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per metric column of ``frame``: count (non-NaN), mean, std (ddof=1), min, quartiles, max."""
    rows = []
    for col in frame.columns:
        if col == CONDITION_COLUMN or not pd.api.types.is_numeric_dtype(frame[col]):
            continue
        v = frame[col].astype(np.float64).dropna()
        q = v.quantile([0.25, 0.5, 0.75]) if len(v) else pd.Series([np.nan] * 3, index=[0.25, 0.5, 0.75])
        rows.append(
            {
                "metric": col,
                "count": int(len(v)),
                "mean": v.mean() if len(v) else np.nan,
                "std": v.std(ddof=1) if len(v) > 1 else np.nan,
                "min": v.min() if len(v) else np.nan,
                "q25": q[0.25],
                "median": q[0.5],
                "q75": q[0.75],
                "max": v.max() if len(v) else np.nan,
            }
        )
    return pd.DataFrame(rows, columns=list(SUMMARY_COLUMNS))


def _remove(*paths: Path) -> None:
    for path in paths:
        if path.exists():
            path.unlink()


def score_perturbench(
    pred_path: str | os.PathLike,
    truth_path: str | os.PathLike,
    control_label: str,
    out_per_condition: str | os.PathLike,
    out_summary: str | os.PathLike,
    pert_col: str = "condition",
    seed: int = 0,
    n_deg: int = 50,
    pca_components: int = 50,
) -> pd.DataFrame:
    """Read two h5ad files, check the prediction contract, write per-condition and summary CSVs.

    The prediction must satisfy the pipeline's contract (:func:`perturb_repro.scoring.contract.check_prediction`).
    Both CSVs are computed before either is written and each is written atomically; stale copies
    are removed first and after a failure neither output exists.

    Returns:
        The summary frame (also written to ``out_summary``).
    """
    from perturb_repro.scoring.contract import check_prediction, group_columns

    pred_path, truth_path = Path(pred_path), Path(truth_path)
    out_per_condition, out_summary = Path(out_per_condition), Path(out_summary)
    _remove(out_per_condition, out_summary)
    for path in (pred_path, truth_path):
        if not path.is_file():
            raise PipelineInputError(path, "(file)", "does not exist")
    pred = ad.read_h5ad(pred_path)
    truth = ad.read_h5ad(truth_path)
    group_by = group_columns(truth)
    check_prediction(pred, truth, pert_col, control_label, str(pred_path), str(truth_path), group_by)
    per_condition = perturbench_metrics_by_group(
        pred, truth, control_label, group_by, pert_col=pert_col, seed=seed, n_deg=n_deg,
        pca_components=pca_components, pred_source=str(pred_path), truth_source=str(truth_path),
    )
    summary = summarise(per_condition)
    try:
        write_csv(per_condition, out_per_condition, index=False)
        write_csv(summary, out_summary, index=False)
    except BaseException:
        _remove(out_per_condition, out_summary)
        raise
    logger.info(
        "PerturBench metrics for %d condition(s): %s",
        len(per_condition),
        ", ".join(f"{m}={v:.4g}" for m, v in zip(summary["metric"], summary["mean"]) if not m.endswith("_transpose")),
    )
    return summary

"""PerturBench's evaluation metrics (as used by PRiMeFlow), re-implemented from its definitions.

Reference: altoslabs/perturbench, the later release (commit ``fc13a8c``; ``metrics.py``,
``aggregation.py``, ``evaluation.py`` and ``embed_cells.py`` as stored at ``c84038b``, whose content
``fc13a8c`` shares), files ``src/perturbench/analysis/benchmarks/{metrics,aggregation,evaluation}.py``,
``src/perturbench/analysis/embed_cells.py`` and ``src/perturbench/modelcore/models/base.py``
(``test_step`` / ``on_test_end``: the path that writes PerturBench's ``summary.csv``). The first
release (``4dd6a03`` / ``d357dfa``) has no MMD, PCA or DEG-recall metric at all, and its ranks are
normalised by ``n`` instead of ``n - 1`` (option ``rank_normalisation``).
No PerturBench code is used or copied; every quantity is computed here with numpy/scipy. The DE
test PerturBench calls (scanpy's ``rank_genes_groups``, ``t-test_overestim_var``) is computed from
per-condition means and variances exactly as scanpy computes them (``_get_mean_var`` then
``scipy.stats.ttest_ind_from_stats``), without stacking the cells into a new AnnData.

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
    Computed exactly in float64 by default (``distance_dtype``). geomloss itself works in float32 via
    ``|x|^2 + |y|^2 - 2x.y``, so its zero self-distances come out as sqrt(round-off) rather than
    1e-4; its self terms are slightly too large, so its MMD is slightly too low (by ~2e-4 on
    40-gene toy data, more with more genes), which this exact computation does not reproduce.
``mmd_pca``  (``pca`` / ``mmd``; ``aggregation.py:_pca_helper``, ``embed_cells.py:train_pca``)
    the same energy MMD after projecting every cell onto PCs fitted on the **truth AnnData (all of
    its cells: the test conditions plus the control cells, of every covariate group)**, never on the
    prediction:
    ``(x - mean_truth) @ loadings.T``. Like ``sc.tl.pca`` (which PerturBench calls with defaults),
    the PCA uses only ``var["highly_variable"]`` genes when the truth has that column.
``deg_recall``  (``scores`` / ``top_k_recall``; ``aggregation.py:_differential_expression_helper``)
    scanpy ``rank_genes_groups(groupby=condition, reference=control,
    method="t-test_overestim_var")`` t-scores (NaN -> 0 as scanpy), +-inf -> 0, for truth (true cells vs true control)
    and for the prediction (predicted cells vs true control); recall =
    ``|top_k(|score_pred|) & top_k(|score_truth|)| / k`` with ``k = n_deg`` (PerturBench: 50),
    over all genes. The denominator is ``k`` even when fewer genes exist (as in PerturBench).

Rank metrics (``metrics.py:rank_helper``, ``evaluation.py:evaluate_rank``): the pairwise matrix
``M[i, j] = metric(prediction of condition i, truth of condition j)`` is built for all pairs.

* ``<metric>_rank`` -- PerturBench's ``rank`` (the value its summary reports as ``*_rank_*`` and
  PRiMeFlow tabulates): for each **true** condition ``j``, the 0-based position of prediction ``j``
  among all predictions ordered by ``M[:, j]`` (best first), divided by ``n - 1`` (later release,
  ``rank_helper``: ``rel_ranks / (len(rel_ranks) - 1)`` when ``n > 1``; with ``rank_normalisation:
  n``, by ``n`` as the first release's ``rel_ranks / len(rel_ranks)``).
* ``<metric>_rank_transpose`` -- PerturBench's ``rank_transpose`` (``rank_helper(mat.T)``): for
  each **predicted** condition ``i``, the position of truth ``i`` among all truths ordered by
  ``M[i, :]``, with the same normalisation.

0 = the matching condition is best; with ``n - 1``, 1 = worst and ~0.5 = random. "Best" is the
largest value for similarities (cosine, recall) and the smallest for distances (RMSE, MMD); NaN
sorts last. PerturBench shuffles (unseeded) before sorting to break ties, which puts the matching
condition uniformly among the values tied with it; here that uniform draw is made directly (seeded by
``seed``), for all conditions at once. With a single condition the rank is 0. The per-condition
value of a metric is the diagonal ``M[p, p]``, which is exactly PerturBench's ``compare_perts`` value.

At scale: nothing is copied per condition (conditions are index arrays into the two matrices; inputs
stay in their float32), group means/variances and the PCA covariance are accumulated in float64 row
blocks, the two energy matrices come from one blockwise pass over all (predicted, true) cell pairs
(numpy, or torch on a CUDA device) whose distance blocks are summed per (condition, condition) tile,
and the recall and rank matrices are single array operations. Settings that trade exactness for size
(:class:`Options`: ``distance_dtype``, ``max_cells_per_condition``) default to the exact path and are
recorded in the summary's ``settings`` column.

PerturBench evaluates each covariate (e.g. cell line) separately: with ``group_by`` (the truth's
``uns['group_by']``) :func:`perturbench_metrics_by_group` scores each group against its own true
controls, ranks among that group's conditions, and the summary is over all (condition, group) rows.
"""

from __future__ import annotations

import logging
import os
import json
import zlib
from dataclasses import dataclass, fields
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from perturb_repro.errors import PipelineInputError
from perturb_repro.io import remove_outputs, write_csvs
from perturb_repro.scoring.pb_cells import Cells, Kernel, Points, condition_stats, energy_matrix, read_rows

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
SETTINGS_COLUMN = "settings"  # perturbench.csv's last column: the Options used (JSON)
LOGFC_PSEUDOCOUNT = 0.1  # aggregation.py: aggregate_adata(pseudocount=0.1)
DE_METHOD = "t-test_overestim_var"  # aggregation.py: aggregate_adata(de_method=...)
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


def _validate(
    pred: ad.AnnData,
    truth: ad.AnnData,
    control_label: str,
    pert_col: str,
    pred_source: str,
    truth_source: str,
    block: int = 2048,
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
        x = adata.X.data[None, :] if sp.issparse(adata.X) else adata.X
        for i0 in range(0, x.shape[0], block):  # in row blocks: no full-size temporary
            if not np.all(np.isfinite(x[i0 : i0 + block])):
                raise PipelineInputError(source, "X", "non-finite value(s) (NaN or inf)")
    return pred_labels, truth_labels, sorted(truth_conds)


# --------------------------------------------------------------------------- options


RANK_NORMALISATIONS = ("n_minus_1", "n")
DISTANCE_DTYPES = ("float64", "float32")
DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class Options:
    """Settings of the computation (``scoring.perturbench`` in the config); defaults are the exact path.

    rank_normalisation: ``n_minus_1`` = PerturBench's later release (``metrics.py:rank_helper`` at
        c84038b / fc13a8c: position / (n - 1), n > 1), the release whose MMD / PCA / DEG-recall metrics
        PRiMeFlow reports; ``n`` = its first release (4dd6a03 / d357dfa: position / n).
    distance_dtype: dtype of the pairwise-distance products of ``mmd_gex`` / ``mmd_pca``. ``float64`` is
        exact; ``float32`` is ~2x faster and carries float32 round-off (as geomloss, PerturBench's own
        MMD, does). Inputs are never cast as a whole: blocks are cast as they are used.
    max_cells_per_condition: ``None`` = all cells (exact). An integer caps the cells of each (predicted
        and true) condition entering the two MMDs at a seeded random subsample (every other metric uses
        all cells); not PerturBench's definition, for sizes where the n_pred x n_truth sums are too big.
    block_size: rows per block of the blockwise pairwise sums (memory ~ block_size^2 x 8 bytes).
    device: ``auto`` (CUDA through torch when available, else numpy), ``cpu`` or ``cuda``.
    """

    rank_normalisation: str = "n_minus_1"
    distance_dtype: str = "float64"
    max_cells_per_condition: int | None = None
    block_size: int = _BLOCK
    device: str = "auto"

    def __post_init__(self) -> None:
        where = "scoring.perturbench"
        if self.rank_normalisation not in RANK_NORMALISATIONS:
            raise PipelineInputError(where, "rank_normalisation", f"must be one of {RANK_NORMALISATIONS}, got {self.rank_normalisation!r}")
        if self.distance_dtype not in DISTANCE_DTYPES:
            raise PipelineInputError(where, "distance_dtype", f"must be one of {DISTANCE_DTYPES}, got {self.distance_dtype!r}")
        if self.device not in DEVICES:
            raise PipelineInputError(where, "device", f"must be one of {DEVICES}, got {self.device!r}")
        m = self.max_cells_per_condition
        if m is not None and (isinstance(m, bool) or not isinstance(m, (int, np.integer)) or m < 2):
            raise PipelineInputError(where, "max_cells_per_condition", f"must be null or an integer >= 2, got {m!r}")
        b = self.block_size
        if isinstance(b, bool) or not isinstance(b, (int, np.integer)) or b < 1:
            raise PipelineInputError(where, "block_size", f"must be an integer >= 1, got {b!r}")

    @classmethod
    def from_config(cls, options: dict | None) -> "Options":
        """From a ``scoring.perturbench`` mapping (other keys of it, e.g. ``seed``, are ignored here)."""
        options = dict(options or {})
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in options.items() if k in names})

    def record(self) -> dict:
        """What the summary's ``settings`` column records (the result-changing settings and the backend)."""
        return {
            "rank_normalisation": self.rank_normalisation,
            "distance_dtype": self.distance_dtype,
            "max_cells_per_condition": self.max_cells_per_condition,
            "backend": _backend(self.device),
        }


def _backend(device: str) -> str:
    if device == "cpu":
        return "numpy"
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None and torch.cuda.is_available():
        return "torch-cuda"
    if device == "cuda":
        raise PipelineInputError("scoring.perturbench", "device", "cuda asked for but torch sees no CUDA device")
    return "numpy"


# --------------------------------------------------------------------------- aggregations


def _logfc(means: np.ndarray, control_mean: np.ndarray) -> np.ndarray:
    """aggregation.py:_logfc_helper with ctrl given and exp=False."""
    with np.errstate(divide="ignore", invalid="ignore"):
        lfc = np.log2(means + LOGFC_PSEUDOCOUNT) - np.log2(control_mean + LOGFC_PSEUDOCOUNT)
    return np.nan_to_num(lfc, nan=0.0, posinf=np.inf, neginf=-np.inf)


def fit_pca(x, rows: np.ndarray, n_comps: int, mask: np.ndarray | None, block: int = _BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """PCA of the cells ``rows`` of ``x``: (centering mean over all genes, loadings (k, n_genes)).

    The principal axes are the top eigenvectors of the covariance, accumulated in float64 row blocks
    (no centred copy of the data); they span the same subspace as ``sc.tl.pca``'s, and every distance
    in PC space depends only on that subspace. Loadings of genes outside ``mask`` are 0, as in
    ``sc.tl.pca`` with a highly-variable mask.
    """
    n_genes = x.shape[1]
    cols = np.flatnonzero(mask) if mask is not None else np.arange(n_genes)
    total = np.zeros(n_genes)
    for i0 in range(0, len(rows), block):
        total += read_rows(x, rows[i0 : i0 + block]).sum(axis=0, dtype=np.float64)
    mean = total / len(rows)
    cov = np.zeros((len(cols), len(cols)))
    for i0 in range(0, len(rows), block):
        xc = read_rows(x, rows[i0 : i0 + block], np.float64)[:, cols] - mean[cols]
        cov += xc.T @ xc
    k = min(n_comps, len(rows), len(cols))
    if k < n_comps:
        logger.warning("pca_components=%d capped to %d (truth has %d cells x %d PCA genes)", n_comps, k, len(rows), len(cols))
    w, v = np.linalg.eigh(cov)
    top = np.argsort(w)[::-1][:k]
    loadings = np.zeros((k, n_genes))
    loadings[:, cols] = v[:, top].T
    return mean, loadings


def _project(cells: Cells, mean: np.ndarray, loadings: np.ndarray, block: int) -> np.ndarray:
    """PC coordinates of the sorted rows of ``cells``: ``(x - mean) @ loadings.T`` (float64, (n, k))."""
    out = np.empty((len(cells.rows), loadings.shape[0]))
    for i0 in range(0, len(cells.rows), block):
        out[i0 : i0 + block] = (read_rows(cells.x, cells.rows[i0 : i0 + block], np.float64) - mean) @ loadings.T
    return out


def _t_scores(mean: np.ndarray, var: np.ndarray, counts: np.ndarray, ctrl_mean: np.ndarray, ctrl_var: np.ndarray) -> np.ndarray:
    """scanpy ``t-test_overestim_var`` of every condition vs control, NaN -> 0 (scanpy), +-inf -> 0 (PerturBench).

    ``scipy.stats.ttest_ind_from_stats(mean, sqrt(var), n, ctrl_mean, sqrt(ctrl_var), n, equal_var=False)``
    with the group's own ``n`` for both sides, exactly as scanpy's ``_RankGenes.t_test`` calls it.
    """
    from scipy import stats

    n = counts[:, None].astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        scores, _ = stats.ttest_ind_from_stats(
            mean1=mean, std1=np.sqrt(var), nobs1=n, mean2=ctrl_mean[None, :], std2=np.sqrt(ctrl_var)[None, :],
            nobs2=n, equal_var=False,
        )
    scores = np.asarray(scores, dtype=np.float64)
    scores[np.isnan(scores)] = 0.0
    scores[np.isinf(scores)] = 0.0
    return scores


def _top_k_mask(scores: np.ndarray, k: int, genes: pd.Index) -> np.ndarray:
    """Boolean (C, G): the k genes with largest |score| per row.

    PerturBench pivots DE results with genes as columns (sorted by name) and takes
    ``np.argsort(|s|)[::-1][:k]``; the same order is used here, with a stable sort so ties resolve
    deterministically (later name first among equal |score|).
    """
    order = np.argsort(np.asarray(genes, dtype=str), kind="stable")
    top = np.argsort(np.abs(scores[:, order]), axis=1, kind="stable")[:, ::-1][:, :k]
    mask = np.zeros(scores.shape, dtype=bool)
    mask[np.arange(scores.shape[0])[:, None], order[top]] = True
    return mask


def _recall_matrix(pred_top: np.ndarray, truth_top: np.ndarray, k: int) -> np.ndarray:
    """M[i, j] = |top_k(pred i) & top_k(truth j)| / k (one matrix product of 0/1 masks; exact)."""
    return (pred_top.astype(np.float32) @ truth_top.T.astype(np.float32)).astype(np.float64) / k


# --------------------------------------------------------------------------- pairwise metrics


def _cosine_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return (a @ b.T) / np.outer(np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1))


def _rmse_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    na, nb = (a * a).sum(1), (b * b).sum(1)
    sq = na[:, None] + nb[None, :] - 2.0 * (a @ b.T)
    # where the expansion cancels (near-identical means), take the difference itself
    i, j = np.nonzero(sq <= 1e-6 * (na[:, None] + nb[None, :]))
    for s in range(0, len(i), 4096):
        sl = slice(s, s + 4096)
        sq[i[sl], j[sl]] = ((a[i[sl]] - b[j[sl]]) ** 2).sum(1)
    return np.sqrt(np.maximum(sq, 0.0) / a.shape[1])


# --------------------------------------------------------------------------- ranks


def _rng(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), zlib.crc32(name.encode())]))


def rank_columns(mat: np.ndarray, kind: str, rng: np.random.Generator, normalisation: str = "n_minus_1") -> np.ndarray:
    """PerturBench's ``rank_helper`` on a square matrix: for each column j, the rank of row j in column j.

    Upstream (``metrics.py:rank_helper``) shuffles column j, sorts it (best first: descending for
    ``"similarity"``, ascending for ``"distance"``; NaN last) and takes the 0-based position of row j;
    after a uniform shuffle that position is ``#better + U`` with ``U`` uniform on ``0..#tied`` (the
    other rows equal to ``M[j, j]``; NaN ties with NaN and is worse than any number). This computes
    exactly that, for all columns at once, drawing ``U`` from ``rng``. The position is divided by
    ``n - 1`` (``normalisation="n_minus_1"``: the later release, 0 when ``n == 1``) or by ``n``
    (``"n"``: the first release); ``n`` = number of columns.
    """
    if kind not in ("similarity", "distance"):
        raise ValueError(f"kind must be 'similarity' or 'distance', got {kind!r}")
    if normalisation not in RANK_NORMALISATIONS:
        raise ValueError(f"normalisation must be one of {RANK_NORMALISATIONS}, got {normalisation!r}")
    mat = np.asarray(mat, dtype=np.float64)
    n_rows, n_cols = mat.shape
    if n_rows != n_cols:
        raise ValueError(f"rank_columns needs a square matrix, got {mat.shape}")
    key = -mat if kind == "similarity" else mat  # smaller is better
    target = np.diag(key)
    nan = np.isnan(key)
    target_nan = np.isnan(target)
    with np.errstate(invalid="ignore"):
        better = np.where(target_nan, (~nan).sum(axis=0), (key < target[None, :]).sum(axis=0))
        ties = np.where(target_nan, nan.sum(axis=0), (key == target[None, :]).sum(axis=0)) - 1
    position = (better + rng.integers(0, ties + 1)).astype(np.float64)
    if normalisation == "n":
        return position / n_cols
    return position / (n_cols - 1) if n_cols > 1 else position


# --------------------------------------------------------------------------- public API


def _score_group(
    pred_x, pred_labels: np.ndarray, pred_rows: np.ndarray,
    truth_x, truth_labels: np.ndarray, truth_rows: np.ndarray,
    control_label: str, conditions: list[str], genes: pd.Index, pca: tuple[np.ndarray, np.ndarray],
    seed: int, n_deg: int, opts: Options,
) -> pd.DataFrame:
    """All metrics for the conditions of one group: predicted rows vs true rows vs that group's true controls."""
    block = int(opts.block_size)
    n_genes = len(genes)
    p_cells = Cells.of(pred_x, pred_labels, conditions, pred_rows)
    t_cells = Cells.of(truth_x, truth_labels, conditions, truth_rows)
    ctrl = Cells.of(truth_x, truth_labels, [control_label], truth_rows)
    for cells, what in ((p_cells, "predicted"), (t_cells, "true")):
        few = [c for c, n in zip(conditions, cells.counts) if n < 2]
        if few:  # the t-test needs a variance, the energy self-terms pairs
            raise PipelineInputError("perturbench_metrics()", "obs (condition, group)", f"condition(s) with fewer than 2 {what} cells in their group: {few[:5]}")

    p_mean, p_var = condition_stats(p_cells, n_genes, block)
    t_mean, t_var = condition_stats(t_cells, n_genes, block)
    c_mean, c_var = condition_stats(ctrl, n_genes, block)
    c_mean, c_var = c_mean[0], c_var[0]

    mats: dict[str, np.ndarray] = {}
    mats["cosine_logfc"] = _cosine_matrix(_logfc(p_mean, c_mean), _logfc(t_mean, c_mean))
    mats["rmse_average"] = _rmse_matrix(p_mean, t_mean)

    backend = _backend(opts.device)
    kernel = Kernel(backend)
    dtype = np.dtype(opts.distance_dtype)
    rng = _rng(seed, "max_cells_per_condition")
    p_e = p_cells.subsample(opts.max_cells_per_condition, rng)
    t_e = t_cells.subsample(opts.max_cells_per_condition, rng)
    pc_mean, loadings = pca
    # centring on the truth's mean leaves every distance unchanged and keeps |x|^2 small (round-off)
    mats["mmd_gex"] = energy_matrix(Points(p_e, dtype, center=pc_mean), Points(t_e, dtype, center=pc_mean), kernel, block)
    mats["mmd_pca"] = energy_matrix(
        Points(p_e, dtype, coords=_project(p_e, pc_mean, loadings, block)),
        Points(t_e, dtype, coords=_project(t_e, pc_mean, loadings, block)),
        kernel, block,
    )

    k = int(n_deg)
    pred_top = _top_k_mask(_t_scores(p_mean, p_var, p_cells.counts, c_mean, c_var), k, genes)
    truth_top = _top_k_mask(_t_scores(t_mean, t_var, t_cells.counts, c_mean, c_var), k, genes)
    mats["deg_recall"] = _recall_matrix(pred_top, truth_top, k)

    out = pd.DataFrame({CONDITION_COLUMN: conditions})
    for name, (_, _, kind) in METRICS.items():
        mat = mats[name]
        out[name] = np.diag(mat)
        out[name + "_rank"] = rank_columns(mat, kind, _rng(seed, name + "_rank"), opts.rank_normalisation)
        out[name + "_rank_transpose"] = rank_columns(
            mat.T, kind, _rng(seed, name + "_rank_transpose"), opts.rank_normalisation
        )
    return out


def _check_args(n_deg, pca_components) -> None:
    if isinstance(n_deg, bool) or not isinstance(n_deg, (int, np.integer)) or n_deg < 1:
        raise PipelineInputError("perturbench_metrics()", "n_deg", f"must be an integer >= 1, got {n_deg!r}")
    if isinstance(pca_components, bool) or not isinstance(pca_components, (int, np.integer)) or pca_components < 1:
        raise PipelineInputError(
            "perturbench_metrics()", "pca_components", f"must be an integer >= 1, got {pca_components!r}"
        )


def hvg_mask(truth: ad.AnnData, truth_source: str) -> np.ndarray | None:
    if "highly_variable" not in truth.var.columns:
        return None
    mask = truth.var["highly_variable"].to_numpy(dtype=bool)
    if not mask.any():
        raise PipelineInputError(truth_source, "var['highly_variable']", "no gene is marked highly variable")
    return mask


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
    options: Options | dict | None = None,
) -> pd.DataFrame:
    """Score a prediction with PerturBench's metrics (see the module docstring for definitions).

    Args:
        pred: Predicted cells, labelled in ``obs[pert_col]``, same genes (same order) as ``truth``
            and the same non-control conditions. Its control cells, if any, are ignored: the
            truth's control cells are used for both sides, as PerturBench does.
        truth: Real cells of the scored conditions plus real control cells; log-normalised ``.X``.
        control_label: Label of the control cells in ``obs[pert_col]``.
        pert_col: ``obs`` column holding condition labels in both objects.
        seed: Seed of the tie-breaking draws in the rank metrics (and of a subsample, if asked for).
        n_deg: ``k`` of the DEG recall (PerturBench: 50).
        pca_components: Number of PCs for ``mmd_pca`` (PerturBench's ``Evaluation.aggregate``
            default is 100, ``aggregate_adata``'s 30; PRiMeFlow reports 30).
        pred_source, truth_source: Names used in error messages (file paths when read from disk).
        options: :class:`Options` (or a ``scoring.perturbench`` mapping); default = the exact path.

    Returns:
        One row per non-control condition (sorted), column ``condition`` then
        :func:`metric_columns` (``<metric>``, ``<metric>_rank``, ``<metric>_rank_transpose``).
        NaN is kept (e.g. cosine of an all-zero logFC).

    Raises:
        PipelineInputError: Naming the object/file and field on bad input.
    """
    return perturbench_metrics_by_group(
        pred, truth, control_label, [], pert_col=pert_col, seed=seed, n_deg=n_deg, pca_components=pca_components,
        pred_source=pred_source, truth_source=truth_source, options=options,
    )


def perturbench_metrics_by_group(
    pred: ad.AnnData,
    truth: ad.AnnData,
    control_label: str,
    group_by: list[str],
    pert_col: str = "condition",
    seed: int = 0,
    n_deg: int = 50,
    pca_components: int = 50,
    *,
    pred_source: str = "prediction",
    truth_source: str = "truth",
    options: Options | dict | None = None,
    groups: set[str] | None = None,
    pca: tuple[np.ndarray, np.ndarray] | None = None,
) -> pd.DataFrame:
    """:func:`perturbench_metrics` per group (PerturBench evaluates each covariate separately).

    Each group's predicted and true cells are scored against that group's true controls; ranks are
    among the conditions of that group. The PCA of ``mmd_pca`` is fitted once on all truth cells, as
    PerturBench's ``aggregate_adata`` fits it on the whole reference before splitting by covariate.
    Rows are (condition, group) pairs with the group columns after ``condition``. Without
    ``group_by`` there is one group (all cells). No per-group copy of either matrix is made: groups
    and conditions are index arrays into the two matrices.

    ``groups`` (keys of :func:`group_keys`) scores only those groups (a scoring shard; groups are independent);
    ``pca`` = (mean, loadings) of :func:`fit_pca` on the *whole* truth, for a shard that holds part of it.
    """
    _check_args(n_deg, pca_components)
    opts = options if isinstance(options, Options) else Options.from_config(options)
    pred_labels, truth_labels, _ = _validate(pred, truth, control_label, pert_col, pred_source, truth_source, opts.block_size)
    genes = truth.var_names
    pred_x, truth_x = pred.X, truth.X
    if pca is None:
        pca = fit_pca(truth_x, np.arange(truth.n_obs), int(pca_components), hvg_mask(truth, truth_source), int(opts.block_size))

    t_keys, p_keys = group_keys(truth.obs, group_by), group_keys(pred.obs, group_by)
    is_test = truth_labels != control_label
    frames = []
    for key in sorted(set(t_keys[is_test])):
        if groups is not None and key not in groups:
            continue
        t_rows = np.flatnonzero(t_keys == key)
        p_rows = np.flatnonzero((p_keys == key) & (pred_labels != control_label))
        conditions = sorted(set(truth_labels[t_rows]) - {control_label})
        if np.count_nonzero(truth_labels[t_rows] == control_label) < 2:
            raise PipelineInputError(truth_source, f"obs['{pert_col}']", f"group {key!r}: fewer than 2 control cells")
        frame = _score_group(
            pred_x, pred_labels, p_rows, truth_x, truth_labels, t_rows, control_label, conditions, genes, pca,
            seed, n_deg, opts,
        )
        for j, (column, value) in enumerate(zip(group_by, str(key).split("\t"))):
            frame.insert(1 + j, column, value)
        frames.append(frame)
    if not frames:
        return pd.DataFrame(columns=[CONDITION_COLUMN, *group_by, *metric_columns()])
    return pd.concat(frames, ignore_index=True)


def group_keys(obs: pd.DataFrame, group_by: list[str]) -> np.ndarray:
    """One key per cell: its group_by values joined by a tab ("" for every cell without group_by)."""
    if not group_by:
        return np.full(len(obs), "", dtype=object)
    return obs[list(group_by)].astype(str).agg("\t".join, axis=1).to_numpy()


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
    options: Options | dict | None = None,
) -> pd.DataFrame:
    """Read two h5ad files, check the prediction contract, write per-condition and summary CSVs.

    The prediction must satisfy the pipeline's contract (:func:`perturb_repro.scoring.contract.check_prediction`).
    Both CSVs are computed before either is written and each is written atomically; stale copies
    are removed first and after a failure neither output exists. The summary's last column,
    ``settings``, records (as JSON, same on every row) the :class:`Options` that change results
    (rank normalisation, distance dtype, cell cap) and the backend used.

    Returns:
        The summary frame (also written to ``out_summary``).
    """
    from perturb_repro.scoring.contract import check_prediction, group_columns

    opts = options if isinstance(options, Options) else Options.from_config(options)
    pred_path, truth_path = Path(pred_path), Path(truth_path)
    out_per_condition, out_summary = Path(out_per_condition), Path(out_summary)
    remove_outputs(out_per_condition, out_summary)
    for path in (pred_path, truth_path):
        if not path.is_file():
            raise PipelineInputError(path, "(file)", "does not exist")
    pred = ad.read_h5ad(pred_path)
    truth = ad.read_h5ad(truth_path)
    group_by = group_columns(truth)
    check_prediction(pred, truth, pert_col, control_label, str(pred_path), str(truth_path), group_by)
    per_condition = perturbench_metrics_by_group(
        pred, truth, control_label, group_by, pert_col=pert_col, seed=seed, n_deg=n_deg,
        pca_components=pca_components, pred_source=str(pred_path), truth_source=str(truth_path), options=opts,
    )
    return write_outputs(per_condition, out_per_condition, out_summary, opts, seed, n_deg, pca_components)


def write_outputs(
    per_condition: pd.DataFrame, out_per_condition: Path, out_summary: Path, opts: Options, seed: int, n_deg: int,
    pca_components: int,
) -> pd.DataFrame:
    """Summarise ``per_condition`` and write both CSVs (the summary's ``settings`` column: options + seed, k, PCs)."""
    out_per_condition, out_summary = Path(out_per_condition), Path(out_summary)
    summary = summarise(per_condition)
    summary[SETTINGS_COLUMN] = json.dumps({**opts.record(), "seed": int(seed), "n_deg": int(n_deg),
                                           "pca_components": int(pca_components)}, sort_keys=True)
    write_csvs((per_condition, out_per_condition), (summary, out_summary), index=False)
    logger.info(
        "PerturBench metrics for %d condition(s): %s",
        len(per_condition),
        ", ".join(f"{m}={v:.4g}" for m, v in zip(summary["metric"], summary["mean"]) if not m.endswith("_transpose")),
    )
    return summary

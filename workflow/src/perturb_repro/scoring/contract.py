"""Contract checks for the files cell-eval scores: the truth file and a model's prediction file.

cell-eval validates little and, where it does, fails late (after minutes of differential
expression) or silently changes the data (integer-valued input is re-normalised and log1p'd).
These checks run first, in the calling process, and raise
:class:`~perturb_repro.errors.PipelineInputError` naming the file and the field at fault.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from perturb_repro.errors import PipelineInputError

# Above this, values are almost surely raw counts (log1p of a 1e4-normalised count tops out ~9.2).
RAW_COUNT_MAX = 50.0
# cell-eval's own ceiling (cell_eval.utils.guess_is_lognorm, max_threshold=15): data with decimals
# and max >= 15 makes MetricsEvaluator raise, so catch it here with a better message.
CELLEVAL_LOG1P_MAX = 15.0
# cell-eval treats data whose fractional parts are all <= 1e-3 as integer counts and silently
# re-normalises it; mirror its test so such data is refused instead of quietly transformed.
CELLEVAL_FRAC_EPSILON = 1e-3
# Control means of prediction and truth must agree to float32 round-off (the prediction carries
# the same real control cells; cell-eval computes the predicted delta against them).
CONTROL_MEAN_ATOL = 1e-4
# Rows per block when scanning a dense matrix, so a large .X never needs a full-size temporary.
_BLOCK_ROWS = 8192


def _name_some(items: Iterable[object], limit: int = 5) -> str:
    """Render up to ``limit`` items, noting how many were left out."""
    items = sorted(str(i) for i in items)
    shown = ", ".join(repr(i) for i in items[:limit])
    if len(items) > limit:
        shown += f", ... ({len(items) - limit} more)"
    return shown


def _labels(adata: ad.AnnData, pert_col: str, control_label: str, source: str) -> pd.Series:
    """Return ``obs[pert_col]`` after checking it exists, has no missing labels and holds the control."""
    if pert_col not in adata.obs.columns:
        raise PipelineInputError(
            source,
            f"obs['{pert_col}']",
            f"perturbation column missing; obs has columns {_name_some(adata.obs.columns, 10)}",
        )
    labels = adata.obs[pert_col]
    n_missing = int(labels.isna().sum())
    if n_missing:
        raise PipelineInputError(source, f"obs['{pert_col}']", f"{n_missing} cell(s) have no condition label")
    as_str = labels.astype(str)
    if control_label not in set(as_str):
        raise PipelineInputError(
            source,
            f"obs['{pert_col}']",
            f"control label {control_label!r} not found; labels include {_name_some(as_str.unique(), 5)}",
        )
    # Declared categories with no cells would reach cell-eval as a condition it cannot score.
    if isinstance(labels.dtype, pd.CategoricalDtype):
        counts = labels.value_counts()
        empty = counts.index[counts == 0]
        if len(empty):
            raise PipelineInputError(
                source, f"obs['{pert_col}']", f"{len(empty)} condition(s) have zero cells: {_name_some(empty)}"
            )
    return as_str


def _check_var_names_unique(adata: ad.AnnData, source: str) -> None:
    """Refuse duplicated gene names: gene-level comparisons would be ambiguous."""
    dup = adata.var_names[adata.var_names.duplicated()]
    if len(dup):
        raise PipelineInputError(source, "var_names", f"{len(dup)} duplicated gene name(s): {_name_some(set(dup))}")


def _row_blocks(x: np.ndarray) -> Iterator[np.ndarray]:
    for start in range(0, x.shape[0], _BLOCK_ROWS):
        yield np.asarray(x[start : start + _BLOCK_ROWS])


def _check_values(adata: ad.AnnData, source: str) -> None:
    """Check ``.X`` is finite, non-negative, log1p-scaled and not integer-valued."""
    x = adata.X
    if x is None:
        raise PipelineInputError(source, "X", "expression matrix is missing")
    if sp.issparse(x):
        # implicit zeros are finite, non-negative and integral, so only stored values matter
        # (except for the minimum, which is 0 whenever the matrix is not full)
        blocks: Iterable[np.ndarray] = [np.asarray(x.data)]
        has_implicit_zero = x.nnz < x.shape[0] * x.shape[1]
    else:
        blocks = _row_blocks(np.asarray(x))
        has_implicit_zero = False
    if not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
        raise PipelineInputError(source, "X", f"dtype {x.dtype} is not a real number type")

    n_nonfinite = 0
    vmin, vmax = np.inf, -np.inf
    has_fraction = False
    for block in blocks:
        if block.size == 0:
            continue
        finite = np.isfinite(block)
        n_nonfinite += int(block.size - np.count_nonzero(finite))
        if n_nonfinite:
            continue  # keep counting, the message reports how many
        vmin = min(vmin, float(block.min()))
        vmax = max(vmax, float(block.max()))
        if not has_fraction:
            frac = np.abs(np.modf(block)[0])
            has_fraction = bool(np.any(frac > CELLEVAL_FRAC_EPSILON))
    if n_nonfinite:
        raise PipelineInputError(source, "X", f"{n_nonfinite} non-finite value(s) (NaN or inf)")
    if has_implicit_zero:
        vmin = min(vmin, 0.0)
    if vmin == np.inf:  # empty matrix: nothing to score
        raise PipelineInputError(source, "X", f"expression matrix is empty (shape {adata.shape})")
    if vmin < 0:
        raise PipelineInputError(
            source, "X", f"negative value(s) (min {vmin:.4g}): expected log1p of normalised counts (>= 0)"
        )
    if vmax > RAW_COUNT_MAX:
        raise PipelineInputError(
            source, "X", f"max value {vmax:.4g} > {RAW_COUNT_MAX:g}: looks like raw counts, expected log1p of normalised counts"
        )
    if vmax >= CELLEVAL_LOG1P_MAX:
        raise PipelineInputError(
            source,
            "X",
            f"max value {vmax:.4g} >= {CELLEVAL_LOG1P_MAX:g}: not on a log1p scale (cell-eval refuses such data)",
        )
    if not has_fraction:
        raise PipelineInputError(
            source,
            "X",
            "all values are integers: looks like raw counts, expected log1p of normalised counts "
            "(cell-eval would silently re-normalise it)",
        )


def _control_mean(adata: ad.AnnData, is_control: np.ndarray) -> np.ndarray:
    rows = adata.X[np.flatnonzero(is_control)]
    return np.asarray(rows.mean(axis=0, dtype=np.float64)).ravel()


def group_columns(adata: ad.AnnData) -> list[str]:
    """The ``group_by`` columns a processed/truth/prediction file records in ``uns`` (empty if none)."""
    return [str(g) for g in adata.uns.get("group_by", [])]


def _group_keys(adata: ad.AnnData, group_by: list[str], source: str) -> pd.Series:
    """One tuple per cell of its group_by values, after checking the columns exist and are filled."""
    for column in group_by:
        if column not in adata.obs.columns:
            raise PipelineInputError(source, f"obs['{column}']", "group column (dataset group_by) missing")
        n_missing = int(adata.obs[column].isna().sum())
        if n_missing:
            raise PipelineInputError(source, f"obs['{column}']", f"{n_missing} cell(s) have no group value")
    return pd.Series(list(map(tuple, adata.obs[group_by].astype(str).to_numpy().tolist())), index=adata.obs.index)


def _check_groups_have_controls(
    truth: ad.AnnData, labels: pd.Series, control_label: str, group_by: list[str], source: str
) -> pd.Series:
    keys = _group_keys(truth, group_by, source)
    with_test = set(keys[labels != control_label])
    with_ctrl = set(keys[labels == control_label])
    lacking = with_test - with_ctrl
    if lacking:
        raise PipelineInputError(
            source, f"obs['{control_label}']",
            f"group(s) {_name_some(lacking)} of {group_by} have test cells but no control cells to score against",
        )
    return keys


def check_truth(
    truth: ad.AnnData, pert_col: str, control_label: str, source: str, group_by: list[str] | None = None
) -> None:
    """Check a truth (real test + control cells) AnnData against the scoring contract.

    Args:
        truth: Real cells; ``.X`` log1p of normalised counts, dense or sparse.
        pert_col: ``obs`` column holding the condition label.
        control_label: Label of the control cells in ``pert_col``.
        source: File name used in error messages.

    Raises:
        PipelineInputError: If the perturbation column or the control label is missing, a label is
            missing, a declared condition has zero cells, there is no non-control condition, gene
            names repeat, or ``.X`` has non-finite, negative, integer-only or non-log1p values.
    """
    labels = _labels(truth, pert_col, control_label, source)
    if (labels != control_label).sum() == 0:
        raise PipelineInputError(source, f"obs['{pert_col}']", "no non-control condition to score")
    group_by = group_columns(truth) if group_by is None else list(group_by)
    if group_by:
        _check_groups_have_controls(truth, labels, control_label, group_by, source)
    _check_var_names_unique(truth, source)
    _check_values(truth, source)


def check_prediction(
    pred: ad.AnnData,
    truth: ad.AnnData,
    pert_col: str,
    control_label: str,
    pred_source: str,
    truth_source: str,
    group_by: list[str] | None = None,
) -> None:
    """Check a prediction AnnData against its truth file before scoring.

    With ``group_by`` (default: the truth's ``uns['group_by']``) conditions are (condition, group)
    pairs: the prediction must carry the group columns, predict exactly the truth's pairs, and carry
    each group's real control cells.

    The prediction must have the truth's genes in the truth's order, exactly the truth's
    non-control conditions, the same control cells, and a dense float32 log1p ``.X``.

    Args:
        pred: Predicted cells plus the real control cells, labelled in ``obs[pert_col]``.
        truth: The truth AnnData the prediction is scored against.
        pert_col: ``obs`` column holding the condition label (in both files).
        control_label: Label of the control cells.
        pred_source: Prediction file name, used in error messages.
        truth_source: Truth file name, used in error messages.

    Raises:
        PipelineInputError: Naming the offending file and field on any contract violation
            (see :func:`check_truth` for the truth-side checks).
    """
    group_by = group_columns(truth) if group_by is None else list(group_by)
    check_truth(truth, pert_col, control_label, truth_source, group_by)
    pred_labels = _labels(pred, pert_col, control_label, pred_source)
    truth_labels = truth.obs[pert_col].astype(str)

    # genes: same set, then same order (cell-eval compares columns by position)
    _check_var_names_unique(pred, pred_source)
    truth_genes, pred_genes = truth.var_names, pred.var_names
    if not truth_genes.equals(pred_genes):
        missing = truth_genes.difference(pred_genes)
        extra = pred_genes.difference(truth_genes)
        if len(missing) or len(extra):
            parts = []
            if len(missing):
                parts.append(f"{len(missing)} gene(s) of {truth_source} missing: {_name_some(missing)}")
            if len(extra):
                parts.append(f"{len(extra)} gene(s) not in {truth_source}: {_name_some(extra)}")
            raise PipelineInputError(pred_source, "var_names", "; ".join(parts))
        first = int(np.flatnonzero(np.asarray(truth_genes) != np.asarray(pred_genes))[0])
        raise PipelineInputError(
            pred_source,
            "var_names",
            f"same genes as {truth_source} but in another order (first difference at position {first}: "
            f"{pred_genes[first]!r} vs {truth_genes[first]!r})",
        )

    # conditions: exactly the truth's non-control conditions
    truth_conds = set(truth_labels) - {control_label}
    pred_conds = set(pred_labels) - {control_label}
    if truth_conds != pred_conds:
        parts = []
        if truth_conds - pred_conds:
            parts.append(
                f"{len(truth_conds - pred_conds)} condition(s) of {truth_source} not predicted: "
                f"{_name_some(truth_conds - pred_conds, 10)}"
            )
        if pred_conds - truth_conds:
            parts.append(
                f"{len(pred_conds - truth_conds)} condition(s) not in {truth_source}: "
                f"{_name_some(pred_conds - truth_conds, 10)}"
            )
        raise PipelineInputError(pred_source, f"obs['{pert_col}']", "; ".join(parts))

    if group_by:
        _check_group_pairs(pred, truth, pred_labels, truth_labels, control_label, group_by, pred_source, truth_source)

    # the pipeline writes predictions dense float32; anything else means a producer bug
    if sp.issparse(pred.X) or not isinstance(pred.X, np.ndarray):
        raise PipelineInputError(pred_source, "X", f"expected a dense float32 array, got {type(pred.X).__name__}")
    if pred.X.dtype != np.float32:
        raise PipelineInputError(pred_source, "X", f"expected dtype float32, got {pred.X.dtype}")
    _check_values(pred, pred_source)

    # controls: cell-eval measures the predicted delta against the prediction's own control
    # cells, so they must be the truth's control cells (same count, same mean profile)
    pred_ctrl = np.asarray(pred_labels == control_label)
    truth_ctrl = np.asarray(truth_labels == control_label)
    if pred_ctrl.sum() != truth_ctrl.sum():
        raise PipelineInputError(
            pred_source,
            f"obs['{pert_col}']",
            f"{int(pred_ctrl.sum())} control cell(s), but {truth_source} has {int(truth_ctrl.sum())}: "
            "the prediction must carry the same real control cells",
        )
    diff = np.abs(_control_mean(pred, pred_ctrl) - _control_mean(truth, truth_ctrl))
    if float(diff.max()) > CONTROL_MEAN_ATOL:
        worst = int(diff.argmax())
        raise PipelineInputError(
            pred_source,
            "X",
            f"control cells differ from those in {truth_source} (mean expression of gene "
            f"{truth_genes[worst]!r} differs by {float(diff[worst]):.4g}): the prediction must carry "
            "the same real control cells",
        )


def _check_group_pairs(
    pred: ad.AnnData, truth: ad.AnnData, pred_labels: pd.Series, truth_labels: pd.Series, control_label: str,
    group_by: list[str], pred_source: str, truth_source: str,
) -> None:
    """(condition, group) pairs must match, and every group must carry that group's real control cells."""
    pred_keys = _group_keys(pred, group_by, pred_source)
    truth_keys = _group_keys(truth, group_by, truth_source)
    truth_pairs = {(c, k) for c, k in zip(truth_labels, truth_keys) if c != control_label}
    pred_pairs = {(c, k) for c, k in zip(pred_labels, pred_keys) if c != control_label}
    if truth_pairs != pred_pairs:
        parts = []
        if truth_pairs - pred_pairs:
            parts.append(f"(condition, group) pair(s) of {truth_source} not predicted: {_name_some(truth_pairs - pred_pairs)}")
        if pred_pairs - truth_pairs:
            parts.append(f"pair(s) not in {truth_source}: {_name_some(pred_pairs - truth_pairs)}")
        raise PipelineInputError(pred_source, f"obs[{group_by}]", "; ".join(parts))
    pred_ctrl = np.asarray(pred_labels == control_label)
    truth_ctrl = np.asarray(truth_labels == control_label)
    for key in sorted(set(truth_keys[truth_ctrl]) | set(pred_keys[pred_ctrl])):
        p = pred_ctrl & np.array([k == key for k in pred_keys], dtype=bool)
        t = truth_ctrl & np.array([k == key for k in truth_keys], dtype=bool)
        if p.sum() != t.sum():
            raise PipelineInputError(
                pred_source, f"obs[{group_by}]",
                f"group {key}: {int(p.sum())} control cell(s), but {truth_source} has {int(t.sum())}: "
                "each group must carry its own real control cells",
            )
        if p.any():
            diff = np.abs(_control_mean(pred, p) - _control_mean(truth, t))
            if float(diff.max()) > CONTROL_MEAN_ATOL:
                raise PipelineInputError(
                    pred_source, "X",
                    f"group {key}: control cells differ from those in {truth_source} "
                    f"(max mean difference {float(diff.max()):.4g}): each group must carry its own real control cells",
                )

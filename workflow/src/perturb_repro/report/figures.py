"""Report figures, each returned as PNG bytes so the HTML report can inline them.

Figures are drawn on :class:`matplotlib.figure.Figure` objects with the Agg canvas rather than
through pyplot: no global figure registry to leak, and no dependence on a display or on the
process-wide backend another module may have chosen.
"""

from __future__ import annotations

import io
import math
import os
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # headless cluster nodes; harmless if a backend was already chosen

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from perturb_repro.errors import PipelineInputError
from perturb_repro.io import read_csv_checked

PathLike = str | os.PathLike

# Paper Figure 1 (PRiMeFlow) colours ground-truth perturbed cells green; controls are background.
CONTROL_COLOR = "#b3b3b3"
REAL_COLOR = "#2ca02c"
PREDICTED_COLOR = "#d62728"

# The PRiMeFlow figure samples 1,000 cells per model; more points only add overplotting and bytes.
MAX_CELLS_PER_GROUP = 1000

_DPI = 100

# Sizes chosen so a figure is shown at its own pixel size in the report's 1200 px column at a 1400 px
# window (two per row): no downscaling, so 9 pt labels stay 12.5 px on screen.
LEADERBOARD_WIDTH_IN = 5.6
LEADERBOARD_ROW_IN = 0.26
LEADERBOARD_FONT_PT = 9
BASELINE_COLOR = "#969696"
MODEL_COLOR = "#3182bd"


def _to_png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    # Fixed metadata keeps the bytes reproducible across runs of the same inputs.
    fig.savefig(buf, format="png", dpi=_DPI, metadata={"Software": None})
    return buf.getvalue()


def _message_png(title: str, message: str) -> bytes:
    fig = Figure(figsize=(5, 2.5))
    ax = fig.add_subplot()
    ax.set_axis_off()
    ax.set_title(title)
    ax.text(0.5, 0.5, message, ha="center", va="center", wrap=True, transform=ax.transAxes)
    return _to_png(fig)


# --------------------------------------------------------------------------------------------------
# Loss curve


def loss_curve(train_log_csv: PathLike, title: str) -> bytes:
    """Plot training loss against step, with a rolling mean.

    Args:
        train_log_csv: CSV with columns ``step`` and ``loss`` (extra columns are ignored).
        title: Figure title.

    Returns:
        PNG bytes. If no finite loss was logged (e.g. a diverged run), the figure says so instead
        of failing, because that is itself a result worth showing.

    Raises:
        PipelineInputError: If the file cannot be read or lacks/garbles ``step`` or ``loss``.
    """
    src = str(train_log_csv)
    log = read_csv_checked(train_log_csv)
    # columns checked here, not by read_csv_checked: each is checked, then converted, before the next
    for column in ("step", "loss"):
        if column not in log.columns:
            raise PipelineInputError(src, column, "column is missing")
        try:
            log[column] = pd.to_numeric(log[column], errors="raise").astype(float)
        except (ValueError, TypeError) as exc:
            raise PipelineInputError(src, column, f"has non-numeric values: {exc}") from exc

    log = log[np.isfinite(log["step"]) & np.isfinite(log["loss"])].sort_values("step", kind="stable")
    if log.empty:
        return _message_png(title, "no finite loss values logged")

    # ~5% of the points per window: smooths minibatch noise while still showing late-training drift.
    window = max(1, len(log) // 20)
    smooth = log["loss"].rolling(window, min_periods=1).mean()

    fig = Figure(figsize=(6, 3.5))
    ax = fig.add_subplot()
    ax.plot(log["step"], log["loss"], color="#9ecae1", linewidth=0.8, label="loss")
    ax.plot(log["step"], smooth, color="#08519c", linewidth=1.6, label=f"rolling mean ({window} points)")
    loss = log["loss"].to_numpy()
    # A loss falling over orders of magnitude is unreadable on a linear axis.
    if np.all(loss > 0) and loss.max() / loss.min() > 100:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend(loc="upper right", fontsize="small")
    fig.tight_layout()
    return _to_png(fig)


# --------------------------------------------------------------------------------------------------
# PCA: predicted vs real


def _load_pca(pca_npz: PathLike) -> tuple[np.ndarray, np.ndarray]:
    src = str(pca_npz)
    try:
        with np.load(pca_npz) as npz:
            arrays = {key: npz[key] for key in ("components", "mean") if key in npz.files}
    except (OSError, ValueError) as exc:
        raise PipelineInputError(src, "<file>", f"cannot be read as .npz: {exc}") from exc
    for key in ("components", "mean"):
        if key not in arrays:
            raise PipelineInputError(src, key, "array is missing")
    components = np.asarray(arrays["components"], dtype=float)
    mean = np.asarray(arrays["mean"], dtype=float)
    if components.ndim != 2 or components.shape[0] < 2:
        raise PipelineInputError(src, "components", f"must be [n_comp >= 2, n_genes], got shape {components.shape}")
    if mean.shape != (components.shape[1],):
        raise PipelineInputError(src, "mean", f"shape {mean.shape} does not match n_genes={components.shape[1]}")
    return components[:2], mean


def _read_cells(path: PathLike, wanted: set[str] | None) -> tuple[np.ndarray, np.ndarray, pd.Index]:
    """Return (dense X rows, condition labels, var_names) for the cells whose condition is wanted.

    Reading backed and densifying only the selected rows keeps paper-scale files (tens of thousands
    of cells) from being loaded whole just to draw a few panels.
    """
    src = str(path)
    try:
        adata = ad.read_h5ad(path, backed="r")
    except (OSError, ValueError, KeyError) as exc:
        raise PipelineInputError(src, "<file>", f"cannot be read as .h5ad: {exc}") from exc
    try:
        if "condition" not in adata.obs.columns:
            raise PipelineInputError(src, "obs.condition", "column is missing")
        conditions = adata.obs["condition"].astype(str).to_numpy()
        var_names = pd.Index(adata.var_names.astype(str))
        mask = np.ones(len(conditions), dtype=bool) if wanted is None else np.isin(conditions, list(wanted))
        idx = np.flatnonzero(mask)
        if idx.size == 0:
            x = np.zeros((0, adata.n_vars))
        else:
            # idx is sorted (flatnonzero), which h5py fancy indexing requires
            x = adata[idx].to_memory().X
            x = np.asarray(x.toarray() if sp.issparse(x) else x, dtype=float)
        return x, conditions[idx], var_names
    finally:
        if getattr(adata, "file", None) is not None and adata.isbacked:
            adata.file.close()


def _subsample(points: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    if len(points) <= MAX_CELLS_PER_GROUP:
        return points
    return points[np.sort(rng.choice(len(points), MAX_CELLS_PER_GROUP, replace=False))]


def pca_predicted_vs_real(
    pred_h5ad: PathLike,
    truth_h5ad: PathLike,
    pca_npz: PathLike,
    conditions: Sequence[str],
    control_label: str | None,
) -> bytes:
    """Project predicted and real cells into the train-fitted PCA, one panel per condition.

    Cells are projected as ``(X - mean) @ components.T`` and the first two PCs plotted, as in
    Figure 1 of the PRiMeFlow paper: control cells grey, real perturbed cells green, predicted
    cells red. Each group is capped at 1,000 randomly chosen cells (fixed seed).

    Args:
        pred_h5ad: Predictions (``.X`` log-normalised, ``obs["condition"]``).
        truth_h5ad: Test truth, same genes in the same order.
        pca_npz: ``components`` [n_comp, n_genes] and ``mean`` [n_genes], fitted on train cells.
        conditions: Conditions to draw, one panel each, in the given order.
        control_label: Label of control cells in the truth; None draws no control background.

    Returns:
        PNG bytes.

    Raises:
        PipelineInputError: If an input is unreadable or the gene axes disagree.
    """
    components, mean = _load_pca(pca_npz)
    conditions = [str(c) for c in conditions]
    if not conditions:
        return _message_png("PCA: predicted vs real", "no conditions to show")

    wanted_truth = set(conditions) | ({control_label} if control_label is not None else set())
    x_true, c_true, genes_true = _read_cells(truth_h5ad, wanted_truth)
    x_pred, c_pred, genes_pred = _read_cells(pred_h5ad, set(conditions))

    if not genes_true.equals(genes_pred):
        raise PipelineInputError(
            str(pred_h5ad), "var_names", f"genes differ from {truth_h5ad} (same genes in the same order required)"
        )
    if len(genes_true) != components.shape[1]:
        raise PipelineInputError(
            str(pca_npz), "components", f"has {components.shape[1]} genes, the h5ad files have {len(genes_true)}"
        )

    def project(x: np.ndarray) -> np.ndarray:
        return (x - mean) @ components.T

    z_true, z_pred = project(x_true), project(x_pred)
    rng = np.random.default_rng(0)
    control = (
        _subsample(z_true[c_true == control_label], rng) if control_label is not None else np.zeros((0, 2))
    )

    # Shared limits so panels can be compared by eye.
    everything = np.vstack([z for z in (z_true, z_pred) if len(z)]) if len(z_true) + len(z_pred) else np.zeros((0, 2))

    n = len(conditions)
    ncols = min(n, 3)
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(4.2 * ncols, 3.8 * nrows))
    for i, condition in enumerate(conditions):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        real = _subsample(z_true[c_true == condition], rng)
        pred = _subsample(z_pred[c_pred == condition], rng)
        if len(control):
            ax.scatter(control[:, 0], control[:, 1], s=4, c=CONTROL_COLOR, alpha=0.4, linewidths=0, label=f"control (n={len(control)})")
        if len(real):
            ax.scatter(real[:, 0], real[:, 1], s=6, c=REAL_COLOR, alpha=0.6, linewidths=0, label=f"real (n={len(real)})")
        if len(pred):
            ax.scatter(pred[:, 0], pred[:, 1], s=6, c=PREDICTED_COLOR, alpha=0.6, linewidths=0, label=f"predicted (n={len(pred)})")
        missing = [name for name, pts in (("real", real), ("predicted", pred)) if not len(pts)]
        ax.set_title(condition + (f"\n(no {' / '.join(missing)} cells)" if missing else ""), fontsize="medium")
        if len(everything):
            lo, hi = everything.min(axis=0), everything.max(axis=0)
            pad = 0.05 * np.maximum(hi - lo, 1e-9)
            ax.set_xlim(lo[0] - pad[0], hi[0] + pad[0])
            ax.set_ylim(lo[1] - pad[1], hi[1] + pad[1])
        ax.set_xlabel("PC1")
        ax.set_ylabel("PC2")
        if ax.has_data():
            ax.legend(loc="best", fontsize="x-small", markerscale=2)
    fig.tight_layout()
    return _to_png(fig)


# --------------------------------------------------------------------------------------------------
# Metric distribution


def read_per_condition_metric(path: PathLike, metric: str) -> np.ndarray:
    """Finite per-condition values of ``metric`` from a per-condition metrics CSV.

    Accepts cell-eval's wide layout (one row per perturbation, one column per metric) and a long
    layout (``metric`` and ``value`` columns). A metric absent from the file yields no values: a
    baseline may legitimately not produce every metric.

    Args:
        path: Per-condition CSV.
        metric: Metric name.

    Returns:
        1-D float array with NaN/inf removed.

    Raises:
        PipelineInputError: If the file cannot be read or the column is not numeric.
    """
    src = str(path)
    frame = read_csv_checked(path)
    if metric in frame.columns:
        values = frame[metric]
    elif {"metric", "value"} <= set(frame.columns):
        values = frame.loc[frame["metric"].astype(str) == metric, "value"]
    else:
        return np.zeros(0)
    try:
        values = pd.to_numeric(values, errors="raise").to_numpy(dtype=float)
    except (ValueError, TypeError) as exc:
        raise PipelineInputError(src, metric, f"has non-numeric values: {exc}") from exc
    return values[np.isfinite(values)]


def metric_distribution(
    per_condition_csvs: Mapping[str, PathLike], metric: str, baselines: Sequence[str] = (), higher_is_better: bool | None = None
) -> bytes:
    """Horizontal box plot with overlaid points of one metric's per-condition values, one row per label.

    Rows are sorted by median (best first when ``higher_is_better`` is known, else descending), so
    26 models stay readable: each gets ``LEADERBOARD_ROW_IN`` of height at a fixed, screen-sized width.

    Args:
        per_condition_csvs: Label (usually the model) -> per-condition metrics CSV.
        metric: Metric to plot; NaN values are skipped, and the count kept is shown per label.
        baselines: Labels that are simple baselines (grey boxes, italic labels).
        higher_is_better: Sort direction of the medians; None sorts descending.

    Returns:
        PNG bytes (a message figure if no label has any finite value).
    """
    labels = list(per_condition_csvs)
    values = {label: read_per_condition_metric(per_condition_csvs[label], metric) for label in labels}
    if not labels or not any(len(v) for v in values.values()):
        return _message_png(metric, "no finite per-condition values")
    sign = 1.0 if higher_is_better in (None, True) else -1.0
    labels.sort(key=lambda lb: (not len(values[lb]), -sign * float(np.median(values[lb])) if len(values[lb]) else 0.0))
    n = len(labels)
    fig = Figure(figsize=(LEADERBOARD_WIDTH_IN, 0.9 + LEADERBOARD_ROW_IN * n))
    ax = fig.add_subplot()
    y = np.arange(n)[::-1]  # first (best) row at the top
    present = [i for i, lb in enumerate(labels) if len(values[lb])]
    boxes = ax.boxplot(
        [values[labels[i]] for i in present],
        positions=y[present],
        widths=0.6,
        orientation="horizontal",
        patch_artist=True,
        showfliers=False,  # the strip below already shows every point
        medianprops={"color": "black"},
    )
    for box, i in zip(boxes["boxes"], present):
        box.set_facecolor("#d9d9d9" if labels[i] in baselines else "#deebf7")
    rng = np.random.default_rng(0)
    for i in present:
        v = values[labels[i]]
        jitter = rng.uniform(-0.15, 0.15, size=len(v))
        ax.scatter(v, y[i] + jitter, s=8, alpha=0.6, color=MODEL_COLOR, linewidths=0, zorder=3)
    ax.set_yticks(y)
    ax.set_yticklabels([f"{lb} (n={len(values[lb])})" for lb in labels], fontsize=LEADERBOARD_FONT_PT)
    for tick, lb in zip(ax.get_yticklabels(), labels):
        if lb in baselines:
            tick.set_fontstyle("italic")
    ax.set_ylim(-0.6, n - 0.4)
    ax.tick_params(axis="x", labelsize=LEADERBOARD_FONT_PT)
    ax.set_xlabel(metric, fontsize=LEADERBOARD_FONT_PT)
    ax.set_title(f"{metric} per condition", fontsize=LEADERBOARD_FONT_PT + 1)
    fig.tight_layout()
    return _to_png(fig)


# --------------------------------------------------------------------------------------------------
# Leaderboard: one metric, every model of a dataset



def leaderboard_bars(
    models: Sequence[str],
    values: Sequence[float],
    errors: Sequence[float],
    baseline: Sequence[bool],
    metric: str,
    higher_is_better: bool | None,
    best_baseline_value: float | None = None,
) -> bytes:
    """Horizontal bars of one metric, one row per model, best first; simple baselines grey and hatched.

    Args:
        models: Model labels.
        values: The metric per model (NaN rows are listed last as "n/a").
        errors: Std over seeds per model (NaN = one seed: no error bar).
        baseline: Whether each model is a simple baseline.
        metric: Metric name (axis label and title).
        higher_is_better: Sort direction; None keeps the given order.
        best_baseline_value: Drawn as a dashed line (the bar to beat).

    Returns:
        PNG bytes, ``LEADERBOARD_WIDTH_IN`` wide and ``LEADERBOARD_ROW_IN`` per model tall.
    """
    vals = np.asarray(values, dtype=float)
    errs = np.asarray(errors, dtype=float)
    order = list(range(len(models)))
    if higher_is_better is not None:
        # best first; NaN last
        order.sort(key=lambda i: (not np.isfinite(vals[i]), -vals[i] if higher_is_better else vals[i]))
    n = len(order)
    if n == 0 or not np.isfinite(vals).any():
        return _message_png(metric, "no finite values")
    fig = Figure(figsize=(LEADERBOARD_WIDTH_IN, 1.1 + LEADERBOARD_ROW_IN * n))  # + a two-line axis label
    ax = fig.add_subplot()
    y = np.arange(n)[::-1]  # first row at the top
    shown = np.where(np.isfinite(vals[order]), vals[order], 0.0)
    colors = [BASELINE_COLOR if baseline[i] else MODEL_COLOR for i in order]
    bars = ax.barh(y, shown, color=colors, height=0.7, edgecolor="white")
    for bar, i in zip(bars, order):
        if baseline[i]:
            bar.set_hatch("//")
    seeded = np.isfinite(errs[order])  # one-seed runs get no error bar (not a zero-width one)
    if seeded.any():
        ax.errorbar(shown[seeded], y[seeded], xerr=errs[order][seeded], fmt="none", ecolor="black", elinewidth=1, capsize=2)
    marked = best_baseline_value is not None and np.isfinite(best_baseline_value)
    if marked:
        ax.axvline(best_baseline_value, color="black", linestyle="--", linewidth=1)
    ax.set_yticks(y)
    labels = [f"{models[i]}" + ("" if np.isfinite(vals[i]) else " (n/a)") for i in order]
    ax.set_yticklabels(labels, fontsize=LEADERBOARD_FONT_PT)
    for tick, i in zip(ax.get_yticklabels(), order):
        if baseline[i]:
            tick.set_fontstyle("italic")
    ax.tick_params(axis="x", labelsize=LEADERBOARD_FONT_PT)
    ax.set_ylim(-0.6, n - 0.4)
    arrow = "" if higher_is_better is None else (" (higher is better)" if higher_is_better else " (lower is better)")
    # said in the axis label rather than a legend, which would cover bars
    ax.set_xlabel(metric + arrow + ("\ndashed line: best simple baseline" if marked else ""), fontsize=LEADERBOARD_FONT_PT)
    ax.set_title(metric, fontsize=LEADERBOARD_FONT_PT + 1)
    ax.grid(axis="x", color="#e0e0e0", linewidth=0.6)
    ax.set_axisbelow(True)
    fig.tight_layout()
    return _to_png(fig)


__all__ = ["leaderboard_bars", "loss_curve", "metric_distribution", "pca_predicted_vs_real", "read_per_condition_metric"]

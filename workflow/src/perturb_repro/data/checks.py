"""Value checks at the door: the first job that reads a source refuses values the later steps would choke on.

Without them a NaN reaches scikit-learn's PCA two jobs later ("Input X contains NaN", no file, no count), an
infinity runs the whole chain into the metrics, a negative count becomes NaN inside ``log1p`` and raw counts
declared log-normalised are only noticed by the scorer, after training. Every check raises
:class:`~perturb_repro.errors.PipelineInputError` naming the file, the field, how many values are at fault and
the first offending (cell, gene), or the config key to change.

:class:`ValueScan` accumulates over row blocks, so a large matrix (the CD4 reader's backed windows, a big
in-memory CSR) is checked in the same single pass that reads it: it looks at stored values only (an implicit
sparse zero is finite, non-negative and integral) and never builds a full-size temporary.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..errors import PipelineInputError

# Above this a value is almost surely a raw count: log1p of a 1e4-normalised count tops out near 9.2. The scorer
# refuses such data with the same threshold (scoring/contract.py RAW_COUNT_MAX), so refuse it before any work.
RAW_COUNT_MAX = 50.0
# Fractional parts up to this are integers (float storage of counts); cell-eval's integer test uses 1e-3 too.
INTEGER_EPSILON = 1e-3
BLOCK_ROWS = 8192  # rows per block of an in-memory dense matrix


@dataclass
class _First:
    """How many values broke one rule, and where the first one was."""

    count: int = 0
    where: tuple[str, str, float] | None = None

    def add(self, n: int, where: tuple[str, str, float]) -> None:
        if n and self.where is None:
            self.where = where
        self.count += n

    def describe(self) -> str:
        cell, gene, value = self.where
        return f"first at cell '{cell}', gene '{gene}' (value {value:.6g})"


@dataclass
class ValueScan:
    """Counts non-finite, negative and non-integer values of a cells x genes matrix, block by block."""

    source: str
    field: str
    var_names: Sequence[str]
    n_cells: int = 0
    n_values: int = 0  # stored values seen
    max_value: float = -np.inf
    nonfinite: _First = field(default_factory=_First)
    negative: _First = field(default_factory=_First)
    fractional: _First = field(default_factory=_First)

    def update(self, block, cell_names: Sequence[str]) -> None:
        """Scan one block of rows (CSR/CSC/COO or dense); ``cell_names`` names its rows in order."""
        if sp.issparse(block):
            coo = block.tocsr() if not sp.isspmatrix_csr(block) else block
            data = np.asarray(coo.data)
            rows = np.repeat(np.arange(coo.shape[0]), np.diff(coo.indptr))
            cols = coo.indices
        else:
            dense = np.asarray(block)
            flat = dense.reshape(-1)
            data, rows, cols = flat, None, None
            n_cols = dense.shape[1] if dense.ndim == 2 else 1
        self.n_cells += block.shape[0]
        self.n_values += data.size
        if data.size == 0:
            return

        def where(mask: np.ndarray) -> tuple[str, str, float]:
            k = int(np.argmax(mask))
            r, c = (int(rows[k]), int(cols[k])) if rows is not None else divmod(k, n_cols)
            return str(cell_names[r]), str(self.var_names[c]), float(data[k])

        finite = np.isfinite(data)
        bad = ~finite
        n_bad = int(np.count_nonzero(bad))
        if n_bad:
            self.nonfinite.add(n_bad, where(bad))
            data_ok = np.where(finite, data, 0)
        else:
            data_ok = data
        negative = data_ok < 0
        if negative.any():
            self.negative.add(int(np.count_nonzero(negative)), where(negative))
        fractional = np.abs(data_ok - np.rint(data_ok)) > INTEGER_EPSILON
        if fractional.any():
            self.fractional.add(int(np.count_nonzero(fractional)), where(fractional))
        self.max_value = max(self.max_value, float(data_ok.max()))

    def check(self, expect: str, setting: str, fix: str | None = None) -> None:
        """Raise on what the later steps cannot use.

        Args:
            expect: ``counts`` (raw counts to be normalised), ``log`` (log-normalised expression) or
                ``nonnegative`` (a counts layer: finite and >= 0, nothing more).
            setting: The config key (and value) that declares what the file holds, named in the message.
            fix: What to change when the values contradict ``setting`` (default: flip ``setting``).
        """
        if self.nonfinite.count:
            raise PipelineInputError(
                self.source, self.field,
                f"{self.nonfinite.count} non-finite value(s) (NaN or inf) in {self.n_cells} cells; "
                f"{self.nonfinite.describe()}",
            )
        if self.negative.count:
            why = {"counts": "counts cannot be negative (log1p would turn them into NaN)",
                   "log": "log-normalised expression cannot be negative",
                   "nonnegative": "counts cannot be negative"}[expect]
            raise PipelineInputError(
                self.source, self.field, f"{self.negative.count} negative value(s): {why}; {self.negative.describe()}"
            )
        if expect == "counts" and self.fractional.count and self.max_value <= RAW_COUNT_MAX:
            raise PipelineInputError(
                self.source, self.field,
                f"looks log-normalised, not raw counts ({self.fractional.count} non-integer value(s), max "
                f"{self.max_value:.4g} <= {RAW_COUNT_MAX:g}; {self.fractional.describe()}), but {setting} declares "
                f"raw counts: {fix or 'set it to false if the file is log-normalised'}",
            )
        if expect == "log" and self.n_values:
            if not self.fractional.count:
                raise PipelineInputError(
                    self.source, self.field,
                    f"every value is an integer (max {self.max_value:.4g}): looks like raw counts, but {setting} "
                    f"declares log-normalised values: {fix or 'set it to true to normalise them'}",
                )
            if self.max_value > RAW_COUNT_MAX:
                raise PipelineInputError(
                    self.source, self.field,
                    f"max value {self.max_value:.4g} > {RAW_COUNT_MAX:g}: not log-normalised (log1p of a "
                    f"1e4-normalised count stays below ~10), but {setting} declares log-normalised values: "
                    f"{fix or 'set it to true if X holds raw counts'}",
                )


def scan_matrix(x, source: str, field: str, cell_names: Sequence[str], var_names: Sequence[str],
                block_rows: int = BLOCK_ROWS) -> ValueScan:
    """A :class:`ValueScan` of an in-memory matrix, in row blocks (CSR rows are views of its arrays)."""
    scan = ValueScan(source, field, list(var_names))
    cell_names = np.asarray(cell_names)
    if sp.issparse(x) and not sp.isspmatrix_csr(x):
        x = x.tocsr()
    for lo in range(0, x.shape[0], block_rows):
        hi = min(lo + block_rows, x.shape[0])
        if sp.issparse(x):
            a, b = x.indptr[lo], x.indptr[hi]
            block = sp.csr_matrix((x.data[a:b], x.indices[a:b], x.indptr[lo:hi + 1] - a), shape=(hi - lo, x.shape[1]))
        else:
            block = x[lo:hi]
        scan.update(block, cell_names[lo:hi])
    return scan


def check_expression(adata, source: str, dataset_cfg: Mapping[str, Any]) -> None:
    """X (and a counts layer, if any) of the selected cells: finite, >= 0, and what ``preprocess.normalize`` says."""
    normalize = bool((dataset_cfg.get("preprocess") or {}).get("normalize", False))
    setting = f"datasets.{dataset_cfg.get('name', '<dataset>')}.preprocess.normalize: {str(normalize).lower()}"
    if adata.X is not None:
        scan_matrix(adata.X, source, "X", adata.obs_names, adata.var_names).check(
            "counts" if normalize else "log", setting)
    if "counts" in adata.layers:
        scan_matrix(adata.layers["counts"], source, "layers['counts']", adata.obs_names, adata.var_names).check(
            "nonnegative", setting)


def check_labels(labels: pd.Series, source: str, column: str) -> None:
    """Every cell has a condition label (a blank or missing label is an empty condition)."""
    text = labels.astype(str).str.strip()
    empty = labels.isna().to_numpy() | text.isin(["", "nan", "None"]).to_numpy()
    if empty.any():
        first = labels.index[int(np.argmax(empty))]
        raise PipelineInputError(
            source, f"obs['{column}']",
            f"{int(empty.sum())} cell(s) have an empty or missing condition label; first at cell '{first}'",
        )


def check_split(table: pd.DataFrame, obs: pd.DataFrame, dataset_cfg: Mapping[str, Any], source: str,
                n_genes: int) -> None:
    """What the split step writes must leave every later step something to work on.

    Checks: train and test hold perturbed conditions; every group with test conditions has control cells; the
    train cells and genes suffice for the requested PCA (``pca.n_components``) and HVG selection
    (``preprocess.n_top_genes``). Messages name the config keys to change. Whether seurat_v3's loess fit
    works on a given panel cannot be told in advance (it fails on the demo's 500 pre-selected genes at any cell
    count): :func:`hvg_failure` turns its error into one naming the keys.
    """
    name = dataset_cfg.get("name", "<dataset>")
    key = f"datasets.{name}"
    control = dataset_cfg["control_label"]
    group_by = list(dataset_cfg.get("group_by") or [])
    recipe = dataset_cfg["split"]["recipe"]
    perturbed = table[table["condition"].astype(str) != control]
    for part in ("train", "test"):
        rows = perturbed[perturbed["split"] == part]
        if rows.empty:
            counts = perturbed["split"].value_counts().to_dict()
            raise PipelineInputError(
                source, f"{key}.split",
                f"recipe '{recipe}' puts no perturbed condition in {part} ({len(perturbed)} perturbed "
                f"condition row(s), by split: {counts}): the dataset needs more perturbations, or change "
                f"{key}.split (e.g. train_gene_set_size / held-out fractions)",
            )
    keys = ["condition", *group_by]
    # cells per (condition, group) pair first: the merge is then over pairs, not over (millions of) cells
    pairs = obs[keys].astype(str).value_counts().rename("cells").reset_index()
    pairs = pairs.merge(table[[*keys, "split"]].astype(str), on=keys, how="left")
    is_control = (pairs["condition"] == control).to_numpy()
    if group_by:
        groups_with_test = set(map(tuple, pairs.loc[(pairs["split"] == "test").to_numpy() & ~is_control, group_by].values))
        groups_with_control = set(map(tuple, pairs.loc[is_control, group_by].values))
        lacking = sorted(groups_with_test - groups_with_control)
        if lacking:
            raise PipelineInputError(
                source, f"obs['{dataset_cfg['perturbation_column']}']",
                f"{len(lacking)} group(s) of {group_by} have test conditions but no '{control}' cells: "
                f"{lacking[:5]} (predictions start from a group's controls): drop them with {key}.obs_filter or "
                f"change {key}.group_by",
            )
    in_train = (pairs["split"] == "train").to_numpy()
    n_train = int(pairs.loc[in_train, "cells"].sum())
    frac = dataset_cfg["split"].get("train_control_fraction")
    if frac is not None:  # controls are re-split per cell in preprocessing: only this share stays in train
        n_ctrl = int(pairs.loc[in_train & is_control, "cells"].sum())
        n_train -= n_ctrl - int(n_ctrl * float(frac))
    prep = dataset_cfg.get("preprocess") or {}
    n_top = prep.get("n_top_genes")
    if n_top and int(n_top) > n_genes:
        raise PipelineInputError(
            source, f"{key}.preprocess.n_top_genes",
            f"{n_top} highly variable genes requested, but the file has {n_genes} gene(s): lower "
            f"{key}.preprocess.n_top_genes, or set it to null to keep every gene",
        )
    n_kept = int(n_top) if n_top else n_genes
    n_pcs = int(dataset_cfg["pca"]["n_components"])
    if n_pcs > min(n_train - 1, n_kept):
        raise PipelineInputError(
            source, f"{key}.pca.n_components",
            f"{n_pcs} components requested, but PCA on {n_train} train cell(s) x {n_kept} gene(s) has at most "
            f"{max(0, min(n_train - 1, n_kept))}: lower {key}.pca.n_components"
            + (f" or raise {key}.preprocess.n_top_genes" if n_top else ""),
        )


def hvg_failure(err: Exception, dataset_cfg: Mapping[str, Any], n_cells: int, n_genes: int) -> PipelineInputError:
    """The error to raise when scanpy's HVG selection fails (scikit-misc's loess: "near singularities")."""
    key = f"datasets.{dataset_cfg.get('name', '<dataset>')}.preprocess"
    prep = dataset_cfg.get("preprocess") or {}
    return PipelineInputError(
        "config", f"{key}.n_top_genes",
        f"HVG selection ({prep.get('hvg_flavor', 'seurat_v3')}, {prep.get('n_top_genes')} genes) failed on "
        f"{n_cells} train cell(s) x {n_genes} gene(s): {err!s}; too few cells or genes with distinct moments "
        f"for the fit: set {key}.n_top_genes: null to keep the panel, try {key}.hvg_flavor: seurat, or train on "
        "more cells",
    )


__all__ = ["ValueScan", "scan_matrix", "check_expression", "check_labels", "check_split", "hvg_failure",
           "RAW_COUNT_MAX"]

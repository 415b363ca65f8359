"""Cells x HVGs, log-normalised, with the split attached. Every data-driven choice sees train cells only."""

from __future__ import annotations

from typing import Any, Mapping

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..errors import PipelineInputError
from .conditions import unique_genes
from .source import CONDITION, IS_CONTROL

SPLIT = "split"
SUBGROUP = "subgroup"


def attach_split(
    adata: ad.AnnData, split_table: pd.DataFrame, split_source: str, group_by: list[str] | tuple[str, ...] = ()
) -> ad.AnnData:
    """Add ``split``/``subgroup`` per cell from the (condition [+ group_by]) table; every pair must be listed."""
    keys = [CONDITION, *group_by]
    missing_cols = [c for c in keys if c not in split_table.columns]
    if missing_cols:
        raise PipelineInputError(split_source, ",".join(missing_cols), f"split table lacks column(s) {missing_cols}")
    table = split_table.copy()
    for column in keys:
        table[column] = table[column].astype(str)
    if table.duplicated(keys).any():
        dup = table.loc[table.duplicated(keys), keys].head(3).values.tolist()
        raise PipelineInputError(split_source, CONDITION, f"repeated (condition, group) rows: {dup}")
    cells = adata.obs[keys].astype(str).reset_index(drop=True)
    joined = cells.merge(table[[*keys, SPLIT, SUBGROUP]], on=keys, how="left", sort=False)
    unlisted = joined[SPLIT].isna()
    if unlisted.any():
        missing = sorted({tuple(r) if len(r) > 1 else r[0] for r in joined.loc[unlisted, keys].values.tolist()})
        what = "conditions" if not group_by else f"(condition, {', '.join(group_by)}) pairs"
        raise PipelineInputError(split_source, CONDITION, f"{what} without a split: {missing[:5]}")
    adata.obs[SPLIT] = joined[SPLIT].astype(str).to_numpy()
    adata.obs[SUBGROUP] = joined[SUBGROUP].fillna("").astype(str).to_numpy()
    return adata


def resplit_controls(adata: ad.AnnData, seed: int, train_control_fraction: float) -> None:
    """PerturBench's control-cell split (train / val / test), in place, cells in file order.

    Only train controls then feed training and every train-fitted statistic; the truth keeps the
    test controls (see :func:`perturb_repro.data.perturbench_split.split_control_cells`).
    """
    from .perturbench_split import split_control_cells

    is_control = adata.obs[IS_CONTROL].to_numpy(dtype=bool)
    split = adata.obs[SPLIT].astype(str).to_numpy().copy()
    split[is_control] = split_control_cells(int(is_control.sum()), seed, train_control_fraction)
    adata.obs[SPLIT] = split


def log_normalise(adata: ad.AnnData, target_sum: float) -> None:
    """Per-cell normalisation with a fixed target sum, so no statistic is shared across cells."""
    import scanpy as sc  # imported here: most jobs never preprocess, and scanpy costs seconds to import
    adata.layers["counts"] = adata.X.copy()
    sc.pp.normalize_total(adata, target_sum=target_sum)
    sc.pp.log1p(adata)


def select_hvgs(adata: ad.AnnData, n_top_genes: int | None, flavor: str, must_keep: list[str]) -> list[str]:
    """Highly variable genes chosen on train cells only; the whole panel when it is already fixed.

    ``must_keep`` (e.g. perturbed genes present in the panel) are added after the ranking, as
    PerturBench does, so a target gene is never dropped.
    """
    import scanpy as sc
    if n_top_genes is None or n_top_genes >= adata.n_vars:
        return list(adata.var_names)
    train = adata[adata.obs[SPLIT] == "train"]
    layer = "counts" if flavor == "seurat_v3" and "counts" in train.layers else None
    table = sc.pp.highly_variable_genes(
        train, n_top_genes=n_top_genes, flavor=flavor, layer=layer, inplace=False
    )
    chosen = set(train.var_names[table["highly_variable"].to_numpy()])
    chosen |= {g for g in must_keep if g in adata.var_names}
    return [g for g in adata.var_names if g in chosen]


def _train_counts(train: ad.AnnData):
    return train.layers["counts"] if "counts" in train.layers else train.X


def _group_labels(obs: pd.DataFrame, group_by: list[str]) -> pd.Series:
    """PerturBench's ``merge_cols``: group columns joined by '_' (one constant group without group_by)."""
    if not group_by:
        return pd.Series("all", index=obs.index)
    return obs[list(group_by)].astype(str).agg("_".join, axis=1)


def top_degs(train: ad.AnnData, control_label: str, group_by: list[str], n_degs: int) -> set[str]:
    """Union of each train condition's top ``n_degs`` genes vs its group's train controls.

    PerturBench's ``differential_expression_by_covariate``: per covariate group, scanpy
    ``rank_genes_groups(groupby=condition, reference=control, rankby_abs=True, n_genes=n_degs)``
    (default t-test) on log-normalised values -- here on train cells only. Conditions with fewer
    than two train cells in a group are skipped (the t-test needs a variance).
    """
    import scanpy as sc
    import warnings

    genes: set[str] = set()
    labels = _group_labels(train.obs, group_by)
    for label in sorted(labels.unique()):
        sub = train[(labels == label).to_numpy()]
        counts = sub.obs[CONDITION].astype(str).value_counts()
        if counts.get(control_label, 0) < 2:
            continue
        wanted = sorted(c for c, n in counts.items() if n >= 2 and c != control_label)
        if not wanted:
            continue
        keep = sub.obs[CONDITION].astype(str).isin(wanted + [control_label]).to_numpy()
        de = ad.AnnData(
            X=sub.X[keep],
            obs=pd.DataFrame({"_cond": pd.Categorical(sub.obs[CONDITION].astype(str).to_numpy()[keep])},
                             index=[str(i) for i in range(int(keep.sum()))]),
            var=pd.DataFrame(index=sub.var_names),
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sc.tl.rank_genes_groups(
                de, groupby="_cond", groups=wanted, reference=control_label, rankby_abs=True,
                n_genes=n_degs, use_raw=False,
            )
        names = de.uns["rank_genes_groups"]["names"]
        for condition in wanted:
            genes.update(str(g) for g in names[condition])
    return genes


def select_genes_perturbench(
    adata: ad.AnnData,
    control_label: str,
    group_by: list[str],
    n_top_genes: int,
    n_degs: int,
    must_keep: list[str],
    min_cells: int = 10,
    flavor: str = "seurat_v3",
) -> list[str]:
    """PerturBench's gene panel (``analysis/preprocess.py: preprocess``), every statistic from train cells.

    Upstream: ``filter_genes(min_cells=10)``, then ``highly_variable_genes(flavor='seurat_v3',
    layer='counts', batch_key=<merged covariates>, n_top_genes=4000)`` union the top-``degs`` (25)
    DEGs per (perturbation, covariate) union the perturbed genes -- computed on all cells. Here the
    gene filter, the HVG ranking and the DEGs see train cells only (raw counts from
    ``layers['counts']`` when present); perturbed genes present in the panel are always kept.
    Returns genes in the input order.
    """
    import scanpy as sc
    train = adata[adata.obs[SPLIT] == "train"]
    counts = _train_counts(train)
    n_cells = np.asarray((counts > 0).sum(axis=0)).ravel()
    expressed = n_cells >= min_cells
    sub = train[:, expressed].copy()
    chosen: set[str] = set()
    if n_top_genes and n_top_genes < sub.n_vars:
        layer = "counts" if flavor == "seurat_v3" and "counts" in sub.layers else None
        sub.obs["_hvg_batch"] = _group_labels(sub.obs, group_by).to_numpy()
        batch = "_hvg_batch" if sub.obs["_hvg_batch"].nunique() > 1 else None
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            table = sc.pp.highly_variable_genes(
                sub, n_top_genes=int(n_top_genes), flavor=flavor, layer=layer, batch_key=batch, inplace=False
            )
        chosen |= set(sub.var_names[np.asarray(table["highly_variable"], dtype=bool)])
    else:
        chosen |= set(sub.var_names)
    if n_degs:
        chosen |= top_degs(sub, control_label, group_by, int(n_degs))
    chosen |= {g for g in must_keep if g in adata.var_names}
    return [g for g in adata.var_names if g in chosen]


def preprocess(
    adata: ad.AnnData, split_table: pd.DataFrame, dataset_cfg: Mapping[str, Any], split_source: str
) -> ad.AnnData:
    """Raw cells -> processed cells (log-normalised, HVGs, obs: condition, split, subgroup, covariates).

    ``adata`` is consumed (its obs gains the split, and with a fixed panel it *becomes* the result): pass a
    copy to keep it. Sparse X and counts stay sparse and are not copied when the panel keeps every gene
    (the CD4 chunked reader's output, GEARS' fixed panels), so the peak is the input plus small temporaries.
    """
    group_by = list(dataset_cfg.get("group_by") or [])
    attach_split(adata, split_table, split_source, group_by)
    split_cfg = dataset_cfg.get("split") or {}
    if split_cfg.get("train_control_fraction") is not None:
        resplit_controls(adata, int(split_cfg.get("seed", 0)), float(split_cfg["train_control_fraction"]))
    prep = dataset_cfg.get("preprocess", {})
    if prep.get("normalize", False):
        log_normalise(adata, float(prep.get("target_sum", 1e4)))
    targets = unique_genes(adata.obs[CONDITION].unique(), dataset_cfg["control_label"])
    try:
        if prep.get("gene_selection", "hvg") == "perturbench":
            genes = select_genes_perturbench(
                adata, dataset_cfg["control_label"], group_by, prep.get("n_top_genes") or 0,
                int(prep.get("n_degs", 25)), targets, int(prep.get("min_cells", 10)), prep.get("hvg_flavor", "seurat_v3"),
            )
        else:
            genes = select_hvgs(adata, prep.get("n_top_genes"), prep.get("hvg_flavor", "seurat_v3"), targets)
    except PipelineInputError:
        raise
    except ValueError as err:  # scikit-misc's loess ("near singularities") and scanpy's binning, with no key named
        from .checks import hvg_failure

        raise hvg_failure(err, dataset_cfg, int((adata.obs[SPLIT] == "train").sum()), adata.n_vars) from err
    # a fixed panel keeps every gene in order: no copy of X / layers (a copy doubles the peak at CD4 size)
    out = adata if genes == list(adata.var_names) else adata[:, genes].copy()
    out.obs = _output_obs(out.obs, dataset_cfg)
    counts = out.layers.get("counts") if prep.get("keep_counts", False) else None
    if prep.get("keep_counts", False) and counts is None:
        raise PipelineInputError(split_source, "preprocess.keep_counts", "no raw counts: set normalize or a counts reader")
    out.layers.clear()
    if counts is not None:  # raw counts of the kept genes (scLDM); sparse stays sparse
        out.layers["counts"] = (counts.astype(np.float32, copy=False) if sp.issparse(counts)
                                else np.asarray(counts, dtype=np.float32))
    out.X = out.X.astype(np.float32, copy=False) if sp.issparse(out.X) else np.asarray(out.X, dtype=np.float32)
    out.uns = _processed_uns(dataset_cfg)
    return out


def _output_obs(obs: pd.DataFrame, dataset_cfg: Mapping[str, Any]) -> pd.DataFrame:
    """The processed file's obs: condition, is_control, split, subgroup and the covariates, as text."""
    group_by = list(dataset_cfg.get("group_by") or [])
    covariates = list(dict.fromkeys([*dataset_cfg.get("covariates", []), *group_by]))
    out = obs[[CONDITION, IS_CONTROL, SPLIT, SUBGROUP, *covariates]].copy()
    for column in [CONDITION, SPLIT, SUBGROUP, *covariates]:
        out[column] = out[column].astype(str)
    return out


def _processed_uns(dataset_cfg: Mapping[str, Any]) -> dict:
    uns = {"dataset": dataset_cfg.get("name", ""), "control_label": dataset_cfg["control_label"]}
    if dataset_cfg.get("group_by"):
        uns["group_by"] = list(dataset_cfg["group_by"])
    return uns


def _check_streamable(dataset_cfg: Mapping[str, Any], n_panel: int) -> None:
    """The streamed path writes the reader's panel as it is: no gene selection, no second normalisation."""
    prep = dataset_cfg.get("preprocess") or {}
    n_top = prep.get("n_top_genes")
    if prep.get("gene_selection", "hvg") != "hvg" or (n_top is not None and int(n_top) < n_panel):
        raise PipelineInputError("config", "preprocess.n_top_genes",
                                 "the backed_chunked reader streams its fixed gene panel: set n_top_genes: null "
                                 "(choose the panel in source.gene_panel)")
    if prep.get("normalize", False):
        raise PipelineInputError("config", "preprocess.normalize",
                                 "the backed_chunked reader already log-normalises (library size over all genes): set false")


def preprocess_streamed(
    raw: str, split_table: pd.DataFrame, dataset_cfg: Mapping[str, Any], split_source: str, out_h5ad: str,
) -> dict:
    """:func:`preprocess` for the ``backed_chunked`` reader, written chunk by chunk (CD4's ~22M cells).

    The obs (through :func:`perturb_repro.data.source.load_source`, so the same checks and columns) get the
    split first; then ``processed.h5ad`` is written as a skeleton (obs, var, uns) and X (and ``layers['counts']``
    with ``keep_counts``) are appended one reader window at a time as CSR (int64 indptr). Memory: the obs plus one
    window, never the matrix. The file equals what :func:`preprocess` writes from the reader's in-memory result
    (``tests/test_preprocess.py``). Returns :func:`summary`.
    """
    import h5py

    from ..io import atomic_path
    from .backed import empty_csr
    from .cd4 import PanelChunks, check_counts
    from .source import load_source

    group_by = list(dataset_cfg.get("group_by") or [])
    cells = load_source(raw, dataset_cfg, obs_only=True)
    attach_split(cells, split_table, split_source, group_by)
    split_cfg = dataset_cfg.get("split") or {}
    if split_cfg.get("train_control_fraction") is not None:
        resplit_controls(cells, int(split_cfg.get("seed", 0)), float(split_cfg["train_control_fraction"]))
    keep_counts = bool((dataset_cfg.get("preprocess") or {}).get("keep_counts", False))
    reader = PanelChunks(raw, dataset_cfg)
    with reader:
        panel, columns, var = reader.panel()
        _check_streamable(dataset_cfg, len(panel))
        skeleton = ad.AnnData(obs=_output_obs(cells.obs, dataset_cfg), var=var, uns=_processed_uns(dataset_cfg))
        with atomic_path(out_h5ad) as tmp:
            skeleton.write_h5ad(tmp)
            with h5py.File(tmp, "r+") as handle:
                stores = [empty_csr(handle, "X", len(panel))]
                if keep_counts:
                    stores.append(empty_csr(handle.require_group("layers"), "counts", len(panel)))
                n_rows = 0
                scan = reader.value_scan()  # raw counts are checked window by window (the file is removed if not)
                for counts, logn, _library in reader.chunks(columns, scan):
                    stores[0].append(logn)
                    if keep_counts:
                        stores[1].append(counts)
                    n_rows += logn.shape[0]
                check_counts(scan, dataset_cfg)
                if n_rows != skeleton.n_obs:
                    raise PipelineInputError(reader.source, "obs_filter", f"{n_rows} rows read, {skeleton.n_obs} cells selected")
    return summary(skeleton)


def summary(adata: ad.AnnData) -> dict:
    """Cells, genes and conditions per split: the JSON the report shows."""
    group_by = [str(g) for g in adata.uns.get("group_by", [])]
    per_split = {}
    for split, frame in adata.obs.groupby(SPLIT, observed=True):
        per_split[split] = {
            "cells": int(len(frame)),
            "conditions": int(frame[CONDITION].nunique()),
            "subgroups": {k: int(v) for k, v in frame.groupby(SUBGROUP, observed=True)[CONDITION].nunique().items() if k},
        }
        if group_by:  # (condition, group) pairs, the unit a covariate-aware split holds out
            per_split[split]["pairs"] = int(len(frame[[CONDITION, *group_by]].drop_duplicates()))
    return {"cells": int(adata.n_obs), "genes": int(adata.n_vars), "splits": per_split}

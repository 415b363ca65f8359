"""Cells x HVGs, log-normalised, with the split attached. Every data-driven choice sees train cells only."""

from __future__ import annotations

from typing import Any, Mapping

import anndata as ad
import numpy as np
import pandas as pd
import scanpy as sc
import scipy.sparse as sp

from ..errors import PipelineInputError
from .conditions import unique_genes
from .source import CONDITION, IS_CONTROL

SPLIT = "split"
SUBGROUP = "subgroup"


def attach_split(adata: ad.AnnData, split_table: pd.DataFrame, split_source: str) -> ad.AnnData:
    """Add ``split``/``subgroup`` per cell from the condition-level table; every condition must be listed."""
    mapping = split_table.set_index(CONDITION)
    missing = sorted(set(adata.obs[CONDITION]) - set(mapping.index))
    if missing:
        raise PipelineInputError(split_source, CONDITION, f"conditions without a split: {missing[:5]}")
    adata.obs[SPLIT] = adata.obs[CONDITION].map(mapping[SPLIT]).astype(str).values
    adata.obs[SUBGROUP] = adata.obs[CONDITION].map(mapping[SUBGROUP].fillna("")).astype(str).values
    return adata


def log_normalise(adata: ad.AnnData, target_sum: float) -> None:
    """Per-cell normalisation with a fixed target sum, so no statistic is shared across cells."""
    adata.layers["counts"] = adata.X.copy()
    sc.pp.normalize_total(adata, target_sum=target_sum)
    sc.pp.log1p(adata)


def select_hvgs(adata: ad.AnnData, n_top_genes: int | None, flavor: str, must_keep: list[str]) -> list[str]:
    """Highly variable genes chosen on train cells only; the whole panel when it is already fixed.

    ``must_keep`` (e.g. perturbed genes present in the panel) are added after the ranking, as
    PerturBench does, so a target gene is never dropped.
    """
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


def preprocess(
    adata: ad.AnnData, split_table: pd.DataFrame, dataset_cfg: Mapping[str, Any], split_source: str
) -> ad.AnnData:
    """Raw cells -> processed cells (log-normalised, HVGs, obs: condition, split, subgroup, covariates)."""
    attach_split(adata, split_table, split_source)
    prep = dataset_cfg.get("preprocess", {})
    if prep.get("normalize", False):
        log_normalise(adata, float(prep.get("target_sum", 1e4)))
    targets = unique_genes(adata.obs[CONDITION].unique(), dataset_cfg["control_label"])
    genes = select_hvgs(adata, prep.get("n_top_genes"), prep.get("hvg_flavor", "seurat_v3"), targets)
    out = adata[:, genes].copy()
    keep = [CONDITION, IS_CONTROL, SPLIT, SUBGROUP, *dataset_cfg.get("covariates", [])]
    out.obs = out.obs[keep].copy()
    for column in [CONDITION, SPLIT, SUBGROUP, *dataset_cfg.get("covariates", [])]:
        out.obs[column] = out.obs[column].astype(str)
    out.layers.clear()
    out.X = out.X.astype(np.float32) if sp.issparse(out.X) else np.asarray(out.X, dtype=np.float32)
    out.uns = {"dataset": dataset_cfg.get("name", ""), "control_label": dataset_cfg["control_label"]}
    return out


def summary(adata: ad.AnnData) -> dict:
    """Cells, genes and conditions per split: the JSON the report shows."""
    per_split = {}
    for split, frame in adata.obs.groupby(SPLIT, observed=True):
        per_split[split] = {
            "cells": int(len(frame)),
            "conditions": int(frame[CONDITION].nunique()),
            "subgroups": {k: int(v) for k, v in frame.groupby(SUBGROUP, observed=True)[CONDITION].nunique().items() if k},
        }
    return {"cells": int(adata.n_obs), "genes": int(adata.n_vars), "splits": per_split}

"""One function per pipeline step. Rule scripts are thin adapters around these."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Mapping

import anndata as ad
import numpy as np
import pandas as pd

from .data.pca import PCABasis, fit_pca
from .data.preprocess import SPLIT, preprocess, summary
from .data.source import CONDITION, IS_CONTROL, load_source
from .data.split import make_split
from .data.truth import build_test_truth
from .io import write_csv, write_h5ad, write_text
from .models.base import ModelContext, get_model


def limit_threads() -> None:
    """Small models on 2 cores run faster and far steadier single-threaded."""
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        pass


def split_step(raw: str, dataset_cfg: Mapping[str, Any], out_csv: str) -> None:
    adata = load_source(raw, dataset_cfg)
    params = dict(dataset_cfg["split"])
    recipe = params.pop("recipe")
    table = make_split(list(adata.obs[CONDITION].unique()), dataset_cfg["control_label"], recipe, **params)
    write_csv(table, out_csv, index=False)


def preprocess_step(raw: str, split_csv: str, dataset_cfg: Mapping[str, Any], out_h5ad: str, out_summary: str) -> None:
    adata = load_source(raw, dataset_cfg)
    processed = preprocess(adata, pd.read_csv(split_csv, keep_default_na=False), dataset_cfg, split_csv)
    write_h5ad(processed, out_h5ad)
    write_text(json.dumps(summary(processed), indent=2), out_summary)


def pca_step(processed: str, dataset_cfg: Mapping[str, Any], out_npz: str) -> None:
    adata = ad.read_h5ad(processed)
    fit_pca(adata, int(dataset_cfg["pca"]["n_components"]), int(dataset_cfg["split"].get("seed", 0))).save(out_npz)


def truth_step(processed: str, out_h5ad: str) -> None:
    write_h5ad(build_test_truth(ad.read_h5ad(processed)), out_h5ad)


def _context(dataset: str, adata: ad.AnnData, pca: str, esm2: str | None, seed: int) -> ModelContext:
    embeddings = {}
    if esm2:
        from .embed.esm2 import load_embeddings

        embeddings = load_embeddings(esm2)
    return ModelContext(dataset, adata.uns["control_label"], PCABasis.load(pca), embeddings, seed)


def train_step(
    dataset: str, processed: str, pca: str, esm2: str, model_cfg: Mapping[str, Any], params: Mapping[str, Any],
    checkpoint_dir: str, seed: int,
) -> None:
    limit_threads()
    adata = ad.read_h5ad(processed)
    train = adata[adata.obs[SPLIT] == "train"].copy()
    val = adata[adata.obs[SPLIT] == "val"].copy()
    context = _context(dataset, adata, pca, esm2, seed)
    # Snakemake deletes a failed job's declared outputs; resumable state therefore lives beside the
    # checkpoint and becomes it only when training has finished.
    final = Path(checkpoint_dir)
    work = final.with_name(final.name + ".partial")
    work.mkdir(parents=True, exist_ok=True)
    started = time.time()
    get_model(model_cfg["type"]).fit(train, val, context, params, work)
    write_text(
        json.dumps({"model": dict(model_cfg), "params": dict(params), "seed": seed, "train_seconds": time.time() - started},
                   indent=2, default=str),
        work / "config_used.json",
    )
    if final.exists():
        shutil.rmtree(final)
    os.replace(work, final)


def predict_step(
    dataset: str, model: str, truth: str, processed: str, pca: str, esm2: str, model_cfg: Mapping[str, Any],
    params: Mapping[str, Any], sampling: Mapping[str, Any], checkpoint_dir: str, out_h5ad: str,
) -> None:
    """Predicted cells for every test condition plus the real controls, in the truth's gene order."""
    limit_threads()
    truth_adata = ad.read_h5ad(truth)
    control_label = truth_adata.uns["control_label"]
    conditions = sorted(set(truth_adata.obs[CONDITION]) - {control_label})
    control = truth_adata[truth_adata.obs[IS_CONTROL].to_numpy()].copy()
    context = _context(dataset, truth_adata, pca, esm2, int(sampling.get("seed", 0)))
    n_cells = int(sampling["n_cells_per_condition"])  # generative models; baselines return the control set
    started = time.time()
    cells = get_model(model_cfg["type"]).sample(
        Path(checkpoint_dir), conditions, control, n_cells, context, params, sampling
    )
    seconds = time.time() - started
    blocks, labels = [], []
    for condition in conditions:
        x = np.asarray(cells[condition], dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != truth_adata.n_vars or x.shape[0] == 0:
            raise ValueError(f"model returned shape {x.shape} for '{condition}', expected (n, {truth_adata.n_vars})")
        blocks.append(x)
        labels += [condition] * x.shape[0]
    blocks.append(np.asarray(control.X, dtype=np.float32))
    labels += [control_label] * control.n_obs
    obs = pd.DataFrame({CONDITION: labels}, index=[f"pred_{i}" for i in range(len(labels))])
    pred = ad.AnnData(X=np.vstack(blocks), obs=obs, var=truth_adata.var[[]].copy())
    pred.uns = {
        "model": model, "dataset": dataset, "model_type": model_cfg["type"], "control_label": control_label,
        "sampler": {k: sampling[k] for k in sampling}, "sample_seconds": seconds,
        "note": "gene-space values from PCA or mean shifts are clipped at 0 (log-expression cannot be negative)",
    }
    write_h5ad(pred, out_h5ad)

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
from .data.split import condition_pairs, make_split
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
    adata = load_source(raw, dataset_cfg, obs_only=True)  # the split needs obs only
    params = dict(dataset_cfg["split"])
    recipe = params.pop("recipe")
    pairs = condition_pairs(adata.obs, list(dataset_cfg.get("group_by") or []))
    table = make_split(pairs, dataset_cfg["control_label"], recipe, **params)
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
    checkpoint_dir: str, seed: int, stage: str = "fit", stage_inputs: Mapping[str, str] | None = None,
    device_report: Mapping[str, Any] | None = None,
) -> None:
    """Train one stage of a model into ``checkpoint_dir``.

    ``stage`` is the model's method: ``fit`` for every model, plus e.g. ``fit_autoencoder`` for the two-stage
    scLDM, whose stages are separate jobs. ``stage_inputs`` hands earlier stages' outputs to a later stage
    through params (``{"_autoencoder_dir": ...}``).
    """
    limit_threads()
    adata = ad.read_h5ad(processed)
    train = adata[adata.obs[SPLIT] == "train"].copy()
    val = adata[adata.obs[SPLIT] == "val"].copy()
    context = _context(dataset, adata, pca, esm2, seed)
    params = {**params, **(stage_inputs or {})}
    # Snakemake deletes a failed job's declared outputs; resumable state therefore lives beside the
    # checkpoint and becomes it only when training has finished.
    final = Path(checkpoint_dir)
    work = final.with_name(final.name + ".partial")
    work.mkdir(parents=True, exist_ok=True)
    started = time.time()
    getattr(get_model(model_cfg["type"]), stage)(train, val, context, params, work)
    from .distributed import current_world

    if not current_world().is_main:
        return  # rank 0 writes the job's files
    write_text(
        json.dumps({"model": dict(model_cfg), "stage": stage, "params": dict(params), "seed": seed,
                    "train_seconds": time.time() - started, "devices": dict(device_report or {})},
                   indent=2, default=str),
        work / "config_used.json",
    )
    if final.exists():
        shutil.rmtree(final)
    os.replace(work, final)


def train_job(snakemake) -> None:
    """A training rule's whole job: the GPU guard, then one process, or one per GPU (data parallel)."""
    from .devices import guard_job
    from .distributed import launch
    from .models.base import framework_of

    model_cfg = snakemake.params.model_cfg
    report = guard_job(snakemake, framework_of(model_cfg["type"]))
    stage_inputs = {"_autoencoder_dir": snakemake.input.autoencoder} if snakemake.input.get("autoencoder") else None
    kwargs = dict(
        dataset=snakemake.wildcards.dataset, processed=snakemake.input.processed, pca=snakemake.input.pca,
        esm2=snakemake.input.get("esm2") or None, model_cfg=dict(model_cfg), params=dict(snakemake.params.params),
        checkpoint_dir=snakemake.output[0], seed=int(snakemake.params.seed),
        stage=snakemake.params.get("stage", "fit"), stage_inputs=stage_inputs, device_report=report.as_dict(),
    )
    nodes = int(snakemake.resources.get("nodes", 1) or 1)
    per_node = int(snakemake.resources.get("tasks_per_node", 1) or 1)
    if nodes * per_node == 1:
        train_step(**kwargs)
        return
    out = Path(snakemake.output[0])
    launch({"function": "perturb_repro.steps:train_step", "kwargs": kwargs}, out.with_name(out.name + ".ddp_job.json"),
           nodes=nodes, tasks_per_node=per_node)


def group_columns(adata: ad.AnnData) -> list[str]:
    """The dataset's ``group_by`` columns, recorded in ``uns`` by preprocessing (empty without groups)."""
    return [str(g) for g in adata.uns.get("group_by", [])]


def _groups_of(obs: pd.DataFrame, group_by: list[str]) -> list[tuple[tuple[str, ...], np.ndarray]]:
    """(group values, row mask) per group, sorted; one all-rows group when there are no group columns."""
    if not group_by:
        return [((), np.ones(len(obs), dtype=bool))]
    keys = obs[group_by].astype(str)
    out = []
    for values in sorted(set(map(tuple, keys.to_numpy().tolist()))):
        out.append((values, (keys == pd.Series(values, index=group_by)).all(axis=1).to_numpy()))
    return out


def predict_step(
    dataset: str, model: str, truth: str, processed: str, pca: str, esm2: str, model_cfg: Mapping[str, Any],
    params: Mapping[str, Any], sampling: Mapping[str, Any], checkpoint_dir: str, out_h5ad: str,
) -> None:
    """Predicted cells for every test condition plus the real controls, in the truth's gene order.

    With ``group_by`` (in the truth's ``uns``) the model is asked once per group, with that group's
    control cells (whose obs carry the covariates) and that group's test conditions; predicted
    cells carry the group columns in obs.
    """
    limit_threads()
    truth_adata = ad.read_h5ad(truth)
    control_label = truth_adata.uns["control_label"]
    group_by = group_columns(truth_adata)
    is_control = truth_adata.obs[IS_CONTROL].to_numpy(dtype=bool)
    context = _context(dataset, truth_adata, pca, esm2, int(sampling.get("seed", 0)))
    n_cells = int(sampling["n_cells_per_condition"])  # generative models; baselines return the control set
    model_impl = get_model(model_cfg["type"])
    blocks, labels, group_rows = [], [], []
    seconds = 0.0
    for values, rows in _groups_of(truth_adata.obs, group_by):
        conditions = sorted(set(truth_adata.obs.loc[rows & ~is_control, CONDITION].astype(str)) - {control_label})
        if not conditions:
            continue
        control = truth_adata[rows & is_control].copy()
        if control.n_obs == 0:
            raise ValueError(f"group {dict(zip(group_by, values))} has test conditions but no control cells")
        started = time.time()
        cells = model_impl.sample(Path(checkpoint_dir), conditions, control, n_cells, context, params, sampling)
        seconds += time.time() - started
        for condition in conditions:
            x = np.asarray(cells[condition], dtype=np.float32)
            if x.ndim != 2 or x.shape[1] != truth_adata.n_vars or x.shape[0] == 0:
                raise ValueError(f"model returned shape {x.shape} for '{condition}', expected (n, {truth_adata.n_vars})")
            blocks.append(x)
            labels += [condition] * x.shape[0]
            group_rows += [values] * x.shape[0]
    control = truth_adata[is_control]
    blocks.append(np.asarray(control.X, dtype=np.float32))
    labels += [control_label] * control.n_obs
    if group_by:
        group_rows += list(map(tuple, control.obs[group_by].astype(str).to_numpy().tolist()))
    obs = pd.DataFrame({CONDITION: labels}, index=[f"pred_{i}" for i in range(len(labels))])
    for j, column in enumerate(group_by):
        obs[column] = [g[j] for g in group_rows]
    pred = ad.AnnData(X=np.vstack(blocks), obs=obs, var=truth_adata.var[[]].copy())
    pred.uns = {
        "model": model, "dataset": dataset, "model_type": model_cfg["type"], "control_label": control_label,
        "sampler": {k: sampling[k] for k in sampling}, "sample_seconds": seconds,
        "note": "gene-space values from PCA or mean shifts are clipped at 0 (log-expression cannot be negative)",
    }
    if group_by:
        pred.uns["group_by"] = group_by
    write_h5ad(pred, out_h5ad)

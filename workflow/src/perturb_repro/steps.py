"""One function per pipeline step. Rule scripts are thin adapters around these."""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator, Mapping

import anndata as ad
import numpy as np
import pandas as pd

from .data.pca import PCABasis, dense, fit_pca
from .data.preprocess import SPLIT, preprocess, summary
from .data.checks import check_split
from .data.source import CONDITION, IS_CONTROL, load_source, source_gene_count
from .data.split import condition_pairs, make_split
from .data.truth import build_test_truth
from .io import atomic_path, remove_stale_temps, write_csv, write_h5ad, write_text
from .config import check_solver
from .models.base import ModelContext, get_model

logger = logging.getLogger(__name__)


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
    check_split(table, adata.obs, dataset_cfg, raw, source_gene_count(raw, dataset_cfg))  # before any output
    write_csv(table, out_csv, index=False)


def preprocess_step(raw: str, split_csv: str, dataset_cfg: Mapping[str, Any], out_h5ad: str, out_summary: str) -> None:
    if dataset_cfg["source"].get("reader") == "backed_chunked":  # written chunk by chunk, never whole (CD4)
        from .data.preprocess import preprocess_streamed

        table = pd.read_csv(split_csv, keep_default_na=False)
        write_text(json.dumps(preprocess_streamed(raw, table, dataset_cfg, split_csv, out_h5ad), indent=2), out_summary)
        return
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


# -- sampling: one job, or shards of the test conditions merged into the same file --------------------------------

SEED_RULE = (
    "per (group, condition): seed = SeedSequence([sampling.seed, w0, w1, w2, w3]).generate_state(1, uint32)[0] >> 1, "
    "w0..w3 = the first 16 bytes (4 little-endian uint32) of sha256(utf-8 of the group values then the condition "
    "label, joined by U+001F); the model's sample() is called once per (group, condition) with that seed as "
    "sampling.seed (and context.seed), so a condition's cells do not depend on the other conditions or the shard"
)
SHARD_RULE = (
    "the sorted (group values, condition) list of the truth's test conditions is dealt round-robin: "
    "entry k goes to shard k mod shards (0-based)"
)
TIMING_KEYS = ("sample_seconds",)  # the only uns entries that differ between two runs of the same sampling
CONTROL_CHUNK_ROWS = 8192  # control rows copied from the truth per block
# the scratch dataset's HDF5 chunks span whole rows (a row-range read touches only its chunks) and are ~1 MB, the
# size of HDF5's default chunk cache; rows are copied from scratch to the output ~32 MB at a time
SCRATCH_CHUNK_BYTES = 2**20
COPY_CHUNK_BYTES = 32 * 2**20


def condition_seed(seed: int, group_values: tuple[str, ...], condition: str) -> int:
    """The sampling seed of one (group, condition): stable across runs, machines, shards and Python versions."""
    digest = hashlib.sha256("\x1f".join([*map(str, group_values), str(condition)]).encode("utf-8")).digest()
    words = np.frombuffer(digest[:16], dtype="<u4").astype(np.uint64).tolist()
    return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFFFFFFFFFF, *words]).generate_state(1, np.uint32)[0] >> 1)


def sampling_plan(obs: pd.DataFrame, control_label: str, group_by: list[str]) -> list[tuple[tuple[str, ...], str]]:
    """Every (group values, condition) to predict, in the order its cells appear in predictions.h5ad."""
    is_control = obs[IS_CONTROL].to_numpy(dtype=bool)
    plan = []
    for values, rows in _groups_of(obs, group_by):
        conditions = sorted(set(obs.loc[rows & ~is_control, CONDITION].astype(str)) - {control_label})
        plan += [(values, c) for c in conditions]
    return plan


def shard_plan(plan: list, shard: int, shards: int) -> list:
    """Shard ``shard`` (0-based) of ``shards``: see :data:`SHARD_RULE`."""
    if not 0 <= shard < shards:
        raise ValueError(f"shard {shard} is not in 0..{shards - 1}")
    return plan[shard::shards]


def _sampler_record(sampling: Mapping[str, Any]) -> dict[str, Any]:
    """Sampler settings as recorded in uns: not ``shards`` (how the work was split, which does not change a cell)."""
    return {k: sampling[k] for k in sampling if k != "shards"}


def _sample_plan(
    truth_adata: ad.AnnData, plan: list, group_by: list[str], context: ModelContext, model_cfg: Mapping[str, Any],
    params: Mapping[str, Any], sampling: Mapping[str, Any], checkpoint_dir: str,
) -> Iterator[tuple[np.ndarray, int, float]]:
    """(predicted cells, seed, seconds of the model call) of each plan entry in turn, one model call per entry with
    its own seed. A generator, so a paper-scale plan (Replogle: ~27 GB of cells) is never in memory at once."""
    is_control = truth_adata.obs[IS_CONTROL].to_numpy(dtype=bool)
    n_cells = int(sampling["n_cells_per_condition"])  # generative models; baselines return the control set
    model_impl = get_model(model_cfg["type"])
    base_seed = int(sampling.get("seed", 0))
    masks = dict(_groups_of(truth_adata.obs, group_by))
    control, control_of = None, None
    for values, condition in plan:
        if control_of != values:  # plans are sorted by group: each group's controls are read once
            control = truth_adata[masks[values] & is_control].to_memory()
            control_of = values
            if control.n_obs == 0:
                raise ValueError(f"group {dict(zip(group_by, values))} has test conditions but no control cells")
        seed = condition_seed(base_seed, values, condition)
        started = time.time()
        cells = model_impl.sample(Path(checkpoint_dir), [condition], control, n_cells, replace(context, seed=seed),
                                  params, {**_sampler_record(sampling), "seed": seed})
        seconds = time.time() - started
        x = np.asarray(cells[condition], dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != truth_adata.n_vars or x.shape[0] == 0:
            raise ValueError(f"model returned shape {x.shape} for '{condition}', expected (n, {truth_adata.n_vars})")
        yield x, seed, seconds
        del cells, x  # a suspended generator keeps its locals: without this the block outlives the next call


@contextlib.contextmanager
def _scratch_file(out_h5ad: str) -> Iterator[Path]:
    """An empty scratch file beside ``out_h5ad`` (same disk, so no /tmp quota), removed on success and failure.
    Named as :func:`io.atomic_path` names temps of ``<stem>.scratch.h5``, so the one a killed job left (SIGKILL,
    OOM: no ``finally``) is swept by the next job's :func:`io.remove_stale_temps`; not as a temp of ``out_h5ad``,
    whose ``atomic_path`` would sweep the live scratch while the output is written from it."""
    target = Path(out_h5ad)
    scratch = target.with_name(f"{target.stem}.scratch.h5")
    scratch.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(scratch)
    fd, tmp = tempfile.mkstemp(prefix=f".{scratch.stem}.", suffix=f".tmp{scratch.suffix}", dir=scratch.parent)
    os.close(fd)
    path = Path(tmp)
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)


def _append_blocks(entries, handle, n_vars: int) -> tuple[Any, list[int], list[int], float]:
    """Append each (block, seed, seconds) of ``entries`` to a resizable float32 dataset of the open HDF5 ``handle``
    as it comes (rows are only known once sampled); returns the dataset, rows and seeds per entry, total seconds."""
    x_scratch = handle.create_dataset("X", shape=(0, n_vars), maxshape=(None, n_vars), dtype=np.float32,
                                      chunks=(max(1, SCRATCH_CHUNK_BYTES // (4 * n_vars)), n_vars))
    rows, seeds, seconds = [], [], 0.0
    for block, seed, elapsed in entries:
        first = x_scratch.shape[0]
        x_scratch.resize(first + block.shape[0], axis=0)
        x_scratch[first:] = block
        rows.append(block.shape[0])
        seeds.append(seed)
        seconds += elapsed
        del block  # the loop variable would otherwise hold this block while the generator samples the next
    return x_scratch, rows, seeds, seconds


def _row_chunks(x_scratch, n_vars: int):
    """The scratch dataset's rows in order, ~:data:`COPY_CHUNK_BYTES` per read."""
    step = max(1, COPY_CHUNK_BYTES // (4 * n_vars))
    for lo in range(0, x_scratch.shape[0], step):
        yield x_scratch[lo:lo + step]


def _key_table(plan: list, group_by: list[str], **columns) -> dict[str, np.ndarray]:
    """Plan entries as uns arrays: ``condition``, one array per group column, and ``columns`` (seed, rows)."""
    table = {CONDITION: np.array([c for _, c in plan], dtype=object)}
    for j, column in enumerate(group_by):
        table[column] = np.array([v[j] for v, _ in plan], dtype=object)
    table.update({k: np.asarray(v, dtype=np.int64) for k, v in columns.items()})
    return table


def _skeleton(
    truth_adata: ad.AnnData, plan: list, rows: list[int], seeds: list[int], group_by: list[str],
    dataset: str, model: str, model_cfg: Mapping[str, Any], sampling: Mapping[str, Any], seconds: float,
) -> ad.AnnData:
    """predictions.h5ad but X: ``rows[k]`` cells of plan entry k in plan order, then the real controls in truth
    order (one code path for the one-job and the merged sharded run, so both write the same file)."""
    control_label = truth_adata.uns["control_label"]
    is_control = truth_adata.obs[IS_CONTROL].to_numpy(dtype=bool)
    labels = [c for (_, c), n in zip(plan, rows) for _ in range(n)] + [control_label] * int(is_control.sum())
    obs = pd.DataFrame({CONDITION: labels}, index=[f"pred_{i}" for i in range(len(labels))])
    control_groups = truth_adata.obs.loc[is_control, group_by].astype(str).to_numpy() if group_by else None
    for j, column in enumerate(group_by):
        obs[column] = [v[j] for (v, _), n in zip(plan, rows) for _ in range(n)] + control_groups[:, j].tolist()
    pred = ad.AnnData(obs=obs, var=truth_adata.var[[]].copy())
    pred.uns = {
        "model": model, "dataset": dataset, "model_type": model_cfg["type"], "control_label": control_label,
        "sampler": _sampler_record(sampling), "sample_seconds": seconds,
        "seed_rule": SEED_RULE, "condition_seeds": _key_table(plan, group_by, seed=seeds),
        "note": "gene-space values from PCA or mean shifts are clipped at 0 (log-expression cannot be negative)",
    }
    if group_by:
        pred.uns["group_by"] = group_by
    return pred


def _control_chunks(truth_adata: ad.AnnData, chunk_rows: int):
    """The truth's control cells in truth order, as float32 blocks of at most ``chunk_rows`` rows."""
    index = np.flatnonzero(truth_adata.obs[IS_CONTROL].to_numpy(dtype=bool))
    for lo in range(0, index.size, chunk_rows):
        yield np.asarray(dense(truth_adata.X[index[lo:lo + chunk_rows]]), dtype=np.float32)


def _write_predictions(skeleton: ad.AnnData, blocks, out_h5ad: str) -> None:
    """Write ``skeleton`` with X the row concatenation of ``blocks`` (float32 arrays, an iterable), filled block by
    block into the h5ad's dense X (as io.write_h5ad: a temp file renamed into place only when complete)."""
    import h5py

    n_obs, n_vars = skeleton.n_obs, skeleton.n_vars
    with atomic_path(out_h5ad) as tmp:
        skeleton.write_h5ad(tmp)
        with h5py.File(tmp, "r+") as handle:
            if "X" in handle:
                del handle["X"]
            x_out = handle.create_dataset("X", shape=(n_obs, n_vars), dtype=np.float32)
            x_out.attrs["encoding-type"] = "array"
            x_out.attrs["encoding-version"] = "0.2.0"
            offset = 0
            for block in blocks:
                x_out[offset:offset + block.shape[0]] = block
                offset += block.shape[0]
            if offset != n_obs:
                raise ValueError(f"predictions: {offset} rows written, {n_obs} expected")


def _open_truth(truth: str) -> ad.AnnData:
    """The truth opened backed: its obs in memory, only the control rows a step needs read from X."""
    return ad.read_h5ad(truth, backed="r")


def predict_step(
    dataset: str, model: str, truth: str, processed: str, pca: str, esm2: str, model_cfg: Mapping[str, Any],
    params: Mapping[str, Any], sampling: Mapping[str, Any], checkpoint_dir: str, out_h5ad: str,
    shard: int | None = None, shards: int = 1,
) -> None:
    """Predicted cells for every test condition plus the real controls, in the truth's gene order.

    With ``group_by`` (in the truth's ``uns``) each condition is sampled with its group's control cells (whose
    obs carry the covariates); predicted cells carry the group columns in obs. Each (group, condition) is one
    model call with its own seed (:data:`SEED_RULE`).

    With ``shard`` (0-based, of ``shards``) only that shard's conditions (:data:`SHARD_RULE`) are sampled and
    ``out_h5ad`` is a shard file (predicted cells only, no controls) for :func:`merge_predictions_step`.

    Streams: each block goes to a scratch file beside ``out_h5ad`` as it is sampled (:func:`_write_sampled`), so
    memory is one block plus a group's controls at any plan size; the file is the one the in-memory code wrote.
    """
    limit_threads()
    check_solver(model, model_cfg, sampling)
    truth_adata = _open_truth(truth)
    try:
        group_by = group_columns(truth_adata)
        context = _context(dataset, truth_adata, pca, esm2, int(sampling.get("seed", 0)))
        plan = sampling_plan(truth_adata.obs, truth_adata.uns["control_label"], group_by)
        if shard is not None:
            plan = shard_plan(plan, int(shard), int(shards))
            logger.info("shard %d of %d: %d (group, condition) entries", shard, shards, len(plan))
        entries = _sample_plan(truth_adata, plan, group_by, context, model_cfg, params, sampling, checkpoint_dir)
        _write_sampled(truth_adata, plan, entries, group_by, out_h5ad, shard, shards,
                       dict(dataset=dataset, model=model, model_cfg=model_cfg, sampling=sampling))
    finally:
        truth_adata.file.close()


def _write_sampled(truth_adata, plan, entries, group_by, out_h5ad, shard, shards, about) -> None:
    """Stream ``entries`` (from :func:`_sample_plan`) to a scratch file, then write predictions.h5ad (or the shard
    file) from it: memory is one block plus a group's controls, not the plan's cells; disk holds X twice until the
    scratch is removed. The skeleton's obs needs every entry's row count, known only once all are sampled."""
    import h5py

    with _scratch_file(out_h5ad) as scratch, h5py.File(scratch, "w") as handle:
        x_scratch, rows, seeds, seconds = _append_blocks(entries, handle, truth_adata.n_vars)
        sampled = _row_chunks(x_scratch, truth_adata.n_vars)
        if shard is None:
            skeleton = _skeleton(truth_adata, plan, rows, seeds, group_by, seconds=seconds, **about)
            _write_predictions(skeleton, itertools.chain(sampled, _control_chunks(truth_adata, CONTROL_CHUNK_ROWS)),
                               out_h5ad)
        else:
            _write_predictions(_shard_skeleton(truth_adata, plan, rows, seeds, group_by, int(shard), int(shards),
                                               seconds), sampled, out_h5ad)


def _shard_skeleton(truth_adata, plan, rows, seeds, group_by, shard, shards, seconds) -> ad.AnnData:
    """A shard file but X: ``rows[k]`` cells of entry k of the shard's plan, named shard<i>_<row>."""
    labels = [c for (_, c), n in zip(plan, rows) for _ in range(n)]
    obs = pd.DataFrame({CONDITION: labels}, index=[f"shard{shard}_{i}" for i in range(len(labels))])
    for j, column in enumerate(group_by):
        obs[column] = [v[j] for (v, _), n in zip(plan, rows) for _ in range(n)]
    return ad.AnnData(obs=obs, var=truth_adata.var[[]].copy(), uns={
        "shard": shard, "shards": shards, "shard_rule": SHARD_RULE, "sample_seconds": seconds,
        "entries": _key_table(plan, group_by, seed=seeds, rows=rows),
    })


def merge_predictions_step(
    dataset: str, model: str, truth: str, shard_files: list[str], model_cfg: Mapping[str, Any],
    sampling: Mapping[str, Any], out_h5ad: str,
) -> None:
    """predictions.h5ad from the shard files of :func:`predict_step`: the same rows, obs names, X bytes and uns
    (but ``sample_seconds``, summed over shards) as one unsharded job. Fails if a shard is missing, belongs to
    another shard count, or does not hold exactly its share of the conditions.

    Streams: the shards are opened backed and X is copied one (group, condition) block at a time, then the
    controls in chunks, so memory is obs plus one block, not the whole prediction matrix."""
    truth_adata = _open_truth(truth)
    parts = []
    try:
        group_by = group_columns(truth_adata)
        plan = sampling_plan(truth_adata.obs, truth_adata.uns["control_label"], group_by)
        shards = len(shard_files)
        where: dict[tuple, tuple[ad.AnnData, int, int, int]] = {}  # entry -> (shard, first row, rows, seed)
        seconds = 0.0
        for i, path in enumerate(shard_files):
            part = ad.read_h5ad(path, backed="r")
            parts.append(part)
            if int(part.uns["shards"]) != shards or int(part.uns["shard"]) != i:
                raise ValueError(f"{path} is shard {part.uns['shard']} of {part.uns['shards']}, expected {i} of {shards}")
            entries = part.uns["entries"]
            keys = [(tuple(str(entries[c][k]) for c in group_by), str(entries[CONDITION][k]))
                    for k in range(len(entries[CONDITION]))]
            if keys != shard_plan(plan, i, shards):
                raise ValueError(f"{path} holds other conditions than shard {i} of {shards} of this truth")
            offsets = np.concatenate([[0], np.cumsum(entries["rows"])]).astype(int)
            if offsets[-1] != part.n_obs or part.n_vars != truth_adata.n_vars:
                raise ValueError(f"{path}: {part.shape}, its entries say {offsets[-1]} rows x {truth_adata.n_vars} genes")
            for k, key in enumerate(keys):
                where[key] = (part, int(offsets[k]), int(offsets[k + 1] - offsets[k]), int(entries["seed"][k]))
            seconds += float(part.uns["sample_seconds"])
        located = [where[key] for key in plan]
        skeleton = _skeleton(truth_adata, plan, [n for _, _, n, _ in located], [s for *_, s in located], group_by,
                             dataset, model, model_cfg, sampling, seconds)

        def blocks():
            for part, first, n, _ in located:
                yield np.asarray(part.X[first:first + n], dtype=np.float32)
            yield from _control_chunks(truth_adata, CONTROL_CHUNK_ROWS)

        _write_predictions(skeleton, blocks(), out_h5ad)
    finally:
        for part in parts:
            part.file.close()
        truth_adata.file.close()

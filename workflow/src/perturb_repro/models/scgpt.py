"""scGPT perturbation fine-tuning (Cui et al. 2024) in plain PyTorch.

The ``scgpt`` package pins an old torch/torchtext stack, so this module re-implements what its
perturbation fine-tuning uses, with scGPT's parameter names and shapes so the official checkpoint
maps onto it (scgpt 0.2.4 = bowang-lab/scGPT v0.2.4, commit 0cd3c73):

* ``TransformerGenerator`` (scgpt/model/generation_model.py) with native attention
  (``use_fast_transformer=False``) and no MVC decoder: GeneEncoder (Embedding + LayerNorm),
  ContinuousValueEncoder, a 3-token perturbation-flag embedding whose padding index is
  ``pert_pad_id``, ``nn.TransformerEncoder`` (post-norm, batch_first), AffineExprDecoder
  (prediction = coeff(h) * input value + bias(h), two ExprDecoders) and the ClsDecoder it always
  builds (unused by the perturbation loss, kept so the layout equals scGPT's: 51,859,459
  parameters at the whole-human size).
* Tutorial_Perturbation's data and loop: each perturbed training cell is paired once with a random
  control cell (GEARS' ``num_samples=1``; control cells are paired with themselves); the input is
  the control cell's expression of *all* genes (``include_zero_gene="all"``) with perturbation flags
  0/1; during training a random subset of ``max_seq_len`` genes (the same for the whole batch) is
  used when there are more genes, prediction uses all of them (``pred_perturb``); loss = MSE of the
  predicted against the perturbed cell's expression over the input genes; Adam, StepLR(1, gamma)
  stepped per epoch, gradient clipping at 1.0, fp16 autocast + GradScaler (on GPU only here). The loop
  is the shared trainer's (``perturb_repro.trainer``: devices, precision, clipping, DDP, checkpoints,
  resume); this module gives it the loss and the epoch-end work (``_FineTuneTask``). ``batch_size`` is
  the global batch: under data parallelism each of N processes computes batch_size / N of its rows.
* Model selection as the Replogle card (shared/seeds/scgpt_replogle_card.txt): validation
  ``pearson_delta`` (scgpt.utils.compute_perturbation_metrics: per condition, Pearson over genes of
  mean predicted minus control mean against mean true minus control mean; averaged), early stopping
  after ``early_stop_patience`` epochs without improvement, the best epoch's weights kept.

What this pipeline needs beyond scGPT (each logged and recorded in the checkpoint directory):

* Genes absent from the vocabulary are dropped from the model's input and loss; scGPT's tutorial
  instead feeds them as ``<pad>`` tokens. Their predicted value is the control cell's own value, so
  every predicted cell keeps the truth's gene set (``gene_space.json`` lists them).
* A perturbed gene outside the measured gene panel cannot carry a flag on a panel position (GEARS
  datasets always contain their perturbed genes; other panels, e.g. the 500-gene demo, often do
  not). Such a gene is appended as an extra token: its vocabulary id, value ``pad_value`` and flag 1
  (padded slots use ``<pad>``, ``pert_pad_id`` and the attention padding mask). The extra tokens are
  never dropped by the ``max_seq_len`` subset (the panel subset is shortened to make room) and are
  not part of the loss. A gene in neither the panel nor the vocabulary is appended as ``<pad>`` with
  flag 1 ("some unknown gene"), plus its ESM2 prior when ``gene_prior: esm2``.
* ``gene_prior: esm2`` (the card's "+ESM" run): a frozen per-gene ESM2 vector (from
  ``context.embeddings``: every gene of the model entry's embedding file; the paper entry's
  ``esm2_t48_15B_UR50D`` embeds every gene of the UniProt FASTA, so every vocabulary token with a sequence
  has one, as the card's runner built its table; genes without one get none) is projected by a trainable
  linear map, zero-initialised so training starts from the pretrained model's function, and added to the
  gene-token embedding of every panel and perturbation token.
* Predictions are clipped at 0 (log-expression); the validation metric uses the same predictions.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import torch

from ..data.conditions import genes_of
from ..data.source import CONDITION, IS_CONTROL
from ..errors import PipelineInputError
from ..io import write_text
from ..distributed import current_world
from ..trainer import Trainer, resolve_device
from . import _scgpt_loading as loading
from .base import ModelContext, checkpoint_key, job_cached
from .scgpt_network import ARCH_KEYS, GenePrior, TransformerGenerator, build_network  # noqa: F401 (re-exported)
from .scgpt_tokens import PERT_FLAG_OFF, PERT_FLAG_ON, Batch, ConditionTokens, GeneSpace, assemble  # noqa: F401
from .scgpt_training import (  # noqa: F401 (re-exported: the model's public pieces)
    EPOCH_LOG,
    EarlyStopping,
    _FineTuneTask,
    _matrix,
    _mix,
    _rows,
    _save_weights,
    _write_epoch_log,
    epoch_batches,
    gene_subset,
    group_keys,
    pearson,
    precision_of,
    predict_cells,
    train_pairs,
    trainer_config,
    validate,
)

logger = logging.getLogger(__name__)

MODEL_FILE = "model.json"  # architecture + gene space: what sample needs to rebuild the network
VOCAB_FILE = "vocab.json"
BEST_FILE = "best_model.pt"  # state dict of the best epoch, scGPT's own file name
LAST_FILE = "last.pt"  # {"model": state dict} of the last epoch
STATE_FILE = "trainer_state.json"  # the shared trainer's resume point (trainer_state.pt holds the state)
LOG_FILE = "train_log.csv"
STATS_FILE = "training_stats.json"
GENE_SPACE_FILE = "gene_space.json"
LOAD_REPORT_FILE = "pretrained_load.json"


def gene_symbols(adata: ad.AnnData, params: Mapping[str, Any]) -> list[str]:
    """The symbols matched against the vocabulary: ``var_names``, or a ``var`` column when the
    dataset's names are not symbols (``data.gene_symbol_column``)."""
    column = params.get("data", {}).get("gene_symbol_column")
    if column is None:
        return list(map(str, adata.var_names))
    if column not in adata.var:
        raise PipelineInputError("var", column, "gene_symbol_column not in the dataset's var table")
    return list(map(str, adata.var[column]))



@contextlib.contextmanager
def _seeded(seed: int):
    """Seed torch's CPU generator (weight init) without disturbing the caller's stream."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield



def _fresh_vocab(train: ad.AnnData, context: ModelContext, params: Mapping[str, Any]) -> dict[str, int]:
    """Without a pretrained model (Tutorial_Perturbation's ``else`` branch): the dataset's genes, then
    the perturbed genes outside the panel (train conditions and every gene with an ESM2 embedding),
    then the special tokens."""
    genes = gene_symbols(train, params)
    perturbed = {g for c in train.obs[CONDITION].unique() for g in genes_of(str(c), context.control_label)}
    perturbed |= set(context.embeddings) - {context.control_label}
    tokens = genes + sorted(perturbed - set(genes)) + [t for t in loading.SPECIAL_TOKENS if t not in genes]
    return {t: i for i, t in enumerate(tokens)}


def _prior_table(context: ModelContext) -> tuple[list[str], np.ndarray]:
    genes = sorted(g for g in context.embeddings if g != context.control_label)
    if not genes:
        raise PipelineInputError("esm2", "embeddings", "gene_prior: esm2 needs ESM2 embeddings (the rule's esm2 input)")
    table = np.stack([np.zeros_like(np.asarray(context.embeddings[genes[0]], dtype=np.float32))] +
                     [np.asarray(context.embeddings[g], dtype=np.float32) for g in genes])
    return genes, table


def _arch(params: Mapping[str, Any], vocab: Mapping[str, int], pretrained_args: Mapping | None) -> dict:
    model = dict(params["model"])
    if pretrained_args is not None:
        model.update(loading.arch_from_args(pretrained_args))  # args.json overrides, as the tutorial
    return {
        "ntoken": len(vocab),
        "d_model": int(model["d_model"]),
        "nhead": int(model["nhead"]),
        "d_hid": int(model["d_hid"]),
        "nlayers": int(model["nlayers"]),
        "nlayers_cls": int(model.get("nlayers_cls", 3)),
        "n_cls": int(model.get("n_cls", 1)),
        "dropout": float(model.get("dropout", 0.0)),
        "pad_token_id": int(vocab[loading.PAD_TOKEN]),
        "pert_pad_id": int(model.get("pert_pad_id", 2)),
        "pad_value": float(model.get("pad_value", 0.0)),
    }


def build_for_training(
    train: ad.AnnData, context: ModelContext, params: Mapping[str, Any], checkpoint_dir: Path, write: bool = True
) -> tuple[TransformerGenerator, GeneSpace, dict]:
    """Network (pretrained or fresh), gene space and the metadata ``sample`` needs; writes (``write``: rank 0
    of a data-parallel job) model.json, vocab.json, gene_space.json and (pretrained) pretrained_load.json."""
    pretrained_dir = params.get("pretrained_dir")
    if pretrained_dir:
        pretrained_dir = Path(pretrained_dir)
        pretrained_args = loading.read_args(pretrained_dir)
        vocab = loading.read_vocab(pretrained_dir / loading.VOCAB_FILE)
    else:
        pretrained_args = None
        vocab = _fresh_vocab(train, context, params)
    prior_genes, table = ([], None)
    if params.get("gene_prior") == "esm2":
        prior_genes, table = _prior_table(context)
    elif params.get("gene_prior") not in (None, "none"):
        raise PipelineInputError("params", "gene_prior", f"unknown gene prior '{params.get('gene_prior')}' (null or esm2)")
    arch = _arch(params, vocab, pretrained_args)
    with _seeded(_mix(context.seed, 0x1717)):
        net = build_network(arch, len(prior_genes) + 1 if table is not None else 0, table.shape[1] if table is not None else 0)
    if table is not None:
        net.gene_prior.table.copy_(torch.from_numpy(table))
    if pretrained_dir:
        state = loading.read_state_dict(pretrained_dir / loading.WEIGHTS_FILE)
        report = loading.load_pretrained(net, state, source=str(pretrained_dir / loading.WEIGHTS_FILE))
        if write:
            write_text(json.dumps(report.as_dict(), indent=1), checkpoint_dir / LOAD_REPORT_FILE)
    space = GeneSpace(gene_symbols(train, params), vocab, context.control_label, prior_genes)
    if space.dropped:
        logger.warning(
            "scGPT: %d/%d dataset genes are not in the vocabulary; dropped from input and loss, predicted as the "
            "control cell's value: %s", len(space.dropped), len(space.genes), space.dropped[:20],
        )
    if space.n_kept == 0:
        raise PipelineInputError("vocab.json", "genes", "no dataset gene is in the scGPT vocabulary")
    meta = {
        "arch": arch,
        "prior": {"type": "esm2", "genes": prior_genes, "dim": int(table.shape[1])} if table is not None else None,
        "pretrained_dir": str(pretrained_dir) if pretrained_dir else None,
        "genes": space.genes,
    }
    if write:
        write_text(json.dumps(vocab), checkpoint_dir / VOCAB_FILE)
        write_text(json.dumps(meta), checkpoint_dir / MODEL_FILE)
        write_text(
            json.dumps({"n_genes": len(space.genes), "n_in_vocab": space.n_kept, "dropped_not_in_vocab": space.dropped,
                        "dropped_prediction": "the sampled control cell's own value"}, indent=1),
            checkpoint_dir / GENE_SPACE_FILE,
        )
    return net, space, meta


def load_trained(checkpoint_dir: Path, control_label: str, weights: str = BEST_FILE, genes: Sequence[str] | None = None):
    """(network with ``weights`` loaded, gene space, metadata) from our own checkpoint directory.

    ``genes`` (default: the training genes) is the gene order predictions are wanted in."""
    checkpoint_dir = Path(checkpoint_dir)
    meta = json.loads((checkpoint_dir / MODEL_FILE).read_text())
    vocab = json.loads((checkpoint_dir / VOCAB_FILE).read_text())
    prior = meta["prior"]
    net = build_network(meta["arch"], len(prior["genes"]) + 1 if prior else 0, prior["dim"] if prior else 0)
    state = torch.load(checkpoint_dir / weights, map_location="cpu", weights_only=True)
    net.load_state_dict(state["model"] if weights == LAST_FILE else state)
    space = GeneSpace(list(genes) if genes is not None else meta["genes"], vocab, control_label, prior["genes"] if prior else ())
    return net, space, meta



def _load_on(device, checkpoint_dir, control_label: str, genes):
    """load_trained with the network moved to ``device``: what one sampling job loads, once (base.job_cached)."""
    net, space, meta = load_trained(Path(checkpoint_dir), control_label, BEST_FILE, genes)
    return net.to(device), space, meta


class ScGPTModel:
    def fit(self, train, val, context: ModelContext, params, checkpoint_dir: Path) -> None:
        checkpoint_dir = Path(checkpoint_dir)
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        training = params["training"]
        if params.get("data", {}).get("include_zero_gene", "all") != "all":
            raise PipelineInputError("params", "data.include_zero_gene", "only 'all' (the perturbation tutorial's) is implemented")
        seed = int(context.seed)
        world = current_world()
        net, space, meta = build_for_training(train, context, params, checkpoint_dir, write=world.is_main)
        arch = meta["arch"]
        fingerprint = {"meta": meta, "n_cells": int(train.n_obs), "data": params.get("data", {}),
                       **{k: training.get(k) for k in ("batch_size", "lr", "lr_gamma", "grad_clip_norm", "cells_per_epoch", "drop_last")}}
        trainer = Trainer(trainer_config(training, seed), checkpoint_dir, kind="scgpt", fingerprint=fingerprint,
                          log_file=LOG_FILE)

        x_train = _matrix(train)
        within = list(params.get("data", {}).get("pair_controls_within") or [])
        source, target = train_pairs(train, seed, within)
        conditions = train.obs[CONDITION].astype(str).to_numpy()
        cond_tokens = {c: space.tokens(c) for c in np.unique(conditions)}
        n_extra = max((len(t.extra_ids) for t in cond_tokens.values()), default=0)
        cap = max(int(params.get("data", {}).get("max_seq_len", 1536)) - n_extra, 1)
        controls = np.flatnonzero(train.obs[IS_CONTROL].to_numpy(dtype=bool))
        control_x = _rows(x_train, controls)
        if within:  # validation predicts each (condition, group) from its own group's train controls
            keys = group_keys(train, within, "train")[controls]
            control_x = {k: control_x[keys == k] for k in sorted(set(keys))}
        has_val = val is not None and val.n_obs > 0 and (val.obs[CONDITION].astype(str) != context.control_label).any()

        # The ClsDecoder is not part of the perturbation loss: it never gets a gradient (Adam leaves it as it is,
        # as in scGPT), and frozen it is not a parameter DDP waits for.
        net.cls_decoder.requires_grad_(False)
        optimizer = torch.optim.Adam(net.parameters(), lr=float(training["lr"]))
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=float(training["lr_gamma"]))
        task = _FineTuneTask(
            space=space, arch=arch, x_train=x_train, source=source, target=target, conditions=conditions,
            cond_tokens=cond_tokens, cap=cap, use_prior=net.gene_prior is not None, params=params, seed=seed, scheduler=scheduler,
            val=val if has_val else None, x_val=_matrix(val) if has_val else None, control_x=control_x,
            precision=trainer.precision_used, device=trainer.device, checkpoint_dir=checkpoint_dir,
            is_main=trainer.is_main, world_size=trainer.world.size,
        )
        result = trainer.fit(net, optimizer, task, stateful={"lr_schedule": scheduler})
        if trainer.is_main:
            final = result.module.state_dict()
            _save_weights(checkpoint_dir / LAST_FILE, final, wrap=True)
            _save_weights(checkpoint_dir / BEST_FILE, task.best if has_val and task.best is not None else final)
            _write_epoch_log(checkpoint_dir, task.history)
            stopper = task.stopper
            best = stopper.best if has_val and stopper.best > -math.inf else None
            write_text(
                json.dumps({
                    "epochs_trained": len(task.history), "best_epoch": stopper.best_epoch,
                    "best_val_" + task.stop_metric: best,
                    "stop_reason": task.stop_reason if has_val else f"{task.stop_reason} (no validation set: last epoch kept)",
                    "early_stop_patience": stopper.patience, "max_epochs": task.max_epochs, "steps": result.steps,
                    "steps_per_epoch": task.steps_per_epoch, "global_batch": task.batch_size,
                    "world_size": trainer.world.size, "cells_seen": task.cells_seen,
                    "wall_clock_seconds": task.seconds, "device": str(trainer.device),
                    "precision": trainer.precision_used,
                }, indent=1),
                checkpoint_dir / STATS_FILE,
            )
        trainer.close()

    def sample(self, checkpoint_dir, conditions, control, n_cells, context, params, sampling):
        device = resolve_device(str(params["training"].get("device", "auto")), current_world())
        amp = precision_of(params["training"])  # autocast on CUDA only
        genes = gene_symbols(control, params)
        key = ("trained", checkpoint_key(checkpoint_dir), context.control_label, tuple(map(str, genes)), str(device))
        net, space, meta = job_cached(self, key, lambda: _load_on(device, checkpoint_dir, context.control_label, genes))
        rng = np.random.default_rng(int(sampling.get("seed", 0)))
        cells = _matrix(control)[np.flatnonzero(control.obs[IS_CONTROL].to_numpy(dtype=bool))]
        n_ctrl = cells.shape[0]
        pick = rng.choice(n_ctrl, size=n_cells, replace=n_cells > n_ctrl)
        x = _rows(cells, pick)
        unknown = sorted({g for c in conditions for g in space.tokens(c).unknown})
        if unknown:
            logger.warning("scGPT: perturbed genes in neither the gene panel nor the vocabulary enter as <pad> tokens "
                           "flagged perturbed%s: %s", " (with their ESM2 prior)" if meta["prior"] else "", unknown)
        batch_size = int(params["training"]["eval_batch_size"])
        pad_value = float(meta["arch"].get("pad_value", 0.0))
        return {c: predict_cells(net, space, x, c, batch_size, device, amp, pad_value) for c in conditions}

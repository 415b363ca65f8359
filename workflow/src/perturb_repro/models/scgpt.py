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
  ``context.embeddings``, which covers the dataset's perturbed genes; other genes get none) is
  projected by a trainable linear map, zero-initialised so training starts from the pretrained
  model's function, and added to the gene-token embedding.
* Predictions are clipped at 0 (log-expression); the validation metric uses the same predictions.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import scipy.sparse as sp
import torch
from torch import nn

from ..data.conditions import genes_of
from ..data.source import CONDITION, IS_CONTROL
from ..errors import PipelineInputError
from ..io import atomic_path, write_text
from ..distributed import current_world
from ..trainer import Shard, Trainer, TrainerConfig, TrainTask, resolve_device
from . import _scgpt_loading as loading
from .base import ModelContext

logger = logging.getLogger(__name__)

MODEL_FILE = "model.json"  # architecture + gene space: what sample needs to rebuild the network
VOCAB_FILE = "vocab.json"
BEST_FILE = "best_model.pt"  # state dict of the best epoch, scGPT's own file name
LAST_FILE = "last.pt"  # {"model": state dict} of the last epoch
STATE_FILE = "trainer_state.json"  # the shared trainer's resume point (trainer_state.pt holds the state)
LOG_FILE = "train_log.csv"
EPOCH_LOG = "epoch_log.csv"
STATS_FILE = "training_stats.json"
GENE_SPACE_FILE = "gene_space.json"
LOAD_REPORT_FILE = "pretrained_load.json"
PERT_FLAG_OFF, PERT_FLAG_ON = 0, 1


# ---------------------------------------------------------------------------------------------
# Architecture: scGPT's TransformerGenerator (names and shapes as scgpt 0.2.4)
# ---------------------------------------------------------------------------------------------


class GeneEncoder(nn.Module):
    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None):
        super().__init__()
        self.embedding = nn.Embedding(num_embeddings, embedding_dim, padding_idx=padding_idx)
        self.enc_norm = nn.LayerNorm(embedding_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.enc_norm(self.embedding(x))


class ContinuousValueEncoder(nn.Module):
    """Expression value -> vector: Linear(1, d), ReLU, Linear(d, d), LayerNorm, dropout; values
    clipped at ``max_value`` first."""

    def __init__(self, d_model: int, dropout: float = 0.1, max_value: int = 512):
        super().__init__()
        self.dropout = nn.Dropout(p=dropout)
        self.linear1 = nn.Linear(1, d_model)
        self.activation = nn.ReLU()
        self.linear2 = nn.Linear(d_model, d_model)
        self.norm = nn.LayerNorm(d_model)
        self.max_value = max_value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.clamp(x.unsqueeze(-1), max=self.max_value)
        x = self.linear2(self.activation(self.linear1(x)))
        return self.dropout(self.norm(x))


class ExprDecoder(nn.Module):
    def __init__(self, d_model: int):
        super().__init__()
        self.fc = nn.Sequential(
            nn.Linear(d_model, d_model), nn.LeakyReLU(), nn.Linear(d_model, d_model), nn.LeakyReLU(), nn.Linear(d_model, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x).squeeze(-1)


class AffineExprDecoder(nn.Module):
    """scGPT's generator decoder without activation or adaptive bias: coeff(h) * value + bias(h)."""

    def __init__(self, d_model: int):
        super().__init__()
        self.coeff_decoder = ExprDecoder(d_model)
        self.bias_decoder = ExprDecoder(d_model)

    def forward(self, x: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        return self.coeff_decoder(x) * values + self.bias_decoder(x)


class ClsDecoder(nn.Module):
    def __init__(self, d_model: int, n_cls: int, nlayers: int = 3):
        super().__init__()
        self._decoder = nn.ModuleList()
        for _ in range(nlayers - 1):
            self._decoder.append(nn.Linear(d_model, d_model))
            self._decoder.append(nn.ReLU())
            self._decoder.append(nn.LayerNorm(d_model))
        self.out_layer = nn.Linear(d_model, n_cls)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self._decoder:
            x = layer(x)
        return self.out_layer(x)


class GenePrior(nn.Module):
    """Frozen per-gene vectors (``table``; row 0 means "no prior") projected to the model width.

    Not part of scGPT: the card's +ESM run. The projection starts at zero so the model begins as the
    pretrained one, and rows without a prior add nothing (not even the bias).
    """

    def __init__(self, n_rows: int, dim: int, d_model: int):
        super().__init__()
        self.register_buffer("table", torch.zeros(n_rows, dim))
        self.proj = nn.Linear(dim, d_model)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        out = self.proj(self.table[rows])
        return out * (rows > 0).unsqueeze(-1).to(out.dtype)


class TransformerGenerator(nn.Module):
    def __init__(
        self,
        ntoken: int,
        d_model: int,
        nhead: int,
        d_hid: int,
        nlayers: int,
        nlayers_cls: int = 3,
        n_cls: int = 1,
        dropout: float = 0.0,
        pad_token_id: int = 0,
        pert_pad_id: int = 2,
        prior_rows: int = 0,
        prior_dim: int = 0,
    ):
        super().__init__()
        self.d_model = d_model
        self.pad_token_id = pad_token_id
        self.pert_pad_id = pert_pad_id
        self.encoder = GeneEncoder(ntoken, d_model, padding_idx=pad_token_id)
        self.value_encoder = ContinuousValueEncoder(d_model, dropout)
        self.pert_encoder = nn.Embedding(3, d_model, padding_idx=pert_pad_id)
        layer = nn.TransformerEncoderLayer(d_model, nhead, d_hid, dropout, batch_first=True)
        self.transformer_encoder = nn.TransformerEncoder(layer, nlayers, enable_nested_tensor=False)
        self.decoder = AffineExprDecoder(d_model)
        self.cls_decoder = ClsDecoder(d_model, n_cls, nlayers=nlayers_cls)
        self.gene_prior = GenePrior(prior_rows, prior_dim, d_model) if prior_rows else None
        # scGPT's init_weights: the gene embedding (all rows, the padding row too) ~ U(-0.1, 0.1)
        with torch.no_grad():
            self.encoder.embedding.weight.uniform_(-0.1, 0.1)

    def forward(
        self,
        src: torch.Tensor,
        values: torch.Tensor,
        pert_flags: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        prior_rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(batch, seq) token ids, values and flags -> (batch, seq) predicted expression."""
        genes = self.encoder(src)
        if self.gene_prior is not None and prior_rows is not None:
            genes = genes + self.gene_prior(prior_rows)
        total = genes + self.value_encoder(values) + self.pert_encoder(pert_flags)
        hidden = self.transformer_encoder(total, src_key_padding_mask=key_padding_mask)
        return self.decoder(hidden, values)


ARCH_KEYS = ("ntoken", "d_model", "nhead", "d_hid", "nlayers", "nlayers_cls", "n_cls", "dropout", "pad_token_id", "pert_pad_id")


def build_network(arch: Mapping[str, Any], prior_rows: int = 0, prior_dim: int = 0) -> TransformerGenerator:
    return TransformerGenerator(**{k: arch[k] for k in ARCH_KEYS}, prior_rows=prior_rows, prior_dim=prior_dim)


# ---------------------------------------------------------------------------------------------
# Genes -> tokens
# ---------------------------------------------------------------------------------------------


@dataclass
class ConditionTokens:
    panel_pos: list[int]  # perturbed genes' positions among the kept panel genes
    extra_ids: list[int]  # vocabulary ids of perturbed genes outside the kept panel
    extra_prior: list[int]  # their prior-table rows (0 = none)
    unknown: list[str]  # perturbed genes in neither the kept panel nor the vocabulary


@dataclass
class GeneSpace:
    """The dataset's genes (truth order) against a vocabulary: which are model tokens, which dropped."""

    genes: list[str]
    vocab: Mapping[str, int]
    control_label: str
    prior_genes: Sequence[str] = ()
    kept: np.ndarray = field(init=False)
    kept_ids: np.ndarray = field(init=False)
    kept_prior: np.ndarray = field(init=False)
    dropped: list[str] = field(init=False)

    def __post_init__(self) -> None:
        self.pad_id = int(self.vocab[loading.PAD_TOKEN])
        self.kept = np.array([i for i, g in enumerate(self.genes) if g in self.vocab], dtype=np.int64)
        self.dropped = [g for g in self.genes if g not in self.vocab]
        self.kept_ids = np.array([self.vocab[self.genes[i]] for i in self.kept], dtype=np.int64)
        self._prior = {g: r + 1 for r, g in enumerate(self.prior_genes)}
        self.kept_prior = np.array([self._prior.get(self.genes[i], 0) for i in self.kept], dtype=np.int64)
        self._pos = {self.genes[i]: j for j, i in enumerate(self.kept)}

    @property
    def n_kept(self) -> int:
        return len(self.kept)

    def tokens(self, condition: str) -> ConditionTokens:
        t = ConditionTokens([], [], [], [])
        for gene in genes_of(condition, self.control_label):
            if gene in self._pos:
                t.panel_pos.append(self._pos[gene])
                continue
            t.extra_ids.append(int(self.vocab.get(gene, self.pad_id)))
            t.extra_prior.append(self._prior.get(gene, 0))
            if gene not in self.vocab:
                t.unknown.append(gene)
        return t


@dataclass
class Batch:
    src: torch.Tensor
    values: torch.Tensor
    flags: torch.Tensor
    padding: torch.Tensor | None
    prior: torch.Tensor | None
    n_panel: int  # the first n_panel positions are panel genes, the rest extra perturbation tokens

    def to(self, device: torch.device) -> Batch:
        def move(t):
            return None if t is None else t.to(device, non_blocking=True)

        return Batch(move(self.src), move(self.values), move(self.flags), move(self.padding), move(self.prior), self.n_panel)


def assemble(
    space: GeneSpace,
    x_kept: np.ndarray,
    tokens: Sequence[ConditionTokens],
    cols: np.ndarray | None,
    pert_pad_id: int,
    pad_value: float,
    use_prior: bool,
) -> Batch:
    """Model input for control cells ``x_kept`` (rows, kept genes) under one condition per row.

    ``cols`` selects the panel genes given to the model (None: all, as ``include_zero_gene="all"``).
    """
    n = len(tokens)
    cols = np.arange(space.n_kept) if cols is None else np.asarray(cols)
    n_panel = len(cols)
    n_extra = max((len(t.extra_ids) for t in tokens), default=0)
    length = n_panel + n_extra
    src = np.full((n, length), space.pad_id, dtype=np.int64)
    src[:, :n_panel] = space.kept_ids[cols]
    values = np.full((n, length), pad_value, dtype=np.float32)
    values[:, :n_panel] = x_kept[:, cols]
    flags = np.full((n, length), pert_pad_id, dtype=np.int64)
    flags[:, :n_panel] = PERT_FLAG_OFF
    padding = np.zeros((n, length), dtype=bool)
    prior = np.zeros((n, length), dtype=np.int64)
    prior[:, :n_panel] = space.kept_prior[cols]
    where = np.full(space.n_kept, -1, dtype=np.int64)
    where[cols] = np.arange(n_panel)
    for row, t in enumerate(tokens):
        for pos in t.panel_pos:
            if where[pos] >= 0:  # a perturbed panel gene outside the random subset carries no flag (as scGPT)
                flags[row, where[pos]] = PERT_FLAG_ON
        k = len(t.extra_ids)
        src[row, n_panel : n_panel + k] = t.extra_ids
        flags[row, n_panel : n_panel + k] = PERT_FLAG_ON
        prior[row, n_panel : n_panel + k] = t.extra_prior
        padding[row, n_panel + k :] = True
    return Batch(
        torch.from_numpy(src),
        torch.from_numpy(values),
        torch.from_numpy(flags),
        torch.from_numpy(padding) if padding.any() else None,
        torch.from_numpy(prior) if use_prior else None,
        n_panel,
    )


# ---------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------


def _mix(*parts: int) -> int:
    """A 63-bit seed from integers: per-step and per-epoch streams are independent of each other."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint64)[0] >> np.uint64(1))


def _generator(*parts: int) -> torch.Generator:
    return torch.Generator().manual_seed(_mix(*parts))


def _rows(x, idx) -> np.ndarray:
    """Dense float32 rows of a (possibly sparse) matrix."""
    sub = x[np.asarray(idx)]
    return np.asarray(sub.toarray() if sp.issparse(sub) else sub, dtype=np.float32)


def _matrix(adata: ad.AnnData):
    return adata.X.tocsr() if sp.issparse(adata.X) else np.asarray(adata.X, dtype=np.float32)


def gene_symbols(adata: ad.AnnData, params: Mapping[str, Any]) -> list[str]:
    """The symbols matched against the vocabulary: ``var_names``, or a ``var`` column when the
    dataset's names are not symbols (``data.gene_symbol_column``)."""
    column = params.get("data", {}).get("gene_symbol_column")
    if column is None:
        return list(map(str, adata.var_names))
    if column not in adata.var:
        raise PipelineInputError("var", column, "gene_symbol_column not in the dataset's var table")
    return list(map(str, adata.var[column]))


def precision_of(training: Mapping[str, Any]) -> str:
    """The trainer precision a preset asks for: ``precision``, else scGPT's ``amp`` key (true: fp16 autocast +
    GradScaler, as scGPT's fine-tuning; false: fp32). fp16/bf16 apply on CUDA only: CPU runs stay fp32."""
    if training.get("precision"):
        return str(training["precision"])
    return "fp16" if training.get("amp", True) else "fp32"


def trainer_config(training: Mapping[str, Any], seed: int) -> TrainerConfig:
    """The preset's training keys as the shared trainer's settings. The run is counted in epochs (the task
    stops at ``max_epochs`` or early), so there is no step budget."""
    clip = training.get("grad_clip_norm", 1.0)
    return TrainerConfig(
        total_steps=None, seed=seed, checkpoint_every=int(training.get("checkpoint_every") or 0),
        precision=precision_of(training), grad_clip=float(clip) if clip else None,
        device=str(training.get("device", "auto")), progress=bool(training.get("progress", True)),
    )


@contextlib.contextmanager
def _seeded(seed: int):
    """Seed torch's CPU generator (weight init) without disturbing the caller's stream."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    a = np.asarray(a, dtype=np.float64) - np.mean(a)
    b = np.asarray(b, dtype=np.float64) - np.mean(b)
    denom = math.sqrt(float(a @ a) * float(b @ b))
    return float(a @ b / denom) if denom > 0 else float("nan")


@dataclass
class EarlyStopping:
    """scGPT's rule: improvement = strictly above the best so far; stop after ``patience`` epochs
    without one. A NaN score is never an improvement."""

    patience: int
    best: float = -math.inf
    best_epoch: int = 0
    bad_epochs: int = 0

    def update(self, epoch: int, score: float) -> bool:
        if not math.isnan(score) and score > self.best:
            self.best, self.best_epoch, self.bad_epochs = float(score), epoch, 0
            return True
        self.bad_epochs += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.bad_epochs >= self.patience

    def as_dict(self) -> dict:
        best = self.best if math.isfinite(self.best) else None  # JSON has no -Infinity
        return {"patience": self.patience, "best": best, "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> EarlyStopping:
        best = -math.inf if d.get("best") is None else float(d["best"])
        return cls(int(d["patience"]), best, int(d["best_epoch"]), int(d["bad_epochs"]))


# ---------------------------------------------------------------------------------------------
# Building: fresh, from the pretrained directory, or from our own checkpoint
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# Training and prediction
# ---------------------------------------------------------------------------------------------


def train_pairs(train: ad.AnnData, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(control row, target row) per training cell, drawn once as GEARS builds its dataset: each
    perturbed cell with one random control cell, each control cell with itself."""
    is_control = train.obs[IS_CONTROL].to_numpy(dtype=bool)
    controls = np.flatnonzero(is_control)
    if controls.size == 0:
        raise PipelineInputError("train", IS_CONTROL, "scGPT needs control cells in the train split")
    rng = np.random.default_rng(_mix(seed, 0x9A1))
    source = np.arange(train.n_obs)
    source[~is_control] = controls[rng.integers(0, controls.size, size=int((~is_control).sum()))]
    return source, np.arange(train.n_obs)


def epoch_batches(n_pairs: int, batch_size: int, seed: int, epoch: int) -> list[np.ndarray]:
    """Shuffled batches of one epoch; the last short batch is dropped (GEARS' train loader) unless
    it would be the only one."""
    order = torch.randperm(n_pairs, generator=_generator(seed, 0xE90C, epoch)).numpy()
    n_full = n_pairs // batch_size
    if n_full == 0:
        return [order]
    return [order[i * batch_size : (i + 1) * batch_size] for i in range(n_full)]


def gene_subset(n_kept: int, cap: int, seed: int, step: int) -> np.ndarray | None:
    """scGPT: with more input genes than ``max_seq_len``, a random subset (one per batch)."""
    if n_kept <= cap:
        return None
    return np.sort(torch.randperm(n_kept, generator=_generator(seed, 0x5E9, step))[:cap].numpy())


def _autocast(device: torch.device, precision: bool | str):
    """fp16 (``True``, scGPT's amp) or bf16 autocast on CUDA; a no-op elsewhere."""
    precision = "fp16" if precision is True else precision
    if device.type != "cuda" or precision not in ("fp16", "bf16"):
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda", dtype=torch.float16 if precision == "fp16" else torch.bfloat16)


@torch.no_grad()
def predict_cells(
    net: TransformerGenerator,
    space: GeneSpace,
    x_control: np.ndarray,
    condition: str,
    batch_size: int,
    device: torch.device,
    amp: bool | str,
    pad_value: float = 0.0,
) -> np.ndarray:
    """One predicted cell per control cell (rows of ``x_control`` in the dataset's gene order), all
    genes as input (``pred_perturb``); genes outside the vocabulary keep the control value; >= 0.
    ``amp``: the autocast precision (True = fp16; CUDA only)."""
    net.eval()
    out = np.array(x_control, dtype=np.float32, copy=True)
    tokens = space.tokens(condition)
    use_prior = net.gene_prior is not None
    for start in range(0, len(out), batch_size):
        x_kept = out[start : start + batch_size][:, space.kept]
        batch = assemble(space, x_kept, [tokens] * len(x_kept), None, net.pert_pad_id, pad_value, use_prior).to(device)
        with _autocast(device, amp):
            pred = net(batch.src, batch.values, batch.flags, batch.padding, batch.prior)
        out[start : start + len(x_kept), space.kept] = pred[:, : batch.n_panel].float().cpu().numpy()
    return np.clip(out, 0.0, None)


def validate(
    net, space: GeneSpace, val: ad.AnnData, x_val, control_x: np.ndarray, params: Mapping[str, Any],
    device: torch.device, amp: bool | str, seed: int, epoch: int, pad_value: float,
) -> dict[str, float]:
    """scGPT's validation: each val cell's condition predicted from a random train control cell;
    pearson_delta and mse of the per-condition mean profiles (deltas against the control mean)."""
    training = params["training"]
    cap = training.get("val_max_cells_per_condition")
    rng = np.random.default_rng(_mix(seed, 0x7A1, epoch))
    control_mean = control_x.mean(axis=0, dtype=np.float64)
    scores, errors = [], []
    for condition, idx in sorted(val.obs.groupby(CONDITION, observed=True).indices.items()):
        if condition == space.control_label:
            continue
        n = len(idx) if cap is None else min(len(idx), int(cap))
        pick = rng.integers(0, len(control_x), size=n)
        pred = predict_cells(net, space, control_x[pick], str(condition), int(training["eval_batch_size"]), device, amp, pad_value)
        truth_mean = _rows(x_val, idx).mean(axis=0, dtype=np.float64)
        pred_mean = pred.mean(axis=0, dtype=np.float64)
        scores.append(pearson(pred_mean - control_mean, truth_mean - control_mean))
        errors.append(float(np.mean((pred_mean - truth_mean) ** 2)))
    finite = [s for s in scores if not math.isnan(s)]
    return {
        "pearson_delta": float(np.mean(finite)) if finite else float("nan"),
        "mse": float(np.mean(errors)) if errors else float("nan"),
        "n_conditions": len(scores),
    }


def _save_weights(path: Path, state: Mapping[str, torch.Tensor], wrap: bool = False) -> None:
    with atomic_path(path) as tmp:
        torch.save({"model": dict(state)} if wrap else dict(state), tmp)


def _write_epoch_log(checkpoint_dir: Path, history: list[dict]) -> None:
    columns = ["epoch", "train_loss", "val_mse", "val_pearson_delta", "lr", "best_epoch", "steps", "seconds"]
    lines = [",".join(columns)] + [",".join("" if h.get(c) is None else f"{h[c]:.6g}" if isinstance(h[c], float) else str(h[c])
                                            for c in columns) for h in history]
    write_text("\n".join(lines) + "\n", checkpoint_dir / EPOCH_LOG)


def _unwrap(net: nn.Module) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    return net.module if isinstance(net, DistributedDataParallel) else net


class _FineTuneTask(TrainTask):
    """Tutorial_Perturbation's epoch loop as a task of the shared trainer.

    Update ``s`` is batch ``s % steps_per_epoch`` of epoch ``s // steps_per_epoch``: the epoch's shuffle and
    the update's gene subset are drawn from (seed, epoch) and (seed, step) for the *global* batch, and each
    data-parallel process keeps its rows (``Shard.take``), so N processes see the batch one process sees.
    An epoch's last update validates (every process, rank 0's numbers decide), keeps the best weights,
    steps the per-epoch StepLR schedule and decides early stopping; these counters, the history and the
    best weights are the task's state, saved and restored with the trainer's.
    """

    def __init__(self, *, space: GeneSpace, arch: Mapping[str, Any], x_train, source, target, conditions,
                 cond_tokens, cap: int, use_prior: bool, params: Mapping[str, Any], seed: int, scheduler, val, x_val, control_x,
                 precision: str, device: torch.device, checkpoint_dir: Path, is_main: bool):
        training = params["training"]
        self.space, self.arch, self.x, self.source, self.target = space, arch, x_train, source, target
        self.conditions, self.cond_tokens, self.cap = conditions, cond_tokens, cap
        self.params, self.seed, self.scheduler = params, seed, scheduler
        self.batch_size = int(training["batch_size"])
        self.steps_per_epoch = len(epoch_batches(len(source), self.batch_size, seed, 0))  # the same every epoch
        self.max_epochs = int(training["max_epochs"])
        self.stop_metric = str(training.get("stop_metric", "pearson_delta"))
        self.val, self.x_val, self.control_x = val, x_val, control_x
        self.has_val = x_val is not None
        self.precision, self.device, self.dir, self.is_main = precision, device, checkpoint_dir, is_main
        self.pad_value = float(arch.get("pad_value", 0.0))
        self.use_prior = use_prior
        self._epoch_rows: tuple[int, list[np.ndarray]] | None = None
        self._pending: torch.Tensor | None = None
        # state
        self.epoch_loss_sum, self.cells_seen, self.seconds = 0.0, 0, 0.0
        self.history: list[dict] = []
        self.stop_reason: str | None = None
        self.stopper = EarlyStopping(int(training["early_stop_patience"]))
        self.best: dict[str, torch.Tensor] | None = None
        self._clock = time.time()

    def _batches(self, epoch: int) -> list[np.ndarray]:
        if self._epoch_rows is None or self._epoch_rows[0] != epoch:
            self._epoch_rows = (epoch, epoch_batches(len(self.source), self.batch_size, self.seed, epoch))
        return self._epoch_rows[1]

    def loss(self, net: nn.Module, step: int, micro: int, shard: Shard) -> torch.Tensor:
        epoch, b = divmod(step, self.steps_per_epoch)
        cols = gene_subset(self.space.n_kept, self.cap, self.seed, step)
        rows = shard.take(self._batches(epoch)[b])
        x_in = _rows(self.x, self.source[rows])[:, self.space.kept]
        y = _rows(self.x, self.target[rows])[:, self.space.kept]
        if cols is not None:
            y = y[:, cols]
        batch = assemble(self.space, x_in, [self.cond_tokens[c] for c in self.conditions[self.target[rows]]], cols,
                         self.arch["pert_pad_id"], self.pad_value, self.use_prior).to(shard.device)
        pred = net(batch.src, batch.values, batch.flags, batch.padding, batch.prior)
        loss = torch.nn.functional.mse_loss(pred[:, : batch.n_panel].float(), torch.from_numpy(y).to(shard.device))
        self._pending = loss.detach()
        return loss

    def after_step(self, net: nn.Module, steps_done: int) -> bool:
        epoch, b = divmod(steps_done - 1, self.steps_per_epoch)
        loss = float(self._pending) if self._pending is not None else float("nan")
        if self.precision != "fp16" and not math.isfinite(loss):  # under fp16 the grad scaler skips such steps
            raise FloatingPointError(f"scGPT: non-finite training loss at step {steps_done - 1}")
        self.epoch_loss_sum += loss
        self.cells_seen += len(self._batches(epoch)[b])
        if steps_done % self.steps_per_epoch:
            return False
        # end of epoch `epoch` (0-based): validate, keep the best, step the schedule
        module = _unwrap(net)
        entry = {"epoch": epoch + 1, "lr": float(self.scheduler.get_last_lr()[0]), "steps": steps_done}
        metrics = None
        if self.has_val:
            metrics = validate(module, self.space, self.val, self.x_val, self.control_x, self.params, self.device,
                               self.precision, self.seed, epoch, self.pad_value)
            module.train()
        loss_sum, metrics = _agree(self.epoch_loss_sum, metrics, self.device)
        entry["train_loss"] = loss_sum / self.steps_per_epoch
        if metrics is not None:
            entry.update(val_mse=metrics["mse"], val_pearson_delta=metrics["pearson_delta"])
            if self.stopper.update(epoch + 1, metrics[self.stop_metric]):
                self.best = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
        else:  # nothing to select on: the latest weights are the ones kept (the final weights, at the end)
            self.stopper.best_epoch = epoch + 1
        entry["best_epoch"] = self.stopper.best_epoch
        self.scheduler.step()
        self.epoch_loss_sum = 0.0
        if self.has_val and self.stopper.should_stop:
            self.stop_reason = "early_stop"
        elif epoch + 1 >= self.max_epochs:
            self.stop_reason = "max_epochs"
        entry["seconds"] = self.seconds + time.time() - self._clock
        self.history.append(entry)
        if self.is_main:
            _write_epoch_log(self.dir, self.history)
        logger.info("scGPT epoch %d: %s", epoch + 1, entry)
        return self.stop_reason is not None

    def state_dict(self) -> dict[str, Any]:
        now = time.time()  # wall time is summed over runs: each save adds the time since the last
        self.seconds += now - self._clock
        self._clock = now
        return {"epoch_loss_sum": self.epoch_loss_sum, "cells_seen": self.cells_seen, "seconds": self.seconds,
                "history": self.history, "stop_reason": self.stop_reason, "early_stopping": self.stopper.as_dict(),
                "best": self.best}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if not state:
            return
        self.epoch_loss_sum, self.cells_seen = float(state["epoch_loss_sum"]), int(state["cells_seen"])
        self.seconds, self.history = float(state["seconds"]), list(state["history"])
        self.stop_reason = state["stop_reason"]
        self.stopper = EarlyStopping.from_dict(state["early_stopping"])
        self.best = state["best"]
        self._clock = time.time()


def _agree(loss_sum: float, metrics: dict | None, device: torch.device) -> tuple[float, dict | None]:
    """Under DDP: the epoch's loss summed over processes (each summed its shard's means), and rank 0's
    validation numbers on every process, so every process takes the same early-stopping decision."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return loss_sum, metrics
    t = torch.tensor([loss_sum], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    loss_sum = float(t.item()) / dist.get_world_size()
    if metrics is not None:
        m = torch.tensor([metrics["pearson_delta"], metrics["mse"]], dtype=torch.float64, device=device)
        dist.broadcast(m, 0)
        metrics = dict(metrics, pearson_delta=float(m[0]), mse=float(m[1]))
    return loss_sum, metrics


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
                       **{k: training.get(k) for k in ("batch_size", "lr", "lr_gamma", "grad_clip_norm")}}
        trainer = Trainer(trainer_config(training, seed), checkpoint_dir, kind="scgpt", fingerprint=fingerprint,
                          log_file=LOG_FILE)

        x_train = _matrix(train)
        source, target = train_pairs(train, seed)
        conditions = train.obs[CONDITION].astype(str).to_numpy()
        cond_tokens = {c: space.tokens(c) for c in np.unique(conditions)}
        n_extra = max((len(t.extra_ids) for t in cond_tokens.values()), default=0)
        cap = max(int(params.get("data", {}).get("max_seq_len", 1536)) - n_extra, 1)
        controls = np.flatnonzero(train.obs[IS_CONTROL].to_numpy(dtype=bool))
        control_x = _rows(x_train, controls)
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
            is_main=trainer.is_main,
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
        net, space, meta = load_trained(Path(checkpoint_dir), context.control_label, BEST_FILE, gene_symbols(control, params))
        net.to(device)
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

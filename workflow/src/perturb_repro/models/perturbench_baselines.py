"""PerturBench's simple neural baselines (Wu et al. 2024): linear additive, latent additive, decoder-only.

Written from PerturBench's definitions (altoslabs/perturbench, ``src/perturbench``), not copied:

* inputs (``data/transforms/pipelines.py: SingleCellPipeline``): a multi-hot vector over the perturbation tokens
  seen in the *train* split (``MultiLabelEncode(perturbation_uniques)``; a combination "A+B" sets both columns) and
  one one-hot block per covariate column (``OneHotEncode(covariate_uniques)``), concatenated in the order of
  ``covariates``.
* training pairs (``data/datasets/singlecell.py: SingleCellPerturbationWithControls``): every *perturbed* train cell
  is a target; it is paired with a control cell drawn at random from the controls of the same covariate group
  (control cells themselves are never targets).
* networks (``modelcore/models/*.py``, ``modelcore/nn/mlp.py: MLP``):
  - ``LinearAdditive``: ``softplus(control + Linear([pert, covariates]))``;
  - ``LatentAdditive``: ``softplus(dec([enc([control, cov]) + pert_enc(pert), cov]))``;
  - ``DecoderOnly``: ``softplus(MLP([pert, covariates]))`` -- no control input at all.
  Softplus is optional (``softplus_output``); MLP blocks are Linear, LayerNorm without affine
  parameters, ReLU and optional Dropout.
* loss and optimisation (``modelcore/models/base.py``, ``configs/``): MSE on gene expression, ``torch.optim.Adam(lr,
  weight_decay=wd)``, ``ReduceLROnPlateau(factor, patience)`` stepped on the validation loss once per epoch (or
  none: ``model.lr_scheduler``), early stopping on the validation loss (``callbacks/early_stopping.yaml``) honouring
  ``trainer.min_epochs``, and the weights of the best validation epoch are the ones used for prediction
  (``ModelCheckpoint(monitor=val_loss)`` and ``trainer.test(ckpt_path="best")`` in ``modelcore/train.py``).
* prediction (``data/datasets/population.py: Counterfactual``): the model is applied to sampled control cells with
  the test condition's perturbation vector, one predicted cell per control cell (decoder-only ignores the control's
  expression, so its cells of one covariate group are identical).

Deviations, all forced by this pipeline: a gene never perturbed in train has no column, so it contributes nothing
(PerturBench's ``MultiLabelEncode`` would raise on it instead); a condition whose genes are all unseen gets the
all-zero perturbation vector, i.e. the network's output for an empty perturbation (not necessarily the control,
since PerturBench trains on perturbed cells only). A covariate value unseen in train gets an all-zero one-hot block.
Training is float32 (the paper's trainer uses 16-bit mixed precision on a GPU). Validation cells are paired with the
validation split's own controls where it has them for their covariate group, else with train controls (GEARS splits
put every control in train). Randomness (epoch order, control pairing, dropout) is drawn from generators seeded by
(seed, epoch/step), so a run resumed from a checkpoint is bit-identical on CPU to an uninterrupted one. Training
runs through the shared trainer (``perturb_repro.trainer``): the epoch loop is ``_EpochTask``; device, precision,
data parallel, checkpoints and resume are the trainer's.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data.conditions import genes_of
from ..data.pca import dense
from ..data.source import CONDITION, IS_CONTROL
from ..distributed import current_world
from ..io import atomic_path, write_csv, write_text
from ..trainer import STATE_FILE, Shard, Trainer, TrainerConfig, TrainTask, resolve_device, step_seed
from .base import ModelContext, checkpoint_key, job_cached

STATE_MARKER = Path(STATE_FILE).with_suffix(".json").name  # the shared trainer's resume point
MODEL_FILE = "model.pt"
VAL_LOG = "val_log.csv"
PREDICT_CHUNK = 4096


# --------------------------------------------------------------------------- encodings


class InputEncoder:
    """PerturBench's ``SingleCellPipeline``: multi-hot perturbations, one-hot covariates.

    The vocabularies are fitted on the *perturbed* train cells (``perturbation_uniques`` and
    ``covariate_uniques`` of the train dataset). Tokens outside them encode as zeros.
    """

    def __init__(self, genes: Sequence[str], covariates: Mapping[str, Sequence[str]], control_label: str) -> None:
        self.genes = list(genes)
        self.covariates = {k: list(v) for k, v in covariates.items()}
        self.control_label = control_label
        self._gene_index = {g: i for i, g in enumerate(self.genes)}
        self._cov_index = {k: {v: i for i, v in enumerate(vals)} for k, vals in self.covariates.items()}

    @classmethod
    def fit(cls, perturbed_obs: pd.DataFrame, covariate_keys: Sequence[str], control_label: str) -> "InputEncoder":
        genes = sorted({g for c in perturbed_obs[CONDITION].astype(str).unique() for g in genes_of(c, control_label)})
        covs = {}
        for key in covariate_keys:
            if key not in perturbed_obs:
                raise ValueError(f"covariate column '{key}' (params 'covariates') is not in the train cells' obs")
            covs[key] = sorted(perturbed_obs[key].astype(str).unique())
        return cls(genes, covs, control_label)

    @property
    def n_perts(self) -> int:
        return len(self.genes)

    @property
    def n_covariates(self) -> int:
        return sum(len(v) for v in self.covariates.values())

    def seen(self, condition: str) -> list[str]:
        return [g for g in genes_of(condition, self.control_label) if g in self._gene_index]

    def perturbation(self, conditions: Sequence[str]) -> np.ndarray:
        """Multi-hot rows; genes without a column (never perturbed in train) contribute nothing."""
        out = np.zeros((len(conditions), self.n_perts), dtype=np.float32)
        cache: dict[str, list[int]] = {}
        for row, condition in enumerate(conditions):
            if condition not in cache:
                cache[condition] = [self._gene_index[g] for g in self.seen(condition)]
            out[row, cache[condition]] = 1.0
        return out

    def covariate(self, obs: pd.DataFrame) -> np.ndarray:
        blocks = []
        for key, index in self._cov_index.items():
            if key not in obs:
                raise ValueError(f"covariate column '{key}' is missing from the cells' obs")
            block = np.zeros((len(obs), len(index)), dtype=np.float32)
            cols = np.array([index.get(v, -1) for v in obs[key].astype(str)], dtype=np.int64)
            known = cols >= 0
            block[np.flatnonzero(known), cols[known]] = 1.0
            blocks.append(block)
        return np.concatenate(blocks, axis=1) if blocks else np.zeros((len(obs), 0), dtype=np.float32)

    def group_keys(self, obs: pd.DataFrame) -> list[tuple[str, ...]]:
        if not self.covariates:
            return [()] * len(obs)
        cols = [obs[k].astype(str).to_numpy() for k in self.covariates]
        return list(zip(*cols))

    def to_dict(self) -> dict[str, Any]:
        return {"genes": self.genes, "covariates": self.covariates, "control_label": self.control_label}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "InputEncoder":
        return cls(d["genes"], d["covariates"], d["control_label"])


# --------------------------------------------------------------------------- networks


class MLP(nn.Module):
    """``perturbench.modelcore.nn.mlp.MLP`` (norm='layer', elementwise_affine=False)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, n_layers: int, dropout: float | None = None):
        super().__init__()
        layers: list[nn.Module] = []
        dims = [input_dim] + [hidden_dim] * n_layers
        for i in range(n_layers):
            layers += [nn.Linear(dims[i], hidden_dim), nn.LayerNorm(hidden_dim, elementwise_affine=False), nn.ReLU()]
            if dropout is not None:
                layers.append(nn.Dropout(dropout))
        layers.append(nn.Linear(hidden_dim, output_dim))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class MaskNet(nn.Module):
    """``perturbench.modelcore.nn.mlp.MaskNet``: Bernoulli mask with a straight-through gradient."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, n_layers: int):
        super().__init__()
        self.mlp = MLP(input_dim, hidden_dim, output_dim, n_layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = self.mlp(x).sigmoid()
        return torch.bernoulli(probs) - probs.detach() + probs


def _opt_dropout(value) -> float | None:
    return None if value is None else float(value)


class LinearAdditiveNet(nn.Module):
    uses_control = True

    def __init__(self, n_genes: int, n_perts: int, n_covariates: int, cfg: Mapping[str, Any]):
        super().__init__()
        self.inject_covariates = bool(cfg.get("inject_covariates", False))
        self.softplus_output = bool(cfg.get("softplus_output", True))
        self.fc_pert = nn.Linear(n_perts + (n_covariates if self.inject_covariates else 0), n_genes)

    def forward(self, control, pert, cov):
        x = torch.cat([pert, cov], dim=1) if self.inject_covariates else pert
        out = control + self.fc_pert(x)
        return F.softplus(out) if self.softplus_output else out


class LatentAdditiveNet(nn.Module):
    uses_control = True

    def __init__(self, n_genes: int, n_perts: int, n_covariates: int, cfg: Mapping[str, Any]):
        super().__init__()
        n_layers = int(cfg.get("n_layers", 2))
        width = int(cfg.get("encoder_width", 128))
        latent = int(cfg.get("latent_dim", 32))
        dropout = _opt_dropout(cfg.get("dropout"))
        self.inject_enc = bool(cfg.get("inject_covariates_encoder", False))
        self.inject_dec = bool(cfg.get("inject_covariates_decoder", False))
        self.softplus_output = bool(cfg.get("softplus_output", True))
        self.sparse = bool(cfg.get("sparse_additive_mechanism", False))
        self.gene_encoder = MLP(n_genes + (n_covariates if self.inject_enc else 0), width, latent, n_layers, dropout)
        self.decoder = MLP(latent + (n_covariates if self.inject_dec else 0), width, n_genes, n_layers, dropout)
        self.pert_encoder = MLP(n_perts, width, latent, n_layers, dropout)
        if self.sparse:
            self.mask_encoder = MaskNet(n_perts, width, latent, n_layers)

    def forward(self, control, pert, cov):
        x = torch.cat([control, cov], dim=1) if self.inject_enc else control
        z_pert = self.pert_encoder(pert)
        if self.sparse:
            z_pert = self.mask_encoder(pert) * z_pert
        z = self.gene_encoder(x) + z_pert
        if self.inject_dec:
            z = torch.cat([z, cov], dim=1)
        out = self.decoder(z)
        return F.softplus(out) if self.softplus_output else out


class DecoderOnlyNet(nn.Module):
    uses_control = False

    def __init__(self, n_genes: int, n_perts: int, n_covariates: int, cfg: Mapping[str, Any]):
        super().__init__()
        self.use_covariates = bool(cfg.get("use_covariates", True))
        self.use_perturbations = bool(cfg.get("use_perturbations", True))
        if not (self.use_covariates or self.use_perturbations):
            raise ValueError("'use_covariates' and 'use_perturbations' can not both be false")
        self.softplus_output = bool(cfg.get("softplus_output", True))
        n_in = (n_covariates if self.use_covariates else 0) + (n_perts if self.use_perturbations else 0)
        # PerturBench builds the decoder without dropout
        self.decoder = MLP(n_in, int(cfg.get("encoder_width", 128)), n_genes, int(cfg.get("n_layers", 2)))

    def forward(self, control, pert, cov):
        parts = ([pert] if self.use_perturbations else []) + ([cov] if self.use_covariates else [])
        out = self.decoder(torch.cat(parts, dim=1))
        return F.softplus(out) if self.softplus_output else out


# --------------------------------------------------------------------------- helpers


_seed = step_seed  # 63-bit seed from integer keys (seed, stream, counter): stable across runs and machines

STREAM_EPOCH, STREAM_STEP, STREAM_VAL, STREAM_INIT, STREAM_PREDICT = 1, 2, 3, 4, 5


def training_device(params: Mapping[str, Any]) -> str:
    """The preset's ``training.device`` (auto | cpu | cuda), read alike by fit and sample."""
    return str((params.get("training") or {}).get("device", "auto"))


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Global torch RNG seeded for one block outside the trainer's steps (initialisation, validation,
    prediction) and restored afterwards."""
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.default_generator.manual_seed(seed)  # torch.manual_seed also probes every backend: slow
        if devices:
            torch.cuda.manual_seed(seed)
        yield


def _share(n: int, shard: Shard) -> tuple[slice, float]:
    """This process's rows of a global batch of ``n`` (``Shard.take``'s split) and the weight that makes the
    average over processes of their mean losses the global batch's mean loss. An epoch's last, smaller batch
    may not split evenly; its shares then differ by one row and are weighted by size."""
    if n % shard.world == 0:
        lo, hi = shard.bounds(n)
    else:
        lo, hi = shard.rank * n // shard.world, (shard.rank + 1) * n // shard.world
    return slice(lo, hi), (hi - lo) * shard.world / n


class _PairedCells:
    """Perturbed cells with their encodings and, per covariate group, a pool of control cells."""

    def __init__(self, x, pert: np.ndarray, cov: np.ndarray, groups: np.ndarray, pools: list[np.ndarray], controls):
        self.x = x  # perturbed expression, csr or dense [n, G]
        self.pert = torch.from_numpy(pert)
        self.cov = torch.from_numpy(cov)
        self.controls = controls  # control expression, csr or dense [m, G]
        sizes = np.array([len(p) for p in pools], dtype=np.int64)
        self.pool_sizes = torch.from_numpy(sizes[groups])
        self.pool_offsets = torch.from_numpy(np.concatenate([[0], np.cumsum(sizes)[:-1]])[groups])
        self.pool_flat = torch.from_numpy(np.concatenate(pools).astype(np.int64))

    def __len__(self) -> int:
        return self.pert.shape[0]

    def batch(self, rows: torch.Tensor, gen: torch.Generator, device: torch.device, with_control: bool = True,
              part: slice = slice(None)):
        """Targets, paired controls (one random control of the same covariate group per cell), inputs of the
        rows ``part`` of the batch ``rows``.

        The control draw is made for the whole batch (so a process's share is what one process would pair)
        and happens even when the network ignores controls, so every model consumes its step generator alike."""
        u = torch.rand(len(rows), generator=gen, dtype=torch.float64)
        rows, u = rows[part], u[part]
        pick = self.pool_offsets[rows] + torch.clamp((u * self.pool_sizes[rows]).long(), max=self.pool_sizes[rows] - 1)
        ctrl_rows = self.pool_flat[pick].numpy()
        r = rows.numpy()
        target = torch.from_numpy(dense(self.x[r]))
        control = torch.from_numpy(dense(self.controls[ctrl_rows])) if with_control else torch.empty(0)
        return (target.to(device), control.to(device), self.pert[rows].to(device), self.cov[rows].to(device))


class _CellSet:
    """Cells that are their own targets (autoencoder training): expression, perturbation, covariates."""

    def __init__(self, x, pert: np.ndarray, cov: np.ndarray) -> None:
        self.x = x
        self.pert = torch.from_numpy(pert)
        self.cov = torch.from_numpy(cov)

    def __len__(self) -> int:
        return self.pert.shape[0]

    def batch(self, rows: torch.Tensor, gen: torch.Generator, device: torch.device, with_control: bool = False,
              part: slice = slice(None)):
        rows = rows[part]
        x = torch.from_numpy(dense(self.x[rows.numpy()]))
        return x.to(device), torch.empty(0), self.pert[rows].to(device), self.cov[rows].to(device)


def _cells(adata: ad.AnnData, encoder: InputEncoder) -> _CellSet:
    return _CellSet(_matrix(adata.X), encoder.perturbation(adata.obs[CONDITION].astype(str).tolist()),
                    encoder.covariate(adata.obs))


def _matrix(x):
    return x.tocsr().astype(np.float32) if sp.issparse(x) else np.asarray(x, dtype=np.float32)


def _paired(cells: ad.AnnData, controls: ad.AnnData | None, encoder: InputEncoder, fallback: ad.AnnData | None = None):
    """Pair perturbed ``cells`` with the control cells of their covariate group: from ``controls``
    where it has that group, else from ``fallback``."""
    perturbed = cells[~cells.obs[IS_CONTROL].to_numpy(dtype=bool)]
    sources = [s for s in (controls, fallback) if s is not None and s.n_obs]
    mats, pools_by_source, offset = [], [], 0
    for src in sources:
        mats.append(_matrix(src.X))
        pools: dict[tuple, list[int]] = {}
        for i, key in enumerate(encoder.group_keys(src.obs)):
            pools.setdefault(key, []).append(offset + i)
        pools_by_source.append(pools)
        offset += src.n_obs
    group_keys = encoder.group_keys(perturbed.obs)
    uniq = sorted(set(group_keys))
    pools = []
    for key in uniq:
        found = next((p[key] for p in pools_by_source if key in p), None)
        if found is None:
            raise ValueError(f"no control cells for covariate group {dict(zip(encoder.covariates, key))}")
        pools.append(np.asarray(found, dtype=np.int64))
    controls_x = sp.vstack(mats).tocsr() if all(sp.issparse(m) for m in mats) else np.vstack([dense(m) for m in mats])
    index = {key: i for i, key in enumerate(uniq)}
    return _PairedCells(
        _matrix(perturbed.X),
        encoder.perturbation(perturbed.obs[CONDITION].astype(str).tolist()),
        encoder.covariate(perturbed.obs),
        np.array([index[k] for k in group_keys], dtype=np.int64),
        pools,
        controls_x,
    )


def _controls_of(adata: ad.AnnData | None) -> ad.AnnData | None:
    if adata is None:
        return None
    return adata[adata.obs[IS_CONTROL].to_numpy(dtype=bool)]


def _has_perturbed(adata: ad.AnnData | None) -> bool:
    return adata is not None and adata.n_obs > 0 and bool((~adata.obs[IS_CONTROL].to_numpy(dtype=bool)).any())


def count_parameters(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


# --------------------------------------------------------------------------- training on the shared trainer


class _Objective(nn.Module):
    """The network with its training loss as ``forward``: DDP synchronises the gradients of what runs
    through the wrapped module's forward, and the models' losses are methods of their networks."""

    def __init__(self, net: nn.Module, loss) -> None:
        super().__init__()
        self.net = net
        self._loss = loss

    def forward(self, batch, index_in_epoch: int, batch_cells: int) -> torch.Tensor:
        return self._loss(self.net, batch, index_in_epoch, batch_cells)


class _EpochTask(TrainTask):
    """PerturBench's Lightning epoch loop as a task of the shared trainer.

    Update ``step`` is batch ``step % steps_per_epoch`` of epoch ``step // steps_per_epoch``, whose cell
    order is a permutation seeded by (seed, epoch); an epoch's last batch is the remainder (no drop_last).
    At an epoch's end, in Lightning's order: validation, ReduceLROnPlateau, best-weights checkpoint, early
    stopping (honouring ``min_epochs``) and ``max_epochs``. Those counters and the validation history are the
    task's state, so the trainer's checkpoint resumes them.

    Data parallel: each process computes the loss of its share of the global batch (the control pairing is
    drawn for the whole batch first) and validates on all validation cells with the same seeds; rank 0's
    validation loss is used on every process so all of them stop at the same epoch. The networks here have
    no BatchNorm (LayerNorm normalises each row), so a share's loss does not depend on the other shares;
    dropout masks and sampled latents are drawn per process, so N processes match one process in
    distribution, not bit for bit."""

    def __init__(self, model: "_PerturBenchModel", net: nn.Module, data, val_data, hp: Mapping[str, Any], seed: int,
                 plateau, out_dir: Path, device: torch.device, world) -> None:
        self.model, self.net, self.data, self.val_data = model, net, data, val_data
        self.hp, self.seed, self.plateau, self.out_dir, self.device = hp, seed, plateau, out_dir, device
        self.is_main = world.is_main
        self.n, self.bs = len(data), hp["batch_size"]
        self.steps_per_epoch = math.ceil(self.n / self.bs)
        last = self.n - (self.steps_per_epoch - 1) * self.bs
        if last < world.size:
            raise ValueError(f"the last batch of an epoch has {last} cells, fewer than the {world.size} processes: "
                             "change data.batch_size or the number of processes")
        self._order: tuple[int, torch.Tensor] | None = None
        self.st: dict[str, Any] = {
            "epoch": 0, "es_best": math.inf, "es_wait": 0,
            "best_val": math.inf, "best_epoch": -1, "best_weights": None, "val_history": [],
        }

    def _rows(self, epoch: int) -> torch.Tensor:
        if self._order is None or self._order[0] != epoch:
            gen = torch.Generator().manual_seed(_seed(self.seed, STREAM_EPOCH, epoch))
            self._order = (epoch, torch.randperm(self.n, generator=gen))
        return self._order[1]

    def loss(self, module: nn.Module, step: int, micro: int, shard: Shard) -> torch.Tensor:
        epoch, k = divmod(step, self.steps_per_epoch)
        self.net.current_epoch = epoch  # Lightning's current_epoch, for losses with warm-up epochs (CPA)
        rows = self._rows(epoch)[k * self.bs:(k + 1) * self.bs]
        part, weight = _share(len(rows), shard)
        gen = torch.Generator().manual_seed(_seed(self.seed, STREAM_STEP, step))
        batch = self.data.batch(rows, gen, shard.device, self.net.uses_control, part)
        loss = module(batch, k, len(rows))
        return loss if weight == 1.0 else loss * weight

    def after_step(self, module: nn.Module, steps_done: int) -> bool:
        if steps_done % self.steps_per_epoch:
            return False
        self._end_epoch(steps_done)
        if self.is_main:
            frame = pd.DataFrame(self.st["val_history"], columns=["epoch", "step", "val_loss", "lr"])
            write_csv(frame, self.out_dir / VAL_LOG, index=False)
        return self.st["epoch"] >= self.hp["max_epochs"] or (
            self.st["es_wait"] >= self.hp["patience"] and self.st["epoch"] >= self.hp["min_epochs"])

    @torch.no_grad()
    def _val_loss(self, epoch: int) -> float:
        """Unweighted mean of per-batch losses (PerturBench logs val_loss with a constant batch_size)."""
        net, val, bs = self.net, self.val_data, self.bs
        net.eval()
        gen = torch.Generator().manual_seed(_seed(self.seed, STREAM_VAL, epoch))
        losses = []
        for k, start in enumerate(range(0, len(val), bs)):
            batch = val.batch(torch.arange(start, min(start + bs, len(val))), gen, self.device, net.uses_control)
            with _seeded(_seed(self.seed, STREAM_VAL, epoch, start), self.device):
                losses.append(float(self.model._eval_loss(net, batch, k)))
        net.train()
        return _from_rank0(float(np.mean(losses)), self.device)

    def _end_epoch(self, step: int) -> None:
        st, hp = self.st, self.hp
        epoch = st["epoch"]
        if self.val_data is not None:
            val = self._val_loss(epoch)
            if val < st["best_val"]:  # ModelCheckpoint(monitor=val_loss, mode=min, save_top_k=1)
                st["best_val"], st["best_epoch"] = val, epoch
                st["best_weights"] = {k: v.detach().cpu().clone() for k, v in self.net.state_dict().items()}
            # EarlyStopping(monitor=val_loss, mode=min): strict improvement by min_delta
            if not math.isfinite(val):
                st["es_wait"] = hp["patience"]
            elif val < st["es_best"] - hp["min_delta"]:
                st["es_best"], st["es_wait"] = val, 0
            else:
                st["es_wait"] += 1
            if hp["scheduler"] == "reduce_on_plateau" and (epoch + 1) % hp["sched_freq"] == 0:
                self.plateau.step(val)
            st["val_history"].append({"epoch": epoch, "step": step, "val_loss": val,
                                      "lr": self.plateau.optimizer.param_groups[0]["lr"]})
        st["epoch"] = epoch + 1

    def state_dict(self) -> dict[str, Any]:
        return self.st

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.st = dict(state)


def _from_rank0(value: float, device: torch.device) -> float:
    """Rank 0's value on every process of a data-parallel job (one decision to stop, not one per GPU)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor([value], dtype=torch.float64 if device.type == "cpu" else torch.float32, device=device)
    dist.broadcast(t, 0)
    return float(t.item())


class _PerturBenchModel:
    """fit/sample shared by the PerturBench models; subclasses name their network and, through the hooks
    below, their cell sets and losses (cpa.py, biolord.py, sams_vae.py)."""

    NET: type[nn.Module]
    KIND: str

    # -- construction

    def build_net(self, n_genes: int, n_perts: int, n_covariates: int, params: Mapping[str, Any]) -> nn.Module:
        return self.NET(n_genes, n_perts, n_covariates, params.get("model", {}))

    @staticmethod
    def _hparams(params: Mapping[str, Any]) -> dict[str, Any]:
        model = params.get("model", {})
        trainer = params.get("trainer", {})
        stop = params.get("early_stopping", {})
        interval = model.get("lr_scheduler_interval", "epoch")
        if interval != "epoch":
            raise NotImplementedError("only lr_scheduler_interval 'epoch' (PerturBench's default) is implemented")
        scheduler = str(model.get("lr_scheduler") or "reduce_on_plateau")  # none: a constant learning rate
        if scheduler not in ("reduce_on_plateau", "none"):
            raise ValueError(f"model.lr_scheduler must be reduce_on_plateau or none, not {scheduler!r}")
        if stop.get("monitor", "val_loss") != "val_loss":
            raise NotImplementedError("early stopping monitors val_loss only (configs/callbacks/early_stopping.yaml)")
        hp = {
            # PerturbationModel.__init__ defaults when the config leaves them unset
            "lr": float(model.get("lr") if model.get("lr") is not None else 1e-3),
            "wd": float(model.get("wd") if model.get("wd") is not None else 1e-5),
            "scheduler": scheduler, "sched_freq": int(model.get("lr_scheduler_freq") or 1),
            "sched_patience": int(model.get("lr_scheduler_patience") if model.get("lr_scheduler_patience") is not None else 15),
            "sched_factor": float(model.get("lr_scheduler_factor") if model.get("lr_scheduler_factor") is not None else 0.2),
            "batch_size": int(params.get("data", {}).get("batch_size", 4000)),
            "min_epochs": int(trainer.get("min_epochs", 1)),
            "max_epochs": int(trainer.get("max_epochs", 10)),
            "patience": int(stop.get("patience", 50)),
            "min_delta": float(stop.get("min_delta", 0.0)),
        }
        if hp["max_epochs"] < 1:
            raise ValueError("trainer.max_epochs must be >= 1")
        return hp

    @staticmethod
    def trainer_config(params: Mapping[str, Any], seed: int) -> TrainerConfig:
        """The preset's ``training`` keys as the shared trainer's settings; the task decides when to stop."""
        training = params.get("training") or {}
        return TrainerConfig(
            total_steps=None, seed=seed, checkpoint_every=int(training.get("checkpoint_every") or 0),
            precision=str(training.get("precision") or "fp32"), device=training_device(params),
            progress=bool(training.get("progress", True)),
        )

    def _build(self, encoder: InputEncoder, n_genes: int, params: Mapping[str, Any]) -> nn.Module:
        return self.build_net(n_genes, encoder.n_perts, encoder.n_covariates, params)

    # -- hooks for models trained on other cell sets or losses (cpa.py, biolord.py, sams_vae.py)

    def _prepare(self, train: ad.AnnData, val: ad.AnnData | None, params, control_label: str):
        """Input encoder, train cells and validation cells (None without perturbed validation cells)."""
        perturbed_mask = ~train.obs[IS_CONTROL].to_numpy(dtype=bool)
        encoder = InputEncoder.fit(train.obs[perturbed_mask], params.get("covariates") or [], control_label)
        train_ctrl = _controls_of(train)
        data = _paired(train, train_ctrl, encoder)
        val_data = _paired(val, _controls_of(val), encoder, fallback=train_ctrl) if _has_perturbed(val) else None
        return encoder, data, val_data

    def _train_loss(self, net: nn.Module, batch, index_in_epoch: int, batch_cells: int) -> torch.Tensor:
        """Mean loss of (this process's share of) one training batch of ``batch_cells`` cells
        (``index_in_epoch`` is Lightning's ``batch_idx``)."""
        target, control, pert, cov = batch
        return F.mse_loss(net(control, pert, cov), target)

    def _eval_loss(self, net: nn.Module, batch, index: int) -> torch.Tensor:
        """Validation loss of one batch (eval mode, no gradients): by default the training loss."""
        return self._train_loss(net, batch, index, len(batch[0]))

    def _fit_info(self, net: nn.Module, params) -> dict[str, Any]:
        """Model-specific entries of fit.json."""
        return {}

    # -- fit

    def fit(self, train: ad.AnnData, val: ad.AnnData | None, context: ModelContext, params, checkpoint_dir: Path) -> None:
        checkpoint_dir = Path(checkpoint_dir)
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        hp = self._hparams(params)
        seed = int(context.seed)
        encoder, data, val_data = self._prepare(train, val, params, context.control_label)
        if len(data) == 0:
            raise ValueError(f"no training cells for {self.KIND}")
        n_genes = train.n_vars
        trainer = Trainer(self.trainer_config(params, seed), checkpoint_dir, kind=self.KIND,
                          fingerprint={"encoder": encoder.to_dict(), "n_genes": n_genes, "params": params})

        with _seeded(_seed(seed, STREAM_INIT, 0), torch.device("cpu")):
            net = self._build(encoder, n_genes, params)
        opt = torch.optim.Adam(net.parameters(), lr=hp["lr"], weight_decay=hp["wd"])
        plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=hp["sched_factor"], patience=hp["sched_patience"])
        task = _EpochTask(self, net, data, val_data, hp, seed, plateau, checkpoint_dir, trainer.device, trainer.world)
        result = trainer.fit(_Objective(net, self._train_loss), opt, task, stateful={"plateau": plateau})

        st = task.st
        if trainer.is_main:
            weights = st["best_weights"] if st["best_weights"] is not None else net.state_dict()
            weights = {k: v.detach().cpu() for k, v in weights.items()}
            with atomic_path(checkpoint_dir / MODEL_FILE) as tmp:
                torch.save({"kind": self.KIND, "params": copy.deepcopy(dict(params)), "encoder": encoder.to_dict(),
                            "n_genes": n_genes, "var_names": list(map(str, train.var_names)), "weights": weights}, tmp)
            write_text(json.dumps({
                "model": self.KIND, **self._fit_info(net, params),
                "steps": result.steps, "epochs": st["epoch"], "best_epoch": st["best_epoch"],
                "best_val_loss": None if math.isinf(st["best_val"]) else st["best_val"],
                "weights": "best validation epoch" if st["best_weights"] is not None else "last step (no validation cells)",
                "n_perts": encoder.n_perts, "n_covariates": encoder.n_covariates,
                "n_parameters": count_parameters(net), "train_cells": len(data),
                "steps_per_epoch": task.steps_per_epoch,
            }, indent=2), checkpoint_dir / "fit.json")
        trainer.close()

    # -- sample

    @staticmethod
    def load(checkpoint_dir: Path) -> dict[str, Any]:
        return torch.load(Path(checkpoint_dir) / MODEL_FILE, map_location="cpu", weights_only=True)

    def load_net(self, checkpoint_dir: Path) -> tuple[nn.Module, InputEncoder, dict[str, Any]]:
        saved = self.load(checkpoint_dir)
        if saved["kind"] != self.KIND:
            raise ValueError(f"{checkpoint_dir} holds a '{saved['kind']}' model, not '{self.KIND}'")
        encoder = InputEncoder.from_dict(saved["encoder"])
        net = self._build(encoder, saved["n_genes"], saved["params"])
        net.load_state_dict(saved["weights"])
        net.eval()
        return net, encoder, saved

    def sample(self, checkpoint_dir, conditions, control, n_cells, context, params, sampling):
        """``n_cells`` sampled control cells per condition, each mapped through the network with the
        condition's perturbation vector and its own covariates (PerturBench's ``Counterfactual``)."""
        net, encoder, saved = job_cached(self, ("net", checkpoint_key(checkpoint_dir)), lambda: self.load_net(checkpoint_dir))
        ctrl = control[control.obs[IS_CONTROL].to_numpy(dtype=bool)]
        if list(map(str, ctrl.var_names)) != saved["var_names"]:
            if set(map(str, ctrl.var_names)) != set(saved["var_names"]):
                raise ValueError("control cells' genes differ from the genes the model was trained on")
            ctrl = ctrl[:, saved["var_names"]]
        seed = int(sampling.get("seed", 0))
        rng = np.random.default_rng(seed)
        pick = rng.choice(ctrl.n_obs, size=n_cells, replace=n_cells > ctrl.n_obs)
        device = resolve_device(training_device(params), current_world())
        net.to(device)
        x = torch.from_numpy(dense(ctrl.X[pick])).to(device)
        cov = torch.from_numpy(encoder.covariate(ctrl.obs.iloc[pick])).to(device)
        out: dict[str, np.ndarray] = {}
        with torch.no_grad(), _seeded(_seed(seed, STREAM_PREDICT, 0), device):
            for condition in conditions:
                pert = torch.from_numpy(encoder.perturbation([condition])).to(device).expand(n_cells, -1)
                rows = [net(x[s:s + PREDICT_CHUNK], pert[s:s + PREDICT_CHUNK], cov[s:s + PREDICT_CHUNK])
                        for s in range(0, n_cells, PREDICT_CHUNK)]
                y = torch.cat(rows).cpu().numpy()
                out[condition] = np.clip(y, 0.0, None).astype(np.float32)  # log-expression cannot be negative
        if list(map(str, control.var_names)) != saved["var_names"]:
            order = pd.Index(saved["var_names"]).get_indexer(list(map(str, control.var_names)))
            out = {c: v[:, order] for c, v in out.items()}
        return out


class LinearAdditive(_PerturBenchModel):
    """PerturBench ``LinearAdditive``: control expression plus a linear map of [perturbation, covariates]."""

    NET = LinearAdditiveNet
    KIND = "linear"


class LatentAdditive(_PerturBenchModel):
    """PerturBench ``LatentAdditive``: encoded control plus encoded perturbation, decoded to genes."""

    NET = LatentAdditiveNet
    KIND = "latent_additive"


class DecoderOnly(_PerturBenchModel):
    """PerturBench ``DecoderOnly``: an MLP from [perturbation, covariates] to expression (no control input)."""

    NET = DecoderOnlyNet
    KIND = "decoder_only"

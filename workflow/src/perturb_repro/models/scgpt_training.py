"""scGPT fine-tuning: Tutorial_Perturbation's data and loop as a task of the shared trainer, prediction,
validation (``pearson_delta``) and early stopping (see :mod:`perturb_repro.models.scgpt`)."""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import scipy.sparse as sp
import torch
from torch import nn

from ..data.source import CONDITION, IS_CONTROL
from ..errors import PipelineInputError
from ..io import atomic_path, write_text
from ..trainer import Shard, TrainerConfig, TrainTask
from .scgpt_network import TransformerGenerator
from .scgpt_tokens import GeneSpace, assemble

logger = logging.getLogger(__name__)

EPOCH_LOG = "epoch_log.csv"


def _mix(*parts: int) -> int:
    """A 63-bit seed from integers: per-step and per-epoch streams are independent of each other."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint64)[0] >> np.uint64(1))


def _generator(*parts: int) -> torch.Generator:
    return torch.Generator().manual_seed(_mix(*parts))


def _rows(x, idx) -> np.ndarray:
    """Dense float32 rows of a (possibly sparse) matrix."""
    sub = x[np.asarray(idx)]
    return np.asarray(sub.toarray() if sp.issparse(sub) else sub, dtype=np.float32)



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



def _matrix(adata: ad.AnnData):
    return adata.X.tocsr() if sp.issparse(adata.X) else np.asarray(adata.X, dtype=np.float32)



def group_keys(adata: ad.AnnData, columns: Sequence[str], source: str = "obs") -> np.ndarray:
    """One string per cell naming its group (the values of ``columns`` joined); all "" without columns."""
    if not columns:
        return np.full(adata.n_obs, "", dtype=object)
    missing = [c for c in columns if c not in adata.obs]
    if missing:
        raise PipelineInputError(source, "data.pair_controls_within", f"obs has no column(s) {missing}")
    parts = [adata.obs[c].astype(str).to_numpy() for c in columns]
    return np.array(["\x1f".join(v) for v in zip(*parts)], dtype=object)


def train_pairs(train: ad.AnnData, seed: int, within: Sequence[str] = ()) -> tuple[np.ndarray, np.ndarray]:
    """(control row, target row) per training cell, drawn once as GEARS builds its dataset: each
    perturbed cell with one random control cell, each control cell with itself. ``within`` (obs columns,
    e.g. cell_line): the control comes from the perturbed cell's own group, as the Replogle card's loader
    pairs each cell with a control of its own line."""
    is_control = train.obs[IS_CONTROL].to_numpy(dtype=bool)
    controls = np.flatnonzero(is_control)
    if controls.size == 0:
        raise PipelineInputError("train", IS_CONTROL, "scGPT needs control cells in the train split")
    rng = np.random.default_rng(_mix(seed, 0x9A1))
    source = np.arange(train.n_obs)
    if not within:
        source[~is_control] = controls[rng.integers(0, controls.size, size=int((~is_control).sum()))]
        return source, np.arange(train.n_obs)
    keys = group_keys(train, within, "train")
    perturbed = np.flatnonzero(~is_control)
    for key in sorted(set(keys[perturbed])):
        pool = controls[keys[controls] == key]
        if pool.size == 0:
            raise PipelineInputError("train", "data.pair_controls_within", f"group {key!r} has no train control cells")
        rows = perturbed[keys[perturbed] == key]
        source[rows] = pool[rng.integers(0, pool.size, size=rows.size)]
    return source, np.arange(train.n_obs)


def epoch_batches(
    n_pairs: int, batch_size: int, seed: int, epoch: int, *, cells_per_epoch: int | None = None,
    drop_last: bool = True, multiple_of: int = 1,
) -> list[np.ndarray]:
    """Shuffled batches of one epoch.

    ``cells_per_epoch`` (None: every pair once) makes an epoch that many pairs: the first ones of the
    epoch's shuffle (more shuffles are appended when it exceeds ``n_pairs``), so a budget stated in cells
    per epoch (the Replogle card's 180,021) holds whatever the size of the training pool. ``drop_last``
    (GEARS' train loader) drops the last short batch unless it would be the only one; without it (the card
    runner's torch_geometric DataLoader) the short batch is kept, cut to a multiple of ``multiple_of``
    (the data-parallel world size, which must divide every global batch).
    """
    order = torch.randperm(n_pairs, generator=_generator(seed, 0xE90C, epoch)).numpy()
    if cells_per_epoch is not None:
        parts, have, k = [order], n_pairs, 1
        while have < cells_per_epoch:
            parts.append(torch.randperm(n_pairs, generator=_generator(seed, 0xE90C, epoch, k)).numpy())
            have, k = have + n_pairs, k + 1
        order = np.concatenate(parts)[: int(cells_per_epoch)]
    n_full = len(order) // batch_size
    if n_full == 0:
        return [order]
    batches = [order[i * batch_size : (i + 1) * batch_size] for i in range(n_full)]
    rest = order[n_full * batch_size :]
    rest = rest[: len(rest) - len(rest) % max(1, int(multiple_of))]
    if not drop_last and len(rest):
        batches.append(rest)
    return batches


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
    net, space: GeneSpace, val: ad.AnnData, x_val, control_x, params: Mapping[str, Any],
    device: torch.device, amp: bool | str, seed: int, epoch: int, pad_value: float,
) -> dict[str, float]:
    """scGPT's validation: each val cell's condition predicted from a random train control cell;
    pearson_delta and mse of the per-condition mean profiles (deltas against the control mean).
    ``control_x``: the train controls, or group key -> that group's train controls (``data.pair_controls_within``),
    so a (condition, group) is predicted from and compared with its own group's controls."""
    training = params["training"]
    cap = training.get("val_max_cells_per_condition")
    rng = np.random.default_rng(_mix(seed, 0x7A1, epoch))
    by_group = control_x if isinstance(control_x, Mapping) else {"": control_x}
    within = params.get("data", {}).get("pair_controls_within") or () if isinstance(control_x, Mapping) else ()
    keys = group_keys(val, within, "val")
    means = {k: v.mean(axis=0, dtype=np.float64) for k, v in by_group.items()}
    frame = val.obs[[CONDITION]].assign(_group=keys)
    scores, errors = [], []
    for (condition, key), idx in sorted(frame.groupby([CONDITION, "_group"], observed=True).indices.items()):
        if condition == space.control_label:
            continue
        if key not in by_group:
            raise PipelineInputError("val", "data.pair_controls_within", f"group {key!r} has no train control cells")
        pool = by_group[key]
        n = len(idx) if cap is None else min(len(idx), int(cap))
        pick = rng.integers(0, len(pool), size=n)
        pred = predict_cells(net, space, pool[pick], str(condition), int(training["eval_batch_size"]), device, amp, pad_value)
        truth_mean = _rows(x_val, idx).mean(axis=0, dtype=np.float64)
        pred_mean = pred.mean(axis=0, dtype=np.float64)
        scores.append(pearson(pred_mean - means[key], truth_mean - means[key]))
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
                 precision: str, device: torch.device, checkpoint_dir: Path, is_main: bool, world_size: int = 1):
        training = params["training"]
        self.space, self.arch, self.x, self.source, self.target = space, arch, x_train, source, target
        self.conditions, self.cond_tokens, self.cap = conditions, cond_tokens, cap
        self.params, self.seed, self.scheduler = params, seed, scheduler
        self.batch_size = int(training["batch_size"])
        cells = training.get("cells_per_epoch")
        self.epoch_shape = {"cells_per_epoch": None if cells is None else int(cells),
                            "drop_last": bool(training.get("drop_last", True)), "multiple_of": world_size}
        self.steps_per_epoch = len(self._draw(0))  # the same every epoch
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

    def _draw(self, epoch: int) -> list[np.ndarray]:
        return epoch_batches(len(self.source), self.batch_size, self.seed, epoch, **self.epoch_shape)

    def _batches(self, epoch: int) -> list[np.ndarray]:
        if self._epoch_rows is None or self._epoch_rows[0] != epoch:
            self._epoch_rows = (epoch, self._draw(epoch))
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


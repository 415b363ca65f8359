"""scLDM (Palla et al. 2025, arXiv:2511.02986) as tuned in scLDM.CD4 v0.1 (Dibaeinia et al. 2026,
model card /work/shared/seeds/scldm_cd4_card.txt), in PyTorch. Own code after czi-ai/scldm:
src/scldm/{vae.py, nnets.py, layers.py, stochastic_layers.py, models.py (VAE, LatentDiffusion),
transport/{path.py, transport.py}, _utils.py (wsd_schedule)}, experiments/configs/model/{vae_base,
ldm_base}.yaml. Networks are in ``_scldm_nets.py``.

Two stages, two separately callable entry points (two Snakemake rules / cluster jobs):

1. ``fit_autoencoder(train, val, context, params, ae_dir)`` -- transformer autoencoder over gene
   tokens (gene embedding + count encoding; the cell's expressed genes in, all genes out),
   compressed by cross-attention onto learned inducing points to a set of M latent tokens of
   width d, decoded by cross-attention from the gene embeddings back to genes; negative-binomial reconstruction loss on counts (-log-likelihood summed
   over genes, mean over cells) with NB mean = softmax(per-gene logits) x library size (library =
   the cell's total count over the gene panel, handled explicitly, not learned) and a learned
   per-gene inverse dispersion ("negative_binomial_shared_theta", upstream's default head).
2. ``fit(train, val, context, params, checkpoint_dir)`` -- freezes the autoencoder (read from
   ``params["_autoencoder_dir"]`` if given, else trained/resumed in ``checkpoint_dir/autoencoder``),
   encodes the train cells and trains a DiT (adaLN-zero) by flow matching in latent space: linear
   path z_t = t z1 + (1 - t) z0, z0 ~ N(0, I) (independent coupling from noise, as the card says:
   no control/perturbed pairing), target velocity z1 - z0, t ~ U[eps, 1 - eps]. Joint conditioning
   (card: "condition strategy joint") on perturbation + covariate columns (``params.covariates``;
   the card's classes are guide target, donor, time point): embedding = sum of per-gene
   perturbation embeddings (combinations compose) + one embedding per covariate; genes or
   covariate values unseen in training contribute nothing. Classifier-free guidance: with
   probability ``flow.cfg_dropout_prob`` the whole condition is replaced by a learned null vector.
   The autoencoder's weights are copied into ``checkpoint_dir`` so ``sample`` needs only that dir.

``sample``: integrates from Gaussian noise with the sampler ``sampling`` names (``solver: euler``, the
pipeline's, ``steps`` fixed steps; ``solver: dopri5``, the card's, torchdiffeq adaptive with ``rtol``/``atol``;
the paper preset's ``sampling`` block gives upstream's 50 timesteps), guidance weight
``sampling["cfg_weight"]`` (else ``sampling["guidance_weight"]``, else ``params["cfg_weight"]``,
upstream default 1.0), with the DiT's raw weights (``sample_weights: raw``, upstream's
``LatentDiffusion.sample``) or its EMA (``ema``); decodes through the autoencoder to NB counts drawn with
mean mu = softmax x library (``decode: sample``, upstream's ``nb.sample()``) or to the NB means
(``decode: mean``), then log-normalises. The library: ``library: context`` (upstream) draws log L from a
normal with the mean/sd of log panel library of the train cells of the generated cell's context (the joint
value of the ``library_context`` columns, upstream time point x donor); ``train_cell`` takes a random train
cell's of any context (see ``_scldm_counts.draw_library``). ``normalise: panel`` is normalize_total(``counts.target_sum``) over the gene panel +
log1p (for NB means: log1p(softmax x target_sum)). ``normalise: data`` (default) uses the data's
own convention instead: processed X is log1p(counts x target_sum / whole-transcriptome total) with
the total taken BEFORE gene selection (on the demo panel ~126 of ~20,000 counts per cell), so
normalising over the panel would put generated cells on a ~150x larger scale than the real ones;
each generated cell therefore is x = log1p(counts x unit), unit = target_sum / total of a train cell
(scaled to the drawn library). Covariates of the generated cells are copied
from randomly drawn control cells (like the other flow models here).

Counts (``params.counts``): ``source: layer`` reads ``adata.layers[counts.layer]``;
``from_lognorm`` recovers counts from a log-normalised X as round(expm1(X) * total / target_sum)
with total = ``obs[total_counts_column]`` or, when that column is absent (preprocessing here keeps
only condition/split/covariate columns and clears layers), inferred per cell as the largest unit of
which every non-zero expm1(X) is an integer multiple. That is APPROXIMATE: exact only if X was
normalize_total(target_sum) + log1p of integer counts and stored without much loss, and a cell whose
counts share a divisor d comes out divided by d. On the demo file the inferred totals reproduce X
to 1e-15, while its obs.ncounts is ~0.5% larger than the total X was normalised with. ``auto``
uses the layer when present, else from_lognorm.

Deviations / choices the card leaves open (presets mark them ``# not in paper``): the encoder reads
each cell's expressed genes (upstream ``sample_genes: expressed``; padding is masked here instead of
upstream's learned mask token) -- with all genes as tokens the tiny model's latent collapsed on the
sparse demo cells (~15 non-zero of 500 genes); latents are not rescaled (the encoder's last
LayerNorm makes each token zero-mean/unit-variance); epochs are converted to optimiser updates as
ceil(epochs * n_train / global_batch_size) (upstream: epochs x floor(n_train / global batch)); EMA of
the DiT (upstream ldm_base) is optional, saved beside the raw weights, and sampled from only with
``sample_weights: ema``.

Training runs through the shared trainer (``perturb_repro.trainer``): device, precision (preset key
``precision``; bf16/fp16 only on CUDA, CPU stays fp32), gradient clipping, the LR schedule (``lr_factor``
as a per-update LambdaLR), EMA, checkpoints every ``checkpoint_every`` updates and on SIGTERM/SIGUSR1,
resume and DDP. Batch size: the preset states the card's *global* batch (``global_batch_size`` =
per-GPU ``batch_size`` x ``nodes`` x ``gpus_per_node``); each loss draws the global batch's cells,
noise, times and CFG drops from (seed, stage, step) and keeps its rows (``Shard.take``), so N
data-parallel processes train what one process trains at the same global batch, and an interrupted +
resumed CPU run gives bit-identical weights.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import nn

from ..data.conditions import genes_of
from ..data.source import CONDITION, IS_CONTROL
from ..distributed import current_world
from ..io import atomic_path, write_text
from ..trainer import EMA, STATE_FILE as TRAINER_STATE_FILE
from ..trainer import Shard, Trainer, TrainerConfig, TrainTask, lambda_schedule, resolve_device
from ._flow import guided_velocity, integrate
from ._flow import covariate_ids as _covariate_matrix
from ._flow import label_seed as _label_seed
from ._flow import param_at as _get
from ._flow import step_seed as _step_seed
from ._scldm_counts import (DECODE_LIBRARY_FILE, LIBRARY_FILE, _has_decode_library, context_keys, counts_matrix, decode_counts,
                            draw_library, library_columns, log_normalize, normalisation_units, write_decode_library)
from ._scldm_nets import Autoencoder, DiT, nb_loss
from .base import ModelContext, checkpoint_key, job_cached, spec_of

# autoencoder directory (stage 1)
AE_META_FILE = "meta.json"
AE_TRAIN_STATE = TRAINER_STATE_FILE  # the shared trainer's state (model, optimiser, schedule, EMA, step)
AE_WEIGHTS = "autoencoder.pt"       # final weights, written once stage 1 is complete
# flow checkpoint directory (stage 2); also holds copies of AE_WEIGHTS, LIBRARY_FILE and
# AUTOENCODER_META_FILE so that sample() reads only this directory
META_FILE = "meta.json"
AUTOENCODER_META_FILE = "autoencoder_meta.json"
FM_TRAIN_STATE = TRAINER_STATE_FILE
DIT_WEIGHTS = "dit.pt"
STATE_FILE = "trainer_state.json"   # the shared trainer's resume point: {"step", "done"}
LOG_FILE = "train_log.csv"
AE_SUBDIR = "autoencoder"

_STAGE_AE, _STAGE_FM = 1, 2


# ------------------------------------------------------------------------------------------------
# helpers


def _threads(params: Mapping[str, Any]) -> None:
    if params.get("num_threads"):
        torch.set_num_threads(int(params["num_threads"]))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj))


def _check_meta(path: Path, spec: Mapping[str, Any]) -> None:
    if path.exists() and json.loads(path.read_text()) != _jsonable(spec):
        raise ValueError(f"{path} was written for other params/data; remove the checkpoint to retrain")
    if current_world().is_main:  # one writer per file: a second rank's atomic write would sweep rank 0's temp
        write_text(json.dumps(spec, indent=1), path)


# ------------------------------------------------------------------------------------------------
# training settings (the loop is the shared trainer's)


def lr_factor(step: int, total: int, schedule: Mapping[str, Any] | None) -> float:
    """Upstream ``wsd_schedule``: linear warmup from 1/init_div_factor, hold, then cosine (or sqrt)
    decay to final_lr_factor over the last ``fract_decay`` of the updates; ``type: constant`` = 1."""
    s = dict(schedule or {})
    if s.get("type", "cosine") == "constant":
        return 1.0
    warm = int(float(s.get("warmup_fraction", 0.0)) * total)  # upstream: int(0.1 * effective_steps)
    init_div = float(s.get("init_div_factor", 100.0))
    final = float(s.get("final_lr_factor", 0.1))
    n_decay = int(float(s.get("fract_decay", 1.0)) * total)
    n_hold = total - n_decay
    if step < warm:
        return step / warm + (1 - step / warm) / init_div
    if step < n_hold:
        return 1.0
    if step < total:
        if s.get("type", "cosine") == "cosine":
            start = max(warm, n_hold)
            progress = (step - start) / max(1, total - start)
            return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * progress))
        if s.get("type") == "sqrt":
            return final + (1 - final) * (1 - math.sqrt((step - n_hold) / max(1, n_decay)))
        raise ValueError(f"schedule.type must be cosine, sqrt or constant, not {s.get('type')!r}")
    return final


def _optimizer(module: nn.Module, training: Mapping[str, Any]) -> torch.optim.Optimizer:
    kind = str(training.get("optimizer", "adamw")).lower()
    cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[kind]
    betas = tuple(float(b) for b in training.get("betas", (0.9, 0.999)))
    return cls([p for p in module.parameters() if p.requires_grad], lr=float(training["learning_rate"]),
               betas=betas, weight_decay=float(training.get("weight_decay", 0.0)))


def global_batch_size(training: Mapping[str, Any]) -> int:
    """Cells per optimiser update over all processes: ``global_batch_size``, which must equal the per-GPU
    ``batch_size`` x ``nodes`` x ``gpus_per_node`` of the hardware the preset describes (default 1 x 1, so
    a preset without them trains ``batch_size`` cells per update). Each of a job's W processes computes
    global / W of them, whatever W is."""
    per_gpu = int(training["batch_size"])
    n_gpus = int(training.get("nodes") or 1) * int(training.get("gpus_per_node") or 1)
    given = training.get("global_batch_size")
    if given is not None and int(given) != per_gpu * n_gpus:
        raise ValueError(f"global_batch_size {given} != batch_size {per_gpu} x nodes x gpus_per_node ({n_gpus}); "
                         "change them together")
    return per_gpu * n_gpus


def total_steps(training: Mapping[str, Any], n_cells: int) -> int:
    """Optimiser updates: ``num_steps``, or ceil(``epochs`` * n_cells / global batch)."""
    if training.get("num_steps") is not None:
        return int(training["num_steps"])
    return max(1, math.ceil(float(training["epochs"]) * n_cells / global_batch_size(training)))


def trainer_config(training: Mapping[str, Any], total: int, seed: int) -> TrainerConfig:
    """A stage's training keys as the shared trainer's settings. ``precision`` fp32 | tf32 | bf16 | fp16
    (old presets' ``mixed_precision: true`` = bf16); it applies on CUDA only, CPU runs stay fp32."""
    return TrainerConfig(
        total_steps=total, seed=seed, checkpoint_every=int(training.get("checkpoint_every") or 0),
        precision=str(training.get("precision") or ("bf16" if training.get("mixed_precision") else "fp32")),
        grad_clip=float(training["grad_clip"]) if training.get("grad_clip") else None,
        device=str(training.get("device", "auto")), progress=bool(training.get("progress", True)),
    )


def _schedule(optimizer: torch.optim.Optimizer, training: Mapping[str, Any], total: int):
    """The LR of update s is learning_rate x lr_factor(s, total) (what the pre-trainer loop set before each update)."""
    schedule = training.get("schedule")
    return lambda_schedule(optimizer, lambda step: lr_factor(step, total, schedule))


def _ema(module: nn.Module, training: Mapping[str, Any]) -> EMA | None:
    if float(training.get("ema_decay") or 0) <= 0:
        return None
    return EMA(module, float(training["ema_decay"]), int(training.get("ema_update_every", 1)),
               int(training.get("ema_update_after_step", 0)))


def _save_weights(path: Path, weights: Mapping[str, torch.Tensor],
                  ema: Mapping[str, torch.Tensor] | None = None) -> None:
    """``{"model": raw weights}``, plus ``"ema"`` (the EMA shadow) when training kept one."""
    state = {"model": dict(weights)}
    if ema is not None:
        state["ema"] = dict(ema)
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


# ------------------------------------------------------------------------------------------------
# stage 1


def autoencoder_spec(train: ad.AnnData, params: Mapping[str, Any]) -> dict[str, Any]:
    ae = params["autoencoder"]
    return {"genes": [str(g) for g in train.var_names], "network": dict(ae["network"]),
            "counts": dict(params.get("counts") or {}), "target_sum": float(_get(params, "counts.target_sum", 1e4))}


def build_autoencoder(spec: Mapping[str, Any], seed: int) -> Autoencoder:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Autoencoder(len(spec["genes"]), spec["network"])


def load_autoencoder(directory: Path, device: torch.device | str = "cpu",
                     meta_file: str = AE_META_FILE) -> tuple[Autoencoder, dict[str, Any]]:
    directory = Path(directory)
    spec = json.loads((directory / meta_file).read_text())
    model = Autoencoder(len(spec["genes"]), spec["network"])
    model.load_state_dict(torch.load(directory / AE_WEIGHTS, map_location=device, weights_only=True)["model"])
    for p in model.parameters():
        p.requires_grad_(False)
    return model.to(device).eval(), spec


class _AutoencoderTask(TrainTask):
    """NB reconstruction loss of this process's rows of update ``step``'s global batch (drawn from (seed, step))."""

    def __init__(self, counts: sp.csr_matrix, library: np.ndarray, batch_size: int, seed: int):
        self.counts, self.library, self.batch_size, self.seed = counts, library, batch_size, seed

    def loss(self, module: nn.Module, step: int, micro: int, shard: Shard) -> torch.Tensor:
        n = self.counts.shape[0]
        rng = np.random.default_rng(_step_seed(self.seed, _STAGE_AE, step))
        idx = shard.take(np.sort(rng.choice(n, size=min(self.batch_size, n), replace=False)))
        x = torch.as_tensor(self.counts[idx].toarray(), device=shard.device)
        lib = torch.as_tensor(self.library[idx], device=shard.device)
        mu, theta = module(x, lib)  # dropout masks: the trainer seeds them per (seed, step, rank)
        return nb_loss(x, mu.float(), theta.float())


# ------------------------------------------------------------------------------------------------
# stage 2


def _token_matrix(labels, control_label: str, index: Mapping[str, int], width: int) -> np.ndarray:
    """Perturbation gene ids per cell; -1 for empty slots and genes not in ``index`` (unseen)."""
    out = np.full((len(labels), max(width, 1)), -1, dtype=np.int64)
    cache: dict[str, list[int]] = {}
    for i, label in enumerate(labels):
        if label not in cache:
            cache[label] = [index.get(g, -1) for g in genes_of(label, control_label)]
        ids = cache[label][: out.shape[1]]
        out[i, : len(ids)] = ids
    return out


def flow_spec(train: ad.AnnData, context: ModelContext, params: Mapping[str, Any], ae_spec: Mapping[str, Any],
              ae_sha: str) -> dict[str, Any]:
    labels = train.obs[CONDITION].astype(str).unique().tolist()
    covariates = list(params.get("covariates") or [])
    cov_values = []
    for column in covariates:
        if column not in train.obs:
            raise ValueError(f"covariate column '{column}' (params.covariates) is not in obs: {list(train.obs.columns)}")
        cov_values.append(sorted(train.obs[column].astype(str).unique().tolist()))
    flow = params["flow"]
    return {
        "vocab": sorted({g for c in labels for g in genes_of(c, context.control_label)}),
        "max_perts": max([len(genes_of(c, context.control_label)) for c in labels] + [1]),
        "covariates": covariates,
        "covariate_values": cov_values,
        "network": dict(flow["network"]),
        "n_tokens": int(ae_spec["network"]["n_inducing_points"]),
        "latent_dim": int(ae_spec["network"]["n_embed_latent"]),
        "control_label": context.control_label,
        "autoencoder_sha256": ae_sha,
    }


def build_dit(spec: Mapping[str, Any], seed: int) -> DiT:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return DiT(spec["n_tokens"], spec["latent_dim"], len(spec["vocab"]),
                   [len(v) for v in spec["covariate_values"]], spec["network"])


@torch.no_grad()
def encode_cells(model: Autoencoder, counts: sp.csr_matrix, device: torch.device, chunk: int = 256) -> torch.Tensor:
    out = [model.encode(torch.as_tensor(counts[s: s + chunk].toarray(), device=device)).float().cpu()
           for s in range(0, counts.shape[0], chunk)]
    return torch.cat(out) if out else torch.zeros(0)


class _FlowTask(TrainTask):
    """Flow-matching loss of this process's rows of update ``step``'s global batch: cells, noise z0, times
    and CFG drops are drawn for the whole global batch from (seed, step) and each process keeps its rows."""

    def __init__(self, latents: torch.Tensor, tok: np.ndarray, cov: np.ndarray, flow: Mapping[str, Any],
                 batch_size: int, seed: int):
        self.latents, self.tok, self.cov, self.batch_size, self.seed = latents, tok, cov, batch_size, seed
        self.p_drop = float(flow.get("cfg_dropout_prob", 0.1))
        self.eps = float(flow.get("train_eps", 1e-5))

    def loss(self, module: nn.Module, step: int, micro: int, shard: Shard) -> torch.Tensor:
        n, dev, eps = self.latents.shape[0], shard.device, self.eps
        rng = np.random.default_rng(_step_seed(self.seed, _STAGE_FM, step))
        idx = rng.choice(n, size=min(self.batch_size, n), replace=False)
        b = len(idx)
        gen = torch.Generator(device=dev).manual_seed(_step_seed(self.seed, _STAGE_FM, step, 1))
        z0 = torch.randn((b, *self.latents.shape[1:]), generator=gen, device=dev)
        t = eps + (1 - 2 * eps) * torch.rand(b, generator=gen, device=dev)
        drop = torch.rand(b, generator=gen, device=dev) < self.p_drop
        idx, z0, t, drop = shard.take([idx, z0, t, drop])
        z1 = self.latents[idx].to(dev)
        t_tok, t_cov = torch.as_tensor(self.tok[idx], device=dev), torch.as_tensor(self.cov[idx], device=dev)
        tt = t[:, None, None]
        zt = tt * z1 + (1 - tt) * z0
        v = module(zt, t, t_tok, t_cov, drop=drop)
        return F.mse_loss(v.float(), z1 - z0)


def load_dit(checkpoint_dir: Path, device: torch.device | str = "cpu",
             weights: str = "raw") -> tuple[DiT, dict[str, Any]]:
    """The DiT with its raw weights (``weights: raw``, what upstream's ``LatentDiffusion.sample`` uses) or the
    EMA shadow (``ema``)."""
    checkpoint_dir = Path(checkpoint_dir)
    spec = json.loads((checkpoint_dir / META_FILE).read_text())
    dit = DiT(spec["n_tokens"], spec["latent_dim"], len(spec["vocab"]), [len(v) for v in spec["covariate_values"]],
              spec["network"])
    state = torch.load(checkpoint_dir / DIT_WEIGHTS, map_location=device, weights_only=True)
    key = {"raw": "model", "ema": "ema"}.get(weights)
    if key is None or key not in state:
        raise ValueError(f"sample_weights must be raw or ema (ema only when flow.training.ema_decay > 0); "
                         f"{checkpoint_dir / DIT_WEIGHTS} has {sorted(state)}, asked for {weights!r}")
    dit.load_state_dict(state[key])
    return dit.to(device).eval(), spec


def _wait_for_copy(src: Path, dst: Path, timeout: float = 1800.0) -> None:
    """A non-main rank: wait until rank 0's atomic copy of ``src`` is in place (same size; the rename is atomic)."""
    import time

    deadline = time.monotonic() + timeout
    while not (dst.exists() and dst.stat().st_size == src.stat().st_size):
        if time.monotonic() > deadline:
            raise TimeoutError(f"rank {current_world().rank}: {dst} not copied by rank 0 within {timeout:.0f} s")
        time.sleep(0.2)


def _complete(directory: Path, weights: str, total: int | None = None) -> bool:
    """Final weights written and the trainer's saved state reached ``total`` updates (None: the run it
    was started for finished)."""
    state = directory / STATE_FILE
    if not ((directory / weights).exists() and state.exists()):
        return False
    saved = json.loads(state.read_text())
    return bool(saved.get("done")) if total is None else int(saved["step"]) >= int(total)


# ------------------------------------------------------------------------------------------------
# the model


class ScLDMModel:
    def fit_autoencoder(self, train: ad.AnnData, val: ad.AnnData | None, context: ModelContext,
                        params: Mapping[str, Any], ae_dir: Path) -> None:
        """Stage 1: train (or resume) the NB autoencoder into ``ae_dir``; complete when AE_WEIGHTS exists."""
        _threads(params)
        if params.get("n_genes") is not None and int(params["n_genes"]) != train.n_vars:
            # the card's fixed panel size: a dataset with another panel is not the card's run
            raise ValueError(f"params.n_genes is {params['n_genes']} (the preset's gene panel) but the data has "
                             f"{train.n_vars} genes; set the dataset's gene_panel or override n_genes: null")
        ae_dir = Path(ae_dir)
        ae_dir.mkdir(parents=True, exist_ok=True)
        spec = autoencoder_spec(train, params)
        _check_meta(ae_dir / AE_META_FILE, spec)
        training = params["autoencoder"]["training"]
        total = total_steps(training, train.n_obs)
        if _complete(ae_dir, AE_WEIGHTS, total):
            return
        (ae_dir / AE_WEIGHTS).unlink(missing_ok=True)  # stale: written by a run with fewer updates
        counts = counts_matrix(train, params.get("counts"))
        library = np.asarray(counts.sum(axis=1)).ravel().astype(np.float32)
        # (library over the panel, normalisation unit) of every train cell, for decoding generated cells; rank 0 writes
        if current_world().is_main:
            with atomic_path(ae_dir / LIBRARY_FILE) as tmp:
                np.save(tmp, np.stack([library.astype(np.float64), normalisation_units(train, counts)], axis=1))
        trainer = Trainer(trainer_config(training, total, int(context.seed)), ae_dir, kind="scldm_autoencoder",
                          fingerprint=spec, log_file=LOG_FILE)
        model = build_autoencoder(spec, context.seed)
        optimizer = _optimizer(model, training)
        task = _AutoencoderTask(counts, library, global_batch_size(training), int(context.seed))
        result = trainer.fit(model, optimizer, task, scheduler=_schedule(optimizer, training, total))
        if not trainer.is_main:
            trainer.close()
            return
        _save_weights(ae_dir / AE_WEIGHTS, model.state_dict())
        device = trainer.device
        summary: dict[str, Any] = {"total_steps": result.steps, "n_parameters": sum(p.numel() for p in model.parameters()),
                                   "trainer": result.report}
        if val is not None and val.n_obs:  # validation NB loss of the final autoencoder (reported only)
            model.eval()
            vc = counts_matrix(val, params.get("counts"))
            keep = np.flatnonzero(np.asarray(vc.sum(axis=1)).ravel() > 0)[:512]
            with torch.no_grad():
                x = torch.as_tensor(vc[keep].toarray(), device=device)
                mu, theta = model(x, x.sum(1))
                summary["val_nb_loss"] = float(nb_loss(x, mu, theta))
        write_text(json.dumps(summary), ae_dir / "summary.json")
        trainer.close()

    def fit(self, train: ad.AnnData, val: ad.AnnData | None, context: ModelContext, params: Mapping[str, Any],
            checkpoint_dir: Path) -> None:
        """Stage 2: DiT flow matching in the frozen autoencoder's latent space (see module doc)."""
        _threads(params)
        checkpoint_dir = Path(checkpoint_dir)
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        if params.get("_autoencoder_dir"):
            ae_dir = Path(params["_autoencoder_dir"])
            if not (_complete(ae_dir, AE_WEIGHTS) and (ae_dir / AE_META_FILE).exists()):
                raise FileNotFoundError(f"no trained autoencoder in {ae_dir} (run fit_autoencoder first)")
        else:
            ae_dir = checkpoint_dir / AE_SUBDIR
            self.fit_autoencoder(train, val, context, params, ae_dir)
        ae_spec = json.loads((ae_dir / AE_META_FILE).read_text())
        if ae_spec != _jsonable(autoencoder_spec(train, params)):
            raise ValueError(f"the autoencoder in {ae_dir} was trained with other genes/params than these")
        # copy what sample() needs (atomic), then hash the copy. One writer (rank 0): a second writer of the same
        # file would sweep the first one's temp file as an orphan (io.remove_stale_temps); the others wait for it.
        for name, target in ((AE_WEIGHTS, AE_WEIGHTS), (LIBRARY_FILE, LIBRARY_FILE), (AE_META_FILE, AUTOENCODER_META_FILE)):
            src, dst = ae_dir / name, checkpoint_dir / target
            if src.resolve() == dst.resolve():
                continue
            if current_world().is_main:
                with atomic_path(dst) as tmp:
                    shutil.copyfile(src, tmp)
            else:
                _wait_for_copy(src, dst)
        spec = flow_spec(train, context, params, ae_spec, _sha256(checkpoint_dir / AE_WEIGHTS))
        _check_meta(checkpoint_dir / META_FILE, spec)
        flow = params["flow"]
        training = flow["training"]
        total = total_steps(training, train.n_obs)
        counts = None
        columns = library_columns(params)
        if current_world().is_main and not _has_decode_library(checkpoint_dir, train.n_obs, columns):
            counts = counts_matrix(train, params.get("counts"))  # written even for a finished run (decode-only key)
            write_decode_library(checkpoint_dir / DECODE_LIBRARY_FILE, train, counts, columns)
        if _complete(checkpoint_dir, DIT_WEIGHTS, total):
            return
        (checkpoint_dir / DIT_WEIGHTS).unlink(missing_ok=True)
        trainer = Trainer(trainer_config(training, total, int(context.seed)), checkpoint_dir, kind="scldm_flow",
                          fingerprint=spec, log_file=LOG_FILE)
        device = trainer.device
        ae, _ = load_autoencoder(checkpoint_dir, device, AUTOENCODER_META_FILE)
        counts = counts_matrix(train, params.get("counts")) if counts is None else counts
        latents = encode_cells(ae, counts, device, int(flow.get("encode_batch_size", 256)))
        del ae
        labels = train.obs[CONDITION].astype(str).to_numpy()
        tok = _token_matrix(labels, context.control_label, {g: i for i, g in enumerate(spec["vocab"])}, spec["max_perts"])
        cov = _covariate_matrix(train, spec["covariates"], spec["covariate_values"])
        dit = build_dit(spec, context.seed + 1)
        optimizer = _optimizer(dit, training)
        ema = _ema(dit, training)
        task = _FlowTask(latents, tok, cov, flow, global_batch_size(training), int(context.seed))
        result = trainer.fit(dit, optimizer, task, scheduler=_schedule(optimizer, training, total), ema=ema)
        if trainer.is_main:  # raw weights and, when trained with one, the EMA shadow (params.sample_weights picks)
            _save_weights(checkpoint_dir / DIT_WEIGHTS, result.module.state_dict(), result.ema)
        trainer.close()

    SOLVERS = spec_of("scldm").solvers  # the config check refuses any other sampling.solver

    def sample(self, checkpoint_dir, conditions: list[str], control: ad.AnnData, n_cells: int, context: ModelContext,
               params: Mapping[str, Any], sampling: Mapping[str, Any]) -> dict[str, np.ndarray]:
        _threads(params)
        checkpoint_dir = Path(checkpoint_dir)
        device = resolve_device(str(_get(params, "flow.training.device", "auto") or "auto"), current_world())
        weights = str(params.get("sample_weights", "raw"))
        ae, ae_spec = job_cached(self, ("autoencoder", checkpoint_key(checkpoint_dir), str(device)),  # once per job
                                 lambda: load_autoencoder(checkpoint_dir, device, AUTOENCODER_META_FILE))
        dit, spec = job_cached(self, ("dit", checkpoint_key(checkpoint_dir), str(device), weights),
                               lambda: load_dit(checkpoint_dir, device, weights))
        w = sampling.get("cfg_weight", sampling.get("guidance_weight"))
        w = float(params.get("cfg_weight", 1.0) if w is None else w)
        seed = int(sampling.get("seed", 0))
        target_sum = float(ae_spec["target_sum"])
        decode = str(params.get("decode", "mean"))
        normalise = str(params.get("normalise", "data"))
        chunk = int(sampling.get("batch_size") or params.get("sample_batch_size") or 512)
        if w != 1.0:
            chunk = max(1, chunk // 2)
        theta = np.exp(ae.log_theta.detach().cpu().numpy().astype(np.float64))[None, :]
        library_mode = str(params.get("library", "train_cell"))
        context_columns = library_columns(params)

        index = {g: i for i, g in enumerate(spec["vocab"])}
        width = max([spec["max_perts"]] + [len(genes_of(c, context.control_label)) for c in conditions])
        ctrl = control[control.obs[IS_CONTROL].to_numpy(dtype=bool)]
        if ctrl.n_obs == 0:
            raise ValueError("sample() needs control cells (their covariates are given to the generated cells)")
        ctrl_cov = _covariate_matrix(ctrl, spec["covariates"], spec["covariate_values"])
        shape = (spec["n_tokens"], spec["latent_dim"])
        out: dict[str, np.ndarray] = {}
        with torch.no_grad():
            for c in conditions:
                rng = np.random.default_rng(_label_seed(seed, c))
                pick = rng.choice(ctrl.n_obs, size=n_cells, replace=n_cells > ctrl.n_obs)
                gen = torch.Generator().manual_seed(_label_seed(seed + 1, c))
                z0_all = torch.randn((n_cells, *shape), generator=gen)
                tok_all = torch.as_tensor(_token_matrix([c] * n_cells, context.control_label, index, width))
                cov_all = torch.as_tensor(ctrl_cov[pick])
                rows = []
                for s in range(0, n_cells, chunk):
                    tok, cov = tok_all[s: s + chunk].to(device), cov_all[s: s + chunk].to(device)
                    z = integrate(lambda x, t, tok=tok, cov=cov: guided_velocity(dit, x, t, tok, cov, w),
                                  z0_all[s: s + chunk].to(device), sampling)
                    rows.append(torch.softmax(ae.decode_logits(z).float(), dim=-1).cpu().numpy().astype(np.float64))
                p = np.concatenate(rows) if rows else np.zeros((0, len(ae_spec["genes"])))
                keys = (context_keys(ctrl.obs.iloc[pick], context_columns) if library_mode == "context"
                        else np.zeros(n_cells))
                lib, unit = draw_library(checkpoint_dir, library_mode, keys, rng)
                mu = decode_counts(p * lib, theta, decode, rng)
                if normalise == "data":  # the data's own convention: X = log1p(counts * unit)
                    x = np.log1p(mu * unit).astype(np.float32)
                elif normalise == "panel":  # normalize_total over the panel + log1p
                    x = log_normalize(mu, target_sum)
                else:
                    raise ValueError(f"normalise must be data or panel, not {normalise!r}")
                out[c] = np.clip(x, 0.0, None).astype(np.float32)
        return out

"""PRiMeFlow (Yan, Wu, Ji et al. 2026, arXiv:2604.13986) and its ablations, in PyTorch.

Conditional flow matching for perturbation response (paper §3):

* ``architecture: unet, space: gene, coupling: independent`` -- **PRiMeFlow**. Source = standard
  Gaussian, target = the train cells (perturbed *and* control), independent coupling, path
  x_t = (1 - t) x0 + t x1 (+ sigma eps), target velocity x1 - x0. The velocity field is a 1-D U-Net in
  guided-diffusion style (``_unet1d.py``) over the gene axis: each gene's expression value is
  sinusoidally encoded, concatenated with a learned gene-identity embedding and passed through a
  per-gene MLP (``n_layers_gene_expression``) to ``hidden_dim`` channels (§3.1); time (sinusoidal +
  ``n_layers_time`` MLP) and condition (``n_layers_conditions`` MLP) embeddings are summed and added
  in every ResBlock.
* ``architecture: mlp`` -- **PRiMeFlow MLP**: expression, condition and time each through their
  input MLP, concatenated, then a decoding MLP (Appendix E's MLP tables).
* ``space: pca`` -- **FlowMatching PCA**: the same flow in the train-fitted PCA space
  (``context.pca``), decoded with ``context.pca.inverse``.
* ``coupling: ot`` -- **FlowMatching PCA OT**: source = control cells (same covariates), minibatch
  OT coupling (ott-jax Sinkhorn) between ``num_samples_per_condition`` control and perturbed cells of
  one condition, pairs drawn from the plan (CellFlow-like, §3.2).

Condition (§3.1): compositional perturbation encoding (a multi-hot vector, i.e. the sum of learned
per-perturbation embeddings) concatenated with one-hot covariates; the first condition layer is
therefore an embedding bag. Classifier-free guidance: with probability ``prob_unconditional`` a
training condition is replaced by a learned null embedding; sampling uses
v = v_uncond + w (v_cond - v_uncond) (w = ``sampling['guidance_weight']``; w = 1 evaluates only the
conditional field, so it is exactly the conditional model). Euler integration with
``sampling['steps']`` steps; samples are clamped to the per-gene range of the train data, then >= 0.

Perturbations never seen in training (GEARS unseen genes) -- the paper is silent (its tasks have
none): the learned table has no row for them, so they fall back to a learned linear map of the
gene's ESM2 vector (``perturbation.unseen: esm2``) or to one learned "unknown" embedding
(``unknown``; also used for tokens without an ESM2 vector, e.g. drugs). The fallback is trained by
substituting it for a known perturbation's table row with probability
``perturbation.substitute_prob`` during training.

Everything the paper leaves open is a config key (``config/presets/primeflow.yaml`` marks which).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import nn

from ..data.conditions import genes_of
from ..data.pca import dense
from ..data.source import CONDITION, IS_CONTROL
from ..io import atomic_path, write_csv, write_text
from ..distributed import current_world
from ..trainer import Shard, Trainer, TrainerConfig, TrainTask, resolve_device
from ._flow import count_parameters, euler_integrate, guided_velocity
from ._flow import covariate_ids as _covariate_matrix
from ._flow import label_seed as _label_seed
from ._flow import param_at as _get
from ._flow import step_seed as _step_seed
from ._unet1d import UNet1D, timestep_embedding
from .base import ModelContext, checkpoint_key, job_cached, spec_of

MODEL_FILE = "model.pt"
META_FILE = "meta.json"
RANGES_FILE = "ranges.npz"
STATE_FILE = "trainer_state.json"  # the shared trainer's resume point
LOG_FILE = "train_log.csv"
OT_LOG_FILE = "ot_fallbacks.csv"  # one row per Sinkhorn failure (FM PCA OT); the count is also in fit.json
FIT_FILE = "fit.json"

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------
# networks


def mlp(d_in: int, hidden: int, d_out: int, n_layers: int, dropout: float = 0.0) -> nn.Sequential:
    """``n_layers`` Linear layers (in -> hidden -> ... -> out) with SiLU (+ dropout) between them."""
    if n_layers < 1:
        raise ValueError("an MLP needs at least one layer")
    dims = [d_in] + [hidden] * (n_layers - 1) + [d_out]
    layers: list[nn.Module] = []
    for i in range(n_layers):
        if i:
            layers += [nn.SiLU(), nn.Dropout(dropout)]
        layers.append(nn.Linear(dims[i], dims[i + 1]))
    return nn.Sequential(*layers)


class ConditionEncoder(nn.Module):
    """Condition -> embedding. Layer 1 = Linear over [multi-hot perturbations ; one-hot covariates],
    computed as a sum of embedding rows; then ``n_layers - 1`` more SiLU/Linear layers.

    ``tok``: [B, M] token ids (-1 = empty slot); ids < ``n_known`` have a learned row, larger ids
    are tokens first met at sampling time and use the fallback. ``cov``: [B, K] value ids per
    covariate (-1 = value not seen in training: contributes nothing).
    """

    def __init__(self, n_known: int, cov_sizes: list[int], dim: int, n_layers: int, dropout: float,
                 esm_dim: int, cfg_drop: str):
        super().__init__()
        self.n_known = n_known
        self.cfg_drop = cfg_drop
        bound = 1.0 / math.sqrt(max(1, n_known + sum(cov_sizes)))  # nn.Linear's init for that one-hot input
        self.pert = nn.Parameter(torch.empty(max(n_known, 1), dim).uniform_(-bound, bound))
        self.covs = nn.ParameterList([nn.Parameter(torch.empty(s, dim).uniform_(-bound, bound)) for s in cov_sizes])
        self.bias = nn.Parameter(torch.empty(dim).uniform_(-bound, bound))
        self.esm_proj = nn.Linear(esm_dim, dim, bias=False) if esm_dim else None
        self.unknown = nn.Parameter(torch.zeros(dim))
        self.rest = nn.Sequential(*[m for _ in range(n_layers - 1) for m in (nn.SiLU(), nn.Dropout(dropout), nn.Linear(dim, dim))])
        self.null = nn.Parameter(torch.zeros(dim))  # CFG: replaces the output ("all") or the perturbation sum
        self.register_buffer("esm_bank", torch.zeros(max(n_known, 1), max(esm_dim, 1)), persistent=False)
        self.register_buffer("has_esm", torch.zeros(max(n_known, 1), dtype=torch.bool), persistent=False)

    def set_bank(self, esm: np.ndarray, has: np.ndarray) -> None:
        """ESM2 vectors (zeros where missing) of every token id the caller will pass."""
        self.esm_bank = torch.as_tensor(esm, dtype=torch.float32, device=self.bias.device)
        self.has_esm = torch.as_tensor(has, dtype=torch.bool, device=self.bias.device)

    def forward(self, tok, cov, drop=None, substitute=None):
        present = tok >= 0
        known = present & (tok < self.n_known)
        if substitute is not None:
            known = known & ~substitute
        fallback = present & ~known
        safe = tok.clamp(min=0)
        h = (self.pert[safe.clamp(max=max(self.n_known - 1, 0))] * known[..., None]).sum(1)
        if fallback.any():
            has = self.has_esm[safe] & fallback if self.esm_proj is not None else torch.zeros_like(fallback)
            if self.esm_proj is not None:
                h = h + (self.esm_proj(self.esm_bank[safe]) * has[..., None]).sum(1)
            h = h + ((fallback & ~has).sum(1, keepdim=True).to(h.dtype)) * self.unknown
        if drop is not None and self.cfg_drop == "perturbation":
            h = torch.where(drop[:, None], self.null.expand_as(h), h)
        for k, table in enumerate(self.covs):
            idx = cov[:, k]
            h = h + table[idx.clamp(min=0)] * (idx >= 0)[:, None]
        out = self.rest(h + self.bias)
        if drop is not None and self.cfg_drop == "all":
            out = torch.where(drop[:, None], self.null.expand_as(out), out)
        return out


class GeneUNetVelocity(nn.Module):
    """v(x_t, t, c) with a guided-diffusion-style U-Net over the (padded) gene axis."""

    def __init__(self, n_genes: int, net: Mapping[str, Any], time_scale: float, expression_scale: float):
        super().__init__()
        hidden = int(net["hidden_dim"])
        self.n_genes = n_genes
        self.hidden = hidden
        self.time_scale = time_scale
        self.expression_scale = expression_scale
        channel_mult = [int(m) for m in net["channel_mult"]]
        factor = 2 ** (len(channel_mult) - 1)
        self.n_padded = -(-n_genes // factor) * factor
        self.emb_dim = 4 * hidden  # guided-diffusion: time_embed_dim = 4 * model_channels
        self.gene_embedding = nn.Parameter(torch.randn(self.n_padded, hidden))
        self.expression_mlp = mlp(2 * hidden, hidden, hidden, int(net["n_layers_gene_expression"]))
        self.time_mlp = mlp(hidden, self.emb_dim, self.emb_dim, int(net["n_layers_time"]))
        self.unet = UNet1D(
            in_channels=hidden, model_channels=hidden, out_channels=1, emb_channels=self.emb_dim,
            num_res_blocks=int(net["num_res_blocks"]), attention_resolutions=[int(r) for r in net["attention_resolutions"]],
            dropout=float(net["dropout"]), channel_mult=channel_mult, conv_resample=bool(net["conv_resample"]),
            num_heads=int(net["num_heads"]), use_scale_shift_norm=bool(net.get("use_scale_shift_norm", False)),
        )

    def forward(self, x, t, c):
        b = x.shape[0]
        x = F.pad(x, (0, self.n_padded - self.n_genes))
        feats = timestep_embedding(x * self.expression_scale, self.hidden)  # [B, G', H]
        ids = self.gene_embedding.unsqueeze(0).expand(b, -1, -1)
        h = self.expression_mlp(torch.cat([feats, ids.to(feats.dtype)], dim=-1))
        emb = self.time_mlp(timestep_embedding(t * self.time_scale, self.hidden)) + c
        return self.unet(h.transpose(1, 2), emb)[:, 0, : self.n_genes]


class MLPVelocity(nn.Module):
    """v(x_t, t, c) = decoder([MLP_x(x_t) ; MLP_t(sin(t)) ; c])."""

    def __init__(self, dim: int, net: Mapping[str, Any], time_scale: float):
        super().__init__()
        hidden = int(net["hidden_dim"])
        dropout = float(net["dropout"])
        self.hidden = hidden
        self.time_scale = time_scale
        self.emb_dim = hidden
        self.x_mlp = mlp(dim, hidden, hidden, int(net["n_layers_gene_expression"]), dropout)
        self.time_mlp = mlp(hidden, hidden, hidden, int(net["n_layers_time"]), dropout)
        self.decoder = nn.Sequential(
            nn.SiLU(), nn.Dropout(dropout), mlp(3 * hidden, hidden, dim, int(net["n_layers_decoding"]), dropout)
        )

    def forward(self, x, t, c):
        ht = self.time_mlp(timestep_embedding(t * self.time_scale, self.hidden))
        return self.decoder(torch.cat([self.x_mlp(x), ht, c], dim=-1))


class VelocityField(nn.Module):
    """Condition encoder + velocity network, built from a JSON-able ``spec`` (stored in meta.json)."""

    def __init__(self, spec: Mapping[str, Any]):
        super().__init__()
        net = spec["network"]
        if spec["architecture"] == "unet":
            self.net = GeneUNetVelocity(spec["dim"], net, spec["time_scale"], spec["expression_scale"])
            cond_dropout = 0.0
        elif spec["architecture"] == "mlp":
            self.net = MLPVelocity(spec["dim"], net, spec["time_scale"])
            cond_dropout = float(net["dropout"])
        else:
            raise ValueError(f"architecture must be unet or mlp, not {spec['architecture']!r}")
        self.cond = ConditionEncoder(
            len(spec["vocab"]), [len(v) for v in spec["covariate_values"]], self.net.emb_dim,
            int(net["n_layers_conditions"]), cond_dropout, int(spec["esm_dim"]), spec["cfg_drop"],
        )

    def forward(self, x, t, tok, cov, drop=None, substitute=None):
        return self.net(x, t, self.cond(tok, cov, drop, substitute))


# ------------------------------------------------------------------------------------------------
# probability paths and OT coupling


def interpolate(x0, x1, t, kind: str, sigma: float, noise=None):
    """x_t and the target velocity u_t for the linear or trigonometric path (+ constant noise sigma)."""
    tt = t[:, None]
    if kind == "linear":
        xt, ut = (1 - tt) * x0 + tt * x1, x1 - x0
    elif kind == "trigonometric":
        a, b = torch.cos(0.5 * math.pi * tt), torch.sin(0.5 * math.pi * tt)
        xt, ut = a * x0 + b * x1, 0.5 * math.pi * (a * x1 - b * x0)
    else:
        raise ValueError(f"interpolation must be linear or trigonometric, not {kind!r}")
    if sigma > 0:
        xt = xt + sigma * noise
    return xt, ut


_OT_SOLVERS: dict[tuple, Callable] = {}


def ot_plan(x0: np.ndarray, x1: np.ndarray, epsilon: float | None, scale_cost: str | float, tau_a: float,
            tau_b: float) -> np.ndarray:
    """Entropic OT plan between two point clouds (squared Euclidean cost) from ott-jax's Sinkhorn."""
    key = (epsilon, scale_cost, float(tau_a), float(tau_b))
    if key not in _OT_SOLVERS:
        import jax
        from ott.geometry import pointcloud
        from ott.problems.linear import linear_problem
        from ott.solvers.linear import sinkhorn

        balanced = tau_a == 1.0 and tau_b == 1.0

        def solve(x, y):
            geom = pointcloud.PointCloud(x, y, epsilon=epsilon, scale_cost=scale_cost)
            problem = linear_problem.LinearProblem(geom, tau_a=tau_a, tau_b=tau_b)
            return sinkhorn.Sinkhorn(threshold=1e-3 if balanced else 1e-2)(problem).matrix

        _OT_SOLVERS[key] = jax.jit(solve)
    return np.asarray(_OT_SOLVERS[key](np.asarray(x0, np.float32), np.asarray(x1, np.float32)), dtype=np.float64)


def ot_pairs(x0: np.ndarray, x1: np.ndarray, rng: np.random.Generator, epsilon=0.1, scale_cost="mean",
             tau_a=1.0, tau_b=1.0) -> tuple[np.ndarray, np.ndarray, bool]:
    """Minibatch OT coupling: draw ``len(x1)`` (source, target) index pairs from the plan. The third value is
    True when the solver failed and the pairs are independent instead (the caller counts and logs it: a
    silent fallback would turn FM PCA OT into FM PCA without a trace)."""
    plan = ot_plan(x0, x1, epsilon, scale_cost, tau_a, tau_b)
    p = np.clip(plan.ravel(), 0, None)
    fell_back = not np.isfinite(p).all() or p.sum() <= 0
    if fell_back:
        p = np.ones_like(p)
    k = rng.choice(p.size, size=len(x1), replace=True, p=p / p.sum())
    return k // plan.shape[1], k % plan.shape[1], fell_back


# ------------------------------------------------------------------------------------------------
# data


class _Cells:
    """Train cells in the flow's space with their condition tokens and covariate ids."""

    def __init__(self, adata: ad.AnnData, context: ModelContext, spec: Mapping[str, Any]):
        self.space = spec["space"]
        if self.space == "gene":
            self.x = adata.X  # kept as stored (CSR or dense); rows densified per batch
        elif self.space == "pca":
            self.x = context.pca.transform(adata.X).astype(np.float32)
        else:
            raise ValueError(f"space must be gene or pca, not {self.space!r}")
        labels = adata.obs[CONDITION].astype(str).to_numpy()
        self.labels = labels
        self.is_control = adata.obs[IS_CONTROL].to_numpy(dtype=bool)
        index = {g: i for i, g in enumerate(spec["vocab"])}
        self.tok = _token_matrix(labels, context.control_label, index, spec["max_perts"])
        self.cov = _covariate_matrix(adata, spec["covariates"], spec["covariate_values"])
        self.n = adata.n_obs

    def rows(self, idx: np.ndarray) -> np.ndarray:
        return dense(self.x[idx])

    def groups(self) -> tuple[list[np.ndarray], dict[tuple, np.ndarray], list[tuple]]:
        """Perturbed (condition, covariates) groups, the control cells of each covariate tuple, and
        the covariate tuple of every group (OT pairs controls and targets of the same covariates)."""
        perturbed: dict[tuple, list[int]] = {}
        controls: dict[tuple, list[int]] = {}
        for i, (label, cov) in enumerate(zip(self.labels, map(tuple, self.cov.tolist()))):
            if self.is_control[i]:
                controls.setdefault(cov, []).append(i)
            else:
                perturbed.setdefault((label, cov), []).append(i)
        keys = sorted(perturbed, key=str)
        return [np.array(perturbed[k]) for k in keys], {k: np.array(v) for k, v in controls.items()}, [k[1] for k in keys]


def _token_matrix(labels, control_label: str, index: dict[str, int], width: int) -> np.ndarray:
    out = np.full((len(labels), max(width, 1)), -1, dtype=np.int64)
    cache: dict[str, list[int]] = {}
    for i, label in enumerate(labels):
        if label not in cache:
            cache[label] = [index[g] for g in genes_of(label, control_label)]
        ids = cache[label]
        out[i, : len(ids)] = ids
    return out


def _esm_bank(tokens: list[str], context: ModelContext, esm_dim: int) -> tuple[np.ndarray, np.ndarray]:
    bank = np.zeros((max(len(tokens), 1), max(esm_dim, 1)), dtype=np.float32)
    has = np.zeros(max(len(tokens), 1), dtype=bool)
    if esm_dim:
        for i, g in enumerate(tokens):
            vec = context.embeddings.get(g)
            if vec is not None:
                if len(vec) != esm_dim:
                    raise ValueError(f"ESM2 vector of '{g}' has {len(vec)} dims; the checkpoint was trained with {esm_dim}")
                bank[i], has[i] = vec, True
    return bank, has


def _gene_range(x) -> tuple[np.ndarray, np.ndarray]:
    """Per-gene min and max of the train cells (without densifying a sparse matrix)."""
    if sp.issparse(x):
        return (np.asarray(x.min(axis=0).todense()).ravel().astype(np.float32),
                np.asarray(x.max(axis=0).todense()).ravel().astype(np.float32))
    x = np.asarray(x)
    return x.min(axis=0).astype(np.float32), x.max(axis=0).astype(np.float32)


def build_spec(train: ad.AnnData, context: ModelContext, params: Mapping[str, Any]) -> dict[str, Any]:
    """Everything needed to rebuild the network, derived from params and the train cells only."""
    control_label = context.control_label
    labels = train.obs[CONDITION].astype(str).unique().tolist()
    vocab = sorted({g for c in labels for g in genes_of(c, control_label)})
    covariates = list(params.get("covariates") or [])
    cov_values = []
    for column in covariates:
        if column not in train.obs:
            raise ValueError(f"covariate column '{column}' (params.covariates) is not in obs: {list(train.obs.columns)}")
        cov_values.append(sorted(train.obs[column].astype(str).unique().tolist()))
    space = params.get("space", "gene")
    dim = train.n_vars if space == "gene" else int(context.pca.components.shape[0])
    unseen = _get(params, "perturbation.unseen", "esm2")
    esm_dim = len(next(iter(context.embeddings.values()))) if (unseen == "esm2" and context.embeddings) else 0
    return {
        "architecture": params.get("architecture", "unet"),
        "space": space,
        "coupling": params.get("coupling", "independent"),
        "dim": int(dim),
        "n_genes": int(train.n_vars),
        "network": dict(params["network"]),
        "time_scale": float(_get(params, "encoding.time_scale", 1000.0)),
        "expression_scale": float(_get(params, "encoding.expression_scale", 100.0)),
        "vocab": vocab,
        "max_perts": max([len(genes_of(c, control_label)) for c in labels] + [1]),
        "covariates": covariates,
        "covariate_values": cov_values,
        "esm_dim": int(esm_dim),
        "cfg_drop": params.get("cfg_drop", "all"),
        "control_label": control_label,
    }


# ------------------------------------------------------------------------------------------------
# training


def ot_settings(ot: Mapping[str, Any]) -> dict[str, Any]:
    """ot_plan's keyword arguments from the preset's ``ot`` block. Appendix E's ``solver_type``: "balanced" is
    tau_a = tau_b = 1; "unbalanced" relaxes the marginals by tau (ott solves tau = 1 as the balanced problem, so
    the paper's unbalanced + tau 1.0 is balanced OT)."""
    tau_a, tau_b = float(ot.get("tau_a", 1.0)), float(ot.get("tau_b", 1.0))
    if ot.get("solver_type", "unbalanced") == "balanced" and (tau_a, tau_b) != (1.0, 1.0):
        raise ValueError(f"ot.solver_type balanced needs tau_a = tau_b = 1, not {tau_a}, {tau_b}")
    return {"epsilon": ot.get("epsilon", 0.1), "scale_cost": ot.get("scale_cost", "mean"), "tau_a": tau_a, "tau_b": tau_b}


class _FlowTask(TrainTask):
    """Flow-matching loss of one micro-batch. Every draw (cells, noise, times, CFG drops) is made for the
    *global* micro-batch from (seed, step, micro) and each process keeps its rows, so N data-parallel
    processes compute what one process computes at the same global batch."""

    def __init__(self, spec, params, cells: _Cells, context: ModelContext, world_size: int):
        self.spec, self.params, self.cells = spec, params, cells
        self.seed = int(context.seed)
        flow = params.get("flow", {})
        self.p_uncond = float(flow.get("prob_unconditional", 0.0))
        self.kind = str(flow.get("interpolation", "linear")).lower()
        self.sigma = float(flow.get("sigma", 0.0))
        self.p_sub = float(_get(params, "perturbation.substitute_prob", 0.0))
        tr = params["training"]
        per_gpu, n_gpus = int(tr["batch_size"]), int(tr.get("num_gpus", 1))
        if n_gpus % world_size:
            raise ValueError(f"training.num_gpus {n_gpus} (the paper's GPU count) must be a multiple of the "
                             f"job's {world_size} data-parallel processes")
        # Global batch per update = batch_size x num_gpus x grad_accum_steps (the paper's per-GPU batch on its
        # GPUs). A micro-batch is batch_size cells per process; on fewer processes than the paper's GPUs the
        # missing GPUs become extra accumulation, so the update sees the same number of cells.
        self.batch_size = per_gpu * world_size
        self.accum = int(tr.get("grad_accum_steps", 1)) * (n_gpus // world_size)
        if spec["coupling"] == "ot":
            ot = params["ot"]
            self.nspc = int(ot["num_samples_per_condition"])
            self.ot_kwargs = ot_settings(ot)
            self.groups, self.controls, self.group_cov = cells.groups()
            if not self.groups:
                raise ValueError("OT coupling needs perturbed train cells")
            self.all_controls = np.flatnonzero(cells.is_control)
            if len(self.all_controls) == 0:
                raise ValueError("OT coupling needs control cells in the train split")
        elif spec["coupling"] != "independent":
            raise ValueError(f"coupling must be independent or ot, not {spec['coupling']!r}")
        self.ot_fallbacks: list[list[int]] = []  # [step, micro, condition group] of every failed Sinkhorn plan

    def _ot_fallback(self, step: int, micro: int, group: int) -> None:
        self.ot_fallbacks.append([step, micro, group])
        logger.warning("FM PCA OT: Sinkhorn plan unusable at update %d (micro-batch %d, condition group %d); pairs "
                       "drawn independently instead (%d fallbacks so far; listed in %s, counted in %s)",
                       step, micro, group, len(self.ot_fallbacks), OT_LOG_FILE, FIT_FILE)

    def log_fields(self) -> dict[str, Any]:
        """FM PCA OT: the running count of Sinkhorn fallbacks in every train-log row."""
        return {"ot_fallbacks": len(self.ot_fallbacks)} if self.spec["coupling"] == "ot" else {}

    def state_dict(self) -> dict[str, Any]:
        return {"ot_fallbacks": [list(r) for r in self.ot_fallbacks]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.ot_fallbacks = [list(map(int, r)) for r in state.get("ot_fallbacks", [])]

    def _batch(self, rng: np.random.Generator, step: int = 0, micro: int = 0):
        """(x0 or None, x1, row indices of the target cells) of the global micro-batch."""
        if self.spec["coupling"] == "independent":
            idx = rng.integers(0, self.cells.n, size=self.batch_size)
            return None, self.cells.rows(idx), idx
        n_cond = max(1, self.batch_size // self.nspc)
        src, tgt = [], []
        for g in rng.integers(0, len(self.groups), size=n_cond):
            members = self.groups[g]
            pool = self.controls.get(self.group_cov[g], self.all_controls)
            t_idx = rng.choice(members, size=self.nspc, replace=len(members) < self.nspc)
            s_idx = rng.choice(pool, size=self.nspc, replace=len(pool) < self.nspc)
            x0, x1 = self.cells.rows(s_idx), self.cells.rows(t_idx)
            i, j, fell_back = ot_pairs(x0, x1, rng, **self.ot_kwargs)
            if fell_back:
                self._ot_fallback(step, micro, int(g))
            src.append(x0[i])
            tgt.append(t_idx[j])
        idx = np.concatenate(tgt)
        return np.concatenate(src), self.cells.rows(idx), idx

    def loss(self, field: nn.Module, step: int, micro: int, shard: Shard) -> torch.Tensor:
        rng = np.random.default_rng(_step_seed(self.seed, step, micro))
        x0_np, x1_np, idx = self._batch(rng, step, micro)
        dev = shard.device
        x1 = torch.as_tensor(x1_np, device=dev)
        tok = torch.as_tensor(self.cells.tok[idx], device=dev)
        cov = torch.as_tensor(self.cells.cov[idx], device=dev)
        b = x1.shape[0]
        torch.manual_seed(_step_seed(self.seed, step, micro, 1))  # the same on every rank; the trainer forks the RNG
        x0 = torch.randn_like(x1) if x0_np is None else torch.as_tensor(x0_np, device=dev)
        t = torch.rand(b, device=dev)
        noise = torch.randn_like(x1) if self.sigma > 0 else None
        drop = torch.rand(b, device=dev) < self.p_uncond
        sub = (torch.rand(tok.shape, device=dev) < self.p_sub) & (tok >= 0) if self.p_sub > 0 else None
        x0, x1, tok, cov, t, drop = shard.take([x0, x1, tok, cov, t, drop])
        noise = shard.take(noise) if noise is not None else None
        sub = shard.take(sub) if sub is not None else None
        xt, ut = interpolate(x0, x1, t, self.kind, self.sigma, noise)
        v = field(xt, t, tok, cov, drop=drop, substitute=sub)
        return F.mse_loss(v.float(), ut)


def trainer_config(training: Mapping[str, Any], total: int, seed: int) -> TrainerConfig:
    """The preset's training keys as the shared trainer's settings (``mixed_precision``: bf16 on CUDA)."""
    return TrainerConfig(
        total_steps=total, seed=seed, checkpoint_every=int(training.get("checkpoint_every") or 0),
        precision=str(training.get("precision") or ("bf16" if training.get("mixed_precision") else "fp32")),
        grad_clip=float(training["grad_clip"]) if training.get("grad_clip") else None,
        device=str(training.get("device", "auto")), progress=bool(training.get("progress", True)),
    )


def _make_optimizer(field: nn.Module, training: Mapping[str, Any]) -> torch.optim.Optimizer:
    kind = str(training.get("optimizer", "adam")).lower()
    cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[kind]
    return cls(field.parameters(), lr=float(training["learning_rate"]), weight_decay=float(training.get("weight_decay", 0.0)))


def total_steps(training: Mapping[str, Any], n_cells: int) -> int:
    """Optimiser updates: ``num_steps``, or ``epochs`` passes over the train cells at the effective batch."""
    if training.get("num_steps") is not None:
        return int(training["num_steps"])
    effective = int(training["batch_size"]) * int(training.get("grad_accum_steps", 1)) * int(training.get("num_gpus", 1))
    return math.ceil(float(training["epochs"]) * n_cells / effective)


def build_field(spec: Mapping[str, Any], seed: int) -> VelocityField:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return VelocityField(spec)


def _save(checkpoint_dir: Path, field: VelocityField, step: int) -> None:
    with atomic_path(checkpoint_dir / MODEL_FILE) as tmp:
        torch.save({"model": field.state_dict(), "step": step}, tmp)


def load_field(checkpoint_dir: Path, device: torch.device | str = "cpu") -> tuple[VelocityField, dict[str, Any]]:
    checkpoint_dir = Path(checkpoint_dir)
    spec = json.loads((checkpoint_dir / META_FILE).read_text())
    field = VelocityField(spec)
    state = torch.load(checkpoint_dir / MODEL_FILE, map_location=device, weights_only=True)
    field.load_state_dict(state["model"])
    return field.to(device).eval(), spec


def _load_for_sampling(checkpoint_dir: Path, device) -> tuple[VelocityField, dict[str, Any], np.ndarray, np.ndarray]:
    field, spec = load_field(checkpoint_dir, device)
    with np.load(checkpoint_dir / RANGES_FILE) as r:
        return field, spec, r["lo"], r["hi"]


# ------------------------------------------------------------------------------------------------
# the model


class PRiMeFlowModel:
    def fit(self, train, val, context: ModelContext, params, checkpoint_dir: Path) -> None:
        checkpoint_dir = Path(checkpoint_dir)
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        spec = build_spec(train, context, params)
        meta_path = checkpoint_dir / META_FILE
        if meta_path.exists() and json.loads(meta_path.read_text()) != json.loads(json.dumps(spec)):
            raise ValueError(f"{meta_path} was written for other params/data; remove the checkpoint to retrain")
        if current_world().is_main:  # one writer per file: a second rank's atomic write would sweep rank 0's temp
            write_text(json.dumps(spec, indent=1), meta_path)
            lo, hi = _gene_range(train.X)
            with atomic_path(checkpoint_dir / RANGES_FILE) as tmp:
                np.savez(tmp, lo=lo, hi=hi)

        training = params["training"]
        cells = _Cells(train, context, spec)
        total = total_steps(training, cells.n)
        trainer = Trainer(trainer_config(training, total, int(context.seed)), checkpoint_dir, kind="primeflow",
                          fingerprint=spec, log_file=LOG_FILE)
        task = _FlowTask(spec, params, cells, context, trainer.world.size)
        trainer.config = dataclasses.replace(trainer.config, grad_accum_steps=task.accum)

        field = build_field(spec, context.seed)
        field.cond.set_bank(*_esm_bank(spec["vocab"], context, spec["esm_dim"]))
        optimizer = _make_optimizer(field, training)
        result = trainer.fit(field, optimizer, task)
        if trainer.is_main:
            _save(checkpoint_dir, result.module, result.steps)
            if spec["coupling"] == "ot":
                write_csv(pd.DataFrame(task.ot_fallbacks, columns=["step", "micro", "condition_group"]),
                          checkpoint_dir / OT_LOG_FILE, index=False)
            write_text(json.dumps({"steps": result.steps, "n_parameters": count_parameters(field),
                                   "ot_fallbacks": len(task.ot_fallbacks) if spec["coupling"] == "ot" else None,
                                   "substitute_prob": task.p_sub}, indent=2), checkpoint_dir / FIT_FILE)
        trainer.close()

    SOLVERS = spec_of("primeflow").solvers  # fixed-step Euler only: the config check refuses any other

    def sample(self, checkpoint_dir, conditions, control, n_cells, context, params, sampling):
        checkpoint_dir = Path(checkpoint_dir)
        device = resolve_device(str(_get(params, "training.device", "auto")), current_world())
        # loaded once per job (base.job_cached); the ESM bank set below is replaced whole on every call
        field, spec, lo, hi = job_cached(self, ("field", checkpoint_key(checkpoint_dir), str(device)),
                                         lambda: _load_for_sampling(checkpoint_dir, device))
        steps = int(sampling.get("steps", 100))
        w = float(sampling.get("guidance_weight", 1.0))
        seed = int(sampling.get("seed", 0))
        chunk = int(sampling.get("batch_size") or params.get("sample_batch_size") or 1024)
        if w != 1.0:
            chunk = max(1, chunk // 2)  # guidance evaluates conditional and null rows in one batch

        # tokens: the train vocabulary, then perturbations first met here (fallback embeddings)
        tokens = list(spec["vocab"])
        index = {g: i for i, g in enumerate(tokens)}
        per_condition = {c: genes_of(c, context.control_label) for c in conditions}
        for genes in per_condition.values():
            for g in genes:
                if g not in index:
                    index[g] = len(tokens)
                    tokens.append(g)
        field.cond.set_bank(*_esm_bank(tokens, context, spec["esm_dim"]))
        width = max([spec["max_perts"]] + [len(g) for g in per_condition.values()])

        ctrl = control[control.obs[IS_CONTROL].to_numpy()]
        ctrl_cov = _covariate_matrix(ctrl, spec["covariates"], spec["covariate_values"])
        if spec["coupling"] == "ot":
            ctrl_x = context.pca.transform(ctrl.X) if spec["space"] == "pca" else dense(ctrl.X)

        x0s, toks, covs = [], [], []
        for c in conditions:
            rng = np.random.default_rng(_label_seed(seed, c))
            pick = rng.choice(ctrl.n_obs, size=n_cells, replace=n_cells > ctrl.n_obs)  # covariates (and OT source)
            if spec["coupling"] == "ot":
                x0s.append(torch.as_tensor(ctrl_x[pick], dtype=torch.float32))
            else:
                gen = torch.Generator().manual_seed(_label_seed(seed + 1, c))
                x0s.append(torch.randn(n_cells, spec["dim"], generator=gen))
            toks.append(_token_matrix([c] * n_cells, context.control_label, index, width))
            covs.append(ctrl_cov[pick])
        x0_all, tok_all, cov_all = torch.cat(x0s), np.concatenate(toks), np.concatenate(covs)

        out = []
        with torch.no_grad():
            for s in range(0, x0_all.shape[0], chunk):
                tok = torch.as_tensor(tok_all[s: s + chunk], device=device)
                cov = torch.as_tensor(cov_all[s: s + chunk], device=device)
                z = euler_integrate(lambda x, t, tok=tok, cov=cov: guided_velocity(field, x, t, tok, cov, w),
                                    x0_all[s: s + chunk].to(device), steps)
                out.append(z.float().cpu().numpy())
        z = np.concatenate(out) if out else np.zeros((0, spec["dim"]), np.float32)
        x = context.pca.inverse(z) if spec["space"] == "pca" else z
        if params.get("clamp_to_train_range", True):
            x = np.clip(x, lo, hi)
        x = np.clip(x, 0.0, None).astype(np.float32)
        return {c: x[i * n_cells: (i + 1) * n_cells] for i, c in enumerate(conditions)}

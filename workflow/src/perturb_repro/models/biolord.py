"""PerturBench's Biolord baseline (``BiolordStar``; Wu et al. 2024, after Piran et al. 2024).

Written from PerturBench's definitions (altoslabs/perturbench, commit d357dfa, paths under
``src/perturbench/``), not copied:

* network (``modelcore/models/biolord.py: BiolordStar``, ``modelcore/nn/mlp.py: MLP``):
  - ``gene_encoder``: MLP(genes -> ``latent_dim``) with ``n_layers`` hidden layers of ``encoder_width``;
    Gaussian noise ``noise * N(0, 1)`` (``noise`` 0.1, the class default) is added to its output in
    every forward pass -- training, validation and prediction alike;
  - ``pert_encoder``: MLP(multi-hot perturbation -> ``latent_dim``);
  - attribute embedding of the covariates: a free ``latent_dim x n_covariate_values`` matrix
    (``lord_embedding``, initialised N(0, 1)); a cell's covariate latent is the column of its value;
  - ``decoder``: MLP([expression latent, perturbation latent, covariate latent] -> genes), softplus
    output when ``softplus_output``. MLP = Linear, LayerNorm without affine parameters, ReLU, Dropout.
* loss: squared error summed over genes, averaged over cells, plus the attribute regulariser
  ``penalty_weight * sum over the batch of ||covariate latent||^2`` (training only; the logged
  ``val_loss`` is the reconstruction term alone).
* training cells (``data/modules.py``): each cell reconstructs itself from its own expression,
  perturbation and covariates; ``data.add_controls: true`` (the data config default) uses the
  perturbed train cells only, ``false`` (the neurips2024 Biolord configs) every train cell.
* prediction (``BiolordStar.predict``, ``data/datasets/population.py: Counterfactual``): sampled
  control cells are encoded (with the noise), combined with the test condition's perturbation
  latent and the control's covariate latent, and decoded -- one predicted cell per control cell.
* optimisation, LR schedule, early stopping, best-epoch weights, resumable training: the trainer
  of ``perturbench_baselines`` via ``cpa._SelfReconstructionModel``.

Deviations: PerturBench reads the covariate named ``cell_type`` only and fails with more than one
covariate column; here the covariate latent is ``lord_embedding @ covariate multi-hot``, which is the
same for one covariate and the sum of one column per covariate otherwise (and zero for a value unseen
in train, where PerturBench would fail). Float32 instead of 16-bit mixed precision. RNG streams are
seeded by (seed, step) for bit-identical resume on CPU.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import perturbench_baselines as pb
from .cpa import _SelfReconstructionModel, covariate_sizes

BIOLORD_DEFAULTS: dict[str, Any] = {  # BiolordStar.__init__ defaults (modelcore/models/biolord.py)
    "n_layers": 2, "encoder_width": 128, "latent_dim": 32, "penalty_weight": 10000.0, "noise": 0.1,
    "dropout": None, "softplus_output": True,
}


class BiolordNet(nn.Module):
    uses_control = False  # trained to reconstruct each cell from itself

    def __init__(self, n_genes: int, n_perts: int, covariates, cfg: Mapping[str, Any]):
        super().__init__()
        c = {**BIOLORD_DEFAULTS, **{k: v for k, v in dict(cfg).items() if v is not None or k == "dropout"}}
        n_total = sum(covariate_sizes(covariates).values())
        latent, width, n_layers = int(c["latent_dim"]), int(c["encoder_width"]), int(c["n_layers"])
        dropout = pb._opt_dropout(c["dropout"])
        self.lord_embedding = nn.Parameter(torch.randn(latent, n_total))
        self.gene_encoder = pb.MLP(n_genes, width, latent, n_layers, dropout)
        self.decoder = pb.MLP(3 * latent, width, n_genes, n_layers, dropout)
        self.pert_encoder = pb.MLP(n_perts, width, latent, n_layers, dropout)
        self.penalty_weight = float(c["penalty_weight"])
        self.noise = float(c["noise"])
        self.softplus_output = bool(c["softplus_output"])

    def _forward(self, x: torch.Tensor, pert: torch.Tensor, cov: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        latent_x = self.gene_encoder(x)
        latent_x = latent_x + self.noise * torch.randn_like(latent_x)
        latent_cov = cov @ self.lord_embedding.T  # one-hot selects the value's column
        out = self.decoder(torch.cat([latent_x, self.pert_encoder(pert), latent_cov], dim=-1))
        if self.softplus_output:
            out = F.softplus(out)
        return out, (latent_cov ** 2).sum()

    def forward(self, control: torch.Tensor, pert: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
        return self._forward(control, pert, cov)[0]

    def loss(self, x: torch.Tensor, pert: torch.Tensor, cov: torch.Tensor, batch_idx: int,
             training: bool, batch_cells: int | None = None) -> dict[str, torch.Tensor]:
        """``batch_cells``: the global batch when ``x`` is one data-parallel process's share of it. The
        penalty is a *sum* over the batch, so a share's sum is scaled to the batch (the trainer averages the
        processes' losses, each weighted by its share)."""
        pred, penalty = self._forward(x, pert, cov)
        if batch_cells is not None and batch_cells != len(x):
            penalty = penalty * (batch_cells / len(x))
        recon = F.mse_loss(pred, x, reduction="none").sum(dim=1).mean()
        total = recon + self.penalty_weight * penalty if training else recon
        return {"loss": total, "recon": recon, "penalty": penalty}


class Biolord(_SelfReconstructionModel):
    """PerturBench ``BiolordStar``."""

    NET = BiolordNet
    KIND = "biolord"

    def build_net(self, n_genes: int, n_perts: int, covariates, params: Mapping[str, Any]) -> nn.Module:
        return BiolordNet(n_genes, n_perts, covariates, params.get("model", {}))

"""PerturBench's CPA and CPA (noAdv) (Wu et al. 2024, after Lotfollahi et al. 2023).

Written from PerturBench's definitions (altoslabs/perturbench, commit d357dfa, paths under
``src/perturbench/``), not copied:

* network (``modelcore/models/cpa.py: CPA``, ``modelcore/nn/vae.py``, ``modelcore/nn/mlp.py``):
  - encoder ``VariationalEncoder``: Linear(genes, h), then ``n_layers_encoder`` x Linear(h, h), each
    followed by LayerNorm *with* affine parameters, ReLU and Dropout; heads ``mu`` and ``log var``
    (Linear(h, latent) each); ``z_basal = mu + sqrt(exp(log var)) * eps`` -- sampled in training,
    validation *and* prediction (``rsample`` in ``forward``);
  - decoder ``VariationalDecoder``: the mirror image from the latent space, heads for the mean and
    the log variance of a Gaussian over log-expression (``recon_loss: gauss``); the prediction is
    that mean (softplus'ed when ``softplus_output``);
  - ``z = z_basal + pert_network(perturbation) + sum_k covariate_embedding_k(one-hot_k)``, with
    ``pert_network`` an MLP of ``n_layers_pert_emb`` hidden layers and one embedding MLP of
    ``n_layers_covar_emb`` hidden layers per covariate that has more than one value in train
    (PerturBench's ``covars_encoder`` filter). MLP = Linear, LayerNorm (no affine parameters unless
    ``elementwise_affine``, first layer only), ReLU, Dropout; last Linear to the output.
  - adversaries: an MLP (``adv_classifier_n_layers`` hidden layers of ``adv_classifier_hidden_dim``)
    from ``z_basal`` to perturbation logits, and one per (multi-valued) covariate.
* loss (``CPA.loss``, ``CPA.adversarial_loss``):
  ``recon + kl_weight * KL(q(z_basal|x) || N(0, I)) + adv_weight * adv_loss`` where ``recon`` is the
  Gaussian negative log-likelihood summed over genes, ``adv_loss`` is the cross-entropy of the
  perturbation classifier against the multi-hot perturbation vector (soft-label cross-entropy, so a
  combination counts both genes and a control cell counts 0) plus that of each covariate classifier;
  on training batches whose index in the epoch is *not* a multiple of ``adv_steps`` the gradient
  penalty ``penalty_weight * sum_classifiers mean((d sum(logits) / d z_basal)^2)`` is added.
  PerturBench trains everything with *one* Adam optimiser on this sum (``PerturbationModel.
  configure_optimizers``): the encoder is not trained against the classifiers by a separate
  optimiser step as in the original CPA; ``adv_steps`` only schedules the penalty. We do the same.
  The validation loss is the same total without the penalty (``compute_penalty=self.training``).
* CPA (noAdv) is this code with ``use_adversary: false`` (``configs/experiment/neurips2024/*/
  cpa_no_adv_best_params_*.yaml``): no adversarial loss and no penalty.
* training cells (``data/modules.py``, ``data/datasets/singlecell.py``): CPA reconstructs each cell
  from itself, with the cell's own perturbation and covariates. ``data.add_controls: true`` (the
  data config default) trains on the perturbed cells only; ``false`` (all neurips2024 CPA configs)
  on every train cell, controls included (their perturbation vector is all zeros).
* prediction (``data/datasets/population.py: Counterfactual``, ``CPA.predict``): sampled control
  cells are encoded, the test condition's perturbation embedding and the control's covariate
  embeddings are added, and the decoder mean is returned -- one predicted cell per control cell.
* optimisation, validation, LR schedule, early stopping, best-epoch weights and resumable training
  are those of ``perturbench_baselines._PerturBenchModel`` (see its docstring).

PerturBench's later release (commit ``fc13a8c``; ``model.release: neurips2025``): the decoder is
``DeepIsotropicGaussian`` (an MLP to the mean; MSE summed over genes), training is Lightning manual optimisation with
two Adam optimisers (generative modules / classifiers), ``n_warmup_epochs`` of reconstruction + KL only, then
alternating generative steps (encoder trained *against* the fixed classifiers: ``- adv_weight * adv``) and
classifier steps (adversarial loss + gradient penalty); no LR scheduler is stepped. :meth:`CPANet.step_loss` gives
the trainer's single Adam a loss whose gradient reaches exactly the stepped optimiser's parameters, which makes the
same updates (Adam keeps its state per parameter and skips parameters without gradient).

Deviations: (1) with ``use_adversary: false`` PerturBench still *constructs* the (unused, never
updated) classifiers; we do not, so our parameter count for noAdv excludes them
(``upstream_parameter_count`` gives the count with them). (2) ``recon_loss`` ``nb``/``zinb`` are not
implemented (PerturBench's generative model is Gaussian for every setting anyway and no
configuration uses them); ``variational: false`` uses ``z_basal = mu`` (PerturBench's code path for it
would hand a tuple on and fail). (3) Float32 instead of 16-bit mixed precision; the classifier
accuracies PerturBench logs are not computed; the penalty is not computed on batches that do not use
it (it never enters their gradient). (4) The input-encoding deviations of
``perturbench_baselines`` (genes never perturbed in train contribute nothing; unseen covariate
values encode as zeros). (5) Lightning's global RNG is replaced by generators seeded by
(seed, step) (the shared trainer's), so training resumes bit-identically on CPU.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import anndata as ad
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data.source import IS_CONTROL
from ..distributed import current_world
from . import perturbench_baselines as pb

_HALF_LOG_2PI = math.log(math.sqrt(2 * math.pi))


# --------------------------------------------------------------------------- building blocks


def covariate_sizes(covariates) -> dict[str, int]:
    """Covariate name -> number of values; an int ``n`` means one covariate with ``n`` values."""
    if isinstance(covariates, Mapping):
        return {str(k): int(v) for k, v in covariates.items()}
    if isinstance(covariates, (int, np.integer)):
        return {"cov0": int(covariates)} if covariates > 0 else {}
    return {f"cov{i}": int(v) for i, v in enumerate(covariates)}


def split_covariates(cov: torch.Tensor, sizes: Mapping[str, int]) -> dict[str, torch.Tensor]:
    """The concatenated one-hot blocks of ``InputEncoder.covariate`` as one tensor per covariate."""
    return dict(zip(sizes, torch.split(cov, list(sizes.values()), dim=1))) if sizes else {}


def mlp(input_dim: int, hidden_dim: int, output_dim: int, n_layers: int, dropout: float | None,
        elementwise_affine: bool = False) -> pb.MLP:
    """``modelcore/nn/mlp.py: MLP``; ``elementwise_affine`` affects the first LayerNorm only."""
    net = pb.MLP(input_dim, hidden_dim, output_dim, n_layers, dropout)
    if elementwise_affine:
        net.layers[1] = nn.LayerNorm(hidden_dim, elementwise_affine=True)
    return net


def _vae_stack(input_dim: int, hidden_dim: int, n_layers: int, dropout: float | None) -> nn.Sequential:
    """Body of ``VariationalEncoder`` / ``VariationalDecoder``: n_layers + 1 blocks of Linear,
    LayerNorm (with affine parameters), ReLU, Dropout."""
    layers: list[nn.Module] = []
    for i in range(n_layers + 1):
        layers += [nn.Linear(input_dim if i == 0 else hidden_dim, hidden_dim), nn.LayerNorm(hidden_dim), nn.ReLU()]
        if dropout is not None:
            layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


class VariationalEncoder(nn.Module):
    def __init__(self, input_dim: int, hidden_dim: int, latent_dim: int, n_layers: int, dropout: float | None):
        super().__init__()
        self.network = _vae_stack(input_dim, hidden_dim, n_layers, dropout)
        self.mu_x = nn.Linear(hidden_dim, latent_dim)
        self.var_x = nn.Linear(hidden_dim, latent_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.network(x)
        return self.mu_x(h), self.var_x(h)  # mean and log variance


class VariationalDecoder(nn.Module):
    def __init__(self, output_dim: int, hidden_dim: int, latent_dim: int, n_layers: int, dropout: float | None):
        super().__init__()
        self.network = _vae_stack(latent_dim, hidden_dim, n_layers, dropout)
        self.mu_z = nn.Linear(hidden_dim, output_dim)
        self.var_z = nn.Linear(hidden_dim, output_dim)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.network(z)
        return self.mu_z(h), torch.exp(self.var_z(h))  # mean and variance


def _soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``nn.CrossEntropyLoss()(logits, target)`` with a float (multi-hot / one-hot) target."""
    return F.cross_entropy(logits, target)


# --------------------------------------------------------------------------- network


CPA_DEFAULTS: dict[str, Any] = {  # CPA.__init__ defaults (modelcore/models/cpa.py)
    "n_latent": 128, "recon_loss": "gauss", "hidden_dim": 256, "n_layers_encoder": 3, "n_layers_pert_emb": 2,
    "n_layers_covar_emb": 1, "adv_classifier_hidden_dim": 128, "adv_classifier_n_layers": 2,
    "variational": True, "kl_weight": 1.0, "adv_weight": 1.0, "dropout": 0.1, "penalty_weight": 10.0,
    "adv_steps": 7, "use_adversary": True, "use_covariates": True, "softplus_output": False,
    "elementwise_affine": False, "release": "neurips2024", "n_warmup_epochs": 5,
}
RELEASES = ("neurips2024", "neurips2025")


def _frozen(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)`` with its parameters held fixed: gradients reach ``x`` only (Lightning's toggle_optimizer
    for the generative step of the later release's CPA)."""
    return torch.func.functional_call(module, {k: v.detach() for k, v in module.named_parameters()}, (x,))


class CPANet(nn.Module):
    uses_control = False  # trained to reconstruct each cell from itself

    def __init__(self, n_genes: int, n_perts: int, covariates, cfg: Mapping[str, Any]):
        super().__init__()
        c = {**CPA_DEFAULTS, **{k: v for k, v in dict(cfg).items() if v is not None or k == "dropout"}}
        self.release = str(c["release"])
        if self.release not in RELEASES:
            raise ValueError(f"model.release must be one of {RELEASES}, not {self.release!r}")
        self.n_warmup_epochs = int(c["n_warmup_epochs"] or 0)
        if str(c["recon_loss"]).lower() != "gauss":
            raise NotImplementedError("only recon_loss 'gauss' is implemented (PerturBench's CPA decodes a Gaussian)")
        self.sizes = covariate_sizes(covariates)
        latent, hidden = int(c["n_latent"]), int(c["hidden_dim"])
        dropout = pb._opt_dropout(c["dropout"])
        affine = bool(c["elementwise_affine"])
        self.variational = bool(c["variational"])
        self.use_adversary = bool(c["use_adversary"])
        self.use_covariates = bool(c["use_covariates"])
        self.softplus_output = bool(c["softplus_output"])
        self.kl_weight, self.adv_weight = float(c["kl_weight"]), float(c["adv_weight"])
        self.penalty_weight, self.adv_steps = float(c["penalty_weight"]), int(c["adv_steps"])
        # covariates with more than one value get an embedding and an adversary (``covars_encoder``)
        self.embedded = {k: n for k, n in self.sizes.items() if n > 1} if self.use_covariates else {}
        n_layers = int(c["n_layers_encoder"])
        self.encoder = VariationalEncoder(n_genes, hidden, latent, n_layers, dropout)
        if self.release == "neurips2025":  # DeepIsotropicGaussian: an MLP to the mean, no variance head
            self.decoder = pb.MLP(latent, hidden, n_genes, n_layers, dropout)
        else:
            self.decoder = VariationalDecoder(n_genes, hidden, latent, n_layers, dropout)  # as deep as the encoder
        self.pert_network = mlp(n_perts, hidden, latent, int(c["n_layers_pert_emb"]), dropout, affine)
        adv_h, adv_n = int(c["adv_classifier_hidden_dim"]), int(c["adv_classifier_n_layers"])
        if self.use_adversary:
            self.perturbation_adversary_classifier = mlp(latent, adv_h, n_perts, adv_n, dropout, affine)
        self.covars_embeddings = nn.ModuleDict({
            k: mlp(n, hidden, latent, int(c["n_layers_covar_emb"]), dropout, affine) for k, n in self.embedded.items()})
        if self.use_adversary:
            self.covars_adversary_classifiers = nn.ModuleDict({
                k: mlp(latent, adv_h, n, adv_n, dropout, affine) for k, n in self.embedded.items()})

    # -- pieces

    def inference(self, x: torch.Tensor, pert: torch.Tensor, cov: torch.Tensor) -> dict[str, torch.Tensor]:
        mu, log_var = self.encoder(x)
        scale = torch.exp(log_var).sqrt()
        z_basal = mu + scale * torch.randn_like(mu) if self.variational else mu
        z = z_basal + self.pert_network(pert)
        blocks = split_covariates(cov, self.sizes)
        for key in self.embedded:
            z = z + self.covars_embeddings[key](blocks[key])
        return {"z": z, "z_basal": z_basal, "mu": mu, "scale": scale, "covs": blocks}

    def _decode(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Decoder mean (softplus'ed when ``softplus_output``) and variance (None: the later release's MSE decoder)."""
        mean, var = (self.decoder(z), None) if self.release == "neurips2025" else self.decoder(z)
        return (F.softplus(mean) if self.softplus_output else mean), var

    def forward(self, control: torch.Tensor, pert: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
        """Counterfactual prediction: the decoder mean for ``control`` cells given ``pert``."""
        return self._decode(self.inference(control, pert, cov)["z"])[0]

    def _adversary(self, inf, pert: torch.Tensor, z_basal: torch.Tensor, penalty: bool, frozen: bool = False):
        """Classifier cross-entropies on ``z_basal`` and, with ``penalty``, the gradient penalty."""
        call = _frozen if frozen else (lambda m, x: m(x))
        logits = {key: call(self.covars_adversary_classifiers[key], z_basal) for key in self.embedded}
        pert_logits = call(self.perturbation_adversary_classifier, z_basal)
        adv = sum((_soft_cross_entropy(logits[k], inf["covs"][k]) for k in self.embedded), z_basal.new_zeros(()))
        adv = adv + _soft_cross_entropy(pert_logits, pert)
        pen = torch.zeros_like(adv)
        if penalty:
            for out in [*logits.values(), pert_logits]:
                grad = torch.autograd.grad(out.sum(), z_basal, create_graph=True, retain_graph=True, only_inputs=True)[0]
                pen = pen + grad.pow(2).mean()
        return adv, pen

    def step_loss(self, x: torch.Tensor, pert: torch.Tensor, cov: torch.Tensor, batch_idx: int, epoch: int) -> torch.Tensor:
        """The later release's manual optimisation (``CPA.training_step``, fc13a8c) as one loss whose gradient
        reaches exactly the parameters the stepped optimiser holds (the others get no gradient, so Adam skips
        them -- the same update as upstream's two Adam optimisers with equal lr and weight decay):

        * warm-up (``epoch <= n_warmup_epochs``): ``recon + kl_weight * KL`` -> generative modules;
        * then, batches with ``batch_idx % adv_steps == 0``: ``recon + kl_weight * KL - adv_weight * adv``
          -> generative modules (the encoder is trained *against* the classifiers, which stay fixed);
        * other batches: ``adv_weight * adv + penalty_weight * penalty`` on a detached ``z_basal`` ->
          classifiers only (with ``use_adversary: false`` that loss is 0 and nothing is updated)."""
        inf = self.inference(x, pert, cov)
        warm_up = bool(self.n_warmup_epochs) and epoch <= self.n_warmup_epochs
        if warm_up or batch_idx % self.adv_steps == 0:
            mean, _ = self._decode(inf["z"])
            gen = (x - mean).pow(2).sum(dim=-1).mean() + self.kl_weight * self._kl(inf)
            if warm_up or not self.use_adversary:
                return gen
            return gen - self.adv_weight * self._adversary(inf, pert, inf["z_basal"], penalty=False, frozen=True)[0]
        if not self.use_adversary:
            return torch.zeros((), device=x.device, requires_grad=True)
        z_basal = inf["z_basal"].detach().requires_grad_(True)
        adv, pen = self._adversary(inf, pert, z_basal, penalty=True)
        return self.adv_weight * adv + self.penalty_weight * pen

    def _kl(self, inf) -> torch.Tensor:
        """KL(Normal(mu, scale) || Normal(0, 1)) summed over latents, mean over cells (torch.distributions' form)."""
        if not self.variational:
            return torch.zeros((), device=inf["mu"].device)
        var_ratio = inf["scale"].pow(2)
        return (0.5 * (var_ratio + inf["mu"].pow(2) - 1 - var_ratio.log())).sum(dim=1).mean()

    def loss(self, x: torch.Tensor, pert: torch.Tensor, cov: torch.Tensor, batch_idx: int,
             training: bool, batch_cells: int | None = None) -> dict[str, torch.Tensor]:
        """Every term is a mean over the cells, so ``batch_cells`` (the global batch of a data-parallel
        share) changes nothing."""
        inf = self.inference(x, pert, cov)
        mean, var = self._decode(inf["z"])
        if var is None:  # the later release: DeepIsotropicGaussian's MSE summed over genes
            recon = (x - mean).pow(2).sum(dim=-1).mean()
        else:  # Normal(mean, sqrt(var)).log_prob(x), summed over genes
            recon = -(-((x - mean) ** 2) / (2 * var) - var.sqrt().log() - _HALF_LOG_2PI).sum(dim=-1).mean()
        zero = torch.zeros_like(recon)
        kl = self._kl(inf)
        penalise = training and batch_idx % self.adv_steps != 0 and self.release == "neurips2024"
        adv, penalty = self._adversary(inf, pert, inf["z_basal"], penalise) if self.use_adversary else (zero, zero)
        if self.release == "neurips2025":  # CPA.loss: total_loss = recon + kl_weight * kl - adv_weight * adv
            total = recon + self.kl_weight * kl - self.adv_weight * adv
        else:
            total = recon + self.kl_weight * kl + self.adv_weight * adv
            if penalise:
                total = total + self.penalty_weight * penalty
        return {"loss": total, "recon": recon, "kl": kl, "adv": adv, "penalty": penalty}


def upstream_parameter_count(net: CPANet, n_perts: int, cfg: Mapping[str, Any]) -> int:
    """Parameters PerturBench's CPA holds: with ``use_adversary: false`` it still builds the
    (unused) classifiers, which this implementation leaves out."""
    n = pb.count_parameters(net)
    if net.use_adversary:
        return n
    c = {**CPA_DEFAULTS, **dict(cfg)}
    latent, h, k = int(c["n_latent"]), int(c["adv_classifier_hidden_dim"]), int(c["adv_classifier_n_layers"])
    with torch.device("meta"):
        extra = [mlp(latent, h, n_perts, k, None)]
        if net.use_covariates:
            extra += [mlp(latent, h, size, k, None) for size in net.embedded.values()]
    return n + sum(pb.count_parameters(m) for m in extra)


# --------------------------------------------------------------------------- cells and trainer


_CellSet, _cells = pb._CellSet, pb._cells  # cells that are their own targets


class _SelfReconstructionModel(pb._PerturBenchModel):
    """PerturBench models trained on cells reconstructing themselves (CPA, Biolord): the trainer of
    ``perturbench_baselines`` with the model's own cell set and loss (``net.loss``). The networks have
    LayerNorm, no BatchNorm, so under data parallel a process's share of a batch is normalised as it would be
    in one process."""

    def _prepare(self, train: ad.AnnData, val: ad.AnnData | None, params, control_label: str):
        add_controls = bool(params.get("data", {}).get("add_controls", True))

        def cells_of(adata):
            if adata is None or not add_controls:
                return adata
            return adata[~adata.obs[IS_CONTROL].to_numpy(dtype=bool)]

        train_cells = cells_of(train)
        if train_cells.n_obs == 0:
            raise ValueError("no training cells")
        encoder = pb.InputEncoder.fit(train_cells.obs, params.get("covariates") or [], control_label)
        val_cells = cells_of(val)
        val_data = _cells(val_cells, encoder) if val_cells is not None and val_cells.n_obs else None
        return encoder, _cells(train_cells, encoder), val_data

    def _build(self, encoder: pb.InputEncoder, n_genes: int, params: Mapping[str, Any]) -> nn.Module:
        return self.build_net(n_genes, encoder.n_perts, {k: len(v) for k, v in encoder.covariates.items()}, params)

    def _train_loss(self, net: nn.Module, batch, index_in_epoch: int, batch_cells: int) -> torch.Tensor:
        x, _, pert, cov = batch
        return net.loss(x, pert, cov, index_in_epoch, training=True, batch_cells=batch_cells)["loss"]

    def _eval_loss(self, net: nn.Module, batch, index: int) -> torch.Tensor:
        x, _, pert, cov = batch
        return net.loss(x, pert, cov, index, training=False)["loss"]


class CPA(_SelfReconstructionModel):
    """PerturBench ``CPA`` (``use_adversary: true``) and CPA (noAdv) (``use_adversary: false``)."""

    NET = CPANet
    KIND = "cpa"

    def build_net(self, n_genes: int, n_perts: int, covariates, params: Mapping[str, Any]) -> nn.Module:
        return CPANet(n_genes, n_perts, covariates, params.get("model", {}))

    def _train_loss(self, net: nn.Module, batch, index_in_epoch: int, batch_cells: int) -> torch.Tensor:
        if net.release != "neurips2025":
            return super()._train_loss(net, batch, index_in_epoch, batch_cells)
        if current_world().size > 1:  # every step leaves a module without gradient, which plain DDP rejects
            raise NotImplementedError("the later release's CPA (model.release: neurips2025) trains in one process")
        x, _, pert, cov = batch
        return net.step_loss(x, pert, cov, index_in_epoch, getattr(net, "current_epoch", 0))

    def _fit_info(self, net: nn.Module, params) -> dict[str, Any]:
        return {"release": net.release, "use_adversary": net.use_adversary, "n_warmup_epochs": net.n_warmup_epochs}


__all__: Sequence[str] = ["CPA", "CPANet", "upstream_parameter_count"]

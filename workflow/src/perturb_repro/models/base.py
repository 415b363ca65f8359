"""The model interface every method implements, and the registry the config's ``type`` names."""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Protocol

import anndata as ad
import numpy as np

from ..data.pca import PCABasis


@dataclass
class ModelContext:
    """What a model may know about its dataset besides the cells: all of it derived from train data."""

    dataset: str
    control_label: str
    pca: PCABasis
    embeddings: dict[str, np.ndarray] = field(default_factory=dict)
    seed: int = 0


class PerturbationModel(Protocol):
    """``fit`` writes everything ``sample`` needs into ``checkpoint_dir``; ``sample`` reads only that."""

    def fit(
        self,
        train: ad.AnnData,
        val: ad.AnnData,
        context: ModelContext,
        params: Mapping[str, Any],
        checkpoint_dir: Path,
    ) -> None: ...

    def sample(
        self,
        checkpoint_dir: Path,
        conditions: list[str],
        control: ad.AnnData,
        n_cells: int,
        context: ModelContext,
        params: Mapping[str, Any],
        sampling: Mapping[str, Any],
    ) -> dict[str, np.ndarray]:
        """Return gene-space cells (log scale, >= 0) per condition: ``n_cells`` rows for generative
        models; baselines may return the control set (so their means are exact)."""
        ...


# type -> "module:Class". Modules import lazily so a baseline job never imports JAX.
MODEL_REGISTRY: dict[str, str] = {
    "control_mean": "perturb_repro.models.baselines:ControlMean",
    "additive": "perturb_repro.models.baselines:Additive",
    "cellflow": "perturb_repro.models.cellflow:CellFlowModel",
    "linear": "perturb_repro.models.perturbench_baselines:LinearAdditive",
    "latent_additive": "perturb_repro.models.perturbench_baselines:LatentAdditive",
    "decoder_only": "perturb_repro.models.perturbench_baselines:DecoderOnly",
    "cpa": "perturb_repro.models.cpa:CPA",  # CPA (noAdv): preset with model.use_adversary false
    "biolord": "perturb_repro.models.biolord:Biolord",
    "sams_vae": "perturb_repro.models.sams_vae:SAMSVAE",  # SAMS-VAE (S): preset with model.sparse_additive_mechanism true
    "scgpt": "perturb_repro.models.scgpt:ScGPTModel",
    "primeflow": "perturb_repro.models.primeflow:PRiMeFlowModel",
    "scldm": "perturb_repro.models.scldm:ScLDMModel",
}

# Private modules a model's code also lives in: a change to them retrains the model too.
MODEL_EXTRA_SOURCES: dict[str, list[str]] = {
    "scgpt": ["perturb_repro.models._scgpt_loading", "perturb_repro.models.scgpt_network",
              "perturb_repro.models.scgpt_tokens", "perturb_repro.models.scgpt_training"],
    "primeflow": ["perturb_repro.models._unet1d", "perturb_repro.models._flow"],
    "scldm": ["perturb_repro.models._scldm_nets", "perturb_repro.models._scldm_counts", "perturb_repro.models._flow"],
    "cpa": ["perturb_repro.models.perturbench_baselines"],
    "biolord": ["perturb_repro.models.cpa", "perturb_repro.models.perturbench_baselines"],
    "sams_vae": ["perturb_repro.models.perturbench_baselines"],
}


# The framework a model's jobs compute with (what the GPU guard asks for accelerators); default torch.
MODEL_FRAMEWORK: dict[str, str] = {"cellflow": "jax", "control_mean": "none", "additive": "none"}


def framework_of(model_type: str) -> str:
    return MODEL_FRAMEWORK.get(model_type, "torch")


def get_model(model_type: str) -> PerturbationModel:
    try:
        target = MODEL_REGISTRY[model_type]
    except KeyError:
        raise ValueError(f"unknown model type '{model_type}'; known: {sorted(MODEL_REGISTRY)}") from None
    module, cls = target.split(":")
    return getattr(importlib.import_module(module), cls)()

"""The model interface every method implements, and the registry the config's ``type`` names."""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, TypeVar

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


T = TypeVar("T")


def job_cached(model: object, key: tuple, build: Callable[[], T]) -> T:
    """``build()`` once per ``key`` for the life of ``model``, then the same object.

    ``steps.predict_step`` makes one model object per sampling job and calls its ``sample`` once per
    (group, condition); keying what ``sample`` loads (weights, keyed by checkpoint dir) or compiles (a jitted
    solver, keyed by the sampler settings it depends on, never the per-condition seed) here makes a job load
    its checkpoint and compile once. A new job (or a retrained checkpoint) gets a new model object."""
    cache = model.__dict__.setdefault("_job_cache", {})
    if key not in cache:
        cache[key] = build()
    return cache[key]


def checkpoint_key(checkpoint_dir) -> str:
    return str(Path(checkpoint_dir).resolve())


@dataclass(frozen=True)
class ModelSpec:
    """Everything the workflow knows about a model type, in one place: the rules (which inputs, which stages),
    the config check (which parameters) and the jobs (which framework) all read it.

    ``target``            "module:Class", imported only by the jobs (a baseline job never imports JAX)
    ``esm2``              "yes": conditions on ESM2 gene embeddings, the dataset must configure ``esm2``;
                          "optional": uses them when the dataset has ``esm2`` (PRiMeFlow: unseen perturbations);
                          "no": never reads them
    ``stages``            training jobs in order; ("autoencoder", "train"): a first job (train_autoencoder) whose
                          output the main training job reads (scLDM)
    ``extra_sources``     private modules the model's code also lives in: a change to them retrains the model
    ``pretrained_files``  files of ``params.pretrained_dir`` (a pretrained checkpoint): inputs of training,
                          provided by the fetch_pretrained rule (scGPT's checkpoint layout)
    ``framework``         what the model's jobs compute with (what the GPU guard asks for accelerators)
    ``from_dataset``      parameters taken from the dataset's config block unless the preset or the entry's
                          overrides set them (``covariates``: the dataset owns its covariate columns)
    ``solvers``           the ``sampling.solver`` values its sampler integrates with (the config check refuses
                          others before any job runs, so a run never records one solver and integrates another)

    The parameter schema is ``workflow/schemas/models/<type>.schema.yaml`` (:func:`params_schema_path`).
    """

    target: str
    esm2: str = "no"
    stages: tuple[str, ...] = ("train",)
    extra_sources: tuple[str, ...] = ()
    pretrained_files: tuple[str, ...] = ()
    framework: str = "torch"
    from_dataset: tuple[str, ...] = ()
    solvers: tuple[str, ...] = ("euler",)

    def __post_init__(self):
        if self.esm2 not in ("yes", "optional", "no"):
            raise ValueError(f"ModelSpec.esm2 must be yes, optional or no, not {self.esm2!r}")
        if self.stages not in (("train",), ("autoencoder", "train")):
            raise ValueError(f"ModelSpec.stages must be ('train',) or ('autoencoder', 'train'), not {self.stages!r}")


_PB = "perturb_repro.models."
_COV = ("covariates",)
# Adding a model type: its module, its preset file (config/presets/<type>.yaml), its parameter schema
# (workflow/schemas/models/<type>.schema.yaml), one line here, and its test.
MODEL_SPECS: dict[str, ModelSpec] = {
    "control_mean": ModelSpec(_PB + "baselines:ControlMean", framework="none"),
    "additive": ModelSpec(_PB + "baselines:Additive", framework="none"),
    "cellflow": ModelSpec(_PB + "cellflow:CellFlowModel", esm2="yes", framework="jax",
                          solvers=("euler", "tsit5", "dopri5")),  # diffrax's
    "linear": ModelSpec(_PB + "perturbench_baselines:LinearAdditive", from_dataset=_COV),
    "latent_additive": ModelSpec(_PB + "perturbench_baselines:LatentAdditive", from_dataset=_COV),
    "decoder_only": ModelSpec(_PB + "perturbench_baselines:DecoderOnly", from_dataset=_COV),
    # CPA (noAdv): preset with model.use_adversary false
    "cpa": ModelSpec(_PB + "cpa:CPA", extra_sources=(_PB + "perturbench_baselines",), from_dataset=_COV),
    "biolord": ModelSpec(_PB + "biolord:Biolord", extra_sources=(_PB + "cpa", _PB + "perturbench_baselines"),
                         from_dataset=_COV),
    # SAMS-VAE (S): preset with model.sparse_additive_mechanism true
    "sams_vae": ModelSpec(_PB + "sams_vae:SAMSVAE", extra_sources=(_PB + "perturbench_baselines",), from_dataset=_COV),
    "scgpt": ModelSpec(_PB + "scgpt:ScGPTModel", esm2="yes",
                       extra_sources=(_PB + "_scgpt_loading", _PB + "scgpt_network", _PB + "scgpt_tokens",
                                      _PB + "scgpt_training"),
                       pretrained_files=("args.json", "vocab.json", "best_model.pt")),
    "primeflow": ModelSpec(_PB + "primeflow:PRiMeFlowModel", esm2="optional",
                           extra_sources=(_PB + "_unet1d", _PB + "_flow"), from_dataset=_COV),
    "scldm": ModelSpec(_PB + "scldm:ScLDMModel", stages=("autoencoder", "train"),
                       extra_sources=(_PB + "_scldm_nets", _PB + "_scldm_counts", _PB + "_flow"),
                       from_dataset=_COV, solvers=("euler", "dopri5")),  # _flow.integrate's
}

# Views of the specs under their older names (tests and jobs read these).
MODEL_REGISTRY: dict[str, str] = {kind: spec.target for kind, spec in MODEL_SPECS.items()}
MODEL_EXTRA_SOURCES: dict[str, list[str]] = {k: list(s.extra_sources) for k, s in MODEL_SPECS.items() if s.extra_sources}

SCHEMA_DIR = Path(__file__).resolve().parents[3] / "schemas" / "models"


def spec_of(model_type: str) -> ModelSpec:
    try:
        return MODEL_SPECS[model_type]
    except KeyError:
        raise ValueError(f"unknown model type '{model_type}'; known: {sorted(MODEL_SPECS)}") from None


def params_schema_path(model_type: str) -> Path:
    """The JSON schema of a model type's parameters (preset + overrides)."""
    return SCHEMA_DIR / f"{model_type}.schema.yaml"


def framework_of(model_type: str) -> str:
    return spec_of(model_type).framework


def get_model(model_type: str) -> PerturbationModel:
    try:
        target = MODEL_REGISTRY[model_type]
    except KeyError:
        raise ValueError(f"unknown model type '{model_type}'; known: {sorted(MODEL_REGISTRY)}") from None
    module, cls = target.split(":")
    return getattr(importlib.import_module(module), cls)()

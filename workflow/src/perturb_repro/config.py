"""Config helpers shared by the Snakefile and the jobs: presets, per-model parameters, run pairs."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Mapping

import yaml

from .errors import PipelineInputError

PRESET_DIR = Path(__file__).resolve().parents[3] / "config" / "presets"


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(dict(base))
    for key, value in (override or {}).items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def preset_name(model_cfg: Mapping[str, Any], dataset: str | None = None) -> str | None:
    """The preset a model uses on ``dataset``: papers tune per dataset (PRiMeFlow's Appendix E, PerturBench's
    best-params files), so ``preset_by_dataset`` names one per dataset; ``preset`` is the fallback."""
    by_dataset = model_cfg.get("preset_by_dataset") or {}
    if dataset is not None and dataset in by_dataset:
        return by_dataset[dataset]
    return model_cfg.get("preset")


def model_params(
    model_cfg: Mapping[str, Any], preset_dir: Path = PRESET_DIR, dataset: str | None = None
) -> dict[str, Any]:
    """A model's hyper-parameters on ``dataset``: its preset file's named preset, then the config's overrides."""
    preset = preset_name(model_cfg, dataset)
    params: dict[str, Any] = {}
    if preset:
        path = Path(preset_dir) / f"{model_cfg['type']}.yaml"
        if not path.exists():
            raise PipelineInputError(path, "preset", f"no preset file for model type '{model_cfg['type']}'")
        presets = yaml.safe_load(path.read_text()) or {}
        if preset not in presets:
            raise PipelineInputError(path, preset, f"preset not found; available: {sorted(presets)}")
        params = presets[preset]
    return deep_merge(params, model_cfg.get("overrides") or {})


PRESET_SAMPLING_KEY = "sampling"  # a preset's own sampler settings (e.g. scLDM's 50 timesteps), not a training key


def training_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """A model's parameters without its preset's ``sampling`` block: what training jobs see (a sampler change
    does not retrain), and what sample() gets beside the merged sampling settings."""
    return {k: v for k, v in params.items() if k != PRESET_SAMPLING_KEY}


def sampling_settings(
    global_sampling: Mapping[str, Any], model_cfg: Mapping[str, Any], params: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The sampler of one model entry: the global ``sampling``, then its preset's ``sampling`` block (the
    paper's sampler, e.g. scLDM.CD4's 50 timesteps), then the entry's own ``sampling``."""
    preset = dict((params or {}).get(PRESET_SAMPLING_KEY) or {})
    return {**global_sampling, **preset, **(model_cfg.get("sampling") or {})}


def run_pairs(config: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Every configured (dataset, model) pair, in config order."""
    return [(d, m) for d, cfg in config["datasets"].items() for m in cfg.get("models", [])]

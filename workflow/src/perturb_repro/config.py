"""Config helpers shared by the Snakefile and the jobs: presets, per-model parameters (validated against their
type's schema), run pairs, and the cross-reference checks the config schema cannot express."""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path
from typing import Any, Mapping

import jsonschema
import yaml

from .errors import PipelineInputError
from .models.base import MODEL_SPECS, params_schema_path, spec_of

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
    model_cfg: Mapping[str, Any],
    preset_dir: Path = PRESET_DIR,
    dataset: str | None = None,
    dataset_cfg: Mapping[str, Any] | None = None,
    entry: str | None = None,
) -> dict[str, Any]:
    """A model's hyper-parameters on ``dataset``: its preset file's named preset, then the config's overrides, then
    what its type takes from the dataset (``ModelSpec.from_dataset``, e.g. ``covariates``) where neither set it.
    Checked against the type's parameter schema: an unknown key fails, naming the model entry, preset and key."""
    spec = spec_of(model_cfg["type"])
    preset = preset_name(model_cfg, dataset)
    params: dict[str, Any] = {}
    path = Path(preset_dir) / f"{model_cfg['type']}.yaml"
    if preset:
        if not path.exists():
            raise PipelineInputError(path, "preset", f"no preset file for model type '{model_cfg['type']}'")
        presets = _preset_file(str(path), path.stat().st_mtime_ns)
        if preset not in presets:
            raise PipelineInputError(path, preset, f"preset not found; available: {sorted(presets)}")
        params = presets[preset]
    params = deep_merge(params, model_cfg.get("overrides") or {})
    for key in spec.from_dataset:
        if key not in params and dataset_cfg is not None and key in dataset_cfg:
            params[key] = copy.deepcopy(dataset_cfg[key])
    check_params(params, model_cfg["type"], where=_where(entry, model_cfg, preset, path, dataset))
    return params


@functools.lru_cache(maxsize=64)
def _preset_file(path: str, mtime_ns: int) -> dict[str, Any]:
    """A preset file's presets, parsed once per version of the file: the Snakefile resolves every job's params
    through :func:`model_params`, and parsing the YAML each time made a paper-config dry run take minutes.
    Callers get deep copies (:func:`deep_merge`), so the cached value is never mutated."""
    return yaml.load(Path(path).read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)) or {}


def _where(entry, model_cfg, preset, path, dataset) -> str:
    who = f"models.{entry}" if entry else f"a '{model_cfg['type']}' model entry"
    source = f"preset '{preset}' of {_shown(path)}" if preset else "no preset"
    on = f" on dataset '{dataset}'" if dataset else ""
    return f"{who} ({source}{' + overrides' if model_cfg.get('overrides') else ''}{on})"


@functools.lru_cache(maxsize=None)
def _validator(model_type: str) -> jsonschema.protocols.Validator:
    path = params_schema_path(model_type)
    if not path.exists():
        raise PipelineInputError(path, model_type, "no parameter schema for this model type")
    schema = yaml.safe_load(path.read_text())
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def check_params(params: Mapping[str, Any], model_type: str, where: str = "") -> None:
    """Refuse parameters the type's schema does not know (or of the wrong type), naming the key's dotted path."""
    _check_once(json.dumps(params, sort_keys=True, default=str), model_type, where)


@functools.lru_cache(maxsize=4096)
def _check_once(params_json: str, model_type: str, where: str) -> None:
    """check_params of one params value (the Snakefile resolves the same entry's params once per rule and job)."""
    params = json.loads(params_json)
    errors = sorted(_validator(model_type).iter_errors(params), key=lambda e: list(e.absolute_path))
    if not errors:
        return
    error = errors[0]
    path = ".".join(str(p) for p in error.absolute_path)
    if error.validator == "additionalProperties":
        extra = sorted(set(error.instance) - set(error.schema.get("properties", {})))
        keys = ", ".join(f"'{path + '.' if path else ''}{k}'" for k in extra)
        problem = f"unknown parameter {keys} (not in {_shown(params_schema_path(model_type))})"
    else:
        problem = f"parameter '{path}': {error.message}"
    raise PipelineInputError(f"config: {where}" if where else model_type, path or "params", problem)


def _shown(path: Path) -> str:
    """A repository path relative to the repository (what a user edits), else as it is."""
    try:
        return str(Path(path).resolve().relative_to(PRESET_DIR.parents[1]))
    except ValueError:
        return str(path)


def check_config(config: Mapping[str, Any]) -> None:
    """Cross-references the JSON schema cannot check: model types, model keys, presets and their parameters,
    checkpoint owners, per-dataset presets, table datasets, pretrained files. (Gene embeddings: common.smk.)"""
    for key, entry in config["models"].items():
        if entry["type"] not in MODEL_SPECS:
            raise ValueError(f"config: models.{key}.type '{entry['type']}' is not one of {sorted(MODEL_SPECS)}")
    for dataset, model in run_pairs(config):
        if model not in config["models"]:
            raise ValueError(f"config: datasets.{dataset}.models names '{model}', which is not a key of models")
        entry = config["models"][model]
        # a missing preset or an unknown parameter fails now, naming the entry, the preset file and the key
        params = model_params(entry, dataset=dataset, dataset_cfg=config["datasets"][dataset], entry=model)
        check_solver(model, entry, sampling_settings(config.get("sampling") or {}, entry, params))
        owner = entry.get("shares_checkpoint_with")
        if owner and (owner not in config["models"] or config["models"][owner].get("shares_checkpoint_with")):
            raise ValueError(f"config: models.{model}.shares_checkpoint_with names '{owner}', not a model that trains")
    for key, entry in config["models"].items():
        for ds in entry.get("preset_by_dataset", {}):
            if ds not in config["datasets"]:
                raise ValueError(f"config: models.{key}.preset_by_dataset names unknown dataset '{ds}'")
    for name, table in config.get("tables", {}).items():
        for paper_ds, run_ds in table["datasets"].items():
            if run_ds not in config["datasets"]:
                raise ValueError(f"config: tables.{name}.datasets.{paper_ds} names unknown dataset '{run_ds}'")
    known_files = {f for spec in MODEL_SPECS.values() for f in spec.pretrained_files}
    for name, checkpoint in config.get("pretrained", {}).items():
        for file in set(checkpoint) - {"how_to_get"} - known_files:
            raise ValueError(f"config: pretrained.{name}.{file} is not a pretrained file of any model type "
                             f"(known: {sorted(known_files)})")


def check_solver(model: str, model_cfg: Mapping[str, Any], sampling: Mapping[str, Any]) -> None:
    """Refuse a ``sampling.solver`` the model type does not integrate with (its spec's ``solvers``), rather than
    let it sample with another solver than the one recorded. Run by :func:`check_config` (every dry run) and again
    by each sampling job."""
    solver = str(sampling.get("solver") or "euler")
    allowed = spec_of(model_cfg["type"]).solvers
    if solver not in allowed:
        raise PipelineInputError(f"config models.{model}", "sampling.solver",
                                 f"{solver!r} is not a sampler of model type '{model_cfg['type']}' (it has {list(allowed)})")


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

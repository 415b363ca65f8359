# Validated config, wildcard constraints from the config, and the input functions the rules share.
import hashlib
import json
import re

from snakemake.utils import validate

from perturb_repro.config import model_params, run_pairs
from perturb_repro.models.base import MODEL_EXTRA_SOURCES, MODEL_REGISTRY


validate(config, schema="../schemas/config.schema.yaml")

SRC = Path(workflow.basedir) / "workflow" / "src" / "perturb_repro"
ENV = "../../envs/pipeline.yaml"
PAIRS = run_pairs(config)
DATASETS = list(config["datasets"])
MODELS = sorted({m for _, m in PAIRS})
TABLES = list(config.get("tables", {}))


ESM2_MODELS = {"cellflow", "scgpt"}  # condition on ESM2 gene embeddings: the dataset must configure `esm2`
ESM2_OPTIONAL_MODELS = {"primeflow"}  # ESM2 only embeds perturbations unseen in training (none for drugs)


def _check_names():
    for key, entry in config["models"].items():
        if entry["type"] not in MODEL_REGISTRY:
            raise ValueError(f"config: models.{key}.type '{entry['type']}' is not one of {sorted(MODEL_REGISTRY)}")
    for dataset, model in PAIRS:
        if model not in config["models"]:
            raise ValueError(f"config: datasets.{dataset}.models names '{model}', which is not a key of models")
        model_params(config["models"][model], dataset=dataset)  # a missing preset fails now, naming its file
        if config["models"][model]["type"] in ESM2_MODELS and "esm2" not in config["datasets"][dataset]:
            raise ValueError(f"config: datasets.{dataset}.esm2 is missing, but model '{model}' needs ESM2 gene embeddings")
        owner = config["models"][model].get("shares_checkpoint_with")
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


_check_names()


wildcard_constraints:
    dataset="|".join(DATASETS) or "NONE",
    model="|".join(MODELS) or "NONE",
    table="|".join(TABLES) or "NONE",


def dataset_cfg(dataset):
    """What the data jobs need: not the model list or the description, so adding a model or
    rewording a description does not re-run the data chain (params are a rerun trigger)."""
    cfg = {k: v for k, v in config["datasets"][dataset].items() if k not in ("models", "description", "resources")}
    return dict(cfg, name=dataset)


def model_cfg(model):
    return config["models"][model]


def params_of(model, dataset):
    return model_params(config["models"][model], dataset=dataset)


def checkpoint_owner(model):
    """The model key whose training job produced the checkpoint this model samples from."""
    return config["models"][model].get("shares_checkpoint_with") or model


def sampling_of(model):
    """Global sampling settings with this model entry's own settings on top."""
    return {**config["sampling"], **config["models"][model].get("sampling", {})}


def params_hash(model, dataset):
    """Changes when a model's resolved hyper-parameters change, so Snakemake retrains."""
    return hashlib.sha256(json.dumps(params_of(model, dataset), sort_keys=True).encode()).hexdigest()[:12]


def raw_path(dataset):
    """Bundled files are read where they are; downloaded ones land under resources/raw/{dataset}/."""
    source = config["datasets"][dataset]["source"]
    if source.get("path"):
        return source["path"]
    name = Path(source.get("archive_member") or source["url"].rstrip("/").split("/")[-1]).name
    return f"resources/raw/{dataset}/{name}"


def model_resources(model, stage, key, default):
    """Per-model cluster resources: a stage block (``train``/``autoencoder``/``sample``) over the top-level keys."""
    block = config["models"][model].get("resources", {})
    return block.get(stage, {}).get(key, block.get(key, default))


def world_of(model, stage):
    """(nodes, GPU processes per node) of a training stage; (1, 1) for a one-process job."""
    nodes = int(model_resources(model, stage, "nodes", 1))
    gpus = int(model_resources(model, stage, "gpu", 0))
    return nodes, max(1, gpus)


def is_data_parallel(model, stage):
    nodes, per_node = world_of(model, stage)
    return nodes * per_node > 1


def data_parallel_models(stage):
    return [m for m in MODELS if is_data_parallel(m, stage)]


def model_constraint(models):
    """A wildcard pattern matching exactly these model keys (never-matching when empty)."""
    return "|".join(re.escape(m) for m in models) or "(?!x)x"


def needs_esm2(model, dataset):
    kind = config["models"][model]["type"]
    return kind in ESM2_MODELS or (kind in ESM2_OPTIONAL_MODELS and "esm2" in config["datasets"][dataset])


def esm2_input(wildcards):
    return f"results/{wildcards.dataset}/esm2.npz" if needs_esm2(wildcards.model, wildcards.dataset) else []


def model_source_files(model):
    """The model's code (its registry module): a change to it retrains the model."""
    kind = config["models"][model]["type"]
    modules = [MODEL_REGISTRY[kind].split(":")[0], *MODEL_EXTRA_SOURCES.get(kind, [])]
    return [str(SRC.parent / (name.replace(".", "/") + ".py")) for name in modules]


def all_targets():
    targets = [f"results/{d}/{m}/{name}" for d, m in PAIRS for name in ("metrics.csv", "perturbench.csv", "provenance.json")]
    targets += [f"results/tables/{t}.{ext}" for t in TABLES + ["scfate_table1"] for ext in ("csv", "md")]
    targets.append("results/report.html")
    return targets

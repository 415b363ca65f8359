# Validated config, wildcard constraints from the config, and the input functions the rules share.
import functools
import hashlib
import json
import re

from snakemake.utils import validate

from perturb_repro.config import check_config, model_params, run_pairs, sampling_settings, training_params
from perturb_repro.models.base import MODEL_SPECS, spec_of
from perturb_repro.targets import NON_DATASET_DIRS, NON_MODEL_DIRS

validate(config, schema="../schemas/config.schema.yaml")


_REQUIRED = object()


def config_at(path, default=_REQUIRED):
    """The config value at a slash-separated key path, like Snakemake's ``lookup(dpath=..., within=config)``; with
    ``{wildcard}`` fields, a function of the job's wildcards. A plain dict walk: ``lookup`` runs dpath over the
    whole config on every call, which was a third of a paper-config dry run (1,354 jobs)."""

    def walk(keys):
        node = config
        for key in keys.split("/"):
            if not isinstance(node, dict) or key not in node:
                if default is _REQUIRED:
                    raise LookupError(f"config: '{keys}' is not set ({key!r} missing)")
                return default
            node = node[key]
        return node

    if "{" in path:
        return lambda wildcards: walk(path.format(**dict(wildcards.items())))
    return walk(path)


SRC = Path(workflow.basedir) / "workflow" / "src" / "perturb_repro"
ENV = "../../envs/pipeline.yaml"
PAIRS = run_pairs(config)
DATASETS = list(config["datasets"])
MODELS = sorted({m for _, m in PAIRS})
TABLES = list(config.get("tables", {}))


def _check_embeddings():
    """Each model's gene embedding exists, and a dataset has ESM2 sequences for the models that need them
    (check_config, in perturb_repro/config.py, checks the rest: types, keys, presets, parameters)."""
    for dataset, model in PAIRS:
        embedding = embedding_of(model)
        if embedding not in gene_embeddings():
            raise ValueError(f"config: models.{model}.gene_embedding '{embedding}' is not a key of esm2.embeddings")
        if (
            needs_esm2(model, dataset)
            and embedding_spec(embedding)["kind"] == "esm2"
            and "esm2" not in config["datasets"][dataset]
        ):
            raise ValueError(
                f"config: datasets.{dataset}.esm2 is missing, but model '{model}' needs ESM2 gene embeddings"
            )


check_config(config)  # cross-references and every model entry's parameters (its type's schema)


# ---- Replicates (a model entry's `seeds`; issue 17) ---------------------------------------------------------
# An entry with two or more `seeds` is trained, sampled and scored once per seed. The {model} wildcard of the
# per-run rules (train, sample, score, provenance) then holds a *run key*, `<model>/seeds/<seed>`, so each run's
# files are results/{dataset}/{model}/seeds/{seed}/{checkpoint/, predictions.h5ad, metrics.csv, ...}, and
# results/{dataset}/{model}/metrics.csv, perturbench.csv and the per-condition tables are the aggregates over
# seeds (rules/replicates.smk). A replicate's seed is its training seed and the base of its per-condition sampling
# seeds (steps.condition_seed), in place of sampling.seed. One seed (the default) keeps the one-run layout (the
# run key is the model key); without `seeds` a run trains with the global sampling.seed and samples with the
# entry's, as before. Constraints list the configured run keys exactly, so {model} matches nothing else.
SEEDS_DIR = "seeds"


def declared_seeds(model):
    """An entry's `seeds`; for a sampling variant (shares_checkpoint_with) without its own, its owner's -- a CFG
    weight of a replicated model is replicated too, not its owner's first seed alone. None: neither sets any."""
    entry = config["models"][model]
    owner = entry.get("shares_checkpoint_with")
    seeds = entry.get("seeds") or (config["models"][owner].get("seeds") if owner in config["models"] else None)
    return [int(s) for s in seeds] if seeds else None


def seeds_of(model):
    """A model entry's replicate seeds, in config order (default: the one global sampling seed)."""
    return declared_seeds(model) or [int(config_at("sampling/seed"))]


def has_seeds(model):
    """Whether an entry's runs take their seeds from `seeds` rather than from the global sampling seed."""
    return declared_seeds(model) is not None


def is_replicated(model):
    return len(seeds_of(model)) > 1


def run_key(model, seed):
    """The {model} wildcard of one run of ``model`` (the model key itself when it has one seed)."""
    return f"{model}/{SEEDS_DIR}/{seed}" if is_replicated(model) else model


def run_keys(models):
    return [run_key(m, s) for m in models for s in seeds_of(m)]


def entry_of(run):
    """The config key of a run key (``primeflow_cfg1/seeds/3`` -> ``primeflow_cfg1``)."""
    return run.split("/", 1)[0]


def run_seed(run):
    """The training seed of a run (its replicate seed; the first of its entry's seeds for a one-run entry)."""
    model, _, rest = run.partition("/")
    return int(rest.rsplit("/", 1)[1]) if rest else seeds_of(model)[0]


def report_run(model):
    """The run whose predictions and loss curve the report draws for an entry: its first seed."""
    return run_key(model, seeds_of(model)[0])


def perturbench_options(wildcards):
    """``scoring.perturbench`` for one run. PerturBench breaks rank ties by an unseeded shuffle, so each of its runs
    draws anew; here a replicate's draws are seeded by the scoring seed plus the run's seed (replicates draw
    independently), while a one-run entry, and seed 0, keep the configured seed."""
    options = dict(config_at("scoring/perturbench", default={}))
    if is_replicated(entry_of(wildcards.model)):
        options["seed"] = int(options.get("seed", 0)) + run_seed(wildcards.model)
    return options


def seed_run_files(wildcards, name):
    """``name`` in every seed's run directory of a replicated entry, in seed order."""
    return [f"results/{wildcards.dataset}/{run}/{name}" for run in run_keys([wildcards.model])]


REPLICATED_MODELS = sorted(m for m in config["models"] if is_replicated(m))
RUNS = run_keys(config["models"])


def _check_seeds():
    """A variant samples each of its seeds from its owner's run of that seed: the owner must have them all."""
    for model, entry in config["models"].items():
        owner = entry.get("shares_checkpoint_with")
        if owner in config["models"] and not set(seeds_of(model)) <= set(seeds_of(owner)):
            raise ValueError(
                f"config: models.{model}.seeds {seeds_of(model)} are not all seeds of '{owner}' "
                f"{seeds_of(owner)}, whose checkpoints it samples from (shares_checkpoint_with)"
            )


_check_seeds()


# ---- Gene embeddings (esm2.embeddings; issue 16.3/16.5, 17.4) --------------------------------------------
# A model entry names its embedding (`gene_embedding`, default `esm2.embedding`); each embedding is one file per
# dataset, results/{dataset}/embeddings/{embedding}.npz, so CellFlow's t6_8M and scGPT+ESM's 15B live side by side.
ESM2_SHARED_KEYS = ("batch_size", "allow_missing", "uniprot_release", "taxon_id")
ENSEMBL_CANONICAL_FASTA = (
    "results/{dataset}/embeddings/ensembl_canonical_proteins.fasta"  # built from the data (its var ids)
)
EMBEDDING_DEFAULTS = {
    "kind": "esm2",
    "model": None,
    "pooling": "mean",
    "genes": "perturbed",
    "dtype": None,
    "sequences": None,
    "resources": {},
}


def gene_embeddings():
    """Name -> embedding entry; a config without `esm2.embeddings` has one, `esm2`, from `esm2.model`."""
    esm2 = config.get("esm2", {})
    return esm2.get("embeddings") or {"esm2": {"model": esm2.get("model", "tiny")}}


def embedding_spec(name):
    return {**EMBEDDING_DEFAULTS, **gene_embeddings()[name]}


def embedding_of(model):
    return (
        config["models"][entry_of(model)].get("gene_embedding")
        or config["esm2"].get("embedding")
        or next(iter(gene_embeddings()))
    )


def embedding_on_cpu(name):
    spec = embedding_spec(name)
    return spec["kind"] == "one_hot" or spec["model"] == "tiny"


def embedding_sequences(dataset, name):
    """The FASTA an ESM2 embedding reads: its own `sequences` (a path, or `ensembl_canonical` for the CellFlow
    card's Ensembl lookup), else the dataset's `esm2.sequences`."""
    chosen = embedding_spec(name)["sequences"]
    if chosen == "ensembl_canonical":
        return ENSEMBL_CANONICAL_FASTA.format(dataset=dataset)
    return chosen or config["datasets"][dataset]["esm2"]["sequences"]


def embedding_inputs(wildcards):
    inputs = {"split": f"results/{wildcards.dataset}/split.csv"}
    spec = embedding_spec(wildcards.embedding)
    if spec["kind"] == "esm2":
        inputs["sequences"] = embedding_sequences(wildcards.dataset, wildcards.embedding)
        if spec["model"] == "tiny":
            inputs["model"] = ESM2_TINY_DIR
        note = config["esm2"].get("uniprot_release_note")
        if note and spec["sequences"] != "ensembl_canonical":
            inputs["release_note"] = note
    return inputs


def embedding_model_path(wildcards):
    model = embedding_spec(wildcards.embedding)["model"]
    return ESM2_TINY_DIR if model == "tiny" else model


def embedding_resource(key):
    """An embedding's own `resources` (ESM2-15B needs ~40 GB to load in fp16), else the input-sized default."""
    sized = data_mem_mb("embed_genes") if key == "mem_mb" else data_runtime("embed_genes")

    def resource(wildcards, input, attempt):
        own = embedding_spec(wildcards.embedding)["resources"].get(key)
        return int(own) * attempt if own else sized(wildcards, input, attempt)

    return resource


def unknown_target(wildcards):
    """Input function of the unknown_* rules: they match only paths whose dataset, model or table is not
    configured, and this raises while the DAG is built, naming the unknown key and the configured ones (instead
    of Snakemake's generic "No rule to produce"). Works the same with or without --profile."""
    from perturb_repro.targets import target_problems

    if "unknown_table" in wildcards.keys():
        path = f"results/tables/{wildcards.unknown_table}.{wildcards.ext}"
    else:
        path = "results/" + "/".join(wildcards)
    models_of = {d: list(config["datasets"][d].get("models", [])) for d in DATASETS}
    problems = target_problems([path], DATASETS, MODELS, models_of, TABLES)
    raise ValueError("; ".join(problems) or f"target {path}: not produced by any rule")


def unknown_constraint(known):
    """A wildcard pattern matching one path component that is none of ``known``."""
    # a known name ends at a slash, at a dot (results/tables/<table>.csv) or at the end of the path
    return r"(?!(?:" + "|".join(re.escape(k) for k in known) + r")(?:[/.]|$))[^/]+" if known else r"[^/]+"


wildcard_constraints:
    dataset="|".join(DATASETS) or "NONE",
    embedding="|".join(re.escape(e) for e in gene_embeddings()) or "NONE",
    model="|".join(re.escape(r) for r in RUNS) or "NONE",  # run keys (see "Replicates")
    table="|".join(TABLES) or "NONE",


def dataset_cfg(dataset):
    """What the data jobs need: not the model list or the description, so adding a model or
    rewording a description does not re-run the data chain (params are a rerun trigger)."""
    cfg = {k: v for k, v in config["datasets"][dataset].items() if k not in ("models", "description", "resources")}
    return dict(cfg, name=dataset)


def model_cfg(model):
    """The entry of a model or run key, without `seeds` (adding a seed must not re-run the other seeds)."""
    return {k: v for k, v in config["models"][entry_of(model)].items() if k != "seeds"}


def spec(model):
    """The ModelSpec of a model key's type (perturb_repro.models.base.MODEL_SPECS)."""
    return spec_of(config["models"][entry_of(model)]["type"])


def params_of(model, dataset):
    """Hyper-parameters without the preset's `sampling` block (that goes into sampling_of): a sampler change
    does not retrain."""
    return training_params(
        model_params(
            config["models"][entry_of(model)],
            dataset=dataset,
            dataset_cfg=config["datasets"][dataset],
            entry=entry_of(model),
        )
    )


def checkpoint_owner(model):
    """The run key whose training job produced the checkpoint this run samples from (same replicate seed)."""
    owner = config["models"][entry_of(model)].get("shares_checkpoint_with")
    return run_key(owner, run_seed(model)) if owner else model


def sampling_of(model, dataset=None):
    """Global sampling settings, then the preset's `sampling` block on `dataset` (none without one), then the
    model entry's own settings (perturb_repro.config.sampling_settings); an entry with `seeds` (its own or, for a
    sampling variant, its owner's) samples each run with its replicate seed."""
    entry = config["models"][entry_of(model)]
    preset = model_params(entry, dataset=dataset) if dataset is not None else None
    seed = {"seed": run_seed(model)} if has_seeds(entry_of(model)) else {}
    return {**sampling_settings(config["sampling"], entry, preset), **seed}


def params_hash(model, dataset):
    """Changes when a model's resolved hyper-parameters change, so Snakemake retrains."""
    return hashlib.sha256(json.dumps(params_of(model, dataset), sort_keys=True).encode()).hexdigest()[:12]


def raw_path(dataset):
    """Bundled files are read where they are; downloaded ones land under resources/raw/{dataset}/."""
    source = config["datasets"][dataset]["source"]
    if source.get("path"):
        return source["path"]
    name = Path(source.get("archive_member") or source["url"]).name  # a URL's last segment
    return f"resources/raw/{dataset}/{name}"


# What a model job asks for when its entry's `resources` (or that block's stage block) does not say.
MODEL_RESOURCE_DEFAULTS = {
    "train": {"gpu": 0, "nodes": 1, "mem_mb": 4000, "runtime": 60, "cpus": 1},
    "autoencoder": {"gpu": 0, "nodes": 1, "mem_mb": 4000, "runtime": 60, "cpus": 1},
    "sample": {"gpu": 0, "nodes": 1, "mem_mb": 4000, "runtime": 30, "cpus": 1},
}


def model_resources(model, stage, key):
    """Per-model cluster resources: a stage block (``train``/``autoencoder``/``sample``) over the top-level keys
    over the stage's default."""
    block = config["models"][entry_of(model)].get("resources", {})
    return block.get(stage, {}).get(key, block.get(key, MODEL_RESOURCE_DEFAULTS[stage][key]))


def stage_resources(stage):
    """The `resources:` of a one-process model job of ``stage`` (train_model, train_autoencoder, sample_model)."""
    return {
        "gpu": lambda w: model_resources(w.model, stage, "gpu"),
        "mem_mb": lambda w: model_resources(w.model, stage, "mem_mb"),
        "runtime": lambda w: model_resources(w.model, stage, "runtime"),
        "cpus_per_task": lambda w: model_resources(w.model, stage, "cpus"),
    }


def data_parallel_resources(stage):
    """The `resources:` of a data-parallel training job: one SLURM job of N nodes x G tasks. `mpi` makes the SLURM
    plugin run the job script once in the allocation (not under `srun -n1`); the script then starts one process per
    GPU with srun (distributed.launch). gpu is the job's total for `sbatch --gpus`."""
    return {
        **stage_resources(stage),
        "gpu": lambda w: world_of(w.model, stage)[0] * world_of(w.model, stage)[1],
        "nodes": lambda w: world_of(w.model, stage)[0],
        "tasks_per_node": lambda w: world_of(w.model, stage)[1],
        "mpi": "srun",
    }


def world_of(model, stage):
    """(nodes, GPU processes per node) of a training stage; (1, 1) for a one-process job."""
    nodes = int(model_resources(model, stage, "nodes"))
    gpus = int(model_resources(model, stage, "gpu"))
    return nodes, max(1, gpus)


def is_data_parallel(model, stage):
    nodes, per_node = world_of(model, stage)
    return nodes * per_node > 1


def data_parallel_models(stage):
    return run_keys(m for m in config["models"] if is_data_parallel(m, stage))


def model_constraint(models):
    """A wildcard pattern matching exactly these model keys (never-matching when empty)."""
    return "|".join(re.escape(m) for m in models) or "(?!x)x"


def needs_esm2(model, dataset):
    need = spec(model).esm2
    return need == "yes" or (need == "optional" and "esm2" in config["datasets"][dataset])


def esm2_input(wildcards):
    """The model's gene-embedding file (its `gene_embedding`), if its type conditions on one."""
    if not needs_esm2(wildcards.model, wildcards.dataset):
        return []
    return f"results/{wildcards.dataset}/embeddings/{embedding_of(wildcards.model)}.npz"


def model_source_files(model):
    """The model's code (its registry module): a change to it retrains the model."""
    modules = [spec(model).target.split(":")[0], *spec(model).extra_sources]
    return [str(SRC.parent.joinpath(*name.split(".")).with_suffix(".py")) for name in modules]


def all_targets():
    targets = [f"results/{d}/{m}/{name}" for d, m in PAIRS for name in ("metrics.csv", "perturbench.csv")]
    targets += [f"results/{d}/{run}/provenance.json" for d, m in PAIRS for run in run_keys([m])]  # one per seed
    targets += [f"results/tables/{t}.{ext}" for t in TABLES + ["scfate_table1"] for ext in ("csv", "md")]
    targets.append("results/report.html")
    return targets


# ---- Resources from input size (data/prep rules; issue 15) -------------------------------------------------
# mem_mb and runtime (minutes) of split_conditions, preprocess_dataset, fit_pca, extract_test_truth and embed_genes grow
# with the bytes of the job's inputs: fixed + per_gb x input GB, times the attempt number (a retried job asks
# for more). The factors come from workflow/bench/bench_scale.py (peak RSS and CPU time of each step as a
# whole process at growing sizes, sparse raw counts; see workflow/bench/README.md), rounded up:
#   split       reads obs only                    memory ~ 0.1 x file, seconds per GB
#   preprocess  holds X sparse (+ counts copy when it normalises; a fixed panel is not copied again)
#                                                  memory ~ 3 x the raw CSR, ~10 min per GB on one core
#   fit_pca     backed, row chunks: G x G float64 twice + one 32 MB chunk + obs
#                                                  memory ~ 4 GB + 0.15 x file, time one G x G product per chunk
#   extract_test_truth  backed, dense X written in 16 MB row chunks; obs and sparse layers of kept cells in memory
#                                                  memory ~ 3 GB + 0.12 x file
# When an input does not exist yet (a dry run of config/config.yaml before anything is downloaded) its size is
# the dataset's estimate below, so `snakemake --profile slurm -n` already asks for a meaningful request.
# A dataset's `resources: {mem_mb: ...}` still overrides preprocess_dataset's memory, exactly (no scaling).
import os as _os

# On-disk GB of a paper dataset's raw file and of its processed.h5ad (cells x genes, stored as distributed):
#   norman    GEARS perturb_processed.h5ad, 91,205 x 5,045 log-normalised CSR (~30 % non-zero)  ~1.1 / 1.1
#   replogle  State-Replogle-Filtered replogle_concat.h5ad (~30 GB; X 643,413 x 6,546)          30 / 17 (dense f32)
#   cd4       ~22M cells x ~36k genes raw counts (CSR, ~5 % non-zero) read onto 3,699 genes      320 / 120 (X + counts)
#   norman19  PerturBench file, ~91k cells x ~5.7k genes, X + counts CSR                         2.5 / 1.5
#   srivatsan20  ~180k cells x ~5k genes, X + counts CSR                                          3 / 2
#   jiang24   ~1.6M cells x ~7k genes, X + counts CSR                                             30 / 15
DATA_SIZE_ESTIMATES_GB = {
    "norman": {"raw": 1.1, "processed": 1.1},
    "replogle": {"raw": 30.0, "processed": 17.0},
    "cd4": {"raw": 320.0, "processed": 120.0},
    "norman19": {"raw": 2.5, "processed": 1.5},
    "srivatsan20": {"raw": 3.0, "processed": 2.0},
    "jiang24": {"raw": 30.0, "processed": 15.0},
}
# rule -> (fixed MB, MB per input GB, fixed minutes, minutes per input GB); from bench_scale.py, rounded up
DATA_RESOURCE_MODEL = {
    "split_conditions": (1000, 100, 10, 1),
    "preprocess_dataset": (2000, 3000, 15, 10),
    "fit_pca": (4000, 150, 15, 5),  # bench: CD4 15-21 GB, mostly the obs of its 22M cells
    "extract_test_truth": (3000, 120, 10, 2),  # processed.h5ad opened lazily: obs + one chunk (X and layers on disk)
    "embed_genes": (4000, 1000, 30, 0),
}
# the streamed chunked-reader path: fixed MB (a window of 50,000 raw rows read, row-selected and panel-cut), MB per
# raw GB (the obs of its cells), minutes (one pass over the raw file); bench_scale.py projects ~6 GB and ~0.5 h CPU
# for CD4's 22M cells (reading 320 GB adds ~30 min at 200 MB/s)
CHUNKED_PREPROCESS = (8000, 50, 30, 2)
DATA_MEM_CAP_MB = 1_000_000
DATA_RUNTIME_CAP_MIN = 7 * 24 * 60


def _existing_gb(paths):
    return sum(_os.path.getsize(p) for p in paths if _os.path.isfile(str(p))) / 2**30


def data_input_gb(dataset, paths, kind):
    """GB of the inputs that exist; else the dataset's estimate (``kind``: raw or processed), else 1 GB."""
    size = _existing_gb(paths)
    if size > 0:
        return size
    return DATA_SIZE_ESTIMATES_GB.get(dataset, {}).get(kind, 1.0)


def _sized(step, kind, what):
    def resource(wildcards, input, attempt):
        fixed_mb, mb_per_gb, fixed_min, min_per_gb = DATA_RESOURCE_MODEL[step]
        gb = data_input_gb(wildcards.dataset, list(input), kind)
        reader = config["datasets"][wildcards.dataset]["source"].get("reader", "memory")
        if step == "preprocess_dataset" and reader == "backed_chunked":
            # streamed to the file (data/preprocess.py preprocess_streamed): obs + one reader window, not the matrix
            fixed_mb, mb_per_gb, fixed_min, min_per_gb = CHUNKED_PREPROCESS
        if what == "mem_mb":
            if step == "preprocess_dataset":
                override = config["datasets"][wildcards.dataset].get("resources", {}).get("mem_mb")
                if override:
                    return int(override)
            return int(min((fixed_mb + mb_per_gb * gb) * attempt, DATA_MEM_CAP_MB))
        return int(min((fixed_min + min_per_gb * gb) * attempt, DATA_RUNTIME_CAP_MIN))

    return resource


def data_mem_mb(rule, kind="raw"):
    """Resource callable ``(wildcards, input, attempt) -> mem_mb`` of a data rule (see the block comment)."""
    return _sized(rule, kind, "mem_mb")


def data_runtime(rule, kind="raw"):
    """Resource callable ``(wildcards, input, attempt) -> runtime`` (minutes) of a data rule."""
    return _sized(rule, kind, "runtime")


# ---- Sharded sampling (sampling.shards; issue 14 part 5) ---------------------------------------------------
# A model entry with `sampling: {shards: N}`, N > 1, samples its test conditions in N `sample_shard` jobs (each
# with the model's sample resources) and `merge_predictions` writes the same predictions.h5ad one `sample_model`
# job would (rows, obs names, X bytes, uns but `sample_seconds`). Shard i of N holds the entries k = i, i+N, ...
# of the sorted (group, condition) list (perturb_repro.steps.SHARD_RULE); every condition has its own seed
# (steps.SEED_RULE), so its cells do not depend on its shard. N = 1 keeps the one-job DAG.
from os.path import getsize as _shard_getsize, isfile as _shard_isfile


def sampling_shards(model):
    return int(sampling_of(model)["shards"])


def sampler_of(model, dataset=None):
    """sampling_of without `shards` (how the work is split, not how a cell is drawn): the sampling jobs' params,
    so changing the shard count does not make Snakemake think the sampler changed."""
    return {k: v for k, v in sampling_of(model, dataset).items() if k != "shards"}


SHARDED_MODELS = run_keys(sorted(m for m in config["models"] if sampling_shards(m) > 1))  # run keys
UNSHARDED_MODELS = run_keys(sorted(m for m in config["models"] if sampling_shards(m) == 1))


def sample_shard_files(wildcards):
    n = sampling_shards(wildcards.model)
    return [f"results/{wildcards.dataset}/{wildcards.model}/sample_shards/{i}-of-{n}.h5ad" for i in range(n)]


def merge_mem_mb(wildcards, input, attempt):
    """The merge streams X (backed shards, one (group, condition) block at a time; steps.merge_predictions_step):
    it holds obs of every cell plus one block, ~ 3 GB + 0.1 x the shards' bytes. Before the shards exist (a dry
    run) 16 GB or the model's sampling memory if that is less."""
    present = [p for p in input.shards if _shard_isfile(p)]
    if not present:
        return int(min(model_resources(wildcards.model, "sample", "mem_mb"), 16000) * attempt)
    mb = sum(_shard_getsize(p) for p in present) / 2**20
    return int(min((3000 + 0.1 * mb) * attempt, 1_000_000))


# Input functions of the stage files, kept here so that those files hold only rules.
import yaml

ESM2_TINY_DIR = "results/esm2/tiny_model"


# Every file name a pretrained checkpoint may have (fetch_pretrained's wildcard), from the model specs.
PRETRAINED_FILES = sorted({name for s in MODEL_SPECS.values() for name in s.pretrained_files})


def pretrained_input(wildcards):
    """The files of a model's pretrained checkpoint (``params.pretrained_dir``), so a fetch rule provides them."""
    directory = params_of(wildcards.model, wildcards.dataset).get("pretrained_dir")
    return [f"{directory}/{name}" for name in spec(wildcards.model).pretrained_files] if directory else []


def autoencoder_input(wildcards):
    """Models trained in two jobs (spec stages): the first stage's output is an input of the main training job."""
    if "autoencoder" in spec(wildcards.model).stages:
        return f"results/{wildcards.dataset}/{wildcards.model}/autoencoder"
    return []


@functools.lru_cache(maxsize=None)
def _table_spec(path):
    return yaml.load(Path(path).read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def table_runs(table):
    """(run dataset, model) pairs a table's cells need, split into configured and not configured."""
    spec = _table_spec(config["tables"][table]["spec"])  # parsed once: called per table job and target
    mapping = config["tables"][table]["datasets"]
    wanted = {(mapping.get(c["dataset"], c["dataset"]), c["model"]) for c in spec["cells"]}
    return sorted(p for p in wanted if p in PAIRS), sorted(p for p in wanted if p not in PAIRS)


def scfate_log_files(wildcards):
    """Each JSON/CSV log is an input, so adding or editing one re-runs the audit; [] if unset or absent."""
    from perturb_repro.tables.scfate_audit import log_files

    return [str(p) for p in log_files(config.get("audit", {}).get("scfate_logs") or None)]


# ---- Scoring: shards per (dataset, model), resources from the input size (issue 15) ------------------------
# `scoring.shards` is global, per dataset (`datasets.<d>.scoring.shards`) and per model entry
# (`models.<key>.scoring.shards`); the most specific wins. cell-eval shards split the test conditions (every
# shard with all controls); PerturBench shards split the covariate groups (perturb_repro/scoring/pb_shards.py).
# Memory/runtime follow the bytes a job reads: cell-eval ~3.5 x its share of both files, PerturBench ~1.6 x its
# predictions and ~5 x its truth (their in-memory copies of the cells; fitted by bench_scale.py --quick), plus a
# fixed part. PerturBench's time is dominated by the energy
# cross sums, (predicted cells x true cells x genes) per group: ~2,000 CPU s per (GB of predictions x GB of truth)
# at ~6,500 genes, split over shards and threads (measured with bench_scale.py; rounded up). Before the files exist
# (dry runs) the dataset's estimate below is used.
def score_shards(dataset, model):
    for scope in (
        config["models"][entry_of(model)].get("scoring") or {},
        config["datasets"][dataset].get("scoring") or {},
        config["scoring"],
    ):
        if scope.get("shards"):
            return int(scope["shards"])
    return 1


# GB of predictions.h5ad (1,000 cells per test condition, dense float32) and test_truth.h5ad of a paper dataset,
# and its number of covariate groups among the test cells (group_by; PerturBench's energy sums are within groups)
SCORING_SIZE_ESTIMATES = {
    "norman": (2.6, 0.9, 1),
    "replogle": (27.5, 3.1, 1),
    "cd4": (148.0, 50.0, 12),
    "norman19": (3.0, 0.6, 1),
    "srivatsan20": (2.0, 0.5, 3),
    "jiang24": (20.0, 4.0, 1),
}
# rule -> (fixed MB, MB per GB of predictions held, MB per GB of truth held, fixed minutes, minutes per GB held).
# bench_scale.py's fitted bytes per float32 byte: cell-eval ~3.7 (predictions) and ~3.3 (truth); PerturBench ~1.6
# and ~5 (its truth is copied per condition and in float64 for the t-tests); rounded up. The paper datasets' asks
# are checked against the bench's projections (workflow/bench/scale_projection.json; tests/test_config.py).
SCORING_RESOURCE_MODEL = {
    "score_celleval": (4000, 3500, 3500, 15, 6),
    "score_celleval_shard": (4000, 3500, 3500, 15, 6),
    # the shards' summaries, all in memory: 4 x (conditions + 1) x genes float64 (CD4 ~1.2 GB) and ~3 copies
    "score_celleval_cross": (8000, 0, 0, 15, 0),
    "score_perturbench": (3000, 1600, 5000, 15, 1),
    "score_perturbench_shard": (3000, 1600, 5000, 15, 1),
}
# energy cross sums: single-thread CPU s per (GB of one group's predictions x GB of its truth), at 3,699 genes
# (the cost per GB^2 falls as 1/genes: conservative for the wider panels)
PERTURBENCH_CPU_S_PER_GB2 = 3600
CONTROL_SHARE = 0.15  # share of a truth/prediction file that is control cells, read by every cell-eval shard


def _scoring_gb(wildcards, input):
    """(prediction GB, truth GB, covariate groups): the files' sizes when they exist, else the estimate."""
    est_pred, est_truth, groups = SCORING_SIZE_ESTIMATES.get(wildcards.dataset, (1.0, 0.5, 1))
    pred, truth = (_existing_gb([input.pred]), _existing_gb([input.truth]))
    if pred > 0 and truth > 0:
        return pred, truth, groups
    return est_pred, est_truth, groups


def _scoring_share(step, wildcards):
    """Share of both files one job of ``step`` holds: all, or one shard's conditions/groups (+ controls)."""
    n = score_shards(wildcards.dataset, wildcards.model)
    groups = SCORING_SIZE_ESTIMATES.get(wildcards.dataset, (0, 0, 1))[2]
    if step == "score_celleval_shard":  # its conditions + the controls of its groups (shards are sliced group by group)
        return min(1.0, 1.0 / n + CONTROL_SHARE * max(1.0 / groups, 1.0 / n))
    if step == "score_celleval_cross":  # the shards' summaries: a few rows per condition, no cells
        return 0.0
    if step == "score_perturbench_shard":  # its groups (assumed even; the whole truth is only streamed, for the PCA)
        return 1.0 / min(n, groups)
    if step in ("score_celleval", "score_perturbench") and n > 1:  # the merge: CSVs and the truth's obs only
        return 0.0
    return 1.0


def scoring_mem_mb(step):
    fixed_mb, mb_per_pred_gb, mb_per_truth_gb, _, _ = SCORING_RESOURCE_MODEL[step]

    def resource(wildcards, input, attempt):
        share = _scoring_share(step, wildcards)
        pred, truth, _ = _scoring_gb(wildcards, input) if share > 0 else (0.0, 0.0, 1)
        held = (mb_per_pred_gb * pred + mb_per_truth_gb * truth) * share
        return int(min((fixed_mb + held) * attempt, DATA_MEM_CAP_MB))

    return resource


def scoring_runtime(step):
    _, _, _, fixed_min, min_per_gb = SCORING_RESOURCE_MODEL[step]

    def resource(wildcards, input, attempt):
        share = _scoring_share(step, wildcards)
        pred, truth, groups = _scoring_gb(wildcards, input) if share > 0 else (0.0, 0.0, 1)
        minutes = fixed_min + min_per_gb * (pred + truth) * share
        if step.startswith("score_perturbench") and share > 0:  # sum over the job's groups of pred_g x truth_g
            threads = max(1, int(config["scoring"].get("threads", 1)))
            minutes += PERTURBENCH_CPU_S_PER_GB2 * pred * truth / groups * share / 60 / threads
        return int(min(minutes * attempt, DATA_RUNTIME_CAP_MIN))

    return resource


def celleval_inputs(w):
    """score_celleval's inputs: with scoring.shards > 1 also every shard's and the cross-condition scores."""
    base = {
        "pred": f"results/{w.dataset}/{w.model}/predictions.h5ad",
        "truth": f"results/{w.dataset}/test_truth.h5ad",
    }
    n = score_shards(w.dataset, w.model)
    if n > 1:
        base["shards"] = [f"results/{w.dataset}/{w.model}/score_shards/shard{i}_of_{n}.csv" for i in range(n)]
        base["cross"] = f"results/{w.dataset}/{w.model}/score_shards/cross.csv"
    return base


def celleval_summaries(w):
    """Every cell-eval shard's cross-condition summary (score_celleval_cross's input)."""
    n = score_shards(w.dataset, w.model)
    return [f"results/{w.dataset}/{w.model}/score_shards/shard{i}_of_{n}.summary.h5ad" for i in range(n)]


def perturbench_inputs(w):
    base = {
        "pred": f"results/{w.dataset}/{w.model}/predictions.h5ad",
        "truth": f"results/{w.dataset}/test_truth.h5ad",
    }
    n = score_shards(w.dataset, w.model)
    if n > 1:
        base["shards"] = [f"results/{w.dataset}/{w.model}/perturbench_shards/shard{i}_of_{n}.csv" for i in range(n)]
    return base


_check_embeddings()  # last: it uses the input helpers above

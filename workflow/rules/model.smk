# One training job and one sampling job per (dataset, model); GPU resources come from the model's config.


rule fetch_pretrained:
    output:
        "resources/pretrained/{checkpoint}/{file}",
    wildcard_constraints:
        file="|".join(re.escape(f) for f in PRETRAINED_FILES),
    params:
        source=config_at("pretrained/{checkpoint}/{file}", default={}),
        hint=config_at("pretrained/{checkpoint}/how_to_get", default=""),
    log:
        "logs/download/pretrained/{checkpoint}/{file}.log",
    benchmark:
        "benchmarks/download/pretrained/{checkpoint}/{file}.tsv"
    conda:
        ENV
    script:
        "../scripts/fetch_pretrained.py"


rule train_autoencoder:
    input:
        processed="results/{dataset}/processed.h5ad",
        pca="results/{dataset}/pca.npz",
        code=lambda w: model_source_files(w.model),
    output:
        directory("results/{dataset}/{model}/autoencoder"),
    params:
        model_cfg=lambda w: model_cfg(w.model),
        params=lambda w: params_of(w.model, w.dataset),
        params_hash=lambda w: params_hash(w.model, w.dataset),
        seed=lambda w: run_seed(w.model),
        stage="fit_autoencoder",
    log:
        "logs/train_autoencoder/{dataset}/{model}.log",
    benchmark:
        "benchmarks/train_autoencoder/{dataset}/{model}.tsv"
    threads: 1
    resources:
        **stage_resources("autoencoder"),
    conda:
        ENV
    script:
        "../scripts/train_model.py"


rule train_model:
    input:
        processed="results/{dataset}/processed.h5ad",
        pca="results/{dataset}/pca.npz",
        esm2=esm2_input,
        pretrained=pretrained_input,
        autoencoder=autoencoder_input,
        code=lambda w: model_source_files(w.model),
    output:
        directory("results/{dataset}/{model}/checkpoint"),
    params:
        model_cfg=lambda w: model_cfg(w.model),
        params=lambda w: params_of(w.model, w.dataset),
        params_hash=lambda w: params_hash(w.model, w.dataset),
        seed=lambda w: run_seed(w.model),
    log:
        "logs/train/{dataset}/{model}.log",
    benchmark:
        "benchmarks/train/{dataset}/{model}.tsv"
    threads: 1
    resources:
        **stage_resources("train"),
    conda:
        ENV
    script:
        "../scripts/train_model.py"


# Data-parallel training (resources: {train: {gpu: G, nodes: N}}): the same rule as one SLURM job of N nodes x G
# tasks (common.smk, data_parallel_resources).
use rule train_model as train_model_ddp with:
    wildcard_constraints:
        model=model_constraint(data_parallel_models("train")),
    resources:
        **data_parallel_resources("train"),


use rule train_autoencoder as train_autoencoder_ddp with:
    wildcard_constraints:
        model=model_constraint(data_parallel_models("autoencoder")),
    resources:
        **data_parallel_resources("autoencoder"),


ruleorder: train_model_ddp > train_model
ruleorder: train_autoencoder_ddp > train_autoencoder


# Sampling: one job per (dataset, model), or with `sampling.shards: N` > 1 N shard jobs and a merge (common.smk,
# "Sharded sampling"); the merged predictions.h5ad equals the one-job file.
rule sample_model:
    wildcard_constraints:
        model=model_constraint(UNSHARDED_MODELS),
    input:
        checkpoint=lambda w: f"results/{w.dataset}/{checkpoint_owner(w.model)}/checkpoint",
        truth="results/{dataset}/test_truth.h5ad",
        processed="results/{dataset}/processed.h5ad",
        pca="results/{dataset}/pca.npz",
        esm2=esm2_input,
    output:
        "results/{dataset}/{model}/predictions.h5ad",
    params:
        model_cfg=lambda w: model_cfg(w.model),
        params=lambda w: params_of(w.model, w.dataset),
        sampling=lambda w: sampler_of(w.model, w.dataset),
    log:
        "logs/sample/{dataset}/{model}.log",
    benchmark:
        "benchmarks/sample/{dataset}/{model}.tsv"
    threads: 1
    resources:
        **stage_resources("sample"),
    conda:
        ENV
    script:
        "../scripts/sample_model.py"


# One shard's share of the test conditions (shard 0..N-1 of N): predicted cells only, no controls. Same script as
# sample_model (it reads the shard wildcards), so the job-start checks there cover the shards too.
use rule sample_model as sample_shard with:
    wildcard_constraints:
        model=model_constraint(SHARDED_MODELS),
        shard=r"\d+",
        shards=r"\d+",
    output:
        "results/{dataset}/{model}/sample_shards/{shard}-of-{shards}.h5ad",
    log:
        "logs/sample_shard/{dataset}/{model}/{shard}-of-{shards}.log",
    benchmark:
        "benchmarks/sample_shard/{dataset}/{model}/{shard}-of-{shards}.tsv"


# The shards + the real controls in the one-job row order, X streamed block by block (small memory, no GPU).
rule merge_predictions:
    wildcard_constraints:
        model=model_constraint(SHARDED_MODELS),
    input:
        truth="results/{dataset}/test_truth.h5ad",
        shards=sample_shard_files,
    output:
        "results/{dataset}/{model}/predictions.h5ad",
    params:
        model_cfg=lambda w: model_cfg(w.model),
        sampling=lambda w: sampler_of(w.model, w.dataset),
    log:
        "logs/merge_predictions/{dataset}/{model}.log",
    benchmark:
        "benchmarks/merge_predictions/{dataset}/{model}.tsv"
    threads: 1
    resources:
        mem_mb=merge_mem_mb,
        runtime=lambda w, attempt: 30 * attempt,
    conda:
        ENV
    script:
        "../scripts/merge_predictions.py"

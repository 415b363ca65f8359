# One training job and one sampling job per (dataset, model); GPU resources come from the model's config.


rule train_model:
    input:
        processed="results/{dataset}/processed.h5ad",
        pca="results/{dataset}/pca.npz",
        esm2=esm2_input,
        code=lambda w: model_source_files(w.model),
    output:
        directory("results/{dataset}/{model}/checkpoint"),
    params:
        model_cfg=lambda w: model_cfg(w.model),
        params=lambda w: params_of(w.model),
        params_hash=lambda w: params_hash(w.model),
        seed=lambda w: config["sampling"].get("seed", 0),
    log:
        "logs/train/{dataset}/{model}.log",
    benchmark:
        "benchmarks/train/{dataset}/{model}.tsv"
    threads: 1
    resources:
        gpu=lambda w: model_resources(w.model, "train", "gpu", 0),
        mem_mb=lambda w: model_resources(w.model, "train", "mem_mb", 4000),
        runtime=lambda w: model_resources(w.model, "train", "runtime", 60),
        cpus_per_task=lambda w: model_resources(w.model, "train", "cpus", 1),
    conda:
        ENV
    script:
        "../scripts/train_model.py"


rule sample_model:
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
        params=lambda w: params_of(w.model),
        sampling=lambda w: sampling_of(w.model),
    log:
        "logs/sample/{dataset}/{model}.log",
    benchmark:
        "benchmarks/sample/{dataset}/{model}.tsv"
    threads: 1
    resources:
        gpu=lambda w: model_resources(w.model, "sample", "gpu", 0),
        mem_mb=lambda w: model_resources(w.model, "sample", "mem_mb", 4000),
        runtime=lambda w: model_resources(w.model, "sample", "runtime", 30),
        cpus_per_task=lambda w: model_resources(w.model, "sample", "cpus", 1),
    conda:
        ENV
    script:
        "../scripts/sample_model.py"

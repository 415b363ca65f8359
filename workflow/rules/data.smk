# Source -> split.csv -> processed.h5ad -> pca.npz / test_truth.h5ad. Statistics come from train cells only.


rule download_source:
    output:
        "resources/raw/{dataset}/{filename}",
    params:
        source=lambda w: config["datasets"][w.dataset]["source"],
    log:
        "logs/download/{dataset}/{filename}.log",
    benchmark:
        "benchmarks/download/{dataset}/{filename}.tsv"
    conda:
        ENV
    script:
        "../scripts/download_source.py"


rule split_conditions:
    input:
        raw=lambda w: raw_path(w.dataset),
    output:
        "results/{dataset}/split.csv",
    params:
        cfg=lambda w: dataset_cfg(w.dataset),
    log:
        "logs/split/{dataset}.log",
    benchmark:
        "benchmarks/split/{dataset}.tsv"
    conda:
        ENV
    script:
        "../scripts/split_conditions.py"


rule preprocess_dataset:
    input:
        raw=lambda w: raw_path(w.dataset),
        split="results/{dataset}/split.csv",
    output:
        h5ad="results/{dataset}/processed.h5ad",
        summary="results/{dataset}/summary.json",
    params:
        cfg=lambda w: dataset_cfg(w.dataset),
    log:
        "logs/preprocess/{dataset}.log",
    benchmark:
        "benchmarks/preprocess/{dataset}.tsv"
    resources:
        # the whole matrix is in memory here: paper-scale files set their own (datasets.<d>.resources.mem_mb)
        mem_mb=lambda w: config["datasets"][w.dataset].get("resources", {}).get("mem_mb", 16000),
    conda:
        ENV
    script:
        "../scripts/preprocess_dataset.py"


rule fit_pca:
    input:
        "results/{dataset}/processed.h5ad",
    output:
        "results/{dataset}/pca.npz",
    params:
        cfg=lambda w: dataset_cfg(w.dataset),
    log:
        "logs/pca/{dataset}.log",
    benchmark:
        "benchmarks/pca/{dataset}.tsv"
    conda:
        ENV
    script:
        "../scripts/fit_pca.py"


rule test_truth:
    input:
        "results/{dataset}/processed.h5ad",
    output:
        "results/{dataset}/test_truth.h5ad",
    log:
        "logs/truth/{dataset}.log",
    benchmark:
        "benchmarks/truth/{dataset}.tsv"
    conda:
        ENV
    script:
        "../scripts/test_truth.py"

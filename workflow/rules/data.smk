# Source -> split.csv -> processed.h5ad -> pca.npz / test_truth.h5ad. Statistics come from train cells only.


rule download_source:
    output:
        "resources/raw/{dataset}/{filename}",
    params:
        source=config_at("datasets/{dataset}/source"),
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
    resources:
        mem_mb=data_mem_mb("split_conditions"),
        runtime=data_runtime("split_conditions"),
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
        # the whole (sparse) matrix is in memory here: from the raw file's size, or datasets.<d>.resources.mem_mb
        mem_mb=data_mem_mb("preprocess_dataset"),
        runtime=data_runtime("preprocess_dataset"),
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
    resources:
        mem_mb=data_mem_mb("fit_pca", "processed"),
        runtime=data_runtime("fit_pca", "processed"),
    conda:
        ENV
    script:
        "../scripts/fit_pca.py"


rule extract_test_truth:
    input:
        "results/{dataset}/processed.h5ad",
    output:
        "results/{dataset}/test_truth.h5ad",
    log:
        "logs/truth/{dataset}.log",
    benchmark:
        "benchmarks/truth/{dataset}.tsv"
    resources:
        mem_mb=data_mem_mb("extract_test_truth", "processed"),
        runtime=data_runtime("extract_test_truth", "processed"),
    conda:
        ENV
    script:
        "../scripts/extract_test_truth.py"

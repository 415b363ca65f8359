# cell-eval scoring of one model's predictions against the real test cells.


rule score_predictions:
    input:
        pred="results/{dataset}/{model}/predictions.h5ad",
        truth="results/{dataset}/test_truth.h5ad",
    output:
        metrics="results/{dataset}/{model}/metrics.csv",
        per_condition="results/{dataset}/{model}/per_condition.csv",
    params:
        profile=config["scoring"]["profile"],
        control=lambda w: config["datasets"][w.dataset]["control_label"],
    log:
        "logs/score/{dataset}/{model}.log",
    benchmark:
        "benchmarks/score/{dataset}/{model}.tsv"
    threads: config["scoring"].get("threads", 1)
    resources:
        mem_mb=8000,
    conda:
        ENV
    script:
        "../scripts/score_predictions.py"


rule provenance:
    input:
        raw=lambda w: raw_path(w.dataset),
        processed="results/{dataset}/processed.h5ad",
        pca="results/{dataset}/pca.npz",
        checkpoint=lambda w: f"results/{w.dataset}/{checkpoint_owner(w.model)}/checkpoint",
        predictions="results/{dataset}/{model}/predictions.h5ad",
        metrics="results/{dataset}/{model}/metrics.csv",
    output:
        "results/{dataset}/{model}/provenance.json",
    params:
        settings=lambda w: {
            "dataset": dataset_cfg(w.dataset),
            "model": model_cfg(w.model),
            "params": params_of(w.model, w.dataset),
            "sampling": sampling_of(w.model),
            "scoring": config["scoring"],
            "esm2": config["esm2"],
        },
        seed=config["sampling"].get("seed", 0),
        benchmarks=lambda w: [
            f"benchmarks/{stage}/{w.dataset}/{w.model}.tsv" for stage in ("train", "sample", "score")
        ],
    log:
        "logs/provenance/{dataset}/{model}.log",
    conda:
        ENV
    script:
        "../scripts/provenance.py"


rule score_perturbench:
    input:
        pred="results/{dataset}/{model}/predictions.h5ad",
        truth="results/{dataset}/test_truth.h5ad",
    output:
        summary="results/{dataset}/{model}/perturbench.csv",
        per_condition="results/{dataset}/{model}/perturbench_per_condition.csv",
    params:
        control=lambda w: config["datasets"][w.dataset]["control_label"],
        options=config["scoring"].get("perturbench", {}),
    log:
        "logs/score_perturbench/{dataset}/{model}.log",
    benchmark:
        "benchmarks/score_perturbench/{dataset}/{model}.tsv"
    conda:
        ENV
    script:
        "../scripts/score_perturbench.py"

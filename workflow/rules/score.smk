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

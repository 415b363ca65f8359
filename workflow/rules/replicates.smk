# Replicates: a model entry with two or more `seeds` has one run per seed (results/{dataset}/{model}/seeds/{seed}/,
# common.smk "Replicates"); these rules write the entry's own metrics.csv / perturbench.csv (+ per-condition
# tables) as aggregates over its seeds, and the per-seed values in a long table (perturb_repro.scoring.replicates).


rule aggregate_celleval_seeds:
    wildcard_constraints:
        model=model_constraint(REPLICATED_MODELS),
    input:
        summaries=lambda w: seed_run_files(w, "metrics.csv"),
        per_conditions=lambda w: seed_run_files(w, "per_condition.csv"),
    output:
        summary="results/{dataset}/{model}/metrics.csv",
        per_condition="results/{dataset}/{model}/per_condition.csv",
        by_seed="results/{dataset}/{model}/metrics_by_seed.csv",
    params:
        scorer="celleval",
        seeds=lambda w: seeds_of(w.model),
        group_by=lambda w: config["datasets"][w.dataset].get("group_by") or [],
    log:
        "logs/aggregate_celleval_seeds/{dataset}/{model}.log",
    benchmark:
        "benchmarks/aggregate_celleval_seeds/{dataset}/{model}.tsv"
    conda:
        ENV
    script:
        "../scripts/aggregate_scores_over_seeds.py"


use rule aggregate_celleval_seeds as aggregate_perturbench_seeds with:
    input:
        summaries=lambda w: seed_run_files(w, "perturbench.csv"),
        per_conditions=lambda w: seed_run_files(w, "perturbench_per_condition.csv"),
    output:
        summary="results/{dataset}/{model}/perturbench.csv",
        per_condition="results/{dataset}/{model}/perturbench_per_condition.csv",
        by_seed="results/{dataset}/{model}/perturbench_by_seed.csv",
    params:
        scorer="perturbench",
        seeds=lambda w: seeds_of(w.model),
        group_by=lambda w: config["datasets"][w.dataset].get("group_by") or [],
    log:
        "logs/aggregate_perturbench_seeds/{dataset}/{model}.log",
    benchmark:
        "benchmarks/aggregate_perturbench_seeds/{dataset}/{model}.tsv"

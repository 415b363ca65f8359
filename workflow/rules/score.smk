# cell-eval scoring of one model's predictions against the real test cells.
#
# Rule names: score_<scorer>[_<part>] (score_celleval, score_celleval_shard, score_celleval_cross, score_perturbench).
# scoring.shards (global, per dataset or per model entry; common.smk score_shards) = 1: one job. > 1: score_celleval_shard scores each of N deterministic shards of the test
# conditions (every shard with the controls of its groups) and writes a summary of them (pseudobulks, centroids,
# e-distances), score_celleval_cross computes the cross-condition metrics (discrimination_score_*,
# pearson_edistance, clustering_agreement) over all conditions from those summaries (no cells), and
# score_celleval merges them into the same metrics.csv / per_condition.csv (aggregates recomputed from
# the merged table as cell-eval computes them). Predictions are always read from predictions.h5ad.


rule score_celleval:
    input:
        unpack(celleval_inputs),
    output:
        metrics="results/{dataset}/{model}/metrics.csv",
        per_condition="results/{dataset}/{model}/per_condition.csv",
    params:
        profile=config_at("scoring/profile"),
        control=config_at("datasets/{dataset}/control_label"),
        shards=lambda w: score_shards(w.dataset, w.model),
    log:
        "logs/score_celleval/{dataset}/{model}.log",
    benchmark:
        "benchmarks/score_celleval/{dataset}/{model}.tsv"
    threads: config_at("scoring/threads")
    resources:
        mem_mb=scoring_mem_mb("score_celleval"),
        runtime=scoring_runtime("score_celleval"),
    conda:
        ENV
    script:
        "../scripts/score_celleval.py"


rule score_celleval_shard:
    input:
        pred="results/{dataset}/{model}/predictions.h5ad",
        truth="results/{dataset}/test_truth.h5ad",
    output:
        results=temp("results/{dataset}/{model}/score_shards/shard{shard}_of_{n}.csv"),
        summary=temp("results/{dataset}/{model}/score_shards/shard{shard}_of_{n}.summary.h5ad"),
    wildcard_constraints:
        shard=r"\d+",
        n=r"\d+",
    params:
        profile=config_at("scoring/profile"),
        control=config_at("datasets/{dataset}/control_label"),
        shard=lambda w: int(w.shard),
        shards=lambda w: int(w.n),
    log:
        "logs/score_celleval/{dataset}/{model}.shard{shard}_of_{n}.log",
    benchmark:
        "benchmarks/score_celleval/{dataset}/{model}.shard{shard}_of_{n}.tsv"
    threads: config_at("scoring/threads")
    resources:
        mem_mb=scoring_mem_mb("score_celleval_shard"),
        runtime=scoring_runtime("score_celleval_shard"),
    conda:
        ENV
    script:
        "../scripts/score_celleval_shard.py"


rule score_celleval_cross:
    input:
        summaries=celleval_summaries,
        truth="results/{dataset}/test_truth.h5ad",
    output:
        temp("results/{dataset}/{model}/score_shards/cross.csv"),
    params:
        profile=config_at("scoring/profile"),
        control=config_at("datasets/{dataset}/control_label"),
        shard="cross",
    log:
        "logs/score_celleval/{dataset}/{model}.cross.log",
    benchmark:
        "benchmarks/score_celleval/{dataset}/{model}.cross.tsv"
    threads: config_at("scoring/threads")
    resources:
        mem_mb=scoring_mem_mb("score_celleval_cross"),
        runtime=scoring_runtime("score_celleval_cross"),
    conda:
        ENV
    script:
        "../scripts/score_celleval_shard.py"


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
            "sampling": sampling_of(w.model, w.dataset),
            "scoring": config["scoring"],
            "esm2": config["esm2"],
        },
        seed=lambda w: run_seed(w.model),
        benchmarks=lambda w: [
            f"benchmarks/{stage}/{w.dataset}/{w.model}.tsv"
            for stage in ("train", "sample", "score_celleval", "score_perturbench")
        ],
    log:
        "logs/provenance/{dataset}/{model}.log",
    benchmark:
        "benchmarks/provenance/{dataset}/{model}.tsv"
    conda:
        ENV
    script:
        "../scripts/provenance.py"


rule score_perturbench:
    input:
        unpack(perturbench_inputs),
    output:
        summary="results/{dataset}/{model}/perturbench.csv",
        per_condition="results/{dataset}/{model}/perturbench_per_condition.csv",
    params:
        control=config_at("datasets/{dataset}/control_label"),
        options=perturbench_options,
        shards=lambda w: score_shards(w.dataset, w.model),
    log:
        "logs/score_perturbench/{dataset}/{model}.log",
    benchmark:
        "benchmarks/score_perturbench/{dataset}/{model}.tsv"
    threads: config["scoring"].get("threads", 1)
    resources:
        mem_mb=scoring_mem_mb("score_perturbench"),
        runtime=scoring_runtime("score_perturbench"),
    conda:
        ENV
    script:
        "../scripts/score_perturbench.py"


# PerturBench in shards of covariate groups (scoring.shards > 1), merged by score_perturbench.
rule score_perturbench_shard:
    input:
        pred="results/{dataset}/{model}/predictions.h5ad",
        truth="results/{dataset}/test_truth.h5ad",
    output:
        temp("results/{dataset}/{model}/perturbench_shards/shard{shard}_of_{n}.csv"),
    wildcard_constraints:
        shard=r"\d+",
        n=r"\d+",
    params:
        control=lambda w: config["datasets"][w.dataset]["control_label"],
        options=perturbench_options,
        shard=lambda w: int(w.shard),
        shards=lambda w: int(w.n),
    log:
        "logs/score_perturbench/{dataset}/{model}.shard{shard}_of_{n}.log",
    benchmark:
        "benchmarks/score_perturbench/{dataset}/{model}.shard{shard}_of_{n}.tsv"
    threads: config["scoring"].get("threads", 1)
    resources:
        mem_mb=scoring_mem_mb("score_perturbench_shard"),
        runtime=scoring_runtime("score_perturbench_shard"),
    conda:
        ENV
    script:
        "../scripts/score_perturbench.py"

# Paper tables (reported vs reproduced, one status per cell), the scFATE log audit and the HTML report.

SCFATE_FETCH_STATUS = "resources/audit/scfate_hub/fetch_status.json"
SCFATE_HUB = config_at("audit/scfate_hub", default=None)  # None: no fetch; audit.scfate_logs is read


rule paper_table:
    input:
        spec=config_at("tables/{table}/spec"),
        metrics=lambda w: [f"results/{d}/{m}/metrics.csv" for d, m in table_runs(w.table)[0]],
        perturbench=lambda w: [f"results/{d}/{m}/perturbench.csv" for d, m in table_runs(w.table)[0]],
    output:
        csv=report(
            "results/tables/{table}.csv",
            caption="../report/paper_table.rst",
            category="Paper tables",
            labels={"table": "{table}"},
        ),
        md="results/tables/{table}.md",
    params:
        runs=lambda w: table_runs(w.table)[0],
        dataset_map=config_at("tables/{table}/datasets"),
        scale={d: c["scale"] for d, c in config["datasets"].items()},
    log:
        "logs/tables/{table}.log",
    benchmark:
        "benchmarks/tables/{table}.tsv"
    conda:
        ENV
    script:
        "../scripts/paper_table.py"


rule report:
    input:
        tables=expand("results/tables/{table}.csv", table=TABLES),
        audit="results/tables/scfate_table1.csv",
        scfate_fetch=[SCFATE_FETCH_STATUS] if SCFATE_HUB else [],
        metrics=[f"results/{d}/{m}/metrics.csv" for d, m in PAIRS],
        per_condition=[f"results/{d}/{m}/per_condition.csv" for d, m in PAIRS],
        perturbench=[f"results/{d}/{m}/perturbench.csv" for d, m in PAIRS],
        perturbench_per_condition=[f"results/{d}/{m}/perturbench_per_condition.csv" for d, m in PAIRS],
        splits=expand("results/{dataset}/split.csv", dataset=sorted({d for d, _ in PAIRS})),
        # a replicated entry's figures draw its first seed's run; its metrics are the aggregates over seeds
        predictions=[f"results/{d}/{report_run(m)}/predictions.h5ad" for d, m in PAIRS],
        checkpoints=[f"results/{d}/{checkpoint_owner(report_run(m))}/checkpoint" for d, m in PAIRS],
        truth=expand("results/{dataset}/test_truth.h5ad", dataset=sorted({d for d, _ in PAIRS})),
        pca=expand("results/{dataset}/pca.npz", dataset=sorted({d for d, _ in PAIRS})),
        summaries=expand("results/{dataset}/summary.json", dataset=sorted({d for d, _ in PAIRS})),
    output:
        report(
            "results/report.html",
            caption="../report/reproduction_report.rst",
            category="Report",
            labels={"name": "reproduction report"},
        ),
    params:
        pairs=PAIRS,
        tables=TABLES,
        pca_conditions=config_at("report/pca_conditions"),
        leaderboard_metrics=config_at("report/leaderboard_metrics"),
        subgroup_metrics=config_at("report/subgroup_metrics"),
        simple_baselines=config_at("report/simple_baselines"),
        model_types={m: config["models"][m]["type"] for m in MODELS},
        configfiles=[str(f) for f in workflow.configfiles],
        sources={d: config["datasets"][d]["source"] for d in DATASETS},
    log:
        "logs/report.log",
    benchmark:
        "benchmarks/report.tsv"
    conda:
        ENV
    script:
        "../scripts/report.py"


rule fetch_scfate_logs:
    # Never fails for lack of network: the status file says `unavailable` and why, and the audit reports it.
    # Re-run with network: snakemake --forcerun fetch_scfate_logs results/tables/scfate_table1.md
    output:
        status=SCFATE_FETCH_STATUS,
    params:
        hub=SCFATE_HUB or {},
    localrule: True
    log:
        "logs/fetch_scfate_logs.log",
    benchmark:
        "benchmarks/fetch_scfate_logs.tsv"
    conda:
        ENV
    script:
        "../scripts/fetch_scfate_logs.py"


rule scfate_table1_audit:
    input:
        spec="resources/paper_tables/scfate_table1.yaml",
        # the authors' logs from their Hugging Face repo when `audit.scfate_hub` is configured; else a local dir
        fetch=[SCFATE_FETCH_STATUS] if SCFATE_HUB else [],
        logs=scfate_log_files,
    output:
        csv=report(
            "results/tables/scfate_table1.csv",
            caption="../report/scfate_audit.rst",
            category="Claim audits",
            labels={"table": "scfate_table1"},
        ),
        md="results/tables/scfate_table1.md",
    params:
        logs_dir=config_at("audit/scfate_logs", default=""),
    log:
        "logs/tables/scfate_table1.log",
    benchmark:
        "benchmarks/tables/scfate_table1.tsv"
    conda:
        ENV
    script:
        "../scripts/scfate_audit.py"

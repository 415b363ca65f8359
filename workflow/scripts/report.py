from pathlib import Path

from perturb_repro.joblog import logged
from perturb_repro.report.html import build_report
from perturb_repro.provenance import collect_provenance
from perturb_repro.tables.scfate_fetch import files_summary, read_fetch_status

with logged(snakemake):
    inp = snakemake.input
    runs = [
        {
            "dataset": d, "model": m, "model_type": snakemake.params.model_types[m],
            "metrics_csv": inp.metrics[i], "per_condition_csv": inp.per_condition[i],
            "perturbench_csv": inp.perturbench[i], "perturbench_per_condition_csv": inp.perturbench_per_condition[i],
            "predictions": inp.predictions[i], "train_log_csv": f"{inp.checkpoints[i]}/train_log.csv",
            "truth": f"results/{d}/test_truth.h5ad", "pca": f"results/{d}/pca.npz",
        }
        for i, (d, m) in enumerate(snakemake.params.pairs)
    ]
    tables = [(csv, csv[: -len(".csv")] + ".md") for csv in inp.tables]
    provenance = collect_provenance(snakemake.params.configfiles, snakemake.params.sources, inp.summaries)
    for status_file in inp.scfate_fetch:
        fetch = read_fetch_status(status_file)
        provenance["scFATE logs (Hugging Face, sha256)"] = {
            "repo": f"{fetch['repo_id']}@{fetch['revision']} (commit {fetch['commit']})", "folder": fetch["folder"],
            "status": f"{fetch['status']}: {fetch['reason']}", "files": files_summary(fetch),
        }
    build_report(
        snakemake.output[0], tables, runs, provenance, n_pca_conditions=snakemake.params.pca_conditions,
        audits=[(inp.audit, "scFATE Table 1 audit: which saved log backs each printed number")],
        splits={Path(p).parent.name: p for p in inp.splits},
        leaderboard_metrics=snakemake.params.leaderboard_metrics, subgroup_metrics=snakemake.params.subgroup_metrics,
        simple_baselines=snakemake.params.simple_baselines,
    )

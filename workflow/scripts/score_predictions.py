from perturb_repro.joblog import logged
from perturb_repro.scoring.celleval import score

with logged(snakemake):
    score(
        snakemake.input.pred, snakemake.input.truth, "condition", snakemake.params.control,
        snakemake.output.metrics, snakemake.output.per_condition,
        profile=snakemake.params.profile, num_threads=snakemake.threads,
    )

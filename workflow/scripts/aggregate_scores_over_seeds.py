from perturb_repro.joblog import logged
from perturb_repro.scoring.replicates import aggregate_seed_files

with logged(snakemake):
    aggregate_seed_files(
        snakemake.params.scorer, snakemake.params.seeds, list(snakemake.input.summaries),
        list(snakemake.input.per_conditions), snakemake.params.group_by, snakemake.output.summary,
        snakemake.output.per_condition, snakemake.output.by_seed,
    )

from perturb_repro.joblog import logged
from perturb_repro.scoring.celleval import score
from perturb_repro.scoring.celleval_shards import merge_shards

with logged(snakemake):
    if snakemake.params.shards > 1:  # per-shard tables + the cross-condition pass -> the one-run files
        merge_shards(
            list(snakemake.input.shards), snakemake.input.cross, snakemake.input.truth, "condition",
            snakemake.params.control, snakemake.output.metrics, snakemake.output.per_condition,
            profile=snakemake.params.profile,
        )
    else:
        score(
            snakemake.input.pred, snakemake.input.truth, "condition", snakemake.params.control,
            snakemake.output.metrics, snakemake.output.per_condition,
            profile=snakemake.params.profile, num_threads=snakemake.threads,
        )

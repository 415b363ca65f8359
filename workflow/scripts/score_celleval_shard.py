from perturb_repro.joblog import logged
from perturb_repro.scoring.celleval_shards import score_cross, score_shard

with logged(snakemake):
    if snakemake.params.shard == "cross":
        score_cross(
            list(snakemake.input.summaries), snakemake.input.truth, "condition", snakemake.params.control,
            snakemake.output[0], profile=snakemake.params.profile,
        )
    else:
        score_shard(
            snakemake.input.pred, snakemake.input.truth, "condition", snakemake.params.control,
            int(snakemake.params.shard), int(snakemake.params.shards), snakemake.output.results,
            snakemake.output.summary, profile=snakemake.params.profile, num_threads=snakemake.threads,
        )

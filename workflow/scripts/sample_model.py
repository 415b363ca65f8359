from perturb_repro.joblog import logged
from perturb_repro.steps import predict_step

with logged(snakemake):
    shard = snakemake.wildcards.get("shard")  # rule sample_shard: one shard of the test conditions
    predict_step(
        snakemake.wildcards.dataset, snakemake.wildcards.model, snakemake.input.truth, snakemake.input.processed,
        snakemake.input.pca, snakemake.input.esm2 or None, snakemake.params.model_cfg, snakemake.params.params,
        snakemake.params.sampling, snakemake.input.checkpoint, snakemake.output[0],
        **({"shard": int(shard), "shards": int(snakemake.wildcards.shards)} if shard is not None else {}),
    )

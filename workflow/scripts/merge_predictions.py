from perturb_repro.joblog import logged
from perturb_repro.steps import merge_predictions_step

with logged(snakemake):
    merge_predictions_step(
        snakemake.wildcards.dataset, snakemake.wildcards.model, snakemake.input.truth, list(snakemake.input.shards),
        snakemake.params.model_cfg, snakemake.params.sampling, snakemake.output[0],
    )

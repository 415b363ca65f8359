from perturb_repro.joblog import logged
from perturb_repro.steps import train_step

with logged(snakemake):
    train_step(
        snakemake.wildcards.dataset, snakemake.input.processed, snakemake.input.pca, snakemake.input.esm2 or None,
        snakemake.params.model_cfg, snakemake.params.params, snakemake.output[0], int(snakemake.params.seed),
    )

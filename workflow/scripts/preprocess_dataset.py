from perturb_repro.joblog import logged
from perturb_repro.steps import preprocess_step

with logged(snakemake):
    preprocess_step(
        snakemake.input.raw, snakemake.input.split, snakemake.params.cfg,
        snakemake.output.h5ad, snakemake.output.summary,
    )

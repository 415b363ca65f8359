from perturb_repro.joblog import logged
from perturb_repro.steps import pca_step

with logged(snakemake):
    pca_step(snakemake.input[0], snakemake.params.cfg, snakemake.output[0])

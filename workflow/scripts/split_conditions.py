from perturb_repro.joblog import logged
from perturb_repro.steps import split_step

with logged(snakemake):
    split_step(snakemake.input.raw, snakemake.params.cfg, snakemake.output[0])

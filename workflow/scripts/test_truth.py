from perturb_repro.joblog import logged
from perturb_repro.steps import truth_step

with logged(snakemake):
    truth_step(snakemake.input[0], snakemake.output[0])

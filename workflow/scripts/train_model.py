from perturb_repro.joblog import logged
from perturb_repro.steps import train_job

with logged(snakemake):
    train_job(snakemake)

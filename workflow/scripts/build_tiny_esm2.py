from perturb_repro.joblog import logged
from perturb_repro.embed.tiny_esm import build_tiny_esm2

with logged(snakemake):
    build_tiny_esm2(snakemake.output[0], seed=0)

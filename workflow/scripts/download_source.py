from perturb_repro.joblog import logged
from perturb_repro.data.download import fetch_source

with logged(snakemake):
    fetch_source(snakemake.params.source, snakemake.output[0])

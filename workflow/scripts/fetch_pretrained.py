from perturb_repro.joblog import logged
from perturb_repro.models.pretrained import fetch_pretrained_file

with logged(snakemake):
    fetch_pretrained_file(snakemake.params.source, snakemake.params.hint, snakemake.output[0])

import json

from perturb_repro.io import write_text
from perturb_repro.joblog import logged
from perturb_repro.provenance import run_manifest

with logged(snakemake):
    inputs = {k: v for k, v in snakemake.input.items()}
    manifest = run_manifest(inputs, snakemake.params.settings, snakemake.params.seed, snakemake.params.benchmarks)
    write_text(json.dumps(manifest, indent=2), snakemake.output[0])

import pandas as pd

from perturb_repro.joblog import logged
from perturb_repro.embed.esm2 import run_esm2

with logged(snakemake):
    conditions = pd.read_csv(snakemake.input.split, keep_default_na=False)["condition"]
    run_esm2(
        conditions, snakemake.params.control, snakemake.input.sequences, snakemake.params.model,
        snakemake.output[0], batch_size=int(snakemake.params.batch_size),
        allow_missing=bool(snakemake.params.allow_missing), release=snakemake.params.release,
        release_note=snakemake.input.release_note or None, taxon_id=snakemake.params.taxon_id,
    )

import pandas as pd

from perturb_repro.joblog import logged
from perturb_repro.embed.embedding import run_embedding

with logged(snakemake):
    conditions = pd.read_csv(snakemake.input.split, keep_default_na=False)["condition"]
    run_embedding(
        snakemake.params.spec, conditions, snakemake.params.control, snakemake.output[0],
        sequences=snakemake.input.get("sequences") or None, model=snakemake.params.model,
        release_note=snakemake.input.get("release_note") or None, shared=snakemake.params.shared,
    )

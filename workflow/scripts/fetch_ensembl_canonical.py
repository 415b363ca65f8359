import pandas as pd

from perturb_repro.joblog import logged
from perturb_repro.embed.ensembl import fetch_canonical_fasta

with logged(snakemake):
    conditions = pd.read_csv(snakemake.input.split, keep_default_na=False)["condition"]
    fetch_canonical_fasta(conditions, snakemake.params.control, snakemake.input.processed, snakemake.output[0],
                          symbol_column=snakemake.params.symbol_column)

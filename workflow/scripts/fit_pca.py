from perturb_repro.data.pca import fit_pca_file
from perturb_repro.joblog import logged

with logged(snakemake):
    # processed.h5ad is opened backed: train cells are read in row chunks, never densified whole
    fit_pca_file(snakemake.input[0], snakemake.params.cfg, snakemake.output[0])

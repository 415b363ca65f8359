from perturb_repro.data.truth import write_test_truth
from perturb_repro.joblog import logged

with logged(snakemake):
    # processed.h5ad opened backed; the dense truth X is written in row chunks, never whole in memory
    write_test_truth(snakemake.input[0], snakemake.output[0])

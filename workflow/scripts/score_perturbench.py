from perturb_repro.joblog import logged
from perturb_repro.scoring.perturbench import score_perturbench

with logged(snakemake):
    options = dict(snakemake.params.options)
    score_perturbench(
        snakemake.input.pred, snakemake.input.truth, snakemake.params.control,
        snakemake.output.per_condition, snakemake.output.summary, pert_col="condition",
        seed=int(options.get("seed", 0)), n_deg=int(options.get("n_deg", 50)),
        pca_components=int(options.get("pca_components", 30)),
        options=options,  # rank_normalisation, distance_dtype, max_cells_per_condition, block_size, device
    )

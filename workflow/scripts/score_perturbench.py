from perturb_repro.joblog import logged
from perturb_repro.scoring.pb_shards import merge_perturbench, score_perturbench_shard
from perturb_repro.scoring.perturbench import score_perturbench

with logged(snakemake):
    options = dict(snakemake.params.options)  # rank_normalisation, distance_dtype, max_cells_per_condition, ...
    common = dict(pert_col="condition", seed=int(options.get("seed", 0)), n_deg=int(options.get("n_deg", 50)),
                  pca_components=int(options.get("pca_components", 30)), options=options)
    if hasattr(snakemake.params, "shard"):  # one shard of covariate groups (score_perturbench_shard)
        score_perturbench_shard(snakemake.input.pred, snakemake.input.truth, snakemake.params.control,
                                int(snakemake.params.shard), int(snakemake.params.shards), snakemake.output[0], **common)
    elif int(snakemake.params.shards) > 1:  # the shards' rows -> the one-run files
        merge_perturbench(list(snakemake.input.shards), snakemake.input.truth, snakemake.params.control,
                          snakemake.output.per_condition, snakemake.output.summary, **common)
    else:
        score_perturbench(snakemake.input.pred, snakemake.input.truth, snakemake.params.control,
                          snakemake.output.per_condition, snakemake.output.summary, **common)

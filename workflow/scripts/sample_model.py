from perturb_repro.devices import guard_job
from perturb_repro.joblog import logged
from perturb_repro.models.base import framework_of
from perturb_repro.steps import predict_step

with logged(snakemake):
    guard_job(snakemake, framework_of(snakemake.params.model_cfg["type"]))  # before any work: no silent CPU run
    predict_step(
        snakemake.wildcards.dataset, snakemake.wildcards.model, snakemake.input.truth, snakemake.input.processed,
        snakemake.input.pca, snakemake.input.esm2 or None, snakemake.params.model_cfg, snakemake.params.params,
        snakemake.params.sampling, snakemake.input.checkpoint, snakemake.output[0],
    )

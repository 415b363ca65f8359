from perturb_repro.joblog import logged
from perturb_repro.steps import train_step

with logged(snakemake):
    stage_inputs = {"_autoencoder_dir": snakemake.input.autoencoder} if snakemake.input.get("autoencoder") else None
    train_step(
        snakemake.wildcards.dataset, snakemake.input.processed, snakemake.input.pca, snakemake.input.get("esm2") or None,
        snakemake.params.model_cfg, snakemake.params.params, snakemake.output[0], int(snakemake.params.seed),
        stage=snakemake.params.get("stage", "fit"), stage_inputs=stage_inputs,
    )

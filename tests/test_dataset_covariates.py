"""Datasets own their covariates: a dataset whose covariate column is not `cell_type` runs the covariate-aware
models (linear, CPA, PRiMeFlow; tiny presets) with no per-model overrides, and the models use that column."""

import json

import anndata as ad
import pytest
import yaml

from perturb_repro.config import model_params
from workflow_helpers import REPO, copy_repo, snakemake

DEMO = yaml.safe_load((REPO / "config" / "demo.yaml").read_text())
MODELS = {"linear": {"type": "linear", "preset": "tiny"}, "cpa": {"type": "cpa", "preset": "tiny"},
          "primeflow": {"type": "primeflow", "preset": "tiny"}}


def _stimulation_config() -> dict:
    """The demo dataset with its covariate column renamed (a temp copy of the file), three models, no overrides."""
    dataset = dict(DEMO["datasets"]["norman_demo"], covariates=["stimulation"], models=list(MODELS))
    dataset["source"] = dict(dataset["source"], path="resources/demo/stimulation_demo.h5ad", sha256=None)
    return {**DEMO, "datasets": {"stim_demo": dataset}, "models": MODELS, "tables": {},
            "sampling": {**DEMO["sampling"], "steps": 5, "n_cells_per_condition": 10}}


def test_params_take_the_dataset_covariates_unless_set():
    stim = {"covariates": ["stimulation"]}
    for entry in MODELS.values():
        assert model_params(entry, dataset_cfg=stim)["covariates"] == ["stimulation"]
    override = {"type": "linear", "preset": "tiny", "overrides": {"covariates": []}}
    assert model_params(override, dataset_cfg=stim)["covariates"] == []
    # types that do not use covariates do not get the key (their params, and so their checkpoints, stay as they were)
    assert "covariates" not in model_params({"type": "cellflow", "preset": "tiny"}, dataset_cfg=stim)


@pytest.mark.slow
def test_renamed_covariate_column_runs_linear_cpa_primeflow_without_overrides(tmp_path):
    scratch = copy_repo(tmp_path)
    cells = ad.read_h5ad(REPO / "resources" / "demo" / "perturbench_devel.h5ad")
    assert "cell_type" in cells.obs and "stimulation" not in cells.obs
    cells.obs = cells.obs.rename(columns={"cell_type": "stimulation"})
    cells.write_h5ad(scratch / "resources" / "demo" / "stimulation_demo.h5ad")
    (scratch / "config" / "stimulation.yaml").write_text(yaml.safe_dump(_stimulation_config(), sort_keys=False))

    targets = [f"results/stim_demo/{m}/predictions.h5ad" for m in MODELS]
    run = snakemake(scratch, "--configfile", "config/stimulation.yaml", "-c1", *targets, timeout=1500)
    assert run.returncode == 0, run.stderr[-3000:]
    for name in ("linear", "cpa"):
        fit = json.loads((scratch / "results" / "stim_demo" / name / "checkpoint" / "fit.json").read_text())
        assert fit["n_covariates"] == 1, (name, fit)
    meta = json.loads((scratch / "results" / "stim_demo" / "primeflow" / "checkpoint" / "meta.json").read_text())
    assert meta["covariates"] == ["stimulation"]
    for target in targets:
        assert ad.read_h5ad(scratch / target, backed="r").n_obs > 0

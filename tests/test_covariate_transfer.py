"""Covariate-aware path end to end on the bundled McFaline23 cells (mcfaline_demo in config/demo.yaml).

split -> preprocess -> truth -> PCA -> train/predict (control_mean, additive) -> cell-eval and
PerturBench scoring, all in-process through perturb_repro.steps, as the Snakemake rules call them.
Checks that every stage keeps the group (cell line) columns, that models are asked per group with
that group's controls, and that scoring measures each (condition, line) against that line's own
controls (values recomputed here with numpy), plus the group-aware contract checks. (The train-only
guarantee of PerturBench-style gene selection is tested in test_preprocess.py.)
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import DEMO_H5AD, REPO
from perturb_repro import steps
from perturb_repro.data.pca import dense
from perturb_repro.errors import PipelineInputError
from perturb_repro.scoring.contract import check_prediction

LINES = ["A172", "T98G", "U87MG"]
CONTROL = "control"


@pytest.fixture(scope="module")
def cfg():
    config = yaml.safe_load((REPO / "config" / "demo.yaml").read_text())
    return dict(config["datasets"]["mcfaline_demo"], name="mcfaline_demo")


@pytest.fixture(scope="module")
def run(tmp_path_factory, cfg):
    """Every pipeline step on mcfaline_demo, in a scratch results directory."""
    out = tmp_path_factory.mktemp("mcfaline")
    paths = {k: str(out / v) for k, v in {
        "split": "split.csv", "processed": "processed.h5ad", "summary": "summary.json", "pca": "pca.npz",
        "truth": "test_truth.h5ad",
    }.items()}
    steps.split_step(str(DEMO_H5AD), cfg, paths["split"])
    steps.preprocess_step(str(DEMO_H5AD), paths["split"], cfg, paths["processed"], paths["summary"])
    steps.pca_step(paths["processed"], cfg, paths["pca"])
    steps.truth_step(paths["processed"], paths["truth"])
    sampling = {"seed": 0, "n_cells_per_condition": 50, "steps": 10}
    for model in ("control_mean", "additive"):
        ckpt = out / model / "checkpoint"
        steps.train_step("mcfaline_demo", paths["processed"], paths["pca"], "", {"type": model}, {}, str(ckpt), 0)
        paths[model] = str(out / model / "predictions.h5ad")
        steps.predict_step("mcfaline_demo", model, paths["truth"], paths["processed"], paths["pca"], "",
                           {"type": model}, {}, sampling, str(ckpt), paths[model])
    paths["out"] = out
    return paths


def _group_mean(adata, condition, line):
    obs = adata.obs
    rows = ((obs["condition"] == condition) & (obs["cell_type"] == line)).to_numpy()
    return dense(adata.X[rows]).mean(axis=0, dtype=np.float64)


def test_split_rows_per_line_and_counts(run):
    table = pd.read_csv(run["split"], keep_default_na=False)
    assert list(table.columns) == ["condition", "cell_type", "split", "subgroup"]
    assert len(table) == 30 and not table.duplicated(["condition", "cell_type"]).any()
    counts = table.groupby("split").size().to_dict()
    assert counts == {"train": 21, "val": 4, "test": 5}  # 18 perturbed + 3 control rows in train
    assert set(table.loc[table["condition"] == CONTROL, "cell_type"]) == set(LINES)
    summary = json.loads(open(run["summary"]).read())
    assert summary["splits"]["test"]["pairs"] == 8 and summary["cells"] == 2586  # 5 held out + 3 lines of test controls


def test_control_cells_split_like_perturbench(run):
    """train_control_fraction 0.5: PerturBench's _split_controls draw (checked against upstream by hand)."""
    obs = ad.read_h5ad(run["processed"]).obs
    ctrl = obs[obs["is_control"]]
    assert ctrl["split"].value_counts().to_dict() == {"train": 150, "val": 75, "test": 75}
    assert ctrl[ctrl["split"] == "test"].groupby("cell_type").size().to_dict() == {"A172": 18, "T98G": 22, "U87MG": 35}
    truth = ad.read_h5ad(run["truth"])
    t_ctrl = truth.obs[truth.obs["is_control"]]
    assert len(t_ctrl) == 75 and set(t_ctrl["split"]) == {"test"}  # the truth holds the test controls only


def test_processed_and_truth_carry_groups(run):
    processed = ad.read_h5ad(run["processed"])
    assert list(processed.uns["group_by"]) == ["cell_type"]
    # a held-out (gene, line) pair is test only in that line; the same gene trains in the others
    obs = processed.obs
    test = obs[(obs["split"] == "test") & ~obs["is_control"]]
    for (gene, line), _ in test.groupby(["condition", "cell_type"]):
        other = obs[(obs["condition"] == gene) & (obs["cell_type"] != line)]
        assert set(other["split"]) == {"train"} and other["cell_type"].nunique() == 2
    truth = ad.read_h5ad(run["truth"])
    assert "cell_type" in truth.obs and list(truth.uns["group_by"]) == ["cell_type"]
    assert set(truth.obs["split"]) == {"test"}
    assert set(truth.obs.loc[truth.obs["is_control"], "cell_type"]) == set(LINES)


def test_predictions_are_per_group_with_that_groups_controls(run):
    truth = ad.read_h5ad(run["truth"])
    pred = ad.read_h5ad(run["control_mean"])
    assert "cell_type" in pred.obs
    for (gene, line), rows in pred.obs[pred.obs["condition"] != CONTROL].groupby(["condition", "cell_type"]).groups.items():
        # control_mean returns the group's own control cells: same count, same mean
        n_ctrl = int(((truth.obs["condition"] == CONTROL) & (truth.obs["cell_type"] == line)).sum())
        assert len(rows) == n_ctrl
        np.testing.assert_allclose(_group_mean(pred, gene, line), _group_mean(truth, CONTROL, line), atol=1e-5)
    check_prediction(pred, truth, "condition", CONTROL, "pred", "truth")


def test_additive_uses_the_shift_measured_in_the_other_lines(run):
    processed = ad.read_h5ad(run["processed"])
    truth = ad.read_h5ad(run["truth"])
    pred = ad.read_h5ad(run["additive"])
    train = processed[processed.obs["split"] == "train"]
    gene, line = "MAP2K6", "A172"  # seed 42: held out (test) in A172, trained in T98G and U87MG
    shifts = [_group_mean(train, gene, other) - _group_mean(train, CONTROL, other) for other in LINES if other != line]
    ctrl = dense(truth.X[((truth.obs["condition"] == CONTROL) & (truth.obs["cell_type"] == line)).to_numpy()])
    expected = np.clip(ctrl + np.mean(shifts, axis=0), 0, None)
    got = dense(pred.X[((pred.obs["condition"] == gene) & (pred.obs["cell_type"] == line)).to_numpy()])
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_contract_refuses_pooled_or_misplaced_controls(run):
    truth = ad.read_h5ad(run["truth"])
    pred = ad.read_h5ad(run["additive"])
    swapped = pred.copy()
    ctrl = (swapped.obs["condition"] == CONTROL).to_numpy()
    lines = swapped.obs["cell_type"].to_numpy().copy()
    lines[ctrl] = np.roll(lines[ctrl], 7)  # same control cells, wrong line labels
    swapped.obs["cell_type"] = lines
    with pytest.raises(PipelineInputError, match="control"):
        check_prediction(swapped, truth, "condition", CONTROL, "pred", "truth")
    moved = pred.copy()
    rows = (moved.obs["condition"] == "MAP2K6").to_numpy()
    moved.obs.loc[rows, "cell_type"] = "T98G"  # predicted for the wrong line
    with pytest.raises(PipelineInputError, match="not predicted"):
        check_prediction(moved, truth, "condition", CONTROL, "pred", "truth")
    nogroup = pred.copy()
    del nogroup.obs["cell_type"]
    with pytest.raises(PipelineInputError, match="cell_type"):
        check_prediction(nogroup, truth, "condition", CONTROL, "pred", "truth")


@pytest.fixture(scope="module")
def scored(run):
    from perturb_repro.scoring.celleval import score
    from perturb_repro.scoring.perturbench import score_perturbench

    out = run["out"]
    # cell-eval (its own process, numba start-up) runs while PerturBench's metrics are computed here;
    # the `anndata` profile skips DE, which per-group correctness does not need
    with ThreadPoolExecutor(1) as pool:
        job = pool.submit(score, run["additive"], run["truth"], "condition", CONTROL, out / "additive" / "metrics.csv",
                          out / "additive" / "per_condition.csv", profile="anndata", num_threads=1,
                          workdir=out / "scratch")
        score_perturbench(run["additive"], run["truth"], CONTROL, out / "additive" / "pb_per_condition.csv",
                          out / "additive" / "pb_summary.csv", seed=0, n_deg=20, pca_components=10)
        job.result()
    return out


def test_celleval_rows_per_condition_and_line_against_that_lines_controls(run, scored):
    per = pd.read_csv(scored / "additive" / "per_condition.csv", dtype={"perturbation": str, "cell_type": str})
    assert list(per.columns[:2]) == ["perturbation", "cell_type"]
    assert len(per) == 5 and not per.duplicated(["perturbation", "cell_type"]).any()
    truth, pred = ad.read_h5ad(run["truth"]), ad.read_h5ad(run["additive"])
    row = per[(per["perturbation"] == "MAP2K6") & (per["cell_type"] == "A172")].iloc[0]
    own = _group_mean(truth, CONTROL, "A172")
    d_pred = _group_mean(pred, "MAP2K6", "A172") - _group_mean(pred, CONTROL, "A172")
    d_true = _group_mean(truth, "MAP2K6", "A172") - own
    assert row["pearson_delta"] == pytest.approx(np.corrcoef(d_pred, d_true)[0, 1], abs=1e-4)
    # against the pooled controls of all lines the value would be clearly different
    pooled = dense(truth.X[truth.obs["is_control"].to_numpy()]).mean(axis=0)
    d_pooled = np.corrcoef(_group_mean(pred, "MAP2K6", "A172") - pooled, _group_mean(truth, "MAP2K6", "A172") - pooled)[0, 1]
    assert abs(row["pearson_delta"] - d_pooled) > 1e-3
    metrics = pd.read_csv(scored / "additive" / "metrics.csv").set_index("metric")
    assert metrics.loc["pearson_delta", "count"] == 5  # aggregated over all (condition, line) rows
    assert metrics.loc["mse", "mean"] == pytest.approx(per["mse"].mean(), rel=1e-6)


def test_perturbench_metrics_per_line(run, scored):
    per = pd.read_csv(scored / "additive" / "pb_per_condition.csv", dtype={"condition": str, "cell_type": str})
    assert list(per.columns[:2]) == ["condition", "cell_type"] and len(per) == 5
    truth, pred = ad.read_h5ad(run["truth"]), ad.read_h5ad(run["additive"])
    ctrl = _group_mean(truth, CONTROL, "T98G")
    lfc_p = np.log2(_group_mean(pred, "PLK4", "T98G") + 0.1) - np.log2(ctrl + 0.1)
    lfc_t = np.log2(_group_mean(truth, "PLK4", "T98G") + 0.1) - np.log2(ctrl + 0.1)
    expected = lfc_p @ lfc_t / (np.linalg.norm(lfc_p) * np.linalg.norm(lfc_t))
    got = per[(per["condition"] == "PLK4") & (per["cell_type"] == "T98G")]["cosine_logfc"].iloc[0]
    assert got == pytest.approx(expected, abs=1e-6)
    # ranks are within a line: A172 and T98G hold 1 and 2 test genes
    assert (per.loc[per["cell_type"] == "A172", "cosine_logfc_rank"] == 0).all()
    summary = pd.read_csv(scored / "additive" / "pb_summary.csv").set_index("metric")
    assert summary.loc["cosine_logfc", "count"] == 5

"""Sharded cell-eval scoring: shards + the cross-condition pass, merged, equal one run (on the demo's cells)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from perturb_repro.scoring.celleval import is_cross_condition, score
from perturb_repro.scoring.celleval_shards import merge_shards, score_cross, score_shard, shard_keys

PERT_COL = "condition"
N_SHARDS = 3


@pytest.fixture(scope="module")
def demo_files(demo_processed, tmp_path_factory):
    """7 conditions (<= 40 cells each) + <= 60 controls of the processed demo; prediction = noisy, partly swapped truth."""
    x = demo_processed.X
    x = np.asarray(x.toarray() if hasattr(x, "toarray") else x, dtype=np.float32)
    labels = demo_processed.obs["condition"].astype(str).to_numpy()
    control = str(demo_processed.uns["control_label"])
    conds = sorted(set(labels) - {control})[:7]
    rng = np.random.default_rng(3)
    ctrl_all = np.flatnonzero(labels == control)
    ctrl_rows = rng.choice(ctrl_all, size=min(60, len(ctrl_all)), replace=False)
    rows = np.concatenate([np.flatnonzero(labels == c)[:40] for c in conds] + [ctrl_rows])
    var = pd.DataFrame(index=demo_processed.var_names)
    truth = ad.AnnData(X=x[rows], obs=pd.DataFrame({PERT_COL: pd.Categorical(labels[rows])},
                                                   index=[f"t{i}" for i in range(len(rows))]), var=var)
    pred_x = np.maximum(x[rows] + rng.normal(0, 0.2, size=(len(rows), x.shape[1])).astype(np.float32), 0).astype(np.float32)
    pred_x[-len(ctrl_rows):] = x[ctrl_rows]
    swap = {conds[0]: conds[1], conds[1]: conds[0]}
    pred = ad.AnnData(X=pred_x, obs=pd.DataFrame({PERT_COL: pd.Categorical([swap.get(v, v) for v in labels[rows]])},
                                                 index=[f"p{i}" for i in range(len(rows))]), var=var.copy())
    d = tmp_path_factory.mktemp("sharded")
    truth.write_h5ad(d / "test_truth.h5ad")
    pred.write_h5ad(d / "predictions.h5ad")
    return d, control, conds


@pytest.fixture(scope="module")
def scored(demo_files):
    d, control, _ = demo_files
    pred, truth = d / "predictions.h5ad", d / "test_truth.h5ad"
    with ThreadPoolExecutor(2) as pool:  # every call is its own cell-eval process
        jobs = [pool.submit(score, pred, truth, PERT_COL, control, d / "one" / "metrics.csv", d / "one" / "per_condition.csv",
                            profile="full", workdir=d / "scratch")]
        jobs += [pool.submit(score_shard, pred, truth, PERT_COL, control, i, N_SHARDS, d / "shards" / f"shard{i}.csv",
                             d / "shards" / f"shard{i}.summary.h5ad", profile="full", workdir=d / "scratch")
                 for i in range(N_SHARDS)]
        for job in jobs:
            job.result()
    score_cross([d / "shards" / f"shard{i}.summary.h5ad" for i in range(N_SHARDS)], truth, PERT_COL, control,
                d / "shards" / "cross.csv", profile="full")
    merge_shards([d / "shards" / f"shard{i}.csv" for i in range(N_SHARDS)], d / "shards" / "cross.csv", truth, PERT_COL,
                 control, d / "merged" / "metrics.csv", d / "merged" / "per_condition.csv")
    return d


def test_shards_split_conditions_deterministically():
    keys = [(f"c{i}",) for i in range(7)]
    parts = [shard_keys(list(reversed(keys)), i, 3) for i in range(3)]
    assert sum(parts, []) == sorted(keys) and all(parts)
    assert shard_keys(keys[:2], 2, 3) == [] or len(sum((shard_keys(keys[:2], i, 3) for i in range(3)), [])) == 2


def test_merged_shards_equal_one_run(scored, demo_files):
    d = scored
    _, _, conds = demo_files
    one = pd.read_csv(d / "one" / "per_condition.csv", dtype={"perturbation": str})
    merged = pd.read_csv(d / "merged" / "per_condition.csv", dtype={"perturbation": str})
    assert list(merged.columns) == list(one.columns)
    assert list(merged["perturbation"]) == list(one["perturbation"]) == sorted(conds)
    assert any(is_cross_condition(c) for c in one.columns)  # the cross-condition pass was exercised
    pd.testing.assert_frame_equal(merged, one, check_exact=False, rtol=1e-12, atol=1e-12)
    # the shards leave the cross-condition metrics to the pass over their summaries, which hold no cells: per
    # condition (and the control) one pseudobulk and one centroid row each, real and predicted
    shard = pd.read_csv(d / "shards" / "shard0.csv", dtype={"perturbation": str}).set_index("perturbation")
    assert not [c for c in shard.columns if c.startswith(("discrimination_score", "pearson_edistance", "clustering"))]
    summary = ad.read_h5ad(d / "shards" / "shard0.summary.h5ad")
    assert summary.n_obs == 4 * (len(shard) + 1)
    m_one = pd.read_csv(d / "one" / "metrics.csv").set_index("metric")
    m_merged = pd.read_csv(d / "merged" / "metrics.csv").set_index("metric")
    assert list(m_merged.index) == list(m_one.index) and list(m_merged.columns) == list(m_one.columns)
    pd.testing.assert_frame_equal(m_merged, m_one, check_exact=False, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- PerturBench shards (covariate groups)

GROUPS = ("lineA", "lineB", "lineC")


@pytest.fixture(scope="module")
def grouped_files(demo_processed, tmp_path_factory):
    """3 covariate groups of demo cells (4 conditions <= 25 cells + 30 controls each); prediction = noisy truth with
    two conditions swapped in one group. Both files record ``uns['group_by']``, as the pipeline's do."""
    x = demo_processed.X
    x = np.asarray(x.toarray() if hasattr(x, "toarray") else x, dtype=np.float32)
    labels = demo_processed.obs["condition"].astype(str).to_numpy()
    control = str(demo_processed.uns["control_label"])
    conds = sorted(set(labels) - {control})
    ctrl_all = np.flatnonzero(labels == control)
    rows, groups = [], []
    for g, name in enumerate(GROUPS):
        for c in conds[4 * g : 4 * g + 4]:
            picked = np.flatnonzero(labels == c)[:25]
            rows.append(picked)
            groups += [name] * len(picked)
        rows.append(ctrl_all[30 * g : 30 * g + 30])
        groups += [name] * 30
    rows = np.concatenate(rows)
    rng = np.random.default_rng(9)
    var = pd.DataFrame(index=demo_processed.var_names)
    obs = pd.DataFrame({PERT_COL: labels[rows], "cell_line": groups}, index=[f"t{i}" for i in range(len(rows))])
    truth = ad.AnnData(X=x[rows], obs=obs, var=var, uns={"group_by": ["cell_line"], "control_label": control})
    pred_x = np.maximum(x[rows] + rng.normal(0, 0.2, size=(len(rows), x.shape[1])).astype(np.float32), 0).astype(np.float32)
    is_ctrl = labels[rows] == control
    pred_x[is_ctrl] = x[rows][is_ctrl]
    swap = {conds[0]: conds[1], conds[1]: conds[0]}
    pred_obs = obs.copy()
    pred_obs.index = [f"p{i}" for i in range(len(rows))]
    pred_obs[PERT_COL] = [swap.get(v, v) for v in labels[rows]]
    pred = ad.AnnData(X=pred_x, obs=pred_obs, var=var.copy(), uns={"group_by": ["cell_line"]})
    d = tmp_path_factory.mktemp("pb_sharded")
    truth.write_h5ad(d / "test_truth.h5ad")
    pred.write_h5ad(d / "predictions.h5ad")
    return d, control


PB_ARGS = {"seed": 3, "n_deg": 20, "pca_components": 6}


@pytest.mark.parametrize("n_shards", [2, 4])  # 4 shards of 3 groups: one shard is empty
def test_perturbench_shards_merged_equal_one_run(grouped_files, n_shards):
    from perturb_repro.scoring.pb_shards import merge_perturbench, score_perturbench_shard
    from perturb_repro.scoring.perturbench import score_perturbench

    d, control = grouped_files
    pred, truth = d / "predictions.h5ad", d / "test_truth.h5ad"
    one = d / f"one{n_shards}"
    score_perturbench(pred, truth, control, one / "pc.csv", one / "summary.csv", **PB_ARGS)
    parts = [d / f"s{n_shards}" / f"shard{i}.csv" for i in range(n_shards)]
    for i, part in enumerate(parts):
        score_perturbench_shard(pred, truth, control, i, n_shards, part, **PB_ARGS)
    sizes = [len(pd.read_csv(p)) for p in parts]
    assert sum(sizes) == len(pd.read_csv(one / "pc.csv")) and sizes[0] > 0
    assert (0 in sizes) == (n_shards > len(GROUPS))
    merged = d / f"m{n_shards}"
    merge_perturbench(list(reversed(parts)), truth, control, merged / "pc.csv", merged / "summary.csv", **PB_ARGS)
    frame = pd.read_csv(one / "pc.csv")
    assert set(frame["cell_line"]) == set(GROUPS) and frame["cosine_logfc_rank"].max() > 0  # ranks not all zero
    for name in ("pc.csv", "summary.csv"):  # the same bytes: same rows, order, values and settings
        assert (merged / name).read_bytes() == (one / name).read_bytes(), name


def test_perturbench_merge_names_a_missing_condition(grouped_files, tmp_path):
    from perturb_repro.errors import PipelineInputError
    from perturb_repro.scoring.pb_shards import merge_perturbench, score_perturbench_shard

    d, control = grouped_files
    pred, truth = d / "predictions.h5ad", d / "test_truth.h5ad"
    parts = [tmp_path / f"shard{i}.csv" for i in range(2)]
    for i, part in enumerate(parts):
        score_perturbench_shard(pred, truth, control, i, 2, part, **PB_ARGS)
    frame = pd.read_csv(parts[1], dtype=str, keep_default_na=False)
    frame.iloc[1:].to_csv(parts[1], index=False)
    with pytest.raises(PipelineInputError, match="missing"):
        merge_perturbench(parts, truth, control, tmp_path / "pc.csv", tmp_path / "summary.csv", **PB_ARGS)
    assert not (tmp_path / "pc.csv").exists() and not (tmp_path / "summary.csv").exists()


def test_grouped_celleval_shards_merged_equal_one_run(grouped_files):
    """Covariate groups: shards are sliced group by group and carry only their groups' controls; merged == one run."""
    from perturb_repro.scoring.celleval_shards import _subset

    d, control = grouped_files
    pred, truth = d / "predictions.h5ad", d / "test_truth.h5ad"
    keys = sorted({(c, g) for c, g in ad.read_h5ad(truth, backed="r").obs[[PERT_COL, "cell_line"]].astype(str).to_numpy().tolist()
                   if c != control})
    first = shard_keys(keys, 0, 3)
    assert {g for _, g in first} == {GROUPS[0]}  # 12 keys, 3 groups of 4, 3 shards: one group each
    _subset(truth, PERT_COL, control, ("cell_line",), set(first), d / "sub.h5ad")
    sub = ad.read_h5ad(d / "sub.h5ad")
    assert set(sub.obs["cell_line"]) == {GROUPS[0]} and (sub.obs[PERT_COL] == control).sum() == 30
    out = d / "celleval"
    with ThreadPoolExecutor(2) as pool:
        jobs = [pool.submit(score, pred, truth, PERT_COL, control, out / "one" / "metrics.csv", out / "one" / "per_condition.csv",
                            profile="full", workdir=out / "scratch")]
        jobs += [pool.submit(score_shard, pred, truth, PERT_COL, control, i, 2, out / f"shard{i}.csv",
                             out / f"shard{i}.summary.h5ad", profile="full", workdir=out / "scratch") for i in range(2)]
        for job in jobs:
            job.result()
    score_cross([out / f"shard{i}.summary.h5ad" for i in range(2)], truth, PERT_COL, control, out / "cross.csv",
                profile="full")
    merge_shards([out / f"shard{i}.csv" for i in range(2)], out / "cross.csv", truth, PERT_COL, control,
                 out / "merged" / "metrics.csv", out / "merged" / "per_condition.csv")
    labels = {"perturbation": str, "cell_line": str}
    one = pd.read_csv(out / "one" / "per_condition.csv", dtype=labels)
    merged = pd.read_csv(out / "merged" / "per_condition.csv", dtype=labels)
    assert len(one) == 12 and list(merged.columns) == list(one.columns)
    pd.testing.assert_frame_equal(merged, one, check_exact=False, rtol=1e-12, atol=1e-12)
    m_one = pd.read_csv(out / "one" / "metrics.csv").set_index("metric")
    m_merged = pd.read_csv(out / "merged" / "metrics.csv").set_index("metric")
    pd.testing.assert_frame_equal(m_merged, m_one, check_exact=False, rtol=1e-12, atol=1e-12)


def test_scoring_shards_per_dataset_and_model_entry_plan_the_shard_jobs(tmp_path):
    """datasets.<d>.scoring.shards and models.<key>.scoring.shards (the entry wins) decide each pair's scoring jobs."""
    import re

    import yaml
    from workflow_helpers import REPO, copy_repo, snakemake

    scratch = copy_repo(tmp_path)
    config = yaml.safe_load((REPO / "config" / "demo.yaml").read_text())
    config["datasets"]["mcfaline_demo"]["scoring"] = {"shards": 3}
    config["models"]["additive"]["scoring"] = {"shards": 2}
    (scratch / "config" / "sharded.yaml").write_text(yaml.safe_dump(config))
    targets = [f"results/mcfaline_demo/{m}/{f}" for m in ("additive", "control_mean") for f in ("metrics.csv", "perturbench.csv")]
    targets.append("results/norman_demo/control_mean/metrics.csv")
    result = snakemake(scratch, "-n", *targets, "--configfile", "config/sharded.yaml")
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout + result.stderr
    shards = set(re.findall(r"results/(\w+)/(\w+)/(score_shards|perturbench_shards)/shard(\d+)_of_(\d+)\.csv", out))
    assert {(d, m, kind, n) for d, m, kind, _, n in shards} == {
        ("mcfaline_demo", "additive", "score_shards", "2"), ("mcfaline_demo", "additive", "perturbench_shards", "2"),
        ("mcfaline_demo", "control_mean", "score_shards", "3"), ("mcfaline_demo", "control_mean", "perturbench_shards", "3"),
    }  # norman_demo keeps the global 1: no shard files
    assert len({s for s in shards if s[1] == "control_mean" and s[2] == "score_shards"}) == 3

"""Tests for perturb_repro.scoring.perturbench (PerturBench's metrics, as PRiMeFlow reports them).

Every expected value is recomputed here independently, with explicit loops and other library
routines than the module uses, from PerturBench's definitions (altoslabs/perturbench, commit
9f03fc0: analysis/benchmarks/{metrics,aggregation,evaluation}.py, analysis/embed_cells.py):

  logFC      log2(mean(cells) + 0.1) - log2(mean(control) + 0.1), cosine between pred and truth
  RMSE       sqrt(mean over genes of (mean(pred) - mean(truth))^2)
  MMD        geomloss energy loss: E|x-y| - E|x-x'|/2 - E|y-y'|/2, distances sqrt(max(d^2, 1e-8))
  MMD PCA    the same on PCs fitted on all truth cells (test conditions + control)
  DEG recall |top-k |t| (pred) & top-k |t| (truth)| / k, t = Welch t with the group's n for both
             variances (scanpy "t-test_overestim_var"), each group vs the true control
  rank       M[i, j] = metric(pred i, truth j); "_rank": for truth j, position of pred j among all
             preds (best first) / (n - 1); "_rank_transpose": for pred i, position of truth i.
"""

from __future__ import annotations

import math

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from scipy.spatial.distance import cosine as cosine_distance
from scipy.stats import energy_distance

from perturb_repro.errors import PipelineInputError
from perturb_repro.scoring.perturbench import (
    METRICS,
    SUMMARY_COLUMNS,
    metric_columns,
    perturbench_metrics,
    rank_columns,
    score_perturbench,
    summarise,
)

PERT_COL = "condition"
CONTROL = "ctrl"
BLOCK = 5  # genes per condition-specific effect block


# --------------------------------------------------------------------------- data


def _adata(groups: dict[str, np.ndarray], genes: list[str]) -> ad.AnnData:
    labels = [name for name, x in groups.items() for _ in range(len(x))]
    x = np.vstack(list(groups.values())).astype(np.float32)
    obs = pd.DataFrame({PERT_COL: pd.Categorical(labels)}, index=[f"c{i}" for i in range(len(labels))])
    return ad.AnnData(X=x, obs=obs, var=pd.DataFrame(index=genes))


def _cells(rng, n_cells, n_genes, effect=None):
    """log1p-like non-negative, non-integer values, plus an optional per-gene shift."""
    x = np.log1p(rng.gamma(2.0, 1.0, size=(n_cells, n_genes))) + 0.05
    return x if effect is None else x + effect


def _effects(rng, n_conds, n_genes, strength=1.5):
    """Condition i shifts its own block of genes (disjoint blocks) plus a little everywhere."""
    eff = np.abs(rng.normal(0.0, 0.05, size=(n_conds, n_genes)))
    for i in range(n_conds):
        eff[i, i * BLOCK : (i + 1) * BLOCK] += strength
    return eff


def _dataset(seed, n_conds=4, n_cells=12, n_genes=40, pred_seed=None):
    """Truth (conditions + control) and a noisy independent prediction sharing the control cells."""
    rng = np.random.default_rng(seed)
    conds = [f"p{i}" for i in range(n_conds)]
    genes = [f"g{i:03d}" for i in range(n_genes)]
    eff = _effects(rng, n_conds, n_genes)
    ctrl = _cells(rng, n_cells, n_genes)
    truth = {c: _cells(rng, n_cells, n_genes, eff[i]) for i, c in enumerate(conds)}
    prng = np.random.default_rng(seed + 1000 if pred_seed is None else pred_seed)
    pred = {c: _cells(prng, n_cells + 2, n_genes, 0.8 * eff[i] + prng.normal(0, 0.1, n_genes).clip(0)) for i, c in enumerate(conds)}
    truth_ad = _adata({**truth, CONTROL: ctrl}, genes)
    pred_ad = _adata({**pred, CONTROL: ctrl}, genes)
    return truth_ad, pred_ad, conds


def _groups(adata):
    labels = adata.obs[PERT_COL].astype(str).to_numpy()
    x = np.asarray(adata.X, dtype=np.float64)
    return {c: x[labels == c] for c in np.unique(labels)}


# --------------------------------------------------------------------------- independent references


def ref_logfc(cells, ctrl):
    return np.array(
        [math.log(cells[:, g].mean() + 0.1, 2) - math.log(ctrl[:, g].mean() + 0.1, 2) for g in range(cells.shape[1])]
    )


def ref_cosine_logfc(pred_cells, truth_cells, ctrl):
    return 1.0 - cosine_distance(ref_logfc(pred_cells, ctrl), ref_logfc(truth_cells, ctrl))


def ref_rmse(pred_cells, truth_cells):
    a, b = pred_cells.mean(axis=0), truth_cells.mean(axis=0)
    return math.sqrt(sum((a[g] - b[g]) ** 2 for g in range(len(a))) / len(a))


def _mean_pair_distance(x, y):
    total = 0.0
    for xi in x:
        for yj in y:
            total += math.sqrt(max(float(np.sum((xi - yj) ** 2)), 1e-8))
    return total / (len(x) * len(y))


def ref_energy(x, y):
    return _mean_pair_distance(x, y) - 0.5 * _mean_pair_distance(x, x) - 0.5 * _mean_pair_distance(y, y)


def ref_pca_projector(truth_x, k):
    """Top-k principal axes of all truth cells via an eigendecomposition of the covariance."""
    mean = truth_x.mean(axis=0)
    cov = np.cov(truth_x - mean, rowvar=False)
    w, v = np.linalg.eigh(cov)
    axes = v[:, np.argsort(w)[::-1][:k]]
    return lambda cells: (cells - mean) @ axes


def ref_t_scores(cells, ctrl):
    n = len(cells)
    out = []
    for g in range(cells.shape[1]):
        a, c = cells[:, g], ctrl[:, g]
        va = sum((v - a.mean()) ** 2 for v in a) / (len(a) - 1)
        vc = sum((v - c.mean()) ** 2 for v in c) / (len(c) - 1)
        out.append((a.mean() - c.mean()) / math.sqrt(va / n + vc / n))  # "overestim_var": n_group twice
    return out


def ref_top_k(scores, k):
    return set(sorted(range(len(scores)), key=lambda g: -abs(scores[g]))[:k])


def ref_rank_bounds(mat, j, kind):
    """(#strictly better, #tied) rows for column j, excluding row j itself."""
    target = mat[j, j]
    better = ties = 0
    for i in range(mat.shape[0]):
        if i == j:
            continue
        if mat[i, j] == target:
            ties += 1
        elif (mat[i, j] > target) == (kind == "similarity"):
            better += 1
    return better, ties


def ref_matrices(pred, truth, conds, k, n_pcs):
    """All pairwise matrices M[i, j] = metric(pred cond i, truth cond j), computed with loops."""
    pg, tg = _groups(pred), _groups(truth)
    ctrl = tg[CONTROL]
    project = ref_pca_projector(np.asarray(truth.X, dtype=np.float64), n_pcs)
    pred_top = {c: ref_top_k(ref_t_scores(pg[c], ctrl), k) for c in conds}
    truth_top = {c: ref_top_k(ref_t_scores(tg[c], ctrl), k) for c in conds}
    n = len(conds)
    mats = {name: np.zeros((n, n)) for name in METRICS}
    for i, ci in enumerate(conds):
        for j, cj in enumerate(conds):
            mats["cosine_logfc"][i, j] = ref_cosine_logfc(pg[ci], tg[cj], ctrl)
            mats["rmse_average"][i, j] = ref_rmse(pg[ci], tg[cj])
            mats["mmd_gex"][i, j] = ref_energy(pg[ci], tg[cj])
            mats["mmd_pca"][i, j] = ref_energy(project(pg[ci]), project(tg[cj]))
            mats["deg_recall"][i, j] = len(pred_top[ci] & truth_top[cj]) / k
    return mats


# --------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def scored():
    truth, pred, conds = _dataset(seed=1)
    frame = perturbench_metrics(pred, truth, CONTROL, seed=0, n_deg=8, pca_components=5)
    return truth, pred, conds, frame, ref_matrices(pred, truth, conds, k=8, n_pcs=5)


def test_layout(scored):
    _, _, conds, frame, _ = scored
    assert list(frame.columns) == ["condition"] + metric_columns()
    assert list(frame["condition"]) == sorted(conds)
    assert {c for c in frame.columns if c.endswith("_rank")} == {f"{m}_rank" for m in METRICS}


@pytest.mark.parametrize("metric", list(METRICS))
def test_metric_matches_independent_computation(scored, metric):
    _, _, conds, frame, mats = scored
    expected = np.diag(mats[metric])
    np.testing.assert_allclose(frame[metric].to_numpy(), expected, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("metric", list(METRICS))
def test_ranks_match_independent_computation(scored, metric):
    _, _, conds, frame, mats = scored
    kind = METRICS[metric][2]
    n = len(conds)
    for orientation, mat in (("_rank", mats[metric]), ("_rank_transpose", mats[metric].T)):
        got = frame[metric + orientation].to_numpy() * (n - 1)
        for j in range(n):
            better, ties = ref_rank_bounds(mat, j, kind)
            # continuous metrics have no ties; DEG recall may, and then the seeded shuffle decides
            assert better - 1e-9 <= got[j] <= better + ties + 1e-9, (metric, orientation, j)


def test_mmd_single_gene_is_half_squared_energy_distance():
    """1-D check against scipy: geomloss energy = ED^2 / 2, minus the 1e-8 clamp on the diagonal."""
    rng = np.random.default_rng(7)
    genes = ["g0"]
    ctrl = _cells(rng, 10, 1)
    t = {"a": _cells(rng, 9, 1, 1.0), "b": _cells(rng, 11, 1, 0.3)}
    p = {"a": _cells(rng, 13, 1, 0.7), "b": _cells(rng, 8, 1, 0.2)}
    truth, pred = _adata({**t, CONTROL: ctrl}, genes), _adata({**p, CONTROL: ctrl}, genes)
    frame = perturbench_metrics(pred, truth, CONTROL, n_deg=1, pca_components=1).set_index("condition")
    for c in ("a", "b"):
        x, y = p[c].astype(np.float32).ravel().astype(float), t[c].astype(np.float32).ravel().astype(float)
        expected = energy_distance(x, y) ** 2 / 2 - 0.5 * 1e-4 * (1 / len(x) + 1 / len(y))
        assert frame.loc[c, "mmd_gex"] == pytest.approx(expected, abs=1e-12)


def test_mmd_matches_geomloss_when_installed(scored):
    geomloss = pytest.importorskip("geomloss")
    import torch

    truth, pred, conds, frame, _ = scored
    pg, tg = _groups(pred), _groups(truth)
    loss = geomloss.SamplesLoss(loss="energy", p=2)  # exactly PerturBench's metrics.py:compute_metric
    for c, value in zip(frame["condition"], frame["mmd_gex"]):
        ref = float(loss(torch.from_numpy(pg[c]).float(), torch.from_numpy(tg[c]).float()))
        # geomloss works in float32 with |x|^2 + |y|^2 - 2xy: the zero self-distances come out as
        # sqrt(round-off) ~ 1e-3 instead of 1e-4, biasing it by ~2e-4 here; float64 is exact
        assert value == pytest.approx(ref, abs=1e-3)


def test_pca_uses_highly_variable_genes_like_scanpy():
    """With var['highly_variable'], PCs come from those genes only: PerturBench's train_pca path."""
    import scanpy as sc

    truth, pred, conds = _dataset(seed=3, n_genes=40)
    hvg = np.zeros(truth.n_vars, dtype=bool)
    hvg[::2] = True
    truth.var["highly_variable"] = hvg
    frame = perturbench_metrics(pred, truth, CONTROL, n_deg=8, pca_components=5)

    fit = truth.copy()
    sc.tl.pca(fit, n_comps=5)  # what embed_cells.py:train_pca calls (HVG mask by default)
    loadings, mean = fit.varm["PCs"].T, np.asarray(fit.X, dtype=np.float64).mean(axis=0)
    assert np.all(loadings[:, ~hvg] == 0)
    pg, tg = _groups(pred), _groups(truth)
    for c, value in zip(frame["condition"], frame["mmd_pca"]):
        expected = ref_energy((pg[c] - mean) @ loadings.T, (tg[c] - mean) @ loadings.T)
        assert value == pytest.approx(expected, rel=1e-4)


def test_perfect_prediction_ranks_zero():
    truth, _, conds = _dataset(seed=5, n_conds=6)
    frame = perturbench_metrics(truth.copy(), truth, CONTROL, n_deg=BLOCK, pca_components=5)
    assert np.allclose(frame["cosine_logfc"], 1.0)
    assert np.allclose(frame["rmse_average"], 0.0)
    assert np.allclose(frame["mmd_gex"], 0.0, atol=1e-4) and np.allclose(frame["mmd_pca"], 0.0, atol=1e-4)
    assert np.allclose(frame["deg_recall"], 1.0)
    for m in METRICS:
        assert np.all(frame[m + "_rank"] == 0.0), m
        assert np.all(frame[m + "_rank_transpose"] == 0.0), m


def test_shuffled_labels_rank_about_half():
    """A prediction whose condition labels are randomly permuted ranks ~0.5 on average."""
    truth, _, conds = _dataset(seed=11, n_conds=10, n_cells=10, n_genes=60)
    labels = truth.obs[PERT_COL].astype(str).to_numpy()
    rng = np.random.default_rng(0)
    frames = []
    for _ in range(8):
        mapping = dict(zip(conds, rng.permutation(conds)))
        mapping[CONTROL] = CONTROL
        pred = truth.copy()
        pred.obs[PERT_COL] = pd.Categorical([mapping[x] for x in labels])
        frames.append(perturbench_metrics(pred, truth, CONTROL, seed=1, n_deg=BLOCK, pca_components=5))
    ranks = pd.concat(frames)[[c for c in metric_columns() if "_rank" in c]]
    for col in ranks.columns:
        assert 0.3 < ranks[col].mean() < 0.7, (col, ranks[col].mean())
    assert 0.42 < ranks.to_numpy().mean() < 0.58


def test_seeded_tie_breaking_is_deterministic():
    """Mode collapse (every condition predicted with the same cells): '_rank' is all ties."""
    truth, _, conds = _dataset(seed=13, n_conds=8, n_cells=8)
    rng = np.random.default_rng(2)
    same = _cells(rng, 9, truth.n_vars, 0.5)
    ctrl = _groups(truth)[CONTROL]
    pred = _adata({**{c: same for c in conds}, CONTROL: ctrl}, list(truth.var_names))
    a = perturbench_metrics(pred, truth, CONTROL, seed=3, n_deg=BLOCK, pca_components=4)
    b = perturbench_metrics(pred, truth, CONTROL, seed=3, n_deg=BLOCK, pca_components=4)
    c = perturbench_metrics(pred, truth, CONTROL, seed=4, n_deg=BLOCK, pca_components=4)
    pd.testing.assert_frame_equal(a, b)
    rank_cols = [f"{m}_rank" for m in METRICS]
    assert not a[rank_cols].equals(c[rank_cols])
    # for continuous metrics the transpose has no ties here (the truths differ): seed-independent
    transpose_cols = [f"{m}_rank_transpose" for m in METRICS if m != "deg_recall"]
    pd.testing.assert_frame_equal(a[transpose_cols], c[transpose_cols])
    grid = np.arange(len(conds)) / (len(conds) - 1)
    assert np.all(np.isin(np.round(a[rank_cols].to_numpy(), 12), np.round(grid, 12)))


def test_rank_columns_ties_nan_and_single_condition():
    tied = np.ones((21, 21))
    first = rank_columns(tied, "distance", np.random.default_rng(5))
    np.testing.assert_array_equal(first, rank_columns(tied, "distance", np.random.default_rng(5)))
    means = [rank_columns(tied, "similarity", np.random.default_rng(s)).mean() for s in range(40)]
    assert abs(np.mean(means) - 0.5) < 0.03
    # NaN is sorted last whatever the direction
    mat = np.array([[np.nan, 1.0], [0.5, 2.0]])
    assert list(rank_columns(mat, "distance", np.random.default_rng(0))) == [1.0, 1.0]
    assert list(rank_columns(mat, "similarity", np.random.default_rng(0))) == [1.0, 0.0]
    assert list(rank_columns(np.array([[3.0]]), "distance", np.random.default_rng(0))) == [0.0]


def test_genes_differ_raises_naming_source_and_field():
    truth, pred, _ = _dataset(seed=17)
    pred.var_names = ["other"] + list(pred.var_names[1:])
    with pytest.raises(PipelineInputError) as err:
        perturbench_metrics(pred, truth, CONTROL, pred_source="pred.h5ad", truth_source="truth.h5ad")
    assert err.value.source == "pred.h5ad" and err.value.field == "var_names"
    assert "'other'" in str(err.value) and "'g000'" in str(err.value)


@pytest.mark.parametrize(
    "breakage, field",
    [
        (lambda p: p.obs.drop(columns=[PERT_COL], inplace=True), f"obs['{PERT_COL}']"),
        (lambda p: p.obs.__setitem__(PERT_COL, pd.Categorical(p.obs[PERT_COL].astype(str).replace("p0", "p9"))), f"obs['{PERT_COL}']"),
    ],
)
def test_bad_conditions_raise(breakage, field):
    truth, pred, _ = _dataset(seed=19)
    breakage(pred)
    with pytest.raises(PipelineInputError) as err:
        perturbench_metrics(pred, truth, CONTROL, pred_source="pred.h5ad")
    assert err.value.source == "pred.h5ad" and err.value.field == field


def test_score_perturbench_writes_both_files(tmp_path, scored):
    truth, pred, _, frame, _ = scored
    truth_path, pred_path = tmp_path / "test_truth.h5ad", tmp_path / "predictions.h5ad"
    truth.write_h5ad(truth_path)
    pred.write_h5ad(pred_path)
    per_cond, summary_path = tmp_path / "out" / "per_condition.csv", tmp_path / "out" / "metrics.csv"
    score_perturbench(pred_path, truth_path, CONTROL, per_cond, summary_path, n_deg=8, pca_components=5)

    written = pd.read_csv(per_cond)
    pd.testing.assert_frame_equal(written, frame, check_dtype=False, check_categorical=False, rtol=1e-12)
    summary = pd.read_csv(summary_path)
    assert tuple(summary.columns) == SUMMARY_COLUMNS
    assert list(summary["metric"]) == metric_columns()
    for _, row in summary.iterrows():
        v = frame[row["metric"]].to_numpy(dtype=float)
        expected = [len(v), sum(v) / len(v), math.sqrt(sum((x - v.mean()) ** 2 for x in v) / (len(v) - 1)), min(v),
                    np.percentile(v, 25), np.percentile(v, 50), np.percentile(v, 75), max(v)]
        np.testing.assert_allclose(row[list(SUMMARY_COLUMNS[1:])].to_numpy(dtype=float), expected, rtol=1e-12, atol=1e-15)
    assert summarise(frame).equals(summarise(frame))  # pure


def test_score_perturbench_bad_genes_names_file_and_leaves_no_output(tmp_path, scored):
    truth, pred, _, _, _ = scored
    bad = pred.copy()
    bad.var_names = list(bad.var_names[:-1]) + ["zzz"]
    truth_path, pred_path = tmp_path / "test_truth.h5ad", tmp_path / "predictions.h5ad"
    truth.write_h5ad(truth_path)
    bad.write_h5ad(pred_path)
    per_cond, summary_path = tmp_path / "per_condition.csv", tmp_path / "metrics.csv"
    per_cond.write_text("stale")
    summary_path.write_text("stale")
    with pytest.raises(PipelineInputError) as err:
        score_perturbench(pred_path, truth_path, CONTROL, per_cond, summary_path)
    assert err.value.source == str(pred_path) and err.value.field == "var_names"
    assert not per_cond.exists() and not summary_path.exists()

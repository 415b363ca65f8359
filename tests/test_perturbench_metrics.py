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
             The expected ranks come from `upstream_rank_helper`, a transcription of PerturBench's
             own rank_helper (both releases), never from the module's function.
"""

from __future__ import annotations

import json
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
    SETTINGS_COLUMN,
    SUMMARY_COLUMNS,
    metric_columns,
    perturbench_metrics,
    rank_columns,
    score_perturbench,
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


def test_mmd_matches_geomloss(scored):
    import geomloss  # pinned in envs/requirements.txt: this cross-check never skips
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
    assert np.allclose(frame["rmse_average"], 0.0, atol=1e-6)  # float32 sums: ~4e-8 from zero
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
    assert tuple(summary.columns) == SUMMARY_COLUMNS + (SETTINGS_COLUMN,)
    settings = json.loads(summary[SETTINGS_COLUMN].iloc[0])
    assert settings["rank_normalisation"] == "n_minus_1" and settings["max_cells_per_condition"] is None
    assert settings["distance_dtype"] == "float64" and summary[SETTINGS_COLUMN].nunique() == 1
    assert list(summary["metric"]) == metric_columns()
    for _, row in summary.iterrows():
        v = frame[row["metric"]].to_numpy(dtype=float)
        expected = [len(v), sum(v) / len(v), math.sqrt(sum((x - v.mean()) ** 2 for x in v) / (len(v) - 1)), min(v),
                    np.percentile(v, 25), np.percentile(v, 50), np.percentile(v, 75), max(v)]
        np.testing.assert_allclose(row[list(SUMMARY_COLUMNS[1:])].to_numpy(dtype=float), expected, rtol=1e-12, atol=1e-15)


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


# --------------------------------------------------------------------------- ranks against upstream's rank_helper


def upstream_rank_helper(pred_ref_mat: pd.DataFrame, metric_type: str, release: str, random_state=None) -> pd.Series:
    """PerturBench's ``rank_helper``, transcribed (plain pandas/numpy) from altoslabs/perturbench
    ``src/perturbench/analysis/benchmarks/metrics.py``:

    * ``release="later"``: commit c84038bc1ea409aa54f3832cfa6f34f5059adf0c (the content the later release
      fc13a8c ships; the PRiMeFlow metrics MMD / PCA / top_k_recall exist only there):
      ``rel_ranks / (len(rel_ranks) - 1)`` when ``len(rel_ranks) > 1``;
    * ``release="first"``: commit 4dd6a03c54ef348f6be6e46e21ea7f80eb2daaa2: ``rel_ranks / len(rel_ranks)``.

    Rows of the matrix are predictions, columns the references; for each reference ``p`` the column is
    shuffled (``sample(frac=1.0)``; upstream unseeded, ``random_state`` here), sorted best first and the
    0-based position of ``p`` taken.
    """
    rel_ranks = pd.Series(1.0, index=pred_ref_mat.columns)
    for p in pred_ref_mat.columns:
        pred_metrics = pred_ref_mat.loc[:, p]
        pred_metrics = pred_metrics.sample(frac=1.0, random_state=random_state)
        if metric_type == "distance":
            pred_metrics = pred_metrics.sort_values(ascending=True)
        elif metric_type == "similarity":
            pred_metrics = pred_metrics.sort_values(ascending=False)
        else:
            raise ValueError(metric_type)
        rel_ranks.loc[p] = np.where(pred_metrics.index == p)[0][0]
    if release == "later":
        if len(rel_ranks) > 1:
            rel_ranks = rel_ranks / (len(rel_ranks) - 1)
    elif release == "first":
        rel_ranks = rel_ranks / len(rel_ranks)
    else:
        raise ValueError(release)
    return rel_ranks


RELEASES = {"later": "n_minus_1", "first": "n"}

# Rank fixture of its own: 6 conditions; the diagonal is rarely the best, some columns have ties among
# the *other* rows (deterministic position), columns 2 and 5 have rows tied with the diagonal, one NaN.
RANK_FIXTURE = np.array(
    [
        [0.9, 0.1, 0.4, 0.3, 0.2, 0.5],
        [0.2, 0.35, 0.4, 0.3, 0.7, 0.5],
        [0.5, 0.3, 0.4, 0.3, 0.1, 0.6],
        [0.1, 0.8, 0.2, 0.6, 0.9, 0.5],
        [0.7, 0.3, 0.9, 0.3, 0.5, 0.5],
        [0.4, np.nan, 0.1, 0.0, 0.3, 0.5],
    ]
)
TIED_WITH_DIAGONAL = {2: 2, 5: 4}  # column -> number of other rows equal to the diagonal value


def _names(n):
    return [f"c{i}" for i in range(n)]


@pytest.mark.parametrize("release", list(RELEASES))
@pytest.mark.parametrize("kind", ["distance", "similarity"])
def test_ranks_equal_upstream_rank_helper_where_deterministic(release, kind):
    mat = RANK_FIXTURE
    frame = pd.DataFrame(mat, index=_names(6), columns=_names(6))
    expected = upstream_rank_helper(frame, kind, release, random_state=0).to_numpy()
    free = [j for j in range(6) if j not in TIED_WITH_DIAGONAL]
    for seed in range(5):  # no tie involves the diagonal in these columns: every shuffle gives the same rank
        again = upstream_rank_helper(frame, kind, release, random_state=seed + 1).to_numpy()
        assert np.array_equal(expected[free], again[free])
    got = rank_columns(mat, kind, np.random.default_rng(0), RELEASES[release])
    np.testing.assert_array_equal(got[free], expected[free])
    assert np.count_nonzero(expected[free]) >= 2  # not a fixture of all-zero ranks


@pytest.mark.parametrize("release", list(RELEASES))
def test_ranks_tied_with_diagonal_have_upstreams_distribution(release):
    """Where rows tie with the diagonal, upstream's shuffle makes the rank uniform over the tied slots."""
    mat = RANK_FIXTURE
    frame = pd.DataFrame(mat, index=_names(6), columns=_names(6))
    for kind in ("distance", "similarity"):
        ups = np.array([upstream_rank_helper(frame, kind, release, random_state=s).to_numpy() for s in range(300)])
        ours = np.array([rank_columns(mat, kind, np.random.default_rng(s), RELEASES[release]) for s in range(300)])
        for j, n_tied in TIED_WITH_DIAGONAL.items():
            assert set(np.round(ours[:, j], 12)) == set(np.round(ups[:, j], 12)), (kind, j)
            assert len(set(np.round(ours[:, j], 12))) == n_tied + 1
            assert ours[:, j].mean() == pytest.approx(ups[:, j].mean(), abs=0.06)


def test_metric_ranks_equal_upstream_rank_helper_on_pairwise_matrices():
    """End to end: the rank columns are upstream's rank_helper of the (independently computed) pairwise matrices."""
    truth, _, conds = _dataset(seed=23, n_conds=5, n_cells=10, n_genes=30)
    pred_truth, pred, _ = _dataset(seed=23, n_conds=5, n_cells=10, n_genes=30, pred_seed=99)
    # predictions of p0/p1 and of p2/p3 swapped: their own truths are no longer the best match
    swap = {"p0": "p1", "p1": "p0", "p2": "p3", "p3": "p2", "p4": "p4", CONTROL: CONTROL}
    pred.obs[PERT_COL] = pd.Categorical([swap[x] for x in pred.obs[PERT_COL].astype(str)])
    frame = perturbench_metrics(pred, truth, CONTROL, seed=0, n_deg=6, pca_components=4)
    mats = ref_matrices(pred, truth, conds, k=6, n_pcs=4)
    n_nonzero = 0
    for metric, (_, _, kind) in METRICS.items():
        for suffix, mat in (("_rank", mats[metric]), ("_rank_transpose", mats[metric].T)):
            up = upstream_rank_helper(pd.DataFrame(mat, index=conds, columns=conds), kind, "later", random_state=0)
            got = frame[metric + suffix].to_numpy()
            for j in range(len(conds)):
                others = np.delete(mat[:, j], j)
                if np.any(np.isclose(others, mat[j, j], rtol=1e-9, atol=1e-12)):
                    better, ties = ref_rank_bounds(mat, j, kind)
                    assert better / 4 - 1e-12 <= got[j] <= (better + ties) / 4 + 1e-12
                else:
                    assert got[j] == pytest.approx(up.iloc[j], abs=1e-12), (metric, suffix, j)
                    n_nonzero += up.iloc[j] > 0
    assert n_nonzero >= 10


def test_rank_normalisation_option_reaches_the_output():
    truth, pred, _ = _dataset(seed=29, n_conds=4)
    pred.obs[PERT_COL] = pd.Categorical(
        [{"p0": "p1", "p1": "p0"}.get(x, x) for x in pred.obs[PERT_COL].astype(str)]
    )
    later = perturbench_metrics(pred, truth, CONTROL, n_deg=5, pca_components=3)
    first = perturbench_metrics(pred, truth, CONTROL, n_deg=5, pca_components=3, options={"rank_normalisation": "n"})
    rank_cols = [c for c in later.columns if "_rank" in c]
    np.testing.assert_allclose(first[rank_cols].to_numpy() * 4, later[rank_cols].to_numpy() * 3, atol=1e-12)
    assert later["rmse_average_rank"].max() > 0


# --------------------------------------------------------------------------- blockwise == direct, on the demo


@pytest.fixture(scope="module")
def demo_pair(demo_processed):
    """Truth = 8 conditions (<= 60 cells each) + <= 120 controls of the processed demo; prediction = noisy, partly swapped truth."""
    x = np.asarray(demo_processed.X.toarray() if hasattr(demo_processed.X, "toarray") else demo_processed.X, dtype=np.float32)
    labels = demo_processed.obs["condition"].astype(str).to_numpy()
    control = str(demo_processed.uns["control_label"])
    conds = sorted(set(labels) - {control})[:8]
    rng = np.random.default_rng(5)
    ctrl_all = np.flatnonzero(labels == control)
    ctrl_rows = rng.choice(ctrl_all, size=min(120, len(ctrl_all)), replace=False)
    rows = np.concatenate([np.flatnonzero(labels == c)[:60] for c in conds] + [ctrl_rows])
    truth = ad.AnnData(X=x[rows], obs=pd.DataFrame({PERT_COL: pd.Categorical(labels[rows])}, index=[f"t{i}" for i in range(len(rows))]),
                       var=demo_processed.var[[]].copy())
    if "highly_variable" in demo_processed.var.columns:
        truth.var["highly_variable"] = demo_processed.var["highly_variable"].to_numpy()
    swap = dict(zip(conds, conds))
    swap[conds[0]], swap[conds[1]] = conds[1], conds[0]
    pred_x = np.maximum(x[rows] + rng.normal(0, 0.15, size=(len(rows), x.shape[1])).astype(np.float32), 0).astype(np.float32)
    pred_x[-len(ctrl_rows):] = x[ctrl_rows]
    pred_labels = [swap.get(v, v) for v in labels[rows]]
    pred = ad.AnnData(X=pred_x, obs=pd.DataFrame({PERT_COL: pd.Categorical(pred_labels)}, index=[f"p{i}" for i in range(len(rows))]),
                      var=truth.var[[]].copy())
    return truth, pred, control, conds


def _direct_energy(x, y):
    """Unblocked: every pairwise distance at once by broadcasting."""
    def mean_dist(a, b):
        d2 = ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)
        return np.sqrt(np.maximum(d2, 1e-8)).mean()
    return mean_dist(x, y) - 0.5 * mean_dist(x, x) - 0.5 * mean_dist(y, y)


def _direct_metrics(truth, pred, control, conds, n_deg, n_pcs):
    """Every pairwise matrix straight from the definitions (scanpy's own t-test for the DEGs)."""
    import scanpy as sc

    tx, px = np.asarray(truth.X, dtype=np.float64), np.asarray(pred.X, dtype=np.float64)
    tl, pl = truth.obs[PERT_COL].astype(str).to_numpy(), pred.obs[PERT_COL].astype(str).to_numpy()
    ctrl = tx[tl == control]
    hvg = truth.var["highly_variable"].to_numpy(bool) if "highly_variable" in truth.var else np.ones(truth.n_vars, bool)
    mean = tx.mean(0)
    _, _, vt = np.linalg.svd(tx[:, hvg] - mean[hvg], full_matrices=False)
    proj = lambda a: (a[:, hvg] - mean[hvg]) @ vt[:n_pcs].T  # noqa: E731

    def scores(adata_x, labels):
        a = ad.AnnData(X=np.vstack([adata_x[labels != control], ctrl]).astype(np.float32),
                       obs=pd.DataFrame({"g": pd.Categorical(list(labels[labels != control]) + [control] * len(ctrl))},
                                        index=[str(i) for i in range(int((labels != control).sum()) + len(ctrl))]),
                       var=pd.DataFrame(index=truth.var_names))
        sc.tl.rank_genes_groups(a, "g", reference=control, method="t-test_overestim_var", n_genes=a.n_vars)
        df = sc.get.rank_genes_groups_df(a, group=None).pivot(index="group", columns="names", values="scores")
        return df.replace([np.inf, -np.inf], 0.0).loc[conds].to_numpy()  # columns sorted by name, like PerturBench

    def top(s):
        return [set(np.argsort(np.abs(r), kind="stable")[::-1][:n_deg]) for r in s]

    pt, tt = top(scores(px, pl)), top(scores(tx, tl))
    lfc = lambda a: np.log2(a.mean(0) + 0.1) - np.log2(ctrl.mean(0) + 0.1)  # noqa: E731
    n = len(conds)
    mats = {m: np.zeros((n, n)) for m in METRICS}
    for i, ci in enumerate(conds):
        p = px[pl == ci]
        for j, cj in enumerate(conds):
            t = tx[tl == cj]
            a, b = lfc(p), lfc(t)
            mats["cosine_logfc"][i, j] = a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
            mats["rmse_average"][i, j] = np.sqrt(np.mean((p.mean(0) - t.mean(0)) ** 2))
            mats["mmd_gex"][i, j] = _direct_energy(p, t)
            mats["mmd_pca"][i, j] = _direct_energy(proj(p), proj(t))
            mats["deg_recall"][i, j] = len(pt[i] & tt[j]) / n_deg
    return mats


@pytest.mark.parametrize("options, tol", [
    ({}, 1e-9),
    ({"block_size": 37}, 1e-9),  # blocks straddle conditions
    ({"block_size": 37, "distance_dtype": "float32"}, 2e-4),
])
def test_blockwise_metrics_equal_direct_computation_on_demo(demo_pair, options, tol):
    truth, pred, control, conds = demo_pair
    frame = perturbench_metrics(pred, truth, control, seed=0, n_deg=20, pca_components=10, options=options)
    assert list(frame["condition"]) == conds
    mats = _direct_metrics(truth, pred, control, conds, n_deg=20, n_pcs=10)
    for metric, (_, _, kind) in METRICS.items():
        m_tol = tol if metric.startswith("mmd") else 1e-9
        np.testing.assert_allclose(frame[metric].to_numpy(), np.diag(mats[metric]), rtol=m_tol, atol=m_tol, err_msg=metric)
        if tol < 1e-6:  # ranks from upstream's rank_helper on the direct matrices, where no tie makes them random
            up = upstream_rank_helper(pd.DataFrame(mats[metric], index=conds, columns=conds), kind, "later", 0)
            for j in range(len(conds)):
                if not np.any(np.isclose(np.delete(mats[metric][:, j], j), mats[metric][j, j], rtol=1e-7, atol=1e-12)):
                    assert frame[metric + "_rank"].iloc[j] == pytest.approx(up.iloc[j], abs=1e-12), (metric, j)


def test_cell_cap_is_exact_when_no_condition_exceeds_it(demo_pair):
    truth, pred, control, _ = demo_pair
    exact = perturbench_metrics(pred, truth, control, n_deg=20, pca_components=10)
    capped = perturbench_metrics(pred, truth, control, n_deg=20, pca_components=10, options={"max_cells_per_condition": 1000})
    pd.testing.assert_frame_equal(exact, capped)
    small = perturbench_metrics(pred, truth, control, n_deg=20, pca_components=10, options={"max_cells_per_condition": 20})
    assert not np.allclose(small["mmd_gex"], exact["mmd_gex"])
    pd.testing.assert_series_equal(small["rmse_average"], exact["rmse_average"])  # only the MMDs are capped

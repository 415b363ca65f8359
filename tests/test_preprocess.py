"""No leakage: every statistic the model sees is computed from train cells only."""

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from perturb_repro.data.pca import fit_pca, PCABasis
from perturb_repro.data.preprocess import select_genes_perturbench, select_hvgs, summary
from perturb_repro.data.truth import build_test_truth


def _scramble_held_out(adata, seed=0):
    """Replace every val/test cell's values with unrelated noise; train cells stay untouched."""
    out = adata.copy()
    x = out.X.toarray() if sp.issparse(out.X) else np.array(out.X)
    held = (out.obs["split"] != "train").to_numpy()
    rng = np.random.default_rng(seed)
    x[held] = rng.gamma(1.0, 3.0, size=(held.sum(), x.shape[1])).astype(np.float32)
    out.X = x
    return out


def test_pca_depends_on_train_cells_only(demo_processed):
    before = fit_pca(demo_processed, 20, seed=0)
    after = fit_pca(_scramble_held_out(demo_processed), 20, seed=0)
    np.testing.assert_allclose(before.mean, after.mean, rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.abs(before.components), np.abs(after.components), atol=1e-4)
    # and the basis is not trivially independent of the data: scrambling train cells changes it
    flipped = demo_processed.copy()
    flipped.obs["split"] = np.where(flipped.obs["split"] == "train", "test", "train")
    moved = fit_pca(_scramble_held_out(flipped), 20, seed=0)
    assert not np.allclose(before.mean, moved.mean, atol=1e-3)


def test_hvg_choice_depends_on_train_cells_only(demo_processed):
    chosen = select_hvgs(demo_processed, 100, "seurat", must_keep=[])
    again = select_hvgs(_scramble_held_out(demo_processed), 100, "seurat", must_keep=[])
    assert chosen == again and len(chosen) == 100


def test_hvg_keeps_perturbed_genes_and_panel_noop(demo_processed):
    assert select_hvgs(demo_processed, None, "seurat", []) == list(demo_processed.var_names)
    target = demo_processed.var_names[-1]
    assert target in select_hvgs(demo_processed, 10, "seurat", must_keep=[target])


def test_processed_contract(demo_processed):
    obs = demo_processed.obs
    assert {"condition", "split", "subgroup", "is_control", "cell_type"} <= set(obs.columns)
    assert obs.loc[obs["is_control"], "split"].eq("train").all()
    assert demo_processed.X.dtype == np.float32
    s = summary(demo_processed)
    assert s["cells"] == 3375 and s["genes"] == 500
    assert s["splits"]["test"]["conditions"] == 14


def test_truth_has_test_and_control_cells_only(demo_processed):
    truth = build_test_truth(demo_processed)
    assert set(truth.obs["split"]) == {"test", "train"}
    assert truth.obs.loc[truth.obs["split"] == "train", "is_control"].all()
    assert isinstance(truth.X, np.ndarray)


def test_pca_roundtrip_and_clip(tmp_path, demo_processed):
    basis = fit_pca(demo_processed, 10, seed=0)
    basis.save(tmp_path / "pca.npz")
    loaded = PCABasis.load(tmp_path / "pca.npz")
    z = loaded.transform(demo_processed.X[:5])
    back = loaded.inverse(z)
    assert back.min() >= 0.0  # clipped: log-expression cannot be negative
    raw = z @ loaded.components + loaded.mean
    np.testing.assert_allclose(back, np.clip(raw, 0, None), atol=1e-5)


def test_perturbench_gene_selection_uses_train_cells_only():
    """HVG (seurat_v3 on counts, batch = line) + DEGs + perturbed genes: blind to val/test cells."""
    rng = np.random.default_rng(0)
    genes = [f"g{i}" for i in range(120)] + ["P1", "P2", "P3"]
    rows = [(c, line) for line in ["a", "b"] for c in ["control"] * 40 + ["P1"] * 20 + ["P2"] * 20 + ["P3"] * 20]
    obs = pd.DataFrame(rows, columns=["condition", "cell_type"], index=[f"c{i}" for i in range(len(rows))])
    obs["is_control"] = obs["condition"] == "control"
    obs["split"] = np.where((obs["condition"] == "P3") & (obs["cell_type"] == "a"), "test", "train")
    rates = rng.gamma(1.0, 2.0, size=len(genes))
    counts = rng.poisson(rates, size=(len(obs), len(genes))).astype(np.float32)
    adata = ad.AnnData(X=np.log1p(counts), obs=obs, var=pd.DataFrame(index=genes))
    adata.layers["counts"] = counts
    chosen = select_genes_perturbench(adata, "control", ["cell_type"], n_top_genes=30, n_degs=5, must_keep=["P1", "P2", "P3"])
    scrambled = adata.copy()
    held = (scrambled.obs["split"] != "train").to_numpy()
    noise = rng.poisson(rng.gamma(1.0, 8.0, size=len(genes)), size=(held.sum(), len(genes))).astype(np.float32)
    scrambled.layers["counts"][held] = noise
    scrambled.X[held] = np.log1p(noise)
    assert select_genes_perturbench(scrambled, "control", ["cell_type"], 30, 5, ["P1", "P2", "P3"]) == chosen
    assert {"P1", "P2", "P3"} <= set(chosen) and 30 <= len(chosen) < len(genes)
    # and it does depend on the train cells
    moved = adata.copy()
    moved.layers["counts"][~held] = np.roll(moved.layers["counts"][~held], 5, axis=1)
    moved.X[~held] = np.log1p(moved.layers["counts"][~held])
    assert select_genes_perturbench(moved, "control", ["cell_type"], 30, 5, []) != [g for g in chosen if g not in ("P1", "P2", "P3")]
    # the configured path: preprocess(gene_selection=perturbench) keeps exactly these genes, counts dropped
    from perturb_repro.data.preprocess import preprocess

    table = obs[["condition", "cell_type", "split"]].drop_duplicates().assign(subgroup="")
    cfg = {"control_label": "control", "group_by": ["cell_type"], "covariates": ["cell_type"],
           "preprocess": {"gene_selection": "perturbench", "n_top_genes": 30, "n_degs": 5}}
    out = preprocess(adata.copy(), table, cfg, "split.csv")
    assert list(out.var_names) == chosen and not out.layers and list(out.uns["group_by"]) == ["cell_type"]

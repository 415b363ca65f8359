"""No leakage: every statistic the model sees is computed from train cells only."""

import numpy as np
import scipy.sparse as sp

from perturb_repro.data.pca import fit_pca, PCABasis
from perturb_repro.data.preprocess import select_hvgs, summary
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

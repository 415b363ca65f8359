"""The chunked PCA fit: exact (= an SVD of the centred train cells), never dense whole, backed-file ready."""

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
from fakes import record_block_rows
from sklearn.decomposition import PCA

from perturb_repro.data import pca as pca_mod
from perturb_repro.data.pca import PCABasis, fit_pca, fit_pca_file, train_moments


def _align(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a`` with each row's sign flipped to agree with ``b`` (components are defined up to sign)."""
    return a * np.sign(np.sum(a * b, axis=1))[:, None]


def _train_dense(adata) -> np.ndarray:
    x = adata[adata.obs["split"] == "train"].X
    return np.asarray(x.toarray() if sp.issparse(x) else x, dtype=np.float64)


def _well_separated(values: np.ndarray, k: int) -> int:
    """How many leading components have eigen-gaps large enough for a unique direction (first k)."""
    gaps = -np.diff(values[: k + 1]) / values[0]
    bad = np.flatnonzero(gaps < 1e-4)
    return int(bad[0]) if bad.size else k


def test_components_equal_an_svd_of_the_centred_train_cells(demo_processed):
    basis = fit_pca(demo_processed, 30, seed=0)
    train = _train_dense(demo_processed)
    mean = train.mean(axis=0)
    _, s, vt = np.linalg.svd(train - mean, full_matrices=False)
    variance = s**2 / (train.shape[0] - 1)
    k = _well_separated(variance, 30)
    assert k >= 20
    np.testing.assert_allclose(basis.mean, mean, atol=1e-6)
    np.testing.assert_allclose(basis.explained_variance, variance[:30], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(_align(basis.components[:k], vt[:k]), vt[:k], atol=1e-3)


def test_sparse_chunked_equals_dense_pca_up_to_sign(demo_processed, monkeypatch):
    """Sparse X, tiny chunks (many partial blocks) vs scikit-learn's dense full-SVD PCA."""
    sparse = demo_processed.copy()
    sparse.X = sp.csr_matrix(np.asarray(demo_processed.X.toarray() if sp.issparse(demo_processed.X)
                                        else demo_processed.X, dtype=np.float32))
    monkeypatch.setattr(pca_mod, "CHUNK_BYTES", 8 * sparse.n_vars * 37)  # 37 rows per chunk
    chunked = fit_pca(sparse, 25, seed=0)
    dense = PCA(n_components=25, svd_solver="full").fit(_train_dense(demo_processed))
    k = _well_separated(dense.explained_variance_, 25)
    np.testing.assert_allclose(chunked.mean, dense.mean_, atol=1e-6)
    np.testing.assert_allclose(chunked.explained_variance, dense.explained_variance_, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(_align(chunked.components[:k], dense.components_[:k]), dense.components_[:k], atol=1e-3)
    # the same chunked fit with one chunk gives the same basis (chunking changes nothing)
    monkeypatch.setattr(pca_mod, "CHUNK_BYTES", 2**30)
    whole = fit_pca(sparse, 25, seed=0)
    np.testing.assert_allclose(whole.components, chunked.components, atol=1e-4)


def test_backed_file_fit_equals_in_memory_fit(demo_processed, tmp_path, monkeypatch):
    path = tmp_path / "processed.h5ad"
    demo_processed.write_h5ad(path)
    monkeypatch.setattr(pca_mod, "CHUNK_BYTES", 8 * demo_processed.n_vars * 101)
    memory = fit_pca(demo_processed, 20, seed=0)
    backed = ad.read_h5ad(path, backed="r")
    try:
        on_disk = fit_pca(backed, 20, seed=0)
    finally:
        backed.file.close()
    np.testing.assert_allclose(on_disk.components, memory.components, atol=1e-5)
    np.testing.assert_allclose(on_disk.mean, memory.mean, atol=1e-6)
    cfg = {"pca": {"n_components": 20}, "split": {"seed": 0}}
    fit_pca_file(path, cfg, tmp_path / "pca.npz")
    loaded = PCABasis.load(tmp_path / "pca.npz")
    np.testing.assert_allclose(loaded.components, memory.components, atol=1e-5)


def test_fit_never_densifies_the_whole_train_matrix(demo_processed, monkeypatch):
    sparse = demo_processed.copy()
    if not sp.issparse(sparse.X):
        sparse.X = sp.csr_matrix(sparse.X)
    n_train = int((sparse.obs["split"] == "train").sum())
    rows_per_chunk = 50
    monkeypatch.setattr(pca_mod, "CHUNK_BYTES", 8 * sparse.n_vars * rows_per_chunk)
    seen = record_block_rows(monkeypatch, pca_mod, "_row_blocks")
    fit_pca(sparse, 10, seed=0)
    assert sum(seen) == n_train and max(seen) <= rows_per_chunk


def test_moments_equal_numpy(demo_processed):
    n, mean, cov = train_moments(demo_processed, chunk_bytes=8 * demo_processed.n_vars * 64)
    train = _train_dense(demo_processed)
    assert n == train.shape[0]
    np.testing.assert_allclose(mean, train.mean(axis=0), atol=1e-9)
    np.testing.assert_allclose(cov, np.cov(train, rowvar=False), atol=1e-8)


def test_too_few_train_cells_is_refused(demo_processed):
    from perturb_repro.errors import PipelineInputError

    one = demo_processed.copy()
    one.obs["split"] = ["train"] + ["test"] * (one.n_obs - 1)
    with pytest.raises(PipelineInputError):
        fit_pca(one, 5, seed=0)

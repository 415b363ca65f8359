"""PCA fitted on train cells only; the same basis projects every split and maps predictions back.

The fit is exact and never holds the train matrix dense: the train cells are read in row chunks (from an
in-memory sparse or dense X, or from a file opened ``backed="r"``), each chunk densified alone, and their
shifted sum and cross-product accumulated in float64 (a G x G matrix: 392 MB at 7,000 genes). The
covariance's leading eigenvectors are the principal axes -- the right singular vectors of the centred train
matrix, as a full SVD would give them (``tests/test_pca.py`` checks it against one). Memory: G x G twice plus
one 32 MB chunk (``CHUNK_BYTES``); time: one pass over the cells (a chunk's G x G product) plus one G x G
eigendecomposition.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import scipy.sparse as sp

from ..errors import PipelineInputError
from ..io import atomic_path
from .preprocess import SPLIT


def dense(x) -> np.ndarray:
    return np.asarray(x.toarray() if sp.issparse(x) else x, dtype=np.float32)


@dataclass(frozen=True)
class PCABasis:
    components: np.ndarray  # [n_components, n_genes]
    mean: np.ndarray  # [n_genes]
    explained_variance: np.ndarray

    def transform(self, x) -> np.ndarray:
        return (dense(x) - self.mean) @ self.components.T

    def inverse(self, z: np.ndarray) -> np.ndarray:
        """Back to gene space. Linear maps go below zero; log-expression cannot, so clip at 0."""
        return np.clip(np.asarray(z) @ self.components + self.mean, 0.0, None).astype(np.float32)

    def save(self, path: str | Path) -> None:
        with atomic_path(path) as tmp:
            np.savez(tmp, components=self.components, mean=self.mean, explained_variance=self.explained_variance)

    @classmethod
    def load(cls, path: str | Path) -> "PCABasis":
        with np.load(path) as data:
            missing = {"components", "mean", "explained_variance"} - set(data.files)
            if missing:
                raise PipelineInputError(path, sorted(missing)[0], "array missing from PCA file")
            return cls(data["components"], data["mean"], data["explained_variance"])


# float64 bytes of one densified chunk of train rows
CHUNK_BYTES = 32 * 2**20


def _row_blocks(x, rows: np.ndarray, backed: bool, chunk_rows: int):
    """Dense float64 blocks of ``x[rows]`` (sorted row indices), ``chunk_rows`` rows of the source at a time.

    Backed matrices are read in windows of consecutive rows (what h5py reads efficiently) and the wanted rows
    kept; in-memory ones are indexed directly.
    """
    if backed:
        for lo in range(0, x.shape[0], chunk_rows):
            hi = min(lo + chunk_rows, x.shape[0])
            keep = rows[(rows >= lo) & (rows < hi)] - lo
            if keep.size:
                block = x[lo:hi]
                block = block[keep]
                yield np.asarray(block.toarray() if sp.issparse(block) else block, dtype=np.float64)
    else:
        for lo in range(0, rows.size, chunk_rows):
            block = x[rows[lo:lo + chunk_rows]]
            yield np.asarray(block.toarray() if sp.issparse(block) else block, dtype=np.float64)


def _sign_flip(components: np.ndarray) -> np.ndarray:
    """Deterministic signs: each component's largest-magnitude entry positive (scikit-learn's v-based flip)."""
    largest = np.argmax(np.abs(components), axis=1)
    signs = np.sign(components[np.arange(components.shape[0]), largest])
    signs[signs == 0] = 1.0
    return components * signs[:, None]


def train_moments(adata: ad.AnnData, chunk_bytes: int | None = None) -> tuple[int, np.ndarray, np.ndarray]:
    """(n train cells, train mean, train covariance with ddof=1), accumulated over row chunks in float64."""
    rows = np.flatnonzero((adata.obs[SPLIT] == "train").to_numpy())
    n_genes = adata.n_vars
    if rows.size < 2:
        raise PipelineInputError("processed.h5ad", "obs['split']", f"{rows.size} train cell(s): PCA needs >= 2")
    chunk_rows = max(1, int((chunk_bytes or CHUNK_BYTES) // (8 * n_genes)))
    shift = None
    total = np.zeros(n_genes)
    cross = np.zeros((n_genes, n_genes))
    for block in _row_blocks(adata.X, rows, adata.isbacked, chunk_rows):
        if shift is None:  # centring on the first chunk's mean keeps the raw second moments well conditioned
            shift = block.mean(axis=0)
        block -= shift
        total += block.sum(axis=0)
        cross += block.T @ block
    n = rows.size
    mean_shifted = total / n
    cov = (cross - n * np.outer(mean_shifted, mean_shifted)) / (n - 1)
    return n, mean_shifted + shift, (cov + cov.T) / 2


def fit_pca(adata: ad.AnnData, n_components: int, seed: int) -> PCABasis:
    """Fit on the train split's cells only (controls are train cells); exact, chunked, never dense whole.

    ``adata`` may be in memory (sparse or dense X) or opened ``backed="r"``. ``seed`` is kept for the
    interface: the fit is deterministic (an exact eigendecomposition, signs fixed by :func:`_sign_flip`).
    """
    del seed
    n, mean, cov = train_moments(adata)
    k = min(n_components, n - 1, adata.n_vars)
    from scipy.linalg import eigh  # here: every model job loads a basis, only this step fits one

    values, vectors = eigh(cov, subset_by_index=[adata.n_vars - k, adata.n_vars - 1])
    order = np.argsort(values)[::-1]
    components = _sign_flip(vectors[:, order].T)
    return PCABasis(
        components.astype(np.float32),
        mean.astype(np.float32),
        np.clip(values[order], 0.0, None).astype(np.float32),
    )


def fit_pca_file(processed: str | Path, dataset_cfg, out_npz: str | Path) -> None:
    """The ``fit_pca`` rule: open ``processed.h5ad`` lazily (X and layers stay on disk), fit, save."""
    from .backed import LazyH5ad

    with LazyH5ad(processed) as adata:
        basis = fit_pca(adata, int(dataset_cfg["pca"]["n_components"]), int(dataset_cfg["split"].get("seed", 0)))
    basis.save(out_npz)

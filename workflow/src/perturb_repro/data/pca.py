"""PCA fitted on train cells only; the same basis projects every split and maps predictions back."""

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


def fit_pca(adata: ad.AnnData, n_components: int, seed: int) -> PCABasis:
    """Fit on the train split's cells only (controls are train cells)."""
    train = dense(adata[adata.obs[SPLIT] == "train"].X)
    n = min(n_components, train.shape[0] - 1, train.shape[1])
    from sklearn.decomposition import PCA  # here: every model job loads a basis, only this step fits one

    model = PCA(n_components=n, svd_solver="full" if train.shape[1] <= 2000 else "randomized", random_state=seed)
    model.fit(train)
    return PCABasis(
        model.components_.astype(np.float32),
        model.mean_.astype(np.float32),
        model.explained_variance_.astype(np.float32),
    )

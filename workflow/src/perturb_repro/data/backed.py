"""An h5ad opened with X *and layers* left on disk, and appendable CSR arrays for writing one in row chunks.

``anndata.read_h5ad(path, backed="r")`` keeps only X on disk: it reads every layer into memory -- for CD4's
processed file (~22M cells, raw counts of 3,699 genes in ``layers['counts']``) tens of GB before any work.
:class:`LazyH5ad` reads obs, var, uns (and the small obsm/varm/obsp/varp) and leaves X and each layer as an
on-disk matrix (``anndata.io.sparse_dataset`` for CSR/CSC, the h5py dataset for dense) that is read by rows.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import scipy.sparse as sp

from ..errors import PipelineInputError

# HDF5 chunk (elements) of appended CSR arrays: h5py's guess for an empty dataset is 1,024 elements, which makes
# appending quadratic in practice (200 appends of 20k values: 152 s vs 3 s with this chunk)
APPEND_CHUNK = 1 << 18


def _on_disk(element):
    """A matrix element left on disk: sparse groups as anndata sparse datasets, dense arrays as h5py datasets."""
    from anndata.io import sparse_dataset

    encoding = element.attrs.get("encoding-type", "")
    if encoding in ("csr_matrix", "csc_matrix"):
        return sparse_dataset(element)
    return element


class LazyH5ad:
    """obs/var/uns in memory, X and layers on disk; ``close()`` (or ``with``) closes the file."""

    isbacked = True

    def __init__(self, path: str | Path):
        import h5py
        from anndata.io import read_elem

        try:
            self.file = h5py.File(path, "r")
        except OSError as err:
            raise PipelineInputError(path, "h5ad", f"cannot be opened ({err})") from err
        f = self.file
        try:
            self.obs = read_elem(f["obs"])
            self.var = read_elem(f["var"])
            self.uns = read_elem(f["uns"]) if "uns" in f else {}
            self.X = _on_disk(f["X"]) if "X" in f else None
            self.layers = {k: _on_disk(f["layers"][k]) for k in f["layers"]} if "layers" in f else {}
            self.obsm, self.varm, self.obsp, self.varp = (
                ({k: read_elem(f[name][k]) for k in f[name]} if name in f else {}) for name in ("obsm", "varm", "obsp", "varp")
            )
        except BaseException:
            f.close()
            raise

    @property
    def n_obs(self) -> int:
        return len(self.obs)

    @property
    def n_vars(self) -> int:
        return len(self.var)

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> "LazyH5ad":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def empty_csr(group, name: str, n_vars: int, dtype=np.float32):
    """An empty resizable CSR element ``group[name]`` (0 x n_vars; int32 indices, int64 indptr so more than 2^31
    values fit), its arrays chunked for appending; returns the anndata sparse dataset to ``append`` rows to."""
    from anndata.io import sparse_dataset, write_elem

    write_elem(group, name, sp.csr_matrix((0, n_vars), dtype=dtype))
    element = group[name]
    for array, kind in (("data", dtype), ("indices", np.int32), ("indptr", np.int64)):
        del element[array]
        element.create_dataset(array, shape=(1 if array == "indptr" else 0,), dtype=kind, maxshape=(None,),
                               chunks=(APPEND_CHUNK,))
    return sparse_dataset(element)


def rows_in_memory(lazy: LazyH5ad, rows: np.ndarray, window: int = 8192):
    """``AnnData`` of the sorted ``rows`` of a lazily opened file: X read in windows of consecutive rows (sparse
    stays sparse), obs rows (unused categories dropped, as AnnData's subsetting does), var and uns; no layers."""
    import anndata as ad
    import pandas as pd

    rows = np.asarray(rows, dtype=np.int64)
    blocks = []
    for lo in range(0, lazy.n_obs, window):
        hi = min(lo + window, lazy.n_obs)
        keep = rows[(rows >= lo) & (rows < hi)] - lo
        if keep.size:
            block = lazy.X[lo:hi]
            blocks.append(block[keep] if sp.issparse(block) else np.asarray(block)[keep])
    if not blocks:
        x = np.zeros((0, lazy.n_vars), dtype=np.float32)
    elif sp.issparse(blocks[0]):
        x = sp.vstack(blocks, format="csr")
    else:
        x = np.concatenate(blocks)
    obs = lazy.obs.iloc[rows].copy()
    for column in obs.columns:
        if isinstance(obs[column].dtype, pd.CategoricalDtype):
            obs[column] = obs[column].cat.remove_unused_categories()
    return ad.AnnData(X=x, obs=obs, var=lazy.var.copy(), uns=dict(lazy.uns))

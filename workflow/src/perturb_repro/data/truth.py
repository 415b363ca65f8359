"""The scoring truth: real test cells plus the real control cells, dense, in processed gene order.

:func:`build_test_truth` returns it in memory (tests, small data). :func:`write_test_truth` (the
``extract_test_truth`` rule) writes the same file without holding it whole: ``processed.h5ad`` is opened lazily
(:class:`~perturb_repro.data.backed.LazyH5ad`: X *and* layers stay on disk), everything but X and the layers is
written first, then the dense float32 X is filled in row chunks (``CHUNK_BYTES``, 16 MB of float32, per chunk) and
each layer copied window by window (CSR stays CSR). Peak memory: the obs plus one chunk.
``tests/test_truth.py`` checks both files are equal.
"""

from __future__ import annotations

import copy
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..io import atomic_path
from .backed import LazyH5ad
from .pca import dense
from .preprocess import SPLIT
from .source import IS_CONTROL

# float32 bytes of one dense chunk of truth rows
CHUNK_BYTES = 16 * 2**20


def truth_rows(obs) -> np.ndarray:
    """Boolean mask of the cells the truth keeps (see :func:`build_test_truth`)."""
    is_test = (obs[SPLIT] == "test").to_numpy()
    is_control = obs[IS_CONTROL].to_numpy(dtype=bool)
    controls = is_control & is_test if (is_control & is_test).any() else is_control
    return (is_test & ~is_control) | controls


def build_test_truth(processed: ad.AnnData) -> ad.AnnData:
    """Test cells plus the control cells; obs keeps the group_by columns and uns['group_by'], so
    prediction and scoring can work per group (each group's test conditions against its own controls).

    When control cells were split (PerturBench's ``train_control_fraction``) only the test controls
    are kept, as PerturBench evaluates against them; otherwise (GEARS: every control in train) all.
    """
    truth = processed[truth_rows(processed.obs)].copy()
    truth.X = dense(truth.X)
    return truth


def _skeleton(processed: ad.AnnData, index: np.ndarray, layers: bool = True) -> ad.AnnData:
    """Everything of ``processed[index]`` except X (layers unless ``layers=False``, obsm, obsp subset; var, varm,
    varp, uns as they are)."""
    obs = processed.obs.iloc[index].copy()
    for column in obs.columns:  # as AnnData's subsetting does: categories without cells are dropped
        if isinstance(obs[column].dtype, pd.CategoricalDtype):
            obs[column] = obs[column].cat.remove_unused_categories()
    return ad.AnnData(
        X=None,
        obs=obs,
        var=processed.var.copy(),
        uns=copy.deepcopy(dict(processed.uns)),
        obsm={k: v[index] for k, v in processed.obsm.items()},
        varm={k: v for k, v in processed.varm.items()},
        layers={k: v[index] for k, v in processed.layers.items()} if layers else {},
        obsp={k: v[index][:, index] for k, v in processed.obsp.items()},
        varp={k: v for k, v in processed.varp.items()},
    )


def _dense_chunks(x, index: np.ndarray, backed: bool, chunk_rows: int):
    """(offset, float32 block) over ``x[index]``: backed matrices in windows of consecutive source rows."""
    offset = 0
    if backed:
        for lo in range(0, x.shape[0], chunk_rows):
            hi = min(lo + chunk_rows, x.shape[0])
            keep = index[(index >= lo) & (index < hi)] - lo
            if keep.size:
                block = dense(x[lo:hi][keep])
                yield offset, block
                offset += block.shape[0]
    else:
        for lo in range(0, index.size, chunk_rows):
            block = dense(x[index[lo:lo + chunk_rows]])
            yield offset, block
            offset += block.shape[0]


def _layer_chunks(layer, index: np.ndarray, chunk_rows: int):
    """Rows ``index`` of an on-disk layer in windows of consecutive source rows (sparse stays sparse)."""
    for lo in range(0, layer.shape[0], chunk_rows):
        hi = min(lo + chunk_rows, layer.shape[0])
        keep = index[(index >= lo) & (index < hi)] - lo
        if keep.size:
            block = layer[lo:hi]
            yield block[keep] if sp.issparse(block) else np.asarray(block)[keep]


def _write_layers(handle, layers: dict, index: np.ndarray, chunk_rows: int, n_genes: int) -> None:
    """The on-disk layers' truth rows, appended window by window (CSR layers as CSR, dense as dense)."""
    from .backed import empty_csr

    group = handle.require_group("layers")
    for name, layer in layers.items():
        if hasattr(layer, "format") and layer.format == "csr":
            store = empty_csr(group, name, n_genes, np.dtype(layer.dtype))
            for block in _layer_chunks(layer, index, chunk_rows):
                store.append(sp.csr_matrix(block))
            continue
        if hasattr(layer, "format"):  # CSC rows cannot be read by windows cheaply: bring the rows in once
            from anndata.io import write_elem

            write_elem(group, name, layer[index])
            continue
        out = group.create_dataset(name, shape=(index.size, n_genes), dtype=layer.dtype)
        out.attrs["encoding-type"], out.attrs["encoding-version"] = "array", "0.2.0"
        offset = 0
        for block in _layer_chunks(layer, index, chunk_rows):
            out[offset:offset + block.shape[0]] = block
            offset += block.shape[0]


def write_truth_file(processed: ad.AnnData, out_h5ad: str | Path, chunk_bytes: int | None = None) -> None:
    """Write the truth of ``processed`` (in memory, backed or :class:`~perturb_repro.data.backed.LazyH5ad`) to
    ``out_h5ad``, X filled chunk by chunk; a lazily opened file's layers are copied chunk by chunk too."""
    import h5py

    index = np.flatnonzero(truth_rows(processed.obs))
    n_genes = processed.n_vars
    chunk_rows = max(1, int((chunk_bytes or CHUNK_BYTES) // (4 * n_genes)))
    lazy_layers = processed.layers if isinstance(processed, LazyH5ad) else {}
    skeleton = _skeleton(processed, index, layers=not lazy_layers)
    with atomic_path(out_h5ad) as tmp:
        skeleton.write_h5ad(tmp)
        del skeleton
        with h5py.File(tmp, "r+") as handle:
            if "X" in handle:
                del handle["X"]
            x_out = handle.create_dataset("X", shape=(index.size, n_genes), dtype=np.float32)
            x_out.attrs["encoding-type"] = "array"
            x_out.attrs["encoding-version"] = "0.2.0"
            for offset, block in _dense_chunks(processed.X, index, processed.isbacked, chunk_rows):
                x_out[offset:offset + block.shape[0]] = block
            _write_layers(handle, lazy_layers, index, chunk_rows, n_genes)


def write_test_truth(processed_h5ad: str | Path, out_h5ad: str | Path, chunk_bytes: int | None = None) -> None:
    """The ``extract_test_truth`` rule: ``processed.h5ad`` opened lazily (X and layers on disk), truth written in row chunks."""
    with LazyH5ad(processed_h5ad) as processed:
        write_truth_file(processed, out_h5ad, chunk_bytes)


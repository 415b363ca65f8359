"""The chunked truth writer: the same file as the in-memory truth, X filled in row chunks."""

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from fakes import record_block_rows

from perturb_repro.data import truth as truth_mod
from perturb_repro.data.truth import build_test_truth, write_test_truth, write_truth_file
from perturb_repro.io import write_h5ad


def _assert_same_file(a_path, b_path):
    a, b = ad.read_h5ad(a_path), ad.read_h5ad(b_path)
    assert a.shape == b.shape
    assert isinstance(a.X, np.ndarray) and isinstance(b.X, np.ndarray) and b.X.dtype == np.float32
    np.testing.assert_array_equal(a.X, b.X)
    pd.testing.assert_frame_equal(a.obs, b.obs)
    pd.testing.assert_frame_equal(a.var, b.var)
    assert set(a.layers) == set(b.layers)
    for key in a.layers:
        la, lb = a.layers[key], b.layers[key]
        assert sp.issparse(la) == sp.issparse(lb)
        np.testing.assert_array_equal(la.toarray() if sp.issparse(la) else la, lb.toarray() if sp.issparse(lb) else lb)
    assert a.uns.keys() == b.uns.keys()
    for key in a.uns:
        np.testing.assert_array_equal(np.asarray(a.uns[key]), np.asarray(b.uns[key]))


@pytest.mark.parametrize("rows_per_chunk", [1, 37, 100_000])
def test_chunked_writer_equals_in_memory_truth_on_the_demo(demo_processed, tmp_path, rows_per_chunk):
    processed = tmp_path / "processed.h5ad"
    write_h5ad(demo_processed, processed)
    write_h5ad(build_test_truth(ad.read_h5ad(processed)), tmp_path / "memory.h5ad")  # what the rule wrote before
    write_test_truth(processed, tmp_path / "chunked.h5ad", chunk_bytes=4 * demo_processed.n_vars * rows_per_chunk)
    _assert_same_file(tmp_path / "memory.h5ad", tmp_path / "chunked.h5ad")


def test_chunked_writer_keeps_sparse_layers_and_test_controls(demo_processed, tmp_path):
    """A PerturBench-like processed file: counts layer, controls split, group_by in uns."""
    adata = demo_processed.copy()
    rng = np.random.default_rng(0)
    adata.layers["counts"] = sp.random(adata.n_obs, adata.n_vars, density=0.1, format="csr", random_state=0,
                                       dtype=np.float32)
    control = adata.obs["is_control"].to_numpy(dtype=bool)
    split = adata.obs["split"].to_numpy().copy()
    split[control] = rng.choice(["train", "val", "test"], int(control.sum()))
    adata.obs["split"] = split
    adata.uns["group_by"] = ["cell_type"]
    processed = tmp_path / "processed.h5ad"
    write_h5ad(adata, processed)
    write_h5ad(build_test_truth(ad.read_h5ad(processed)), tmp_path / "memory.h5ad")
    write_test_truth(processed, tmp_path / "chunked.h5ad", chunk_bytes=4 * adata.n_vars * 50)
    _assert_same_file(tmp_path / "memory.h5ad", tmp_path / "chunked.h5ad")
    out = ad.read_h5ad(tmp_path / "chunked.h5ad")
    assert sp.issparse(out.layers["counts"])
    assert set(out.obs.loc[out.obs["is_control"].astype(bool), "split"]) == {"test"}


def test_writer_reads_backed_windows_only(demo_processed, tmp_path, monkeypatch):
    processed = tmp_path / "processed.h5ad"
    write_h5ad(demo_processed, processed)
    rows = 64
    sizes = record_block_rows(monkeypatch, truth_mod, "_dense_chunks", block=lambda item: item[1])  # (offset, block)
    backed = ad.read_h5ad(processed, backed="r")
    try:
        assert backed.isbacked
        write_truth_file(backed, tmp_path / "t.h5ad", chunk_bytes=4 * demo_processed.n_vars * rows)
    finally:
        backed.file.close()
    assert max(sizes) <= rows and sum(sizes) == ad.read_h5ad(tmp_path / "t.h5ad").n_obs


def test_layers_stay_on_disk_and_are_copied_window_by_window(demo_processed, tmp_path, monkeypatch):
    """anndata's backed mode reads every layer into memory (CD4: tens of GB of counts); the rule's lazy opener
    does not, and the truth writer copies a layer's rows in windows of at most chunk rows."""
    import tracemalloc

    from perturb_repro.data.backed import LazyH5ad

    adata = demo_processed.copy()
    n = adata.n_obs * 40  # a counts layer much larger than one chunk
    big = ad.concat([adata] * 40, index_unique="_")
    big.layers["counts"] = sp.random(n, big.n_vars, density=0.5, format="csr", random_state=1, dtype=np.float32)
    big.uns = dict(adata.uns)
    processed = tmp_path / "processed.h5ad"
    write_h5ad(big, processed)
    layer_bytes = big.layers["counts"].data.nbytes + big.layers["counts"].indices.nbytes
    with LazyH5ad(processed) as lazy:
        assert not sp.issparse(lazy.layers["counts"]) and lazy.layers["counts"].shape == big.shape
    sizes = record_block_rows(monkeypatch, truth_mod, "_layer_chunks")
    rows = 200
    tracemalloc.start()
    write_test_truth(processed, tmp_path / "chunked.h5ad", chunk_bytes=4 * big.n_vars * rows)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert sizes and max(sizes) <= rows
    assert peak < layer_bytes / 4, f"peak {peak / 2**20:.1f} MiB vs layer {layer_bytes / 2**20:.1f} MiB"
    write_h5ad(build_test_truth(ad.read_h5ad(processed)), tmp_path / "memory.h5ad")
    _assert_same_file(tmp_path / "memory.h5ad", tmp_path / "chunked.h5ad")

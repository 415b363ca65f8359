"""CD4 Perturb-seq: chunked backed reading of a large h5ad onto a gene panel, and the context-holdout split."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from perturb_repro.data import cd4
from perturb_repro.data.cd4 import (
    cd4_context_holdout_split,
    read_backed_chunked,
    read_gene_panel,
)
from perturb_repro.data.source import load_source
from perturb_repro.errors import PipelineInputError

PERT, DONOR, TIME, CONTROL = "guide_target_ensembl", "donor_id", "experimental_perturbation_time_point", "NTC"
TIMES = ["Rest", "Stim8hr", "Stim48hr"]


def _write_fixture(path: Path, n_obs: int, n_vars: int, density: float, seed: int = 0, dense: bool = False) -> ad.AnnData:
    """CD4-shaped file: integer counts, NTC controls, 4 donors x 3 time points, Ensembl-id targets."""
    rng = np.random.default_rng(seed)
    counts = sp.random(n_obs, n_vars, density=density, format="csr", random_state=seed, dtype=np.float32,
                       data_rvs=lambda k: rng.integers(1, 30, k).astype(np.float32))  # fmt: skip
    targets = np.array([CONTROL] + [f"ENSG{i:011d}" for i in range(40)])
    obs = pd.DataFrame(
        {
            PERT: rng.choice(targets, n_obs, p=[0.2] + [0.8 / 40] * 40),
            DONOR: rng.choice([f"D{i}" for i in range(1, 5)], n_obs),
            TIME: rng.choice(TIMES, n_obs),
            "pass_qc": rng.choice(["True", "False"], n_obs, p=[0.9, 0.1]),
        },
        index=[f"cell{i}" for i in range(n_obs)],
    )
    var = pd.DataFrame({"gene_symbol": [f"SYM{i}" for i in range(n_vars)]}, index=[f"ENSG{i:011d}" for i in range(n_vars)])
    adata = ad.AnnData(X=counts.toarray() if dense else counts, obs=obs, var=var)
    adata.write_h5ad(path)
    return adata


def _panel(tmp_path: Path, genes: list[str], name: str = "panel.txt") -> Path:
    path = tmp_path / name
    path.write_text("# HVG panel\n" + "\n".join(genes) + "\n")
    return path


def _cfg(raw: Path, panel: Path, chunk_size: int, **extra) -> dict:
    return {
        "source": {"path": str(raw), "reader": "backed_chunked", "gene_panel": str(panel), "chunk_size": chunk_size},
        "obs_filter": {"pass_qc": "True"},
        "perturbation_column": PERT,
        "control_label": CONTROL,
        "group_by": [DONOR, TIME],
        "preprocess": {"target_sum": 10000},
        **extra,
    }


def _reference(adata: ad.AnnData, panel: list[str], keep: np.ndarray, target_sum: float = 1e4):
    """In-memory reference, dense and independent: library over all genes, panel counts, log1p(cp10k)."""
    dense = np.asarray(adata.X.toarray() if sp.issparse(adata.X) else adata.X, dtype=np.float64)[keep]
    library = dense.sum(axis=1)
    counts = dense[:, adata.var_names.get_indexer(panel)]
    return counts, np.log1p(counts / library[:, None] * target_sum), library


def _paper_cfg(raw: Path, panel: Path, chunk_size: int) -> dict:
    """config/config.yaml's `cd4` entry pointed at a fixture file and panel."""
    import yaml
    from conftest import REPO

    cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text())["datasets"]["cd4"]
    return dict(cfg, name="cd4", source=dict(cfg["source"], path=str(raw), gene_panel=str(panel), chunk_size=chunk_size))


def _traced_paper_steps(tmp_path: Path, raw: Path, panel: Path, chunk_size: int) -> tuple[ad.AnnData, int]:
    """split -> preprocess steps of the paper `cd4` entry; the processed file and the traced peak of preprocess."""
    from perturb_repro.steps import preprocess_step, split_step

    cfg = _paper_cfg(raw, panel, chunk_size)
    split_step(str(raw), cfg, str(tmp_path / "split.csv"))
    tracemalloc.start()
    preprocess_step(str(raw), str(tmp_path / "split.csv"), cfg, str(tmp_path / "p.h5ad"), str(tmp_path / "s.json"))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return ad.read_h5ad(tmp_path / "p.h5ad"), peak


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cd4")
    raw = tmp / "cd4.h5ad"
    adata = _write_fixture(raw, n_obs=3000, n_vars=400, density=0.1)
    genes = list(np.random.default_rng(1).choice(adata.var_names, 150, replace=False))  # panel order != file order
    return raw, adata, genes, _panel(tmp, genes)


@pytest.mark.parametrize("chunk_size", [257, 3000, 10_000])
def test_chunked_equals_in_memory_reference(small, chunk_size):
    raw, adata, genes, panel = small
    out = read_backed_chunked(raw, _cfg(raw, panel, chunk_size))
    keep = (adata.obs["pass_qc"] == "True").to_numpy()
    counts, logn, library = _reference(adata, genes, keep)
    assert list(out.var_names) == genes and list(out.obs_names) == list(adata.obs_names[keep])
    assert sp.isspmatrix_csr(out.X) or sp.issparse(out.X)
    assert sp.issparse(out.layers["counts"]) and out.X.dtype == np.float32
    np.testing.assert_array_equal(out.layers["counts"].toarray(), counts)
    np.testing.assert_allclose(out.X.toarray(), logn, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out.obs["library_size"].to_numpy(), library)
    pd.testing.assert_frame_equal(out.obs.drop(columns="library_size"), adata.obs[keep])


def test_reads_only_windows_of_chunk_size_and_never_densifies(small, monkeypatch):
    raw, adata, _genes, panel = small
    windows = []
    real = cd4._read_block

    def spy(matrix, lo, hi):
        block = real(matrix, lo, hi)
        windows.append(block.shape[0])
        assert sp.issparse(block), "a sparse-stored file must stay sparse"
        return block

    def no_toarray(self, *args, **kwargs):
        raise AssertionError("toarray called")

    monkeypatch.setattr(cd4, "_read_block", spy)
    for cls in (sp.csr_matrix, sp.csr_array, sp.coo_matrix, sp.csc_matrix):
        monkeypatch.setattr(cls, "toarray", no_toarray)
    out = read_backed_chunked(raw, _cfg(raw, panel, 500))
    assert windows == [500] * 6 and out.n_obs == int((adata.obs["pass_qc"] == "True").sum())


def test_peak_memory_is_far_below_the_dense_matrix(tmp_path):
    n_obs, n_vars = 8_000, 2_500  # dense float32 = 80 MB
    raw = tmp_path / "big.h5ad"
    adata = _write_fixture(raw, n_obs, n_vars, density=0.01, seed=2)
    panel = _panel(tmp_path, list(adata.var_names[::5]))  # 500 genes
    del adata
    tracemalloc.start()
    out = read_backed_chunked(raw, _cfg(raw, panel, 500))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    dense_bytes = n_obs * n_vars * 4
    print(f"peak {peak / 2**20:.1f} MiB vs dense {dense_bytes / 2**20:.0f} MiB")
    assert out.n_obs > 6_000 and peak < dense_bytes / 8, f"peak {peak / 2**20:.1f} MiB"


def test_dense_stored_file_is_read_window_by_window(tmp_path):
    raw = tmp_path / "dense.h5ad"
    adata = _write_fixture(raw, 600, 80, density=0.2, seed=3, dense=True)
    genes = list(adata.var_names[10:50])
    out = read_backed_chunked(raw, _cfg(raw, _panel(tmp_path, genes), 64))
    keep = (adata.obs["pass_qc"] == "True").to_numpy()
    counts, logn, _ = _reference(adata, genes, keep)
    np.testing.assert_array_equal(out.layers["counts"].toarray(), counts)
    np.testing.assert_allclose(out.X.toarray(), logn, rtol=1e-5, atol=1e-6)


def test_panel_matched_on_a_var_column_and_csv_panels(small, tmp_path):
    raw, _adata, genes, _ = small
    symbols = [f"SYM{int(g[4:])}" for g in genes[:20]]
    csv = tmp_path / "panel.csv"
    pd.DataFrame({"gene": symbols, "rank": range(20)}).to_csv(csv, index=False)
    assert read_gene_panel(csv) == symbols
    cfg = _cfg(raw, csv, 1000)
    cfg["source"]["var_column"] = "gene_symbol"
    out = read_backed_chunked(raw, cfg)
    assert list(out.var_names) == symbols and list(out.var["gene_symbol"]) == symbols


def test_load_source_uses_the_chunked_reader(small):
    raw, _adata, _genes, panel = small
    cfg = _cfg(raw, panel, 700)
    full = load_source(raw, cfg)
    assert full.n_vars == 150 and "counts" in full.layers and sp.issparse(full.X)
    assert full.obs["is_control"].sum() == (full.obs[PERT] == CONTROL).sum() > 0
    assert (full.obs["condition"] == full.obs[PERT].astype(str)).all()
    obs_only = load_source(raw, cfg, obs_only=True)
    assert obs_only.n_vars == 0 and list(obs_only.obs_names) == list(full.obs_names)
    pd.testing.assert_frame_equal(obs_only.obs.drop(columns=[]), full.obs.drop(columns="library_size"))


def test_clear_errors(small, tmp_path):
    raw, _adata, genes, panel = small
    with pytest.raises(PipelineInputError, match="gene panel file does not exist"):
        read_backed_chunked(raw, _cfg(raw, tmp_path / "nope.txt", 100))
    with pytest.raises(PipelineInputError, match="not in the file") as err:
        read_backed_chunked(raw, _cfg(raw, _panel(tmp_path, [genes[0], "ENSG_NOT_THERE"], "bad.txt"), 100))
    assert "ENSG_NOT_THERE" in str(err.value)
    with pytest.raises(PipelineInputError, match="file does not exist"):
        read_backed_chunked(tmp_path / "absent.h5ad", _cfg(tmp_path / "absent.h5ad", panel, 100))
    with pytest.raises(PipelineInputError, match="listed twice"):
        read_gene_panel(_panel(tmp_path, ["A", "B", "A"], "dup.txt"))


def _pairs(n_targets=60, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for d in ["D1", "D2", "D3", "D4"]:
        for t in TIMES:
            rows.append((CONTROL, d, t))
            rows += [(f"ENSG{i:011d}", d, t) for i in range(n_targets) if rng.random() < 0.9]
    rows.append(("ENSG_SINGLE", "D1", "Rest"))  # measured in one context only: never held out
    return pd.DataFrame(rows, columns=["condition", DONOR, TIME])


def test_context_holdout_split_keeps_every_held_out_target_in_train():
    pairs = _pairs()
    table = cd4_context_holdout_split(pairs, CONTROL, seed=42)
    keys = ["condition", DONOR, TIME]
    assert list(table.columns) == [*keys, "split", "subgroup"] and not table.duplicated(keys).any()
    assert len(table) == len(pairs)
    assert set(table.loc[table["condition"] == CONTROL, "split"]) == {"train"}
    train_targets = set(table.loc[table["split"] == "train", "condition"])
    held = table[table["split"].isin(["val", "test"])]
    assert set(held["condition"]) <= train_targets and (held["subgroup"] == "seen_target").all()
    assert table.loc[table["condition"] == "ENSG_SINGLE", "split"].tolist() == ["train"]
    n_pert = int((table["condition"] != CONTROL).sum())
    assert (table["split"] == "test").sum() == round(n_pert * cd4.CARD_TEST_SHARE)
    assert (table["split"] == "val").sum() == round(n_pert * cd4.CARD_VAL_SHARE)
    # each context keeps training cells (its controls at least) and the draw is seeded
    assert table[table["split"] == "train"].groupby([DONOR, TIME]).size().min() > 0
    pd.testing.assert_frame_equal(table, cd4_context_holdout_split(pairs.sample(frac=1, random_state=1), CONTROL, seed=42))
    other = cd4_context_holdout_split(pairs, CONTROL, seed=1)
    assert not other[other["split"] == "test"].equals(table[table["split"] == "test"])


def test_context_holdout_needs_context_columns():
    with pytest.raises(PipelineInputError, match="group_by"):
        cd4_context_holdout_split(pd.DataFrame({"condition": ["NTC", "A"]}), CONTROL, seed=0)


def test_paper_config_entry_runs_split_and_preprocess_steps(small, tmp_path):
    """config/config.yaml's `cd4` entry (backed_chunked reader, context holdout) on the fixture file."""
    from perturb_repro.steps import preprocess_step, split_step

    raw, _adata, genes, panel = small
    cfg = _paper_cfg(raw, panel, chunk_size=401)
    split_step(str(raw), cfg, str(tmp_path / "split.csv"))
    table = pd.read_csv(tmp_path / "split.csv", keep_default_na=False)
    assert set(table["split"]) == {"train", "val", "test"} and list(table.columns[1:3]) == [DONOR, TIME]
    preprocess_step(str(raw), str(tmp_path / "split.csv"), cfg, str(tmp_path / "p.h5ad"), str(tmp_path / "s.json"))
    processed = ad.read_h5ad(tmp_path / "p.h5ad")
    assert list(processed.var_names) == genes and sp.issparse(processed.layers["counts"])
    direct = read_backed_chunked(raw, dict(cfg, obs_filter=None))
    np.testing.assert_array_equal(processed.layers["counts"].toarray(), direct.layers["counts"].toarray())
    np.testing.assert_allclose(processed.X.toarray(), direct.X.toarray(), rtol=1e-6)
    assert {DONOR, TIME} <= set(processed.obs.columns) and list(processed.uns["group_by"]) == [DONOR, TIME]


def test_preprocessing_after_the_chunked_read_keeps_x_sparse_and_memory_small(tmp_path):
    """split -> preprocess of the cd4 entry on a sparse file: X and counts stay CSR, no whole-matrix densify,
    and the traced peak of the whole preprocess step (read, split, preprocess, write) stays far below dense."""
    n_obs, n_vars = 8_000, 2_500  # dense float32 = 80 MB
    raw = tmp_path / "big.h5ad"
    adata = _write_fixture(raw, n_obs, n_vars, density=0.01, seed=4)
    panel = _panel(tmp_path, list(adata.var_names[::2]))  # 1,250 genes: dense panel = 40 MB
    del adata
    processed, peak = _traced_paper_steps(tmp_path, raw, panel, chunk_size=700)
    assert sp.issparse(processed.X) and sp.issparse(processed.layers["counts"])
    dense_panel = processed.n_obs * processed.n_vars * 4
    print(f"peak {peak / 2**20:.1f} MiB vs dense panel {dense_panel / 2**20:.0f} MiB, dense file {n_obs * n_vars * 4 / 2**20:.0f} MiB")
    assert peak < dense_panel / 4, f"peak {peak / 2**20:.1f} MiB"


def test_preprocess_with_a_fixed_panel_does_not_copy_the_matrix(small):
    """The panel keeps every gene: preprocess reuses the reader's CSR arrays instead of copying them."""
    from perturb_repro.data.preprocess import preprocess
    from perturb_repro.data.split import condition_pairs, make_split

    raw, _adata, _genes, panel = small
    cfg = dict(_cfg(raw, panel, 300), preprocess={"target_sum": 10000, "keep_counts": True, "n_top_genes": None},
               split={"recipe": "cd4_context_holdout", "seed": 0})
    loaded = load_source(raw, cfg, verify=False)
    x_data, counts_data = loaded.X.data, loaded.layers["counts"].data
    table = make_split(condition_pairs(loaded.obs, [DONOR, TIME]), CONTROL, "cd4_context_holdout", seed=0)
    out = preprocess(loaded, table, cfg, "split.csv")
    assert np.shares_memory(out.X.data, x_data) and np.shares_memory(out.layers["counts"].data, counts_data)


@pytest.mark.parametrize("keep_counts", [True, False])
def test_streamed_preprocess_equals_in_memory_preprocess(small, tmp_path, keep_counts):
    """preprocess_streamed (windows appended to the file) writes what preprocess() writes from the reader's whole
    in-memory result: obs, var, uns, X and counts, values and CSR structure."""
    from perturb_repro.data.preprocess import preprocess, preprocess_streamed, summary
    from perturb_repro.data.split import condition_pairs, make_split
    from perturb_repro.io import write_h5ad

    raw, _adata, _genes, panel = small
    cfg = dict(_cfg(raw, panel, 293), name="cd4", covariates=[DONOR, TIME],
               preprocess={"target_sum": 10000, "keep_counts": keep_counts, "n_top_genes": None},
               split={"recipe": "cd4_context_holdout", "seed": 0})
    loaded = load_source(raw, cfg, verify=False)
    table = make_split(condition_pairs(loaded.obs, [DONOR, TIME]), CONTROL, "cd4_context_holdout", seed=0)
    expected = preprocess(loaded, table.copy(), cfg, "split.csv")
    write_h5ad(expected, tmp_path / "memory.h5ad")
    got_summary = preprocess_streamed(str(raw), table.copy(), cfg, "split.csv", str(tmp_path / "streamed.h5ad"))
    a, b = ad.read_h5ad(tmp_path / "memory.h5ad"), ad.read_h5ad(tmp_path / "streamed.h5ad")
    assert got_summary == summary(expected) and set(b.obs["split"]) == {"train", "val", "test"}
    pd.testing.assert_frame_equal(b.obs, a.obs)
    pd.testing.assert_frame_equal(b.var, a.var)
    assert b.uns["dataset"] == a.uns["dataset"] and list(b.uns["group_by"]) == list(a.uns["group_by"])
    assert set(b.layers) == set(a.layers) == ({"counts"} if keep_counts else set())
    for x, y in [(a.X, b.X)] + ([(a.layers["counts"], b.layers["counts"])] if keep_counts else []):
        assert sp.isspmatrix_csr(y) or isinstance(y, sp.csr_array)
        np.testing.assert_array_equal(y.indptr, x.indptr)
        np.testing.assert_array_equal(y.indices, x.indices)
        np.testing.assert_array_equal(y.data, x.data)
        assert y.dtype == np.float32


def test_streamed_preprocess_holds_one_window_not_the_matrix(tmp_path):
    """The traced peak of the streamed preprocess step is below the processed file's own sparse arrays."""
    raw = tmp_path / "big.h5ad"
    adata = _write_fixture(raw, 20_000, 2_000, density=0.3, seed=6)  # panel arrays ~100 MB, obs a few MB
    panel = _panel(tmp_path, list(adata.var_names[::2]))
    del adata
    processed, peak = _traced_paper_steps(tmp_path, raw, panel, chunk_size=500)
    arrays = sum(m.data.nbytes + m.indices.nbytes + m.indptr.nbytes for m in (processed.X, processed.layers["counts"]))
    print(f"peak {peak / 2**20:.1f} MiB, processed sparse arrays {arrays / 2**20:.1f} MiB")
    assert peak < arrays / 2, f"peak {peak / 2**20:.1f} MiB vs {arrays / 2**20:.1f} MiB"


def test_streamed_preprocess_needs_a_fixed_panel(small, tmp_path):
    from perturb_repro.data.preprocess import preprocess_streamed
    from perturb_repro.data.split import condition_pairs, make_split

    raw, _adata, genes, panel = small
    cfg = dict(_cfg(raw, panel, 500), preprocess={"n_top_genes": 20}, split={"recipe": "cd4_context_holdout", "seed": 0})
    loaded = load_source(raw, cfg, obs_only=True, verify=False)
    table = make_split(condition_pairs(loaded.obs, [DONOR, TIME]), CONTROL, "cd4_context_holdout", seed=0)
    with pytest.raises(PipelineInputError, match="n_top_genes"):
        preprocess_streamed(str(raw), table, cfg, "split.csv", str(tmp_path / "p.h5ad"))
    assert not (tmp_path / "p.h5ad").exists()

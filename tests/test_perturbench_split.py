"""PerturBench's splits (data/perturbench_split.py): structure, seeded counts, and upstream agreement.

Fixtures are shaped like PerturBench's curated files (cell order shuffled, as in a real file):
Norman19 (one line, 105 singles + 130 combos), Srivatsan20 (3 lines x 188 drugs at 10 uM) and
Jiang24 (6 lines x 5 cytokines = 30 states). The ``UPSTREAM_*`` digests were produced by running
altoslabs/perturbench's own ``PerturbationDataSplitter`` (``src/perturbench/data/datasplitter.py``,
``split_combinations`` / ``split_covariates`` / ``split_covariates_manual``) on these same fixtures
and on the bundled McFaline23 cells, by hand in a scratch directory (upstream needs omegaconf; it
is not a test dependency). The digest is sha256 over the sorted ``condition|group|split`` lines of
the non-control (condition, group) pairs.
"""

from __future__ import annotations

import hashlib
import itertools

import numpy as np
import pandas as pd
import pytest

from perturb_repro.data.perturbench_split import (
    perturbench_combo_table,
    perturbench_covariate_transfer_table,
)
from perturb_repro.data.split import condition_pairs, make_split

CONTROL = "control"
JIANG_LINES = ["a549", "bxpc3", "hap1", "ht29", "k562", "mcf7"]
JIANG_CYTOKINES = ["IFNB", "IFNG", "INS", "TGFB", "TNFA"]
# build_jiang24_frangieh21_splits.py: 3 cytokines x 4 lines held out, 70 %, seed 0
JIANG_HOLDOUT = [[c, line] for c in ["IFNG", "INS", "TGFB"] for line in ["k562", "mcf7", "ht29", "hap1"]]


def _shuffled(rows: list[dict], cells_per_row: int, seed: int) -> pd.DataFrame:
    frame = pd.DataFrame([r for r in rows for _ in range(cells_per_row)])
    order = np.random.default_rng(seed).permutation(len(frame))
    frame = frame.iloc[order].reset_index(drop=True)
    frame.index = [f"cell{i}" for i in range(len(frame))]
    return frame


def norman19_like_obs() -> pd.DataFrame:
    genes = [f"G{i:03d}" for i in range(105)]
    combos = [f"{a}+{b}" for a, b in itertools.combinations(genes[:40], 2)][::6][:131]
    rows = [{"condition": c, "cell_type": "k562"} for c in [CONTROL, *genes, *combos]]
    return _shuffled(rows, 3, seed=0)


def srivatsan20_like_obs() -> pd.DataFrame:
    drugs = [f"drug{i:03d}" for i in range(188)]
    rows = [{"condition": d, "cell_type": line} for line in ["a549", "k562", "mcf7"] for d in [CONTROL, *drugs]]
    return _shuffled(rows, 2, seed=1)


def jiang24_like_obs() -> pd.DataFrame:
    genes = [f"J{i:02d}" for i in range(40)]
    rng = np.random.default_rng(2)
    rows = []
    for line in JIANG_LINES:
        for cytokine in JIANG_CYTOKINES:
            present = [g for g in genes if rng.random() > 0.1]  # a few genes missing per state
            rows += [{"condition": g, "cell_type": line, "treatment": cytokine} for g in [CONTROL, *present]]
    return _shuffled(rows, 2, seed=3)


def _digest(table: pd.DataFrame, groups: list[str]) -> str:
    rows = table[table["condition"] != CONTROL]
    lines = sorted("|".join([r["condition"], *[r[g] for g in groups], r["split"]]) for _, r in rows.iterrows())
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def _pairs(table: pd.DataFrame, split: str, groups: list[str]) -> set[tuple]:
    rows = table[table["split"] == split]
    return set(map(tuple, rows[["condition", *groups]].to_numpy().tolist()))


# ------------------------------------------------------------------------------------------ combo


@pytest.fixture(scope="module")
def norman_table():
    return make_split(condition_pairs(norman19_like_obs(), ["cell_type"]), CONTROL, "perturbench_combo",
                      seed=42, max_heldout_fraction_per_covariate=0.7)


def test_combo_holds_out_70_percent_of_combos_half_val_half_test(norman_table):
    t = norman_table
    combos = t[t["condition"].str.contains(r"\+", regex=True)]
    singles = t[~t["condition"].str.contains(r"\+", regex=True) & (t["condition"] != CONTROL)]
    assert len(combos) == 130 and len(singles) == 105
    assert (singles["split"] == "train").all()  # every single is seen in train
    held = combos[combos["split"] != "train"]
    assert len(held) == int(0.7 * 130) == 91
    # sklearn's stratified split gives test the ceiling of half
    assert (held["split"] == "val").sum() == 45 and (held["split"] == "test").sum() == 46
    assert set(held["subgroup"]) == {"combo"}
    assert t.loc[t["condition"] == CONTROL, "split"].tolist() == ["train"]


def test_combo_matches_upstream_and_is_deterministic(norman_table):
    assert _digest(norman_table, ["cell_type"]) == UPSTREAM_NORMAN19_SEED42
    again = perturbench_combo_table(condition_pairs(norman19_like_obs(), ["cell_type"]), CONTROL, seed=42)
    pd.testing.assert_frame_equal(norman_table, again)
    other = perturbench_combo_table(condition_pairs(norman19_like_obs(), ["cell_type"]), CONTROL, seed=1)
    assert _pairs(other, "test", ["cell_type"]) != _pairs(norman_table, "test", ["cell_type"])


def test_combo_without_group_columns_uses_one_group():
    pairs = condition_pairs(norman19_like_obs(), [])
    table = make_split(pairs, CONTROL, "perturbench_combo", seed=42, max_heldout_fraction_per_covariate=0.7)
    assert list(table.columns) == ["condition", "split", "subgroup"]
    with_group = make_split(condition_pairs(norman19_like_obs(), ["cell_type"]), CONTROL, "perturbench_combo",
                            seed=42, max_heldout_fraction_per_covariate=0.7)
    assert _pairs(table, "test", []) == {(c,) for c, _ in _pairs(with_group, "test", ["cell_type"])}


# ------------------------------------------------------------------------------ covariate transfer


@pytest.fixture(scope="module")
def srivatsan_table():
    return make_split(condition_pairs(srivatsan20_like_obs(), ["cell_type"]), CONTROL,
                      "perturbench_covariate_transfer", seed=42)


def test_transfer_disjoint_complete_and_seen_elsewhere(srivatsan_table):
    t = srivatsan_table
    assert not t.duplicated(["condition", "cell_type"]).any()
    assert len(t) == 3 * 189
    train = _pairs(t, "train", ["cell_type"])
    train_perts = {}
    for c, line in train:
        train_perts.setdefault(c, set()).add(line)
    held = t[t["split"].isin(["val", "test"])]
    for _, row in held.iterrows():
        others = train_perts.get(row["condition"], set()) - {row["cell_type"]}
        assert others, f"{row['condition']} held out in {row['cell_type']} but not seen in another line's train"
    # max_heldout_covariates=1: a drug is held out in at most one line
    assert not held["condition"].duplicated().any()


def test_transfer_counts_for_seed_42(srivatsan_table):
    t = srivatsan_table
    held = t[t["split"].isin(["val", "test"])]
    # cap per line = 0.3 * 189 conditions (upstream counts the control too) -> 57 held out per line
    assert held.groupby("cell_type").size().to_dict() == {"a549": 57, "k562": 57, "mcf7": 57}
    # 171 held-out pairs: test gets ceil(171 / 2) = 86, stratified so each line splits 28/29
    assert (held["split"] == "test").sum() == 86 and (held["split"] == "val").sum() == 85
    assert set(held.groupby(["cell_type", "split"]).size()) == {28, 29}
    assert (t["split"] == "excluded").sum() == 0
    assert _digest(t, ["cell_type"]) == UPSTREAM_SRIVATSAN20_SEED42


def test_transfer_deterministic_and_order_of_cells_matters_like_upstream():
    obs = srivatsan20_like_obs()
    a = perturbench_covariate_transfer_table(condition_pairs(obs, ["cell_type"]), CONTROL, seed=42)
    b = perturbench_covariate_transfer_table(condition_pairs(obs.copy(), ["cell_type"]), CONTROL, seed=42)
    pd.testing.assert_frame_equal(a, b)
    c = perturbench_covariate_transfer_table(condition_pairs(obs, ["cell_type"]), CONTROL, seed=7)
    assert _pairs(a, "test", ["cell_type"]) != _pairs(c, "test", ["cell_type"])


def test_manual_transfer_jiang24_states():
    obs = jiang24_like_obs()
    groups = ["cell_type", "treatment"]
    t = make_split(condition_pairs(obs, groups), CONTROL, "perturbench_covariate_transfer", seed=0,
                   max_heldout_fraction_per_covariate=0.7, holdout_groups=JIANG_HOLDOUT)
    held = t[t["split"].isin(["val", "test"])]
    states = {tuple(sorted(s)) for s in held[groups].to_numpy().tolist()}
    assert len(states) == 12 and states == {tuple(sorted(s)) for s in JIANG_HOLDOUT}
    per_state = obs[obs["condition"] != CONTROL].groupby(groups)["condition"].nunique()
    for (line, cytokine), n in held.groupby(groups).size().items():
        assert n == int(0.7 * per_state[(line, cytokine)])
    # every held-out gene is trained on in some other state (here: the 18 untouched states)
    train_genes = set(t.loc[t["split"] == "train", "condition"])
    assert set(held["condition"]) <= train_genes
    assert _digest(t, groups) == UPSTREAM_JIANG24_SEED0


def test_manual_transfer_rejects_unknown_group():
    with pytest.raises(ValueError, match="not in the data"):
        perturbench_covariate_transfer_table(condition_pairs(jiang24_like_obs(), ["cell_type", "treatment"]),
                                             CONTROL, seed=0, holdout_groups=[["nowhere", "IFNG"]])


def test_singleton_heldout_group_is_excluded_like_upstream():
    """A line with a single held-out pair cannot be stratified: upstream leaves its cells unsplit."""
    rows = [{"condition": c, "cell_type": line} for line in ["x", "y"] for c in [CONTROL, "p1", "p2", "p3"]]
    rows += [{"condition": "p4", "cell_type": "x"}]
    pairs = condition_pairs(pd.DataFrame(rows), ["cell_type"])
    t = perturbench_covariate_transfer_table(pairs, CONTROL, seed=0, max_heldout_fraction_per_covariate=0.3)
    held = t[t["split"] != "train"]
    # seed 0: two pairs held out in line y (-> one val, one test), one in line x (a stratum of one)
    assert held[["condition", "cell_type", "split"]].values.tolist() == [
        ["p3", "x", "excluded"], ["p1", "y", "test"], ["p2", "y", "val"],
    ]


def test_mcfaline_demo_split_matches_upstream():
    """The bundled McFaline23 cells (3 glioblastoma lines x 9 CRISPRi genes): the mcfaline_demo split."""
    import anndata as ad

    from conftest import DEMO_H5AD

    obs = ad.read_h5ad(DEMO_H5AD, backed="r").obs
    obs = obs[obs["dataset"] == "mcfaline23"]
    t = make_split(condition_pairs(obs, ["cell_type"]), CONTROL, "perturbench_covariate_transfer", seed=42,
                   min_train_covariates=1, max_heldout_covariates=1, max_heldout_fraction_per_covariate=0.3)
    assert _digest(t, ["cell_type"]) == UPSTREAM_MCFALINE23_SEED42
    assert _pairs(t, "test", ["cell_type"]) == {
        ("MAP2K6", "A172"), ("MAP4K3", "T98G"), ("PLK4", "T98G"), ("MAPK1", "U87MG"), ("TGFBR2", "U87MG"),
    }
    assert _pairs(t, "val", ["cell_type"]) == {
        ("MAP3K21", "A172"), ("MAP4K5", "A172"), ("MAP2K3", "T98G"), ("SGK1", "U87MG"),
    }
    # each of the 9 genes is held out in exactly one line and trained on in the two others
    held = t[t["split"].isin(["val", "test"])]
    assert sorted(held["condition"]) == sorted(set(obs["condition"]) - {CONTROL})
    assert (t[t["condition"] != CONTROL].groupby("condition")["split"].apply(lambda s: (s == "train").sum()) == 2).all()


def test_gears_recipe_broadcasts_over_groups(demo_raw):
    obs = demo_raw.obs
    plain = make_split(list(obs["condition"].unique()), CONTROL, "gears_simulation", seed=42)
    grouped = make_split(condition_pairs(obs, ["cell_type"]), CONTROL, "gears_simulation", seed=42)
    merged = grouped.merge(plain, on="condition", suffixes=("", "_plain"))
    assert (merged["split"] == merged["split_plain"]).all() and len(grouped) == len(plain)


UPSTREAM_NORMAN19_SEED42 = "b4eabaa6afc606a5ef80c3101370c7e7846bb3b82ef3de4a69c175c6923f41ed"
UPSTREAM_SRIVATSAN20_SEED42 = "aa46140dbe86b0a88c52d0b821fcc7aaa51ee4cdb752b39161f691fba3c195f9"
UPSTREAM_MCFALINE23_SEED42 = "2cc4fc5cf7ec9fb17778249452d6d1c237d4d07c2631f6c7a76bb48d8c7082f7"
# Upstream's stratify label for two covariate columns is str(frozenset(...)), whose element order follows
# Python's string hashing: its val/test halves differ between processes (12 hash seeds gave 12 digests,
# the held-out set itself was always the same). This digest is upstream's under PYTHONHASHSEED=4, whose
# labels render in sorted order -- the order this port always uses.
UPSTREAM_JIANG24_SEED0 = "2704f4ff68d9e48e9a67340bd30efc18af21d57903d4f3c140dccf4ec4baa7a6"
UPSTREAM_MCFALINE23_TEST_CONTROL_POSITIONS = [1, 5, 6, 19, 24]


def test_gzipped_source_is_decompressed_to_archive_member(tmp_path):
    """PerturBench publishes *.h5ad.gz: the download step gunzips it (archive_member = decompressed name)."""
    import gzip

    from perturb_repro.data.download import _extract
    from perturb_repro.errors import PipelineInputError

    payload = np.random.default_rng(0).bytes(20000)  # incompressible, so a cut stream is truncated
    archive = tmp_path / "x.h5ad.gz.part"
    archive.write_bytes(gzip.compress(payload))
    _extract("https://example/x.h5ad.gz", archive, "x.h5ad", tmp_path / "x.h5ad")
    assert (tmp_path / "x.h5ad").read_bytes() == payload
    broken = tmp_path / "y.part"
    broken.write_bytes(gzip.compress(payload)[:200])
    with pytest.raises(PipelineInputError, match="gzip"):
        _extract("https://example/y.h5ad.gz", broken, "y.h5ad", tmp_path / "y.h5ad")


def test_control_cell_split_matches_upstream():
    """_split_controls: seeded shuffle of all control cells, 50 / 25 / 25 (upstream's labels, checked by hand)."""
    from perturb_repro.data.perturbench_split import split_control_cells

    labels = split_control_cells(300, 42, 0.5)
    assert pd.Series(labels).value_counts().to_dict() == {"train": 150, "val": 75, "test": 75}
    # upstream on the bundled McFaline23 cells (300 controls, file order): first test/val/train positions
    assert [i for i in range(300) if labels[i] == "test"][:5] == UPSTREAM_MCFALINE23_TEST_CONTROL_POSITIONS
    assert list(split_control_cells(7, 0, 0.5)).count("train") == 3  # int(0.5 * 7)
    with pytest.raises(ValueError):
        split_control_cells(10, 0, 0.0)

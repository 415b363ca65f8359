"""Replogle cross-cell-line split on a fixture shaped like State-Replogle-Filtered (4 cell lines, non-targeting)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from perturb_repro.data.replogle import (
    CARD,
    compare_with_card,
    n_val_perturbations,
    replogle_cross_cell_line_split,
    split_summary,
)
from perturb_repro.errors import PipelineInputError

CONTROL = "non-targeting"
LINE = "cell_line"
PARAMS = {
    "control_label": CONTROL, "group_column": LINE, "train_groups": ["k562", "jurkat", "hepg2"], "test_group": "rpe1",
    "val_group": "k562", "val_fraction": 0.05, "seed": 42,
}  # fmt: skip


def _obs(n_k562: int = 300, n_rpe1_overlap: int = 200, n_rpe1_only: int = 60, seed: int = 0) -> pd.DataFrame:
    """Per-cell obs: K562 perturbs genes G0..; Jurkat/HepG2 share part of them; RPE1 overlaps K562 partly."""
    rng = np.random.default_rng(seed)
    k562 = [f"G{i}" for i in range(n_k562)]
    lines = {
        "k562": k562,
        "jurkat": k562[: n_k562 // 2] + [f"J{i}" for i in range(20)],
        "hepg2": k562[n_k562 // 4 :] + [f"H{i}" for i in range(20)],
        "rpe1": list(rng.choice(k562, n_rpe1_overlap, replace=False)) + [f"R{i}" for i in range(n_rpe1_only)],
    }
    rows = []
    for line, perts in lines.items():
        rows += [(CONTROL, line)] * int(rng.integers(300, 600))
        for pert in perts:
            rows += [(pert, line)] * int(rng.integers(5, 40))
    return pd.DataFrame(rows, columns=["condition", LINE])


@pytest.fixture(scope="module")
def obs() -> pd.DataFrame:
    return _obs()


@pytest.fixture(scope="module")
def table(obs) -> pd.DataFrame:
    return replogle_cross_cell_line_split(obs, **PARAMS)


def _perts(table, split, line=None):
    rows = table[(table["split"] == split) & (table["condition"] != CONTROL)]
    if line is not None:
        rows = rows[rows[LINE] == line]
    return set(rows["condition"])


def test_one_row_per_condition_group_and_every_pair_listed(obs, table):
    assert list(table.columns) == ["condition", LINE, "split", "subgroup"]
    assert not table.duplicated(["condition", LINE]).any()
    assert set(map(tuple, table[["condition", LINE]].to_numpy())) == set(map(tuple, obs.drop_duplicates().to_numpy()))
    assert set(table["split"]) == {"train", "val", "test", "excluded"}


def test_val_is_a_k562_share_held_out_everywhere(table):
    val = table[table["split"] == "val"]
    assert set(val[LINE]) == {"k562"} and CONTROL not in set(val["condition"])
    n_k562 = len(_perts(table, "train", "k562") | _perts(table, "val", "k562"))
    assert len(val) == n_val_perturbations(n_k562, 0.05) == 15
    # a held-out perturbation is trained on in no cell line, and never tested
    assert not _perts(table, "val") & (_perts(table, "train") | _perts(table, "test"))


def test_test_is_rpe1_perturbations_seen_in_k562_training_plus_rpe1_controls(obs, table):
    test = table[table["split"] == "test"]
    assert set(test[LINE]) == {"rpe1"}
    assert ((test["condition"] == CONTROL) == (test["subgroup"] == "control")).all()
    assert (CONTROL, "rpe1") in set(map(tuple, test[["condition", LINE]].to_numpy()))
    assert _perts(table, "test") <= _perts(table, "train", "k562")
    rpe1 = set(obs.loc[obs[LINE] == "rpe1", "condition"]) - {CONTROL}
    assert _perts(table, "test") == rpe1 & _perts(table, "train", "k562")
    # RPE1 perturbations outside the overlap are excluded, as are RPE1 cells of val perturbations
    excluded = table[(table["split"] == "excluded") & (table[LINE] == "rpe1")]
    assert set(excluded["condition"]) == rpe1 - _perts(table, "test")


def test_splits_are_disjoint_and_train_controls_are_train(table):
    cells = {s: set(map(tuple, table.loc[table["split"] == s, ["condition", LINE]].to_numpy())) for s in set(table["split"])}
    names = sorted(cells)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not cells[a] & cells[b], (a, b)
    for line in ["k562", "jurkat", "hepg2"]:
        assert (CONTROL, line) in cells["train"]
    # no RPE1 row is trained on
    assert not {p for p in cells["train"] if p[1] == "rpe1"}


def test_deterministic_by_seed_and_independent_of_row_order(obs, table):
    again = replogle_cross_cell_line_split(obs.sample(frac=1.0, random_state=3), **PARAMS)
    pd.testing.assert_frame_equal(table, again)
    other = replogle_cross_cell_line_split(obs, **{**PARAMS, "seed": 7})
    assert _perts(other, "val") != _perts(table, "val")


def test_val_draw_matches_upstream_shuffle(obs, table):
    """sc-interp: rng = default_rng(seed); rng.shuffle(sorted perts); first round(n * frac) are val."""
    k562 = sorted(set(obs.loc[(obs[LINE] == "k562") & (obs["condition"] != CONTROL), "condition"]))
    rng = np.random.default_rng(42)
    rng.shuffle(k562)
    assert _perts(table, "val") == set(k562[: max(1, round(len(k562) * 0.05))])


def test_card_perturbation_counts_are_reproduced_by_the_upstream_definition():
    """1,456 K562 perturbations at 5 % leave 1,383 trained; an RPE1 overlap of 1,047 is tested upstream-style."""
    assert [n for n in range(1300, 1600) if n - n_val_perturbations(n, 0.05) == CARD["train_perturbations"]] == [1456]
    k562 = [f"G{i}" for i in range(1456)]
    rows = [(g, "k562") for g in k562] + [(g, "rpe1") for g in k562[:1047]] + [(f"R{i}", "rpe1") for i in range(900)]
    rows += [(f"J{i}", "jurkat") for i in range(50)] + [(f"H{i}", "hepg2") for i in range(50)]
    rows += [(CONTROL, line) for line in ["k562", "jurkat", "hepg2", "rpe1"]]
    pairs = pd.DataFrame(rows, columns=["condition", LINE])
    upstream = replogle_cross_cell_line_split(pairs, **PARAMS, test_includes_val_perturbations=True)
    assert len(_perts(upstream, "train", "k562")) == 1383
    assert len(_perts(upstream, "test")) == 1047
    strict = replogle_cross_cell_line_split(pairs, **PARAMS)
    n_val_in_overlap = len(_perts(strict, "val") & set(k562[:1047]))
    assert len(_perts(strict, "test")) == 1047 - n_val_in_overlap
    assert _perts(strict, "test") <= _perts(strict, "train", "k562")


def test_summary_counts_cells_per_split_and_compares_with_card(obs, table):
    summary = split_summary(obs, table, CONTROL, LINE)
    split_of = table.set_index(["condition", LINE])["split"]
    per_cell = split_of.reindex(pd.MultiIndex.from_frame(obs)).to_numpy()
    control = (obs["condition"] == CONTROL).to_numpy()
    assert summary["train_cells"] == int((per_cell == "train").sum())
    assert summary["val_cells"] == int((per_cell == "val").sum())
    assert summary["test_cells"] == int(((per_cell == "test") & ~control).sum())
    assert summary["test_control_cells"] == int((obs[LINE] == "rpe1").to_numpy()[control].sum())
    assert sum(summary[k] for k in ("train_cells", "val_cells", "test_cells", "test_control_cells", "excluded_cells")) == len(obs)
    frame = compare_with_card(summary)
    assert set(frame["quantity"]) >= set(CARD) and not frame["match"].all()


@pytest.mark.parametrize(
    "change, field",
    [
        ({"test_group": "k562"}, "split.test_group"),
        ({"val_group": "rpe1"}, "split.val_group"),
        ({"train_groups": ["k562", "jurkat", "hepg2", "huh7"]}, LINE),
        ({"val_fraction": 1.0}, "split.val_fraction"),
    ],
)
def test_bad_configuration_is_named(obs, change, field):
    with pytest.raises(PipelineInputError) as err:
        replogle_cross_cell_line_split(obs, **{**PARAMS, **change})
    assert err.value.field == field


def test_group_without_controls_is_refused(obs):
    no_ctrl = obs[~((obs[LINE] == "rpe1") & (obs["condition"] == CONTROL))]
    with pytest.raises(PipelineInputError, match="rpe1"):
        replogle_cross_cell_line_split(no_ctrl, **PARAMS)


def test_paper_config_entry_runs_split_and_preprocess_steps(tmp_path):
    """config/config.yaml's `replogle` entry on a small file shaped like replogle_concat.h5ad."""
    import anndata as ad
    import yaml
    from conftest import REPO
    from perturb_repro.steps import preprocess_step, split_step

    cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text())["datasets"]["replogle"]
    obs = _obs(n_k562=40, n_rpe1_overlap=25, n_rpe1_only=5).rename(columns={"condition": "gene"})
    obs = obs.groupby(["gene", LINE], group_keys=False).head(6).reset_index(drop=True)  # few cells per pair
    obs.index = [f"cell{i}-{line}" for i, line in enumerate(obs[LINE])]
    rng = np.random.default_rng(0)
    x = np.log1p(rng.poisson(1.0, (len(obs), 30)).astype(np.float32))
    raw = tmp_path / "replogle_concat.h5ad"
    ad.AnnData(X=x, obs=obs, var=pd.DataFrame(index=[f"GENE{i}" for i in range(30)])).write_h5ad(raw)
    # 30 genes hold at most 30 PCs: the split step refuses the paper's 50 (data/checks.py), so ask for 20
    cfg = dict(cfg, name="replogle", source={"path": str(raw), "sha256": None}, pca={"n_components": 20})
    split_step(str(raw), cfg, str(tmp_path / "split.csv"))
    table = pd.read_csv(tmp_path / "split.csv", keep_default_na=False)
    assert list(table.columns) == ["condition", LINE, "split", "subgroup"]
    preprocess_step(str(raw), str(tmp_path / "split.csv"), cfg, str(tmp_path / "processed.h5ad"), str(tmp_path / "summary.json"))
    processed = ad.read_h5ad(tmp_path / "processed.h5ad")
    by_split = processed.obs.groupby("split", observed=True)[LINE].agg(lambda s: set(s))
    assert by_split["test"] == {"rpe1"} and by_split["val"] == {"k562"}
    assert by_split["train"] == {"k562", "jurkat", "hepg2"}
    test = processed.obs[processed.obs["split"] == "test"]
    assert test["is_control"].any() and (test.loc[test["is_control"], LINE] == "rpe1").all()

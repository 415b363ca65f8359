"""GEARS simulation split on the bundled Norman cells: disjoint, complete, seeded, order-free."""

import numpy as np
import pandas as pd

from perturb_repro.data.conditions import genes_of
from perturb_repro.data.split import gears_split_table


def test_splits_are_disjoint_and_cover_every_condition(demo_raw, demo_split):
    conditions = set(demo_raw.obs["condition"])
    assert set(demo_split["condition"]) == conditions
    assert not demo_split["condition"].duplicated().any()
    assert demo_split.set_index("condition").loc["control", "split"] == "train"


def test_seed_42_counts_on_demo(demo_split):
    # 31 genes -> int(31 * 0.75) = 23 in the train gene set; these counts are what seed 42 draws
    counts = demo_split.groupby(["split", "subgroup"]).size().to_dict()
    assert counts == {
        ("test", "combo_seen0"): 1,
        ("test", "combo_seen1"): 5,
        ("test", "combo_seen2"): 3,
        ("test", "unseen_single"): 5,
        ("train", ""): 14,
        ("train", "control"): 1,
        ("val", "combo_seen1"): 3,
        ("val", "combo_seen2"): 1,
        ("val", "unseen_single"): 1,
    }


def test_subgroups_follow_seen_genes(demo_split):
    """Test singles name genes never perturbed alone in train or val; seen-k combos have k such genes."""
    by = demo_split.set_index("condition")
    fit_singles = {
        genes_of(c, "control")[0]
        for c in by.index[by["split"].isin(["train", "val"])]
        if len(genes_of(c, "control")) == 1
    }
    for condition, row in by[by["split"] == "test"].iterrows():
        genes = genes_of(condition, "control")
        if row["subgroup"] == "unseen_single":
            assert len(genes) == 1 and genes[0] not in fit_singles
        elif row["subgroup"] == "combo_seen0":
            assert not set(genes) & fit_singles


def test_split_is_seeded_and_order_free(demo_raw):
    conditions = list(demo_raw.obs["condition"].unique())
    a = gears_split_table(conditions, "control", seed=42)
    b = gears_split_table(list(np.random.default_rng(0).permutation(conditions)), "control", seed=42)
    c = gears_split_table(conditions, "control", seed=1)
    pd.testing.assert_frame_equal(a, b)
    assert not a.equals(c)

"""The GEARS simulation-split port reproduces real GEARS, condition by condition.

``tests/data/gears_reference_splits.json`` holds splits produced by GEARS itself
(cell-gears ``DataSplitter(adata, split_type='simulation').split_data(...)``; see its header and
``tests/data/make_gears_reference.py``, which is run by hand in a venv with GEARS and not by these
tests). Here the port must give the same split and subgroup for every condition of every case,
for GEARS labels ('A+ctrl', 'ctrl+A', 'A+B', 'ctrl') and, for the demo cases, for the pipeline's
plain labels ('A', 'A+B', 'control').

Independent of GEARS, the outputs (GEARS' and the port's) are checked for structure: disjoint
splits that cover every condition, control in train, and subgroups consistent with "seen" genes.
GEARS defines seen-ness against a train *gene set* drawn by the RNG (not the final train split):
every train/val condition only names genes of that set, and a gene of that set that has a single
perturbation has it in train/val. So for a gene with a single, "seen" == "its single is in
train/val"; for a gene that only occurs in combos, we only know it is seen if it occurs in a
train/val condition.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pandas as pd
import pytest

from perturb_repro.data.conditions import genes_of
from perturb_repro.data.split import gears_split_table

FIXTURE = Path(__file__).parent / "data" / "gears_reference_splits.json"
REF = json.loads(FIXTURE.read_text())
CASES = {case["name"]: case for case in REF["cases"]}
DEMO_CASES = [name for name, case in CASES.items() if "demo_label" in case]
SUBGROUPS = {"combo_seen0", "combo_seen1", "combo_seen2", "unseen_single"}


def _port(case, conditions, control_label) -> pd.DataFrame:
    return gears_split_table(
        conditions,
        control_label,
        seed=case["seed"],
        train_gene_set_size=case["train_gene_set_size"],
        combo_seen2_train_frac=case["combo_seen2_train_frac"],
    )


def _as_reference(table: pd.DataFrame, control_label: str) -> dict[str, dict]:
    """Port table -> the fixture's convention (train rows and the control have no subgroup)."""
    out = {}
    for row in table.itertuples(index=False):
        if row.split == "train":
            assert row.subgroup == ("control" if row.condition == control_label else ""), row
            sub = None
        else:
            sub = row.subgroup
        out[row.condition] = {"split": row.split, "subgroup": sub}
    return out


def _diff(expected: dict, got: dict) -> dict:
    keys = set(expected) | set(got)
    return {k: (expected.get(k), got.get(k)) for k in sorted(keys) if expected.get(k) != got.get(k)}


def test_fixture_header_says_how_it_was_made():
    header = REF["header"]
    assert "cell-gears" in header["gears_package"]
    assert "split_type='simulation'" in header["function"]
    assert header["date"] and header["generated_by"].endswith("make_gears_reference.py")
    assert {"demo_norman19_seed42", "demo_norman19_seed1", "synthetic_norman_seed42", "synthetic_norman_seed1"} <= set(
        CASES
    )


@pytest.mark.parametrize("name", list(CASES))
def test_port_matches_gears_on_gears_labels(name):
    case = CASES[name]
    got = _as_reference(_port(case, case["conditions"], "ctrl"), "ctrl")
    assert _diff(case["expected"], got) == {}


@pytest.mark.parametrize("name", DEMO_CASES)
def test_port_matches_gears_on_pipeline_labels(name):
    """The demo's own labels ('KLF1', 'control') give GEARS' split of 'KLF1+ctrl', 'ctrl'."""
    case = CASES[name]
    to_plain = case["demo_label"]
    control = case["demo_control_label"]
    expected = {to_plain[c]: v for c, v in case["expected"].items()}
    got = _as_reference(_port(case, [to_plain[c] for c in case["conditions"]], control), control)
    assert _diff(expected, got) == {}


def test_pipeline_demo_split_is_gears_seed42(demo_split):
    """The split the pipeline makes from the bundled h5ad (conftest) is GEARS' seed-42 split."""
    case = CASES["demo_norman19_seed42"]
    expected = {case["demo_label"][c]: v for c, v in case["expected"].items()}
    assert _diff(expected, _as_reference(demo_split, "control")) == {}


@pytest.mark.parametrize("name", list(CASES))
def test_port_is_order_free(name):
    case = CASES[name]
    reference = _port(case, case["conditions"], "ctrl")
    for rng_seed in (0, 1, 2):
        shuffled = list(case["conditions"])
        random.Random(rng_seed).shuffle(shuffled)
        pd.testing.assert_frame_equal(_port(case, shuffled, "ctrl"), reference)


def _check_structure(conditions: list[str], result: dict[str, dict], control: str) -> None:
    # disjoint (one row per condition) and complete
    assert set(result) == set(conditions)
    assert result[control]["split"] == "train"
    for cond, v in result.items():
        assert v["split"] in {"train", "val", "test"}
        if v["split"] == "train":
            assert v["subgroup"] is None
        else:
            assert v["subgroup"] in SUBGROUPS

    perturbed = [c for c in conditions if c != control]
    with_single = {genes_of(c, control)[0] for c in perturbed if len(genes_of(c, control)) == 1}

    def check_against(fit_splits: set[str], held_out_split: str):
        fit = [c for c in perturbed if result[c]["split"] in fit_splits]
        fit_genes = {g for c in fit for g in genes_of(c, control)}
        fit_single_genes = {genes_of(c, control)[0] for c in fit if len(genes_of(c, control)) == 1}
        # every fitted condition names only seen genes, so a gene with a single is seen iff that single is fitted
        assert {g for g in fit_genes if g in with_single} == fit_single_genes
        for cond in perturbed:
            if result[cond]["split"] != held_out_split:
                continue
            genes = genes_of(cond, control)
            sub = result[cond]["subgroup"]
            if sub == "unseen_single":
                assert len(genes) == 1 and genes[0] not in fit_genes, cond
                continue
            assert len(genes) == 2, cond
            k = int(sub[-1])
            known_seen = sum(g in fit_single_genes or (g not in with_single and g in fit_genes) for g in genes)
            maybe_seen = sum(g in fit_single_genes or g not in with_single for g in genes)
            assert known_seen <= k <= maybe_seen, (cond, sub, known_seen, maybe_seen)
            if all(g in with_single for g in genes):
                assert k == known_seen, (cond, sub)
            if k == 0:
                assert not set(genes) & fit_genes, cond

    # test subgroups: seen-ness against the outer train gene set (train + val conditions)
    check_against({"train", "val"}, "test")
    # val subgroups: seen-ness against the inner train gene set (train conditions only)
    check_against({"train"}, "val")


@pytest.mark.parametrize("name", list(CASES))
def test_gears_reference_has_the_expected_structure(name):
    case = CASES[name]
    _check_structure(case["conditions"], case["expected"], "ctrl")


@pytest.mark.parametrize("name", list(CASES))
def test_port_has_the_expected_structure(name):
    case = CASES[name]
    table = _port(case, case["conditions"], "ctrl")
    assert not table["condition"].duplicated().any()
    _check_structure(case["conditions"], _as_reference(table, "ctrl"), "ctrl")


def test_synthetic_cases_exercise_every_subgroup():
    """The fixture is informative: across cases every test and val subgroup occurs."""
    seen = {(v["split"], v["subgroup"]) for case in CASES.values() for v in case["expected"].values()}
    for split in ("test", "val"):
        for sub in SUBGROUPS:
            assert (split, sub) in seen, (split, sub)

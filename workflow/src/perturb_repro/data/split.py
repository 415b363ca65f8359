"""Condition-level splits. The GEARS simulation split is a faithful port of GEARS' DataSplitter.

GEARS (snap-stanford/GEARS, ``gears/data_utils.py``: ``DataSplitter.split_data`` and
``get_simulation_split``) draws with the global NumPy RNG, re-seeded at the start of each call and
again right before the combo_seen2 draw.
The port keeps every draw in the same order with the same arguments, so for the same condition
labels and seed it returns the same split; sorted inputs (``np.unique``/``np.setdiff1d``) make it
independent of the order conditions appear in the file.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from .conditions import genes_of, unique_genes


@dataclass(frozen=True)
class SimulationSplit:
    train: list[str]
    test: list[str]
    subgroups: dict[str, list[str]]


def _perts_from_genes(genes, perts: list[str], kind: str, control_label: str) -> list[str]:
    """Perturbations (in ``perts`` order) of the given kind that touch any of ``genes``."""
    wanted = set(genes)
    n_genes = {"single": 1, "combo": 2}[kind]
    return [p for p in perts if len(genes_of(p, control_label)) == n_genes and wanted & set(genes_of(p, control_label))]


def _n_seen(pert: str, seen: set[str], control_label: str) -> int:
    return sum(g in seen for g in genes_of(pert, control_label))


def gears_simulation_split(
    perts: list[str],
    control_label: str,
    train_gene_set_size: float,
    combo_seen2_train_frac: float,
    seed: int,
) -> SimulationSplit:
    """One call of GEARS' ``get_simulation_split`` (no pre-specified test perturbations)."""
    np.random.seed(seed)
    genes = np.array(unique_genes(perts, control_label))
    train_genes = np.random.choice(genes, int(len(genes) * train_gene_set_size), replace=False)
    seen = set(train_genes.tolist())
    ood_genes = np.setdiff1d(genes, train_genes)

    train = list(_perts_from_genes(train_genes, perts, "single", control_label))
    combos = _perts_from_genes(train_genes, perts, "combo", control_label)
    combo_seen1 = [p for p in combos if _n_seen(p, seen, control_label) == 1]
    test = list(combo_seen1)

    combos_seen2_pool = np.setdiff1d(combos, combo_seen1)
    # GEARS re-seeds here too (``np.random.seed(seed=seed)`` right before this draw), so the
    # combo_seen2 draw does not continue the RNG stream of the train-gene draw.
    np.random.seed(seed)
    combo_train = np.random.choice(
        combos_seen2_pool, int(len(combos_seen2_pool) * combo_seen2_train_frac), replace=False
    )
    combo_seen2 = np.setdiff1d(combos_seen2_pool, combo_train).tolist()
    test.extend(combo_seen2)
    train.extend(combo_train.tolist())

    unseen_single = _perts_from_genes(ood_genes, perts, "single", control_label)
    test.extend(unseen_single)
    combo_seen0 = [
        p for p in _perts_from_genes(ood_genes, perts, "combo", control_label) if _n_seen(p, seen, control_label) == 0
    ]
    test.extend(combo_seen0)
    if len(train) + len(test) != len(perts):
        raise AssertionError("GEARS split lost or duplicated conditions")
    return SimulationSplit(
        train=train,
        test=test,
        subgroups={
            "combo_seen0": combo_seen0,
            "combo_seen1": combo_seen1,
            "combo_seen2": combo_seen2,
            "unseen_single": unseen_single,
        },
    )


def gears_split_table(
    conditions: list[str],
    control_label: str,
    seed: int,
    train_gene_set_size: float = 0.75,
    combo_seen2_train_frac: float = 0.75,
) -> pd.DataFrame:
    """GEARS ``split_data(split_type='simulation')``: test split, then val carved from train.

    Returns one row per condition with columns ``condition, split, subgroup``; the control is in
    train, as GEARS puts it.
    """
    perts = [c for c in pd.unique(pd.Series(conditions)) if c != control_label]
    outer = gears_simulation_split(perts, control_label, train_gene_set_size, combo_seen2_train_frac, seed)
    # GEARS carves validation from train with fixed fractions 0.9/0.9 and the same seed.
    inner = gears_simulation_split(outer.train, control_label, 0.9, 0.9, seed)
    rows = [(c, "train", "") for c in inner.train]
    rows += [(c, "val", g) for g, members in inner.subgroups.items() for c in members]
    rows += [(c, "test", g) for g, members in outer.subgroups.items() for c in members]
    rows.append((control_label, "train", "control"))
    table = pd.DataFrame(rows, columns=["condition", "split", "subgroup"])
    if table["condition"].duplicated().any():
        raise AssertionError("a condition landed in two splits")
    return table.sort_values(["split", "subgroup", "condition"]).reset_index(drop=True)


def _gears_recipe(pairs: pd.DataFrame, control_label: str, **params) -> pd.DataFrame:
    """GEARS splits conditions; with group columns every (condition, group) row takes its condition's split."""
    table = gears_split_table(list(pairs[CONDITION].astype(str)), control_label, **params)
    groups = [c for c in pairs.columns if c != CONDITION]
    if not groups:
        return table
    rows = pairs[[CONDITION, *groups]].astype(str).drop_duplicates()
    out = rows.merge(table, on=CONDITION, how="left", validate="many_to_one")
    return out.sort_values(["split", "subgroup", *groups, CONDITION], kind="stable").reset_index(drop=True)


def _perturbench_combo(pairs: pd.DataFrame, control_label: str, **params) -> pd.DataFrame:
    from .perturbench_split import perturbench_combo_table

    return perturbench_combo_table(pairs, control_label, **params)


def _perturbench_covariate_transfer(pairs: pd.DataFrame, control_label: str, **params) -> pd.DataFrame:
    from .perturbench_split import perturbench_covariate_transfer_table

    return perturbench_covariate_transfer_table(pairs, control_label, **params)


def _replogle_cross_cell_line(pairs: pd.DataFrame, control_label: str, **params) -> pd.DataFrame:
    from .replogle import replogle_cross_cell_line_split

    return replogle_cross_cell_line_split(pairs, control_label, **params)


def _cd4_context_holdout(pairs: pd.DataFrame, control_label: str, **params) -> pd.DataFrame:
    from .cd4 import cd4_context_holdout_split

    return cd4_context_holdout_split(pairs, control_label, **params)


CONDITION = "condition"
SPLIT_RECIPES = {
    "gears_simulation": _gears_recipe,
    "perturbench_combo": _perturbench_combo,
    "perturbench_covariate_transfer": _perturbench_covariate_transfer,
    "replogle_cross_cell_line": _replogle_cross_cell_line,
    "cd4_context_holdout": _cd4_context_holdout,
}


def condition_pairs(obs: pd.DataFrame, group_by: list[str] | tuple[str, ...] = ()) -> pd.DataFrame:
    """Unique (condition [+ group columns]) rows of the cells, in the order they first appear.

    PerturBench's splitter draws over perturbations in first-appearance order, so the order is kept.
    """
    missing = [c for c in [CONDITION, *group_by] if c not in obs.columns]
    if missing:
        raise ValueError(f"obs lacks column(s) {missing} needed for the split")
    return obs[[CONDITION, *group_by]].astype(str).drop_duplicates().reset_index(drop=True)


def make_split(pairs: pd.DataFrame | list[str], control_label: str, recipe: str, **params) -> pd.DataFrame:
    """Dispatch a configured split recipe by name.

    Args:
        pairs: The unique (condition [+ group_by columns]) rows of the raw cells (see
            :func:`condition_pairs`); a plain list of conditions means no group columns.
        control_label: Label of the control condition.
        recipe: A key of :data:`SPLIT_RECIPES`.
        params: The recipe's settings (``split`` config minus ``recipe``).

    Returns:
        One row per pair: ``condition``, the group columns, ``split``, ``subgroup``.
    """
    try:
        fn = SPLIT_RECIPES[recipe]
    except KeyError:
        raise ValueError(f"unknown split recipe '{recipe}'; known: {sorted(SPLIT_RECIPES)}") from None
    if not isinstance(pairs, pd.DataFrame):
        pairs = pd.DataFrame({CONDITION: [str(c) for c in pairs]})
    return fn(pairs, control_label, **params)

"""PerturBench's condition-level splits: combination prediction and covariate (cell line) transfer.

Ported from ``PerturbationDataSplitter`` in altoslabs/perturbench,
``src/perturbench/data/datasplitter.py`` (``split_combinations``, ``split_covariates``,
``split_covariates_manual``, ``_assign_split``), with the settings of
``src/perturbench/configs/data/splitter/{combination_prediction_task,cell_type_transfer_task}.yaml``,
the Norman19 experiment override ``configs/experiment/neurips2024/norman19/*_best_params_norman19.yaml``
(``max_heldout_fraction_per_covariate: 0.7``) and ``notebooks/neurips2024/build_jiang24_frangieh21_splits.py``
(Jiang24: 3 cytokines x 4 cell lines held out, 70 %, seed 0). No PerturBench code is imported.

Every random draw is made with the same generator, seed and arguments in the same order as upstream:
``random.seed`` + ``random.sample`` / ``random.randint`` (Python's Mersenne Twister),
``np.random.RandomState(seed).randint(100000)`` for per-perturbation / per-state seeds, and
``sklearn.model_selection.train_test_split(stratify=..., test_size=0.5, random_state=seed)`` for the
val/test halves. Upstream iterates perturbations in the order they first appear among the cells
(``df[key].unique()``) and covariate groups in sorted order (``groupby``); the ``pairs`` table this
module receives keeps the cells' first-appearance order, so the draws line up.

Output: one row per (condition, group) with columns ``condition``, the group columns, ``split``
(``train``/``val``/``test``/``excluded``) and ``subgroup``.

Deviations (forced by the condition-level ``split.csv`` of this pipeline):

* Controls: upstream splits *control cells* (``_split_controls``: ``random.seed(seed)``, a shuffle of
  all control cells in file order, then ``train_control_fraction`` / half the rest / the rest to
  train / val / test). A condition-level table cannot hold that, so each group's control row here is
  ``train`` (subgroup ``control``) and, when the split config sets ``train_control_fraction``,
  preprocessing re-splits the control *cells* with :func:`split_control_cells` (same draw as
  upstream); the truth then carries the test controls only. Without it every control is train.
* Upstream drops a held-out (perturbation, covariate) pair whose covariate has only one held-out pair
  (sklearn's stratified split needs two per class) and leaves its cells without a split; here such
  rows get ``split = excluded`` (no model sees them, they are not scored).
* The stratification label is ``str(frozenset(...))`` upstream, whose element order for two or more
  covariate columns depends on Python's string hashing (so upstream is not reproducible across
  processes there); here the values are sorted first, which is one of upstream's possible outcomes
  and exactly upstream's label for a single covariate column.
* ``split_covariates``: the sample-size bound is also capped at the pool size (as later upstream
  versions do); identical whenever upstream does not raise.
"""

from __future__ import annotations

import random
from collections import defaultdict
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

CONDITION = "condition"
EXCLUDED = "excluded"
SUBGROUP_COMBO = "combo"
SUBGROUP_TRANSFER = "covariate_transfer"
SUBGROUP_CONTROL = "control"
_DUMMY = "_group"

Group = tuple  # values of the group columns, in column order
Pair = tuple  # (condition, Group)


def _group_columns(pairs: pd.DataFrame) -> list[str]:
    return [c for c in pairs.columns if c != CONDITION]


def _prepare(pairs: pd.DataFrame, control_label: str) -> tuple[pd.DataFrame, list[str], bool]:
    """Unique (condition, group) rows as strings, first-appearance order kept; a dummy group if none."""
    if CONDITION not in pairs.columns:
        raise ValueError(f"pairs table needs a '{CONDITION}' column; got {list(pairs.columns)}")
    frame = pairs.astype(str).drop_duplicates().reset_index(drop=True)
    cols = _group_columns(frame)
    dummy = not cols
    if dummy:  # PerturbationDataSplitter: covariate_keys=None -> a constant dummy covariate
        frame[_DUMMY] = "1"
        cols = [_DUMMY]
    if not (frame[CONDITION] == control_label).any():
        raise ValueError(f"control label '{control_label}' is not among the conditions")
    return frame, cols, dummy


def _groups(frame: pd.DataFrame, cols: list[str]) -> list[tuple[Group, list[str]]]:
    """``obs.groupby(covariate_keys)``: groups in sorted order, conditions in first-appearance order."""
    keys = [tuple(row) for row in frame[cols].itertuples(index=False)]
    by: dict[Group, list[str]] = defaultdict(list)
    for key, condition in zip(keys, frame[CONDITION]):
        by[key].append(condition)
    return [(key, by[key]) for key in sorted(by)]


def _stratum(group: Group) -> str:
    """Upstream's stratify label ``str(frozenset(covariates))`` with a deterministic element order."""
    values = sorted(set(group))
    return "frozenset({" + ", ".join(repr(v) for v in values) + "})"


def assign_val_test(heldout: list[Pair], seed: int, test_fraction: float = 0.5) -> tuple[list[Pair], list[Pair], list[Pair]]:
    """``_assign_split``: stratified val/test halves of the held-out pairs; returns (val, test, dropped).

    Pairs of a group with a single held-out pair cannot be stratified and are dropped, as upstream.
    """
    from sklearn.model_selection import train_test_split

    counts: dict[str, int] = defaultdict(int)
    for _, group in heldout:
        counts[_stratum(group)] += 1
    kept = [p for p in heldout if counts[_stratum(p[1])] > 1]
    dropped = [p for p in heldout if counts[_stratum(p[1])] <= 1]
    if not kept:
        return [], [], dropped
    val, test = train_test_split(
        kept, stratify=[_stratum(g) for _, g in kept], test_size=test_fraction, random_state=seed
    )
    return [tuple(p) for p in val], [tuple(p) for p in test], dropped


def _table(
    frame: pd.DataFrame, cols: list[str], dummy: bool, control_label: str,
    val: Iterable[Pair], test: Iterable[Pair], dropped: Iterable[Pair], heldout_subgroup: str,
) -> pd.DataFrame:
    status = {p: ("val", heldout_subgroup) for p in val}
    status.update({p: ("test", heldout_subgroup) for p in test})
    status.update({p: (EXCLUDED, heldout_subgroup) for p in dropped})
    keys = [tuple(r) for r in frame[cols].itertuples(index=False)]
    splits, subgroups = [], []
    for condition, key in zip(frame[CONDITION], keys):
        if condition == control_label:
            split, sub = "train", SUBGROUP_CONTROL
        else:
            split, sub = status.get((condition, key), ("train", ""))
        splits.append(split)
        subgroups.append(sub)
    out = frame.copy()
    out["split"] = splits
    out["subgroup"] = subgroups
    if dummy:
        out = out.drop(columns=[_DUMMY])
        cols = []
    out = out[[CONDITION, *cols, "split", "subgroup"]]
    return out.sort_values(["split", "subgroup", *cols, CONDITION], kind="stable").reset_index(drop=True)


def split_control_cells(n_controls: int, seed: int, train_control_fraction: float) -> np.ndarray:
    """``_split_controls``: train/val/test label per control cell, cells given in file order.

    ``random.seed(seed)``; ``random.sample`` of all control cells (a shuffle); the first
    ``int(f * n)`` are train, up to ``int((f + (1 - f) / 2) * n)`` val, the rest test. The
    split is over all control cells at once, not per group, as upstream.
    """
    if not 0 < train_control_fraction <= 1:
        raise ValueError(f"train_control_fraction must be in (0, 1], got {train_control_fraction}")
    random.seed(seed)
    order = random.sample(list(range(n_controls)), k=n_controls)
    val_fraction = (1 - train_control_fraction) / 2
    cuts = [int(train_control_fraction * n_controls), int((val_fraction + train_control_fraction) * n_controls)]
    labels = np.empty(n_controls, dtype=object)
    for name, part in zip(("train", "val", "test"), np.split(np.asarray(order, dtype=int), cuts)):
        labels[part] = name
    return labels


def perturbench_combo_table(
    pairs: pd.DataFrame,
    control_label: str,
    seed: int = 42,
    max_heldout_fraction_per_covariate: float = 0.7,
    max_heldout_perturbations_per_covariate: int = 200,
    test_fraction: float = 0.5,
    delimiter: str = "+",
    train_control_fraction: float | None = None,
) -> pd.DataFrame:
    """``split_combinations``: per group, hold out a random fraction of its combinations.

    Singles (and the control) stay in train; ``int(fraction * n_combos)`` combinations of each group
    (at most ``max_heldout_perturbations_per_covariate``) are drawn with ``random.seed(seed)`` re-set
    for every group, then split half val / half test (stratified by group, ``random_state=seed``).
    ``train_control_fraction`` is applied to control cells by preprocessing (:func:`split_control_cells`).
    """
    del train_control_fraction  # a cell-level setting: see split_control_cells
    frame, cols, dummy = _prepare(pairs, control_label)
    heldout: list[Pair] = []
    for group, conditions in _groups(frame, cols):
        random.seed(seed)
        combos = [c for c in conditions if delimiter in c and c != control_label]
        n_heldout = min(int(max_heldout_fraction_per_covariate * len(combos)), max_heldout_perturbations_per_covariate)
        heldout += [(c, group) for c in random.sample(combos, n_heldout)]
    val, test, dropped = assign_val_test(heldout, seed, test_fraction)
    return _table(frame, cols, dummy, control_label, val, test, dropped, SUBGROUP_COMBO)


def _transfer_heldout(
    frame: pd.DataFrame, cols: list[str], control_label: str, seed: int, min_train_covariates: int,
    max_heldout_covariates: int, max_heldout_fraction_per_covariate: float,
    max_heldout_perturbations_per_covariate: int, downsample_fraction: float,
) -> list[Pair]:
    """The held-out draw of ``split_covariates`` (before val/test assignment)."""
    groups = _groups(frame, cols)
    # nunique() over the group's cells counts the control too, as upstream does
    max_heldout = {
        g: min(max_heldout_fraction_per_covariate * len(set(conds)), max_heldout_perturbations_per_covariate)
        for g, conds in groups
    }
    keys = [tuple(r) for r in frame[cols].itertuples(index=False)]
    per_pert: dict[str, list[Group]] = defaultdict(list)
    for condition, key in zip(frame[CONDITION], keys):  # first-appearance order of groups per perturbation
        if condition != control_label and key not in per_pert[condition]:
            per_pert[condition].append(key)
    # groupby([perturbation]) -> sorted names; then a stable sort by number of groups, most first
    perts = sorted(per_pert.items(), key=lambda item: item[0])
    perts = sorted(perts, key=lambda item: len(item[1]), reverse=True)
    if downsample_fraction < 1.0:
        random.seed(seed)
        keep = set(random.sample([p for p, _ in perts], int(downsample_fraction * len(perts))))
        perts = [(p, g) for p, g in perts if p in keep]
    rng = np.random.RandomState(seed)
    seed_list = [rng.randint(100000) for _ in range(len(perts))]
    n_total = len(max_heldout)
    n_heldout: dict[Group, int] = defaultdict(int)
    heldout: list[Pair] = []
    for i, (pert, covs) in enumerate(perts):
        if len(covs) <= min_train_covariates:
            continue
        pool = [c for c in covs if n_heldout[c] < max_heldout[c]]
        if not pool:
            continue
        random.seed(int(seed_list[i]))
        upper = min(len(pool), max(len(pool) - n_total + max_heldout_covariates, 1))
        sampled = random.sample(pool, random.randint(1, upper))
        for c in sampled:
            n_heldout[c] += 1
        heldout += [(pert, c) for c in sampled]
    return heldout


def _manual_heldout(
    frame: pd.DataFrame, cols: list[str], control_label: str, seed: int,
    holdout_groups: Sequence[Sequence[str]], max_heldout_fraction_per_covariate: float,
) -> list[Pair]:
    """The held-out draw of ``split_covariates_manual`` (named groups, e.g. Jiang24's 12 states)."""
    wanted = [frozenset(str(v) for v in g) for g in holdout_groups]
    rng = np.random.RandomState(seed)
    seed_list = [rng.randint(100000) for _ in range(len(wanted))]
    heldout: list[Pair] = []
    known = set()
    for group, conditions in _groups(frame, cols):
        key = frozenset(group)
        known.add(key)
        if key not in wanted:
            continue
        perts = [c for c in dict.fromkeys(conditions) if c != control_label]
        random.seed(int(seed_list[wanted.index(key)]))
        heldout += [(p, group) for p in random.sample(perts, int(max_heldout_fraction_per_covariate * len(perts)))]
    missing = [sorted(g) for g in wanted if g not in known]
    if missing:
        raise ValueError(f"holdout_groups name group(s) not in the data: {missing[:5]}")
    return heldout


def perturbench_covariate_transfer_table(
    pairs: pd.DataFrame,
    control_label: str,
    seed: int = 42,
    min_train_covariates: int = 1,
    max_heldout_covariates: int = 1,
    max_heldout_fraction_per_covariate: float = 0.3,
    max_heldout_perturbations_per_covariate: int = 200,
    test_fraction: float = 0.5,
    downsample_fraction: float = 1.0,
    holdout_groups: Sequence[Sequence[str]] | None = None,
    train_control_fraction: float | None = None,
) -> pd.DataFrame:
    """``split_covariates`` (or ``split_covariates_manual`` when ``holdout_groups`` is given).

    Automatic mode: perturbations seen in more than ``min_train_covariates`` groups have 1 ..
    ``max_heldout_covariates`` of their groups held out (each group capped at
    ``fraction * n_conditions``), so every held-out (perturbation, group) has the perturbation in
    train in another group. Manual mode: in each listed group, ``int(fraction * n_perturbations)``
    of its perturbations are held out. Held-out pairs are then split half val / half test.
    ``train_control_fraction`` is applied to control cells by preprocessing (:func:`split_control_cells`).
    """
    del train_control_fraction  # a cell-level setting: see split_control_cells
    frame, cols, dummy = _prepare(pairs, control_label)
    if holdout_groups:
        heldout = _manual_heldout(frame, cols, control_label, seed, holdout_groups, max_heldout_fraction_per_covariate)
    else:
        heldout = _transfer_heldout(
            frame, cols, control_label, seed, min_train_covariates, max_heldout_covariates,
            max_heldout_fraction_per_covariate, max_heldout_perturbations_per_covariate, downsample_fraction,
        )
    val, test, dropped = assign_val_test(heldout, seed, test_fraction)
    return _table(frame, cols, dummy, control_label, val, test, dropped, SUBGROUP_TRANSFER)

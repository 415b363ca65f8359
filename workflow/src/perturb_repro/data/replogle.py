"""Replogle cross-cell-line split (recipe ``replogle_cross_cell_line``): train on K562/Jurkat/HepG2, test on RPE1.

Source of truth: the scGPT-Replogle model card (``/work/shared/seeds/scgpt_replogle_card.txt``):
"Training: 362,327 cells from K562 + Jurkat + HepG2 with 1,383 perturbations and 8,569 val pairs
(held-out K562 perturbations). Evaluation: 109,207 RPE1 cells perturbed by the 1,047 genes overlapping
the K562 training perturbation set, plus 10,691 real RPE1 controls." Data: arcinstitute/State-Replogle-Filtered
``replogle_concat.h5ad`` (Replogle 2022 + Nadig 2025; 643,413 cells, 4 cell lines, obs ``gene`` with
control ``non-targeting``, obs ``cell_line`` in {k562, rpe1, jurkat, hepg2}).

Upstream code read: mattshu0410/sc-interp ``scripts/data/state_replogle.py`` (``load_state_replogle``)
and ``data/manifests/replogle.yaml`` (``val_pert_fraction: 0.05``). Its split, which this module follows:

* the validation perturbations are drawn by ``rng = np.random.default_rng(seed)``,
  ``rng.shuffle(sorted perturbations)``, the first ``max(1, round(n * val_fraction))`` of the shuffle;
* val cells are the cells of those perturbations in the training cell line(s); they are not trained on;
* test cells are the test cell line's cells of perturbations that also occur in the training line,
  evaluated against the test line's own controls; the test line's other cells are not used.

Where this module differs, and why:

* The stored upstream versions train on K562 only (``train_cell_lines: ["k562"]``); the card says
  K562 + Jurkat + HepG2, so ``train_groups`` lists all three. The validation perturbations are drawn
  from the ``val_group`` (K562) only, as the card says "held-out K562 perturbations"; because a
  held-out perturbation must not be trained on, its Jurkat/HepG2 rows are ``excluded`` as well
  (val rows exist only for the K562 group).
* Upstream computes the test overlap with *all* training-line perturbations before carving out the
  validation share, so ~5 % of its test perturbations were never trained on in K562. By default
  (``test_includes_val_perturbations=False``) the test set holds only perturbations trained in the
  ``val_group``, i.e. "genes seen in K562 training"; ``True`` reproduces upstream's (and hence the
  card's 1,047) definition.

What can be derived from the card offline: ``n - max(1, round(0.05 n)) = 1,383`` has the single
solution ``n = 1,456`` K562 perturbations (73 held out), so the card's 1,383 is consistent with
upstream's 5 % validation share. Cell counts (362,327 / 8,569 / 109,207 / 10,691) need the real file:
:func:`split_summary` computes them from obs + split table and :func:`compare_with_card` lines them
up with the card.

Split-table format (contract, "Covariate-aware conditions"): one row per (condition, group) with
columns ``condition``, ``<group_column>``, ``split`` and ``subgroup``; ``split`` is ``train``, ``val``,
``test`` or ``excluded`` (rows used by no stage: test-line perturbations outside the overlap, cell
lines that are neither trained nor tested, and the other-line rows of validation perturbations).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
import pandas as pd

from ..errors import PipelineInputError

logger = logging.getLogger(__name__)

CONDITION = "condition"
EXCLUDED = "excluded"

# Numbers printed by the scGPT-Replogle card (see module docstring).
CARD = {
    "train_cells": 362_327,
    "train_perturbations": 1_383,
    "val_cells": 8_569,
    "test_perturbations": 1_047,
    "test_cells": 109_207,
    "test_control_cells": 10_691,
}


def n_val_perturbations(n: int, val_fraction: float) -> int:
    """Upstream's validation count: ``max(1, round(n * val_fraction))`` (0 when the fraction is 0)."""
    if val_fraction <= 0 or n == 0:
        return 0
    return max(1, round(n * val_fraction))


def replogle_cross_cell_line_split(
    pairs: pd.DataFrame,
    control_label: str,
    group_column: str,
    train_groups: list[str],
    test_group: str,
    val_group: str,
    val_fraction: float,
    seed: int,
    test_includes_val_perturbations: bool = False,
) -> pd.DataFrame:
    """Split table for the Replogle cross-cell-line task.

    Args:
        pairs: Unique (condition, group) rows of the raw data (duplicates are dropped); columns
            ``condition`` and ``group_column``.
        control_label: The control condition (``non-targeting``).
        group_column: obs column of the cell line (``cell_line``).
        train_groups: Cell lines trained on (``[k562, jurkat, hepg2]``).
        test_group: Cell line tested on (``rpe1``); its controls are the test controls.
        val_group: Training cell line whose perturbations supply the validation share and define
            the test overlap (``k562``).
        val_fraction: Share of ``val_group`` perturbations held out for validation (upstream: 0.05).
        seed: Seed of the validation draw.
        test_includes_val_perturbations: Test on RPE1 perturbations that overlap all ``val_group``
            perturbations (upstream/card definition) instead of only the ones trained on.

    Returns:
        One row per (condition, group): ``condition``, ``group_column``, ``split``, ``subgroup``.

    Raises:
        PipelineInputError: A column, group or control is missing, the test group is also a
            training group, or the overlap is empty.
    """
    for column in (CONDITION, group_column):
        if column not in pairs.columns:
            raise PipelineInputError("split", column, f"pairs table lacks column '{column}'; has {list(pairs.columns)}")
    if not 0 <= float(val_fraction) < 1:
        raise PipelineInputError("config", "split.val_fraction", f"must be in [0, 1), got {val_fraction}")
    train_groups = [str(g) for g in train_groups]
    test_group, val_group = str(test_group), str(val_group)
    if test_group in train_groups:
        raise PipelineInputError("config", "split.test_group", f"'{test_group}' is also a training group")
    if val_group not in train_groups:
        raise PipelineInputError("config", "split.val_group", f"'{val_group}' is not one of train_groups {train_groups}")

    table = pairs[[CONDITION, group_column]].astype(str).drop_duplicates().reset_index(drop=True)
    present = set(table[group_column])
    for group in [*train_groups, test_group]:
        if group not in present:
            raise PipelineInputError("split", group_column, f"group '{group}' has no cells; groups are {sorted(present)}")
        if not ((table[group_column] == group) & (table[CONDITION] == control_label)).any():
            raise PipelineInputError("split", group_column, f"group '{group}' has no '{control_label}' control cells")

    is_control = table[CONDITION] == control_label
    in_val_group = table[group_column] == val_group
    val_group_perts = sorted(table.loc[in_val_group & ~is_control, CONDITION])
    shuffled = list(val_group_perts)
    np.random.default_rng(seed).shuffle(shuffled)  # upstream: rng.shuffle(sorted list)
    val_perts = set(shuffled[: n_val_perturbations(len(shuffled), float(val_fraction))])
    seen = set(val_group_perts) if test_includes_val_perturbations else set(val_group_perts) - val_perts

    splits, subgroups = [], []
    for condition, group, control in zip(table[CONDITION], table[group_column], is_control, strict=True):
        if group in train_groups:
            if control:
                split, sub = "train", "control"
            elif condition in val_perts:
                split, sub = ("val", "held_out_perturbation") if group == val_group else (EXCLUDED, "val_perturbation")
            else:
                split, sub = "train", ""
        elif group == test_group:
            if control:
                split, sub = "test", "control"
            elif condition in seen:
                split, sub = "test", "cross_cell_line"
            else:
                split, sub = EXCLUDED, "val_perturbation" if condition in val_perts else f"not_in_{val_group}"
        else:
            split, sub = EXCLUDED, "other_group"
        splits.append(split)
        subgroups.append(sub)
    table["split"] = splits
    table["subgroup"] = subgroups
    if not ((table["split"] == "test") & ~is_control).any():
        raise PipelineInputError(
            "split", CONDITION, f"no '{test_group}' perturbation overlaps the '{val_group}' training perturbations"
        )
    logger.info(
        "replogle_cross_cell_line: %d %s perturbations, %d held out for validation, %d test perturbations in %s",
        len(val_group_perts), val_group, len(val_perts),
        int(((table["split"] == "test") & ~is_control).sum()), test_group,
    )  # fmt: skip
    return table.sort_values(["split", "subgroup", group_column, CONDITION]).reset_index(drop=True)


def split_summary(obs: pd.DataFrame, table: pd.DataFrame, control_label: str, group_column: str) -> dict[str, int]:
    """Cells and perturbations per split, in the card's terms, from per-cell obs and the split table.

    ``obs`` needs ``condition`` and ``group_column`` per cell (e.g. the raw file's obs after
    :func:`perturb_repro.data.source.load_source`).
    """
    keys = [CONDITION, group_column]
    cells = obs[keys].astype(str).merge(table[[*keys, "split"]], on=keys, how="left", validate="many_to_one")
    if cells["split"].isna().any():
        raise PipelineInputError("split", CONDITION, "cells whose (condition, group) is not in the split table")
    control = cells[CONDITION] == control_label
    perturbed = cells[~control]
    return {
        "train_cells": int((cells["split"] == "train").sum()),
        "train_perturbed_cells": int(((cells["split"] == "train") & ~control).sum()),
        "train_perturbations": int(perturbed.loc[perturbed["split"] == "train", CONDITION].nunique()),
        "val_cells": int((cells["split"] == "val").sum()),
        "val_perturbations": int(perturbed.loc[perturbed["split"] == "val", CONDITION].nunique()),
        "test_perturbations": int(perturbed.loc[perturbed["split"] == "test", CONDITION].nunique()),
        "test_cells": int(((cells["split"] == "test") & ~control).sum()),
        "test_control_cells": int(((cells["split"] == "test") & control).sum()),
        "excluded_cells": int((cells["split"] == EXCLUDED).sum()),
    }


def compare_with_card(summary: Mapping[str, int]) -> pd.DataFrame:
    """The card's numbers next to ours (``match`` = equal); logged, never raised on.

    Train cells are compared both with and without the training controls, since the card does not
    say whether its 362,327 include them.
    """
    rows = []
    for key, reported in CARD.items():
        ours = summary.get(key)
        rows.append({"quantity": key, "card": reported, "ours": ours, "match": ours == reported})
        if key == "train_cells" and "train_perturbed_cells" in summary:
            ours = summary["train_perturbed_cells"]
            rows.append({"quantity": "train_perturbed_cells", "card": reported, "ours": ours, "match": ours == reported})
    frame = pd.DataFrame(rows)
    for row in frame.itertuples():
        (logger.info if row.match else logger.warning)("card check %s: card %s, ours %s", row.quantity, row.card, row.ours)
    return frame

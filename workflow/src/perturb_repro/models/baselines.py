"""Mean-shift baselines that anchor every table: no effect (control mean) and additive single-gene shifts."""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import numpy as np

from ..data.conditions import genes_of
from ..data.pca import dense
from ..data.source import CONDITION, IS_CONTROL
from ..io import atomic_path, write_text
from .base import ModelContext

MEANS_FILE = "means.npz"


GROUPS_FILE = "group_means.npz"


def _group_keys(obs, group_by: list[str]) -> np.ndarray:
    """One string key per cell: its group_by values joined by a tab (all cells one group without group_by)."""
    if not group_by:
        return np.full(len(obs), "", dtype=object)
    return obs[group_by].astype(str).agg("\t".join, axis=1).to_numpy()


def _fit_means(train: ad.AnnData, checkpoint_dir: Path, kind: str) -> None:
    """Store the control mean and, per train single perturbation, its mean shift from control.

    With ``group_by`` (``train.uns['group_by']``, covariate-aware datasets) the same is also stored per
    group: each group's control mean and each gene's shift against that group's own controls.
    """
    x = dense(train.X)
    control = train.obs[IS_CONTROL].to_numpy()
    control_mean = x[control].mean(axis=0)
    shifts: dict[str, np.ndarray] = {}
    for condition, idx in train.obs.groupby(CONDITION, observed=True).indices.items():
        genes = genes_of(condition, train.uns["control_label"])
        if len(genes) == 1:
            shifts[genes[0]] = x[idx].mean(axis=0) - control_mean
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(checkpoint_dir / MEANS_FILE) as tmp:
        np.savez(tmp, control_mean=control_mean, genes=np.array(sorted(shifts), dtype=str),
                 shifts=np.stack([shifts[g] for g in sorted(shifts)]) if shifts else np.zeros((0, x.shape[1])))
    group_by = [str(g) for g in train.uns.get("group_by", [])]
    n_groups = 0
    if group_by:
        keys = _group_keys(train.obs, group_by)
        conds = train.obs[CONDITION].astype(str).to_numpy()
        names, genes_out, shifts_out = [], [], []
        for key in sorted(set(keys)):
            in_group = keys == key
            if not (in_group & control).any():
                continue  # no train controls in this group: no shift can be measured against them
            g_ctrl = x[in_group & control].mean(axis=0)
            for condition in sorted(set(conds[in_group])):
                genes = genes_of(condition, train.uns["control_label"])
                if len(genes) == 1:
                    names.append(key)
                    genes_out.append(genes[0])
                    shifts_out.append(x[in_group & (conds == condition)].mean(axis=0) - g_ctrl)
        n_groups = len(set(names))
        with atomic_path(checkpoint_dir / GROUPS_FILE) as tmp:
            np.savez(tmp, group_by=np.array(group_by, dtype=str), groups=np.array(names, dtype=str),
                     genes=np.array(genes_out, dtype=str),
                     shifts=np.stack(shifts_out) if shifts_out else np.zeros((0, x.shape[1])))
    write_text(json.dumps({"model": kind, "train_singles": len(shifts), "groups_with_shifts": n_groups}),
               checkpoint_dir / "fit.json")


def _load_means(checkpoint_dir: Path) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    with np.load(checkpoint_dir / MEANS_FILE) as data:
        return data["control_mean"], dict(zip(data["genes"].tolist(), data["shifts"]))


def _shifts_for(checkpoint_dir: Path, control: ad.AnnData) -> dict[str, np.ndarray]:
    """Per-gene shifts for the group the control cells belong to.

    Without groups: the pooled train shifts. With groups: a gene measured alone in this group's train
    cells uses that group's shift; otherwise (held out here, the covariate-transfer case) the mean of
    its shifts in the groups where it was measured; a gene never measured alone adds nothing.
    """
    _, pooled = _load_means(checkpoint_dir)
    path = checkpoint_dir / GROUPS_FILE
    if not path.exists():
        return pooled
    with np.load(path) as data:
        group_by = data["group_by"].tolist()
        names, genes, shifts = data["groups"].tolist(), data["genes"].tolist(), data["shifts"]
    keys = set(_group_keys(control.obs, group_by))
    if len(keys) != 1:
        raise ValueError(f"control cells span {len(keys)} groups of {group_by}; predict one group at a time")
    key = keys.pop()
    own = {g: shifts[i] for i, (n, g) in enumerate(zip(names, genes)) if n == key}
    elsewhere: dict[str, list[np.ndarray]] = {}
    for i, (n, g) in enumerate(zip(names, genes)):
        if n != key:
            elsewhere.setdefault(g, []).append(shifts[i])
    out = {g: np.mean(v, axis=0) for g, v in elsewhere.items()}
    out.update(own)
    return out


def _control_cells(control: ad.AnnData) -> np.ndarray:
    return dense(control[control.obs[IS_CONTROL].to_numpy()].X)


class ControlMean:
    """Predicts no effect: each condition's cells are the real control cells, unchanged.

    Their mean is the control mean exactly, so the predicted delta is exactly zero and cell-eval's
    pearson_delta is undefined (NaN) for this baseline, as it should be; rounding noise from a
    recomputed mean would instead give a meaningless correlation.
    """

    def fit(self, train, val, context: ModelContext, params, checkpoint_dir: Path) -> None:
        _fit_means(train, checkpoint_dir, "control_mean")

    def sample(self, checkpoint_dir, conditions, control, n_cells, context, params, sampling):
        cells = _control_cells(control)
        return {c: cells for c in conditions}


class Additive:
    """Control cells shifted by the sum of each perturbed gene's single-perturbation mean shift in train.

    With ``group_by`` the shifts are the control cells' group's own (see :func:`_shifts_for`), so a
    perturbation held out in one cell line is predicted from its effect in the other lines.

    A gene never perturbed alone in train contributes no shift (GEARS' unseen genes), so an unseen
    single gene is predicted as the control cells themselves (pearson_delta undefined there).
    """

    def fit(self, train, val, context: ModelContext, params, checkpoint_dir: Path) -> None:
        _fit_means(train, checkpoint_dir, "additive")

    def sample(self, checkpoint_dir, conditions, control, n_cells, context, params, sampling):
        shifts = _shifts_for(Path(checkpoint_dir), control)
        cells = _control_cells(control)
        out = {}
        for condition in conditions:
            known = [shifts[g] for g in genes_of(condition, context.control_label) if g in shifts]
            if not known:
                out[condition] = cells
                continue
            # log-expression cannot be negative: clip, as every gene-space prediction here is
            out[condition] = np.clip(cells + np.sum(known, axis=0), 0.0, None).astype(np.float32)
        return out

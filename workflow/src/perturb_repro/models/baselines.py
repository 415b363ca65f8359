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


def _fit_means(train: ad.AnnData, checkpoint_dir: Path, kind: str) -> None:
    """Store the control mean and, per train single perturbation, its mean shift from control."""
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
    write_text(json.dumps({"model": kind, "train_singles": len(shifts)}), checkpoint_dir / "fit.json")


def _load_means(checkpoint_dir: Path) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    with np.load(checkpoint_dir / MEANS_FILE) as data:
        return data["control_mean"], dict(zip(data["genes"].tolist(), data["shifts"]))


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

    A gene never perturbed alone in train contributes no shift (GEARS' unseen genes), so an unseen
    single gene is predicted as the control cells themselves (pearson_delta undefined there).
    """

    def fit(self, train, val, context: ModelContext, params, checkpoint_dir: Path) -> None:
        _fit_means(train, checkpoint_dir, "additive")

    def sample(self, checkpoint_dir, conditions, control, n_cells, context, params, sampling):
        _, shifts = _load_means(Path(checkpoint_dir))
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

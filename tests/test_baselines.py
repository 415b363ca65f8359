"""Baselines: control mean returns the real controls; additive adds train single-gene mean shifts."""

import numpy as np

from perturb_repro.data.pca import dense

from perturb_repro.data.pca import fit_pca
from perturb_repro.models.base import ModelContext, get_model


def _run(kind, processed, tmp_path, conditions):
    train = processed[processed.obs["split"] == "train"].copy()
    context = ModelContext("norman_demo", "control", fit_pca(processed, 5, 0), {}, 0)
    model = get_model(kind)
    model.fit(train, None, context, {}, tmp_path)
    control = processed[processed.obs["is_control"].to_numpy()].copy()
    return model.sample(tmp_path, conditions, control, 10, context, {}, {}), control


def test_control_mean_is_the_control_cells(tmp_path, demo_processed):
    out, control = _run("control_mean", demo_processed, tmp_path, ["HK2"])
    np.testing.assert_array_equal(out["HK2"], dense(control.X))


def test_additive_sums_train_single_shifts(tmp_path, demo_processed):
    x, obs = dense(demo_processed.X), demo_processed.obs
    train = (obs["split"] == "train").to_numpy()

    def mean_of(condition):
        return x[train & (obs["condition"] == condition).to_numpy()].mean(axis=0)

    singles = sorted({c for c in obs.loc[train, "condition"] if "+" not in c} - {"control"})
    unseen = sorted({c for c in obs.loc[~train, "condition"] if "+" not in c})
    a, b, new = singles[0], singles[1], unseen[0]
    ctrl = mean_of("control")
    out, control = _run("additive", demo_processed, tmp_path, [f"{a}+{b}", f"{new}+{b}", new])
    cells = dense(control.X)
    expected = np.clip(cells + (mean_of(a) - ctrl) + (mean_of(b) - ctrl), 0, None)
    np.testing.assert_allclose(out[f"{a}+{b}"], expected, atol=1e-5)
    # a gene never perturbed alone in train adds nothing
    np.testing.assert_allclose(out[f"{new}+{b}"], np.clip(cells + mean_of(b) - ctrl, 0, None), atol=1e-5)
    np.testing.assert_array_equal(out[new], cells)

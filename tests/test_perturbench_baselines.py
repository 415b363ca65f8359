"""PerturBench's linear additive, latent additive and decoder-only baselines: sizes at the paper
presets, fitting a known additive structure, bit-identical resume, unseen genes, demo predictions."""

import json

import numpy as np
import pandas as pd
import pytest
import torch

from perturb_repro.config import deep_merge, model_params
from perturb_repro.models import perturbench_baselines as pb
from perturb_repro.models.base import ModelContext
import perturb_repro.trainer as trainer_mod
from perturb_repro.training import Preempted
from fakes import GENES, TRAIN_CONDITIONS, VAL_CONDITIONS, SignalAfter, additive_cells, train_val

DEMO_COVARIATES = {"covariates": ["cell_type"]}  # config/demo.yaml norman_demo covariates, which the models take
MODELS = {"linear": pb.LinearAdditive, "latent_additive": pb.LatentAdditive, "decoder_only": pb.DecoderOnly}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    torch.set_num_threads(1)


def _mlp(i, h, o, n):
    """Parameters of PerturBench's MLP: n hidden Linear layers (LayerNorm has no parameters) + output."""
    return (i + 1) * h + (n - 1) * (h + 1) * h + (h + 1) * o


def _expected(kind, g, p, c, m):
    if kind == "linear":
        return (p + (c if m["inject_covariates"] else 0) + 1) * g
    if kind == "decoder_only":
        n_in = (p if m["use_perturbations"] else 0) + (c if m["use_covariates"] else 0)
        return _mlp(n_in, m["encoder_width"], g, m["n_layers"])
    w, z, n = m["encoder_width"], m["latent_dim"], m["n_layers"]
    return (_mlp(g + (c if m["inject_covariates_encoder"] else 0), w, z, n)
            + _mlp(z + (c if m["inject_covariates_decoder"] else 0), w, g, n)
            + _mlp(p, w, z, n))


# Norman 2019 as GEARS ships it: 5,045 genes, 105 perturbed genes, one cell line
N_GENES, N_PERTS, N_COVS = 5045, 105, 1


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("preset", ["paper", "paper_norman19", "paper_srivatsan20"])
def test_parameter_counts_at_paper_presets(kind, preset):
    params = model_params({"type": kind, "preset": preset})
    with torch.device("meta"):  # shapes only: the 5,376-wide nets are not allocated
        net = MODELS[kind]().build_net(N_GENES, N_PERTS, N_COVS, params)
    n = pb.count_parameters(net)
    print(f"{kind:16s} {preset:18s} {N_GENES} genes, {N_PERTS} perturbations: {n:,} parameters")
    assert n == _expected(kind, N_GENES, N_PERTS, N_COVS, params["model"])
    # LayerNorms carry no affine parameters (PerturBench's MLP: elementwise_affine=False)
    assert all(not isinstance(mod, torch.nn.LayerNorm) or mod.weight is None for mod in net.modules())


def test_paper_default_counts_by_hand():
    """The `paper` presets, counted by hand for 5,045 genes / 105 perturbations / 1 covariate value."""
    counts = {}
    for kind, cls in MODELS.items():
        with torch.device("meta"):
            counts[kind] = pb.count_parameters(cls().build_net(N_GENES, N_PERTS, N_COVS, model_params({"type": kind, "preset": "paper"})))
    # linear: (105 + 1 + bias) x 5045; decoder 106-3072-3072-3072-5045; latent: 3 such MLPs, latent 160
    assert counts == {"linear": 539_815, "decoder_only": 34_712_501, "latent_additive": 89_455_861}


# --------------------------------------------------------------------------- synthetic additive data


def _synthetic(seed=0, n_cells=40, n_genes=30):
    return additive_cells(seed, n_cells, n_genes, effect_sd=0.6)


@pytest.fixture(scope="module")
def synthetic():
    return train_val(_synthetic())


CONTEXT = ModelContext("synthetic", "control", pca=None, embeddings={}, seed=3)


def _fit_params(kind, **training):
    over = {"trainer": {"max_epochs": 25}, "data": {"batch_size": 64}, "early_stopping": {"patience": 25}}
    return deep_merge(deep_merge(model_params({"type": kind, "preset": "tiny"}), over), training)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, synthetic):
    train, val = synthetic
    out = {}
    for kind, cls in MODELS.items():
        ckpt = tmp_path_factory.mktemp(kind)
        cls().fit(train, val, CONTEXT, _fit_params(kind), ckpt)
        out[kind] = ckpt
    return out


def _mean_errors(pred, cells):
    return {c: float(np.mean((pred[c].mean(0) - cells[cells.obs["condition"] == c].X.mean(0)) ** 2)) for c in pred}


@pytest.mark.parametrize("kind", MODELS)
def test_fits_additive_structure_better_than_control_mean(kind, fitted, synthetic):
    train, val = synthetic
    control = train[train.obs["is_control"].to_numpy()]
    params = _fit_params(kind)
    pred = MODELS[kind]().sample(fitted[kind], TRAIN_CONDITIONS + VAL_CONDITIONS, control, 160, CONTEXT, params, {"seed": 0})
    control_mean = {c: np.broadcast_to(control.X.mean(0), (1, train.n_vars)) for c in pred}
    model_err = _mean_errors({c: pred[c] for c in TRAIN_CONDITIONS}, train)
    base_err = _mean_errors({c: control_mean[c] for c in TRAIN_CONDITIONS}, train)
    print(kind, "train-condition mean MSE", np.mean(list(model_err.values())), "control mean", np.mean(list(base_err.values())))
    assert np.mean(list(model_err.values())) < 0.2 * np.mean(list(base_err.values()))
    for c in pred:
        assert pred[c].shape == (160, train.n_vars) and np.isfinite(pred[c]).all() and (pred[c] >= 0).all()
    if kind == "linear":  # additive in the inputs: unseen combinations of seen genes come out right too
        val_err = _mean_errors({c: pred[c] for c in VAL_CONDITIONS}, val)
        val_base = _mean_errors({c: control_mean[c] for c in VAL_CONDITIONS}, val)
        assert np.mean(list(val_err.values())) < 0.2 * np.mean(list(val_base.values()))


def test_best_validation_epoch_is_kept(fitted):
    for kind, ckpt in fitted.items():
        info = json.loads((ckpt / "fit.json").read_text())
        log = pd.read_csv(ckpt / "val_log.csv")
        assert info["best_epoch"] == int(log["val_loss"].idxmin())
        assert info["best_val_loss"] == pytest.approx(log["val_loss"].min())
        assert list(pd.read_csv(ckpt / "train_log.csv")["step"]) == list(range(info["steps"]))


# --------------------------------------------------------------------------- resume




@pytest.mark.parametrize("kind", MODELS)
def test_preempted_run_resumes_bit_identically(kind, synthetic, tmp_path, monkeypatch):
    train, val = synthetic
    params = _fit_params(kind, trainer={"max_epochs": 3}, training={"checkpoint_every": 4})  # 13 steps/epoch
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    MODELS[kind]().fit(train, val, CONTEXT, params, full)

    with monkeypatch.context() as patch:
        patch.setattr(trainer_mod, "StopFlag", lambda: SignalAfter(17))  # SIGTERM in the second epoch, off the cadence
        with pytest.raises(Preempted):
            MODELS[kind]().fit(train, val, CONTEXT, params, resumed)
    assert json.loads((resumed / pb.STATE_MARKER).read_text())["step"] == 18  # saved where it stopped
    assert not (resumed / pb.MODEL_FILE).exists()
    MODELS[kind]().fit(train, val, CONTEXT, params, resumed)

    a, b = pb._PerturBenchModel.load(full), pb._PerturBenchModel.load(resumed)
    for key in a["weights"]:
        assert torch.equal(a["weights"][key], b["weights"][key]), key
    for name in ("train_log.csv", "val_log.csv"):
        pd.testing.assert_frame_equal(pd.read_csv(full / name), pd.read_csv(resumed / name))
    assert len(pd.read_csv(full / "train_log.csv")) == 39


# --------------------------------------------------------------------------- seen / unseen genes


def test_unseen_genes_contribute_nothing(fitted, synthetic):
    train, _ = synthetic
    control = train[train.obs["is_control"].to_numpy()]
    enc = pb.InputEncoder.fit(train.obs[~train.obs["is_control"].to_numpy()], ["cell_type"], "control")
    assert enc.genes == GENES
    np.testing.assert_array_equal(enc.perturbation(["A+ZZZ"]), enc.perturbation(["A"]))
    np.testing.assert_array_equal(enc.perturbation(["ZZZ", "control"]), np.zeros((2, len(GENES))))
    np.testing.assert_array_equal(enc.perturbation(["B+E"])[0], [0, 1, 0, 0, 1, 0])  # multi-hot
    unseen_type = pd.DataFrame({"cell_type": ["t1", "t9"]})
    np.testing.assert_array_equal(enc.covariate(unseen_type), [[1, 0], [0, 0]])
    for kind, ckpt in fitted.items():
        pred = MODELS[kind]().sample(ckpt, ["A", "A+ZZZ", "ZZZ", "A+B"], control, 50, CONTEXT, _fit_params(kind), {"seed": 1})
        np.testing.assert_array_equal(pred["A"], pred["A+ZZZ"])
        assert not np.allclose(pred["A"], pred["A+B"])  # a seen gene does reach the network
        assert np.isfinite(pred["ZZZ"]).all() and pred["ZZZ"].shape == (50, train.n_vars)


# --------------------------------------------------------------------------- demo data


@pytest.mark.parametrize("kind", MODELS)
def test_tiny_preset_on_demo_data(kind, demo_processed, tmp_path):
    train = demo_processed[demo_processed.obs["split"] == "train"].copy()
    val = demo_processed[demo_processed.obs["split"] == "val"].copy()
    test = demo_processed[demo_processed.obs["split"] == "test"]
    control = demo_processed[demo_processed.obs["is_control"].to_numpy()].copy()
    params = deep_merge(model_params({"type": kind, "preset": "tiny"}, dataset_cfg=DEMO_COVARIATES), {"trainer": {"max_epochs": 2}})  # speed only
    context = ModelContext("norman_demo", "control", pca=None, embeddings={}, seed=0)
    MODELS[kind]().fit(train, val, context, params, tmp_path)
    conditions = sorted(set(test.obs["condition"]) - {"control"})
    pred = MODELS[kind]().sample(tmp_path, conditions, control, 30, context, params, {"seed": 0})
    assert sorted(pred) == conditions
    for c in conditions:
        assert pred[c].shape == (30, demo_processed.n_vars) and pred[c].dtype == np.float32
        assert np.isfinite(pred[c]).all() and (pred[c] >= 0).all()
    info = json.loads((tmp_path / "fit.json").read_text())
    assert info["steps"] == 2 * info["steps_per_epoch"] and info["n_covariates"] == 1

"""PerturBench's CPA, CPA (noAdv) and Biolord: sizes at the paper presets, the noAdv switch and the
adversary schedule, fitting a known additive structure, bit-identical resume, demo predictions."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from fakes import TRAIN_CONDITIONS, VAL_CONDITIONS, SignalAfter, additive_cells, train_val
from perturb_repro.config import deep_merge, model_params
from perturb_repro.models import cpa as cpa_mod
from perturb_repro.models import perturbench_baselines as pb
from perturb_repro.models.base import ModelContext, get_model
from perturb_repro.models.biolord import Biolord
from perturb_repro.models.cpa import CPA
import perturb_repro.trainer as trainer_mod
from perturb_repro.training import Preempted

DEMO_COVARIATES = {"covariates": ["cell_type"]}  # config/demo.yaml norman_demo covariates, which the models take
MODELS = {"cpa": CPA, "biolord": Biolord}
VARIANTS = [("cpa", "tiny"), ("cpa", "tiny_noadv"), ("cpa", "tiny_neurips2025"), ("cpa", "tiny_noadv_neurips2025"),
            ("biolord", "tiny")]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    torch.set_num_threads(1)


# --------------------------------------------------------------------------- sizes


def _lin(i, o):
    return (i + 1) * o


def _mlp(i, h, o, n):
    """PerturBench's MLP: n hidden Linear layers (LayerNorms without affine parameters) + output."""
    return _lin(i, h) + (n - 1) * _lin(h, h) + _lin(h, o)


def _vae_body(i, h, n):
    """VariationalEncoder/-Decoder body: n + 1 Linear layers, each with an affine LayerNorm (2h)."""
    return _lin(i, h) + 2 * h + n * (_lin(h, h) + 2 * h)


def _expected_cpa(g, p, covs, m, with_unused_adversary=False):
    h, z, n = m["hidden_dim"], m["n_latent"], m["n_layers_encoder"]
    ah, an = m["adv_classifier_hidden_dim"], m["adv_classifier_n_layers"]
    total = _vae_body(g, h, n) + 2 * _lin(h, z)          # encoder, mean and log-variance heads
    if m.get("release") == "neurips2025":
        total += _mlp(z, h, g, n)                        # DeepIsotropicGaussian: an MLP to the mean
    else:
        total += _vae_body(z, h, n) + 2 * _lin(h, g)     # decoder, mean and log-variance heads
    total += _mlp(p, h, z, m["n_layers_pert_emb"])       # perturbation embedding
    adversary = m["use_adversary"] or with_unused_adversary
    if adversary:
        total += _mlp(z, ah, p, an)                      # perturbation classifier
    for size in covs:
        if size > 1:                                     # single-valued covariates are skipped
            total += _mlp(size, h, z, m["n_layers_covar_emb"]) + (_mlp(z, ah, size, an) if adversary else 0)
    return total


def _expected_biolord(g, p, covs, m):
    w, z, n = m["encoder_width"], m["latent_dim"], m["n_layers"]
    return z * sum(covs) + _mlp(g, w, z, n) + _mlp(3 * z, w, g, n) + _mlp(p, w, z, n)


# Norman 2019 as GEARS ships it: 5,045 genes, 105 perturbed genes, one cell line
N_GENES, N_PERTS, COVS = 5045, 105, {"cell_type": 1}
PAPER = [("cpa", p) for p in ["paper", "paper_noadv", "paper_norman19", "paper_noadv_norman19",
                              "paper_srivatsan20", "paper_noadv_srivatsan20"]]
PAPER += [("cpa", p) for p in ["neurips2025_norman19", "neurips2025_noadv_norman19", "neurips2025_srivatsan20",
                               "neurips2025_noadv_srivatsan20", "neurips2025_jiang24", "neurips2025_noadv_jiang24"]]
PAPER += [("biolord", p) for p in ["paper", "paper_norman19", "paper_srivatsan20", "neurips2025_norman19",
                                   "neurips2025_srivatsan20"]]


def _net(kind, preset, covs=COVS, device="meta"):
    params = model_params({"type": kind, "preset": preset})
    with torch.device(device):  # shapes only: the wide nets are not allocated
        return MODELS[kind]().build_net(N_GENES, N_PERTS, covs, params), params["model"]


@pytest.mark.parametrize("kind,preset", PAPER)
@pytest.mark.parametrize("covs", [COVS, {"cell_type": 3}], ids=["1-cell-type", "3-cell-types"])
def test_parameter_counts_at_paper_presets(kind, preset, covs):
    net, m = _net(kind, preset, covs)
    n = pb.count_parameters(net)
    sizes = list(covs.values())
    expected = _expected_cpa(N_GENES, N_PERTS, sizes, m) if kind == "cpa" else _expected_biolord(N_GENES, N_PERTS, sizes, m)
    extra = ""
    if kind == "cpa":
        upstream = cpa_mod.upstream_parameter_count(net, N_PERTS, m)
        assert upstream == _expected_cpa(N_GENES, N_PERTS, sizes, m, with_unused_adversary=True)
        extra = f" (PerturBench object incl. unused classifiers: {upstream:,})" if upstream != n else ""
    print(f"{kind:8s} {preset:24s} {N_GENES} genes, {N_PERTS} perts, covariates {covs}: {n:,} parameters{extra}")
    assert n == expected


def test_paper_default_counts_by_hand():
    """`paper` presets for 5,045 genes / 105 perturbations / one cell line, counted by hand.

    CPA: encoder 5045->256 (+ affine LayerNorm, 512) + 3 x 256->256 (+512) + two 256->128 heads
    = 1,292,288 + 198,912 + 65,792 = 1,556,992; decoder 128->256 (+512) + 3 x 256->256 (+512) + two
    256->5045 heads = 33,536 + 198,912 + 2,593,130 = 2,825,578; perturbation MLP 105-256-256-128 =
    125,824; perturbation classifier 128-128-128-105 = 46,569 (no covariate parts: one cell line).
    Biolord: 32 x 1 covariate embedding; MLPs with 3 hidden layers of 3,072: 5045->32 = 34,480,160,
    96->5045 = 34,681,781, 105->32 = 19,304,480."""
    counts = {(k, p): pb.count_parameters(_net(k, p)[0]) for k, p in
              [("cpa", "paper"), ("cpa", "paper_noadv"), ("biolord", "paper")]}
    assert counts[("cpa", "paper")] == 1_556_992 + 2_825_578 + 125_824 + 46_569 == 4_554_963
    assert counts[("cpa", "paper_noadv")] == 4_554_963 - 46_569
    assert counts[("biolord", "paper")] == 32 + 34_480_160 + 34_681_781 + 19_304_480 == 88_466_453


# --------------------------------------------------------------------------- noAdv switch and schedule


def _small_cpa(preset, covs=None, **model):
    params = deep_merge(model_params({"type": "cpa", "preset": preset}), {"model": model})
    torch.manual_seed(0)
    return CPA().build_net(12, 4, covs or {"cell_type": 3}, params)


def _batch(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 12, generator=g) * 3
    pert = torch.zeros(n, 4)
    pert[torch.arange(n), torch.randint(0, 4, (n,), generator=g)] = 1.0
    cov = torch.nn.functional.one_hot(torch.randint(0, 3, (n,), generator=g), 3).float()
    return x, pert, cov


def _loss(net, batch_idx, training=True, seed=5):
    net.train(training)
    torch.manual_seed(seed)  # same z_basal sample and dropout mask for every call
    return {k: float(v.detach()) for k, v in net.loss(*_batch(), batch_idx, training=training).items()}


def test_noadv_switch_removes_adversary():
    adv, noadv = _small_cpa("tiny"), _small_cpa("tiny_noadv")
    assert hasattr(adv, "perturbation_adversary_classifier") and set(adv.covars_adversary_classifiers) == {"cell_type"}
    assert not hasattr(noadv, "perturbation_adversary_classifier") and not hasattr(noadv, "covars_adversary_classifiers")
    assert pb.count_parameters(noadv) < pb.count_parameters(adv)
    m = model_params({"type": "cpa", "preset": "tiny"})["model"]
    assert pb.count_parameters(adv) - pb.count_parameters(noadv) == _mlp(m["n_latent"], m["adv_classifier_hidden_dim"], 4, m["adv_classifier_n_layers"]) + _mlp(m["n_latent"], m["adv_classifier_hidden_dim"], 3, m["adv_classifier_n_layers"])
    for k in (0, 1):
        parts = _loss(noadv, k)
        assert parts["adv"] == 0 and parts["penalty"] == 0
        assert parts["loss"] == pytest.approx(parts["recon"] + m["kl_weight"] * parts["kl"], rel=1e-6)
        assert _loss(adv, k)["adv"] > 0


def test_adversary_penalty_schedule():
    """PerturBench adds penalty_weight x gradient penalty on training batches whose index in the
    epoch is not a multiple of adv_steps; never in validation."""
    net = _small_cpa("tiny", adv_steps=3, penalty_weight=10.0, adv_weight=2.0, kl_weight=0.5)
    on, off, val = _loss(net, 4), _loss(net, 3), _loss(net, 4, training=False)
    assert off["penalty"] == 0 and on["penalty"] > 0 and val["penalty"] == 0
    assert on["recon"] == off["recon"] and on["adv"] == off["adv"]
    assert off["loss"] == pytest.approx(off["recon"] + 0.5 * off["kl"] + 2.0 * off["adv"], rel=1e-6)
    assert on["loss"] == pytest.approx(off["loss"] + 10.0 * on["penalty"], rel=1e-6)
    # the perturbation classifier's cross-entropy treats a multi-hot vector as soft labels
    _, pert, _ = _batch()
    logits = torch.randn(16, 4)
    combo = pert.clone()
    combo[:, 0] = 1.0
    manual = -(combo * logits.log_softmax(1)).sum(1).mean()
    assert float(cpa_mod._soft_cross_entropy(logits, combo)) == pytest.approx(float(manual), rel=1e-6)


def test_single_valued_covariate_is_not_embedded():
    net = _small_cpa("tiny", covs={"cell_type": 1})
    assert len(net.covars_embeddings) == 0 and len(net.covars_adversary_classifiers) == 0
    assert net.loss(torch.rand(5, 12), torch.eye(4)[[0, 1, 2, 3, 0]], torch.ones(5, 1), 1, True)["loss"].isfinite()


# --------------------------------------------------------------------------- synthetic additive data



def _synthetic(seed=0, n_cells=40, n_genes=30):
    return additive_cells(seed, n_cells, n_genes, effect_sd=0.8)


@pytest.fixture(scope="module")
def synthetic():
    return train_val(_synthetic())


CONTEXT = ModelContext("synthetic", "control", pca=None, embeddings={}, seed=3)


def _fit_params(kind, preset, **over):
    base = {"trainer": {"max_epochs": 12}, "data": {"batch_size": 64}, "early_stopping": {"patience": 12},
            "model": {"lr": 3e-3}}
    # the synthetic cells' covariate is cell_type (two types), as a dataset's `covariates` would say
    return deep_merge(deep_merge(model_params({"type": kind, "preset": preset}, dataset_cfg=DEMO_COVARIATES), base), over)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, synthetic):
    train, val = synthetic
    out = {}
    for kind, preset in VARIANTS:
        ckpt = tmp_path_factory.mktemp(f"{kind}_{preset}")
        MODELS[kind]().fit(train, val, CONTEXT, _fit_params(kind, preset), ckpt)
        out[(kind, preset)] = ckpt
    return out


def _mean_errors(pred, cells):
    return {c: float(np.mean((pred[c].mean(0) - cells[cells.obs["condition"] == c].X.mean(0)) ** 2)) for c in pred}


@pytest.mark.parametrize("kind,preset", VARIANTS)
def test_fits_additive_structure_better_than_control_mean(kind, preset, fitted, synthetic):
    train, _ = synthetic
    control = train[train.obs["is_control"].to_numpy()]
    params = _fit_params(kind, preset)
    pred = MODELS[kind]().sample(fitted[(kind, preset)], TRAIN_CONDITIONS + VAL_CONDITIONS, control, 160, CONTEXT,
                                 params, {"seed": 0})
    model_err = np.mean(list(_mean_errors({c: pred[c] for c in TRAIN_CONDITIONS}, train).values()))
    control_mean = {c: control.X.mean(0, keepdims=True) for c in TRAIN_CONDITIONS}
    base_err = np.mean(list(_mean_errors(control_mean, train).values()))
    print(kind, preset, "train-condition pseudo-bulk MSE", model_err, "control mean", base_err)
    assert model_err < 0.25 * base_err
    for c in pred:
        assert pred[c].shape == (160, train.n_vars) and pred[c].dtype == np.float32
        assert np.isfinite(pred[c]).all() and (pred[c] >= 0).all()
    again = MODELS[kind]().sample(fitted[(kind, preset)], ["A"], control, 160, CONTEXT, params, {"seed": 0})
    np.testing.assert_array_equal(again["A"], pred["A"])  # seeded
    # counterfactual: each predicted cell keeps its control cell's cell type (baselines differ by type)
    by_type = {}
    for t in ("t1", "t2"):
        ctrl_t = control[control.obs["cell_type"] == t]
        by_type[t] = MODELS[kind]().sample(fitted[(kind, preset)], ["A"], ctrl_t, 80, CONTEXT, params, {"seed": 0})["A"].mean(0)
    observed = {t: train[(train.obs["condition"] == "A") & (train.obs["cell_type"] == t)].X.mean(0) for t in ("t1", "t2")}
    assert np.corrcoef(by_type["t2"] - by_type["t1"], observed["t2"] - observed["t1"])[0, 1] > 0.9


def test_best_validation_epoch_is_kept(fitted):
    for (kind, preset), ckpt in fitted.items():
        info = json.loads((ckpt / "fit.json").read_text())
        log = pd.read_csv(ckpt / "val_log.csv")
        assert info["model"] == kind and info["best_epoch"] == int(log["val_loss"].idxmin())
        assert list(pd.read_csv(ckpt / "train_log.csv")["step"]) == list(range(info["steps"]))
        # add_controls: false (tiny presets, neurips2024 configs) trains on controls too
        assert info["train_cells"] == 160 + 80 * len(TRAIN_CONDITIONS)


def test_add_controls_true_trains_on_perturbed_cells_only(synthetic, tmp_path):
    train, val = synthetic
    params = _fit_params("biolord", "tiny", data={"add_controls": True}, trainer={"max_epochs": 1})
    Biolord().fit(train, val, CONTEXT, params, tmp_path)
    assert json.loads((tmp_path / "fit.json").read_text())["train_cells"] == 80 * len(TRAIN_CONDITIONS)


# --------------------------------------------------------------------------- resume


@pytest.mark.parametrize("kind,preset", VARIANTS)
def test_preempted_run_resumes_bit_identically(kind, preset, synthetic, tmp_path, monkeypatch):
    train, val = synthetic
    # 960 cells / 64 = 15 steps per epoch; adv_steps 2 so the penalty alternates within epochs
    # the later release's CPA: no warm-up here, so the resumed epochs alternate generative and adversary steps
    over = {"model": {"n_warmup_epochs": 0}} if "neurips2025" in preset else {}
    params = _fit_params(kind, preset, trainer={"max_epochs": 2}, training={"checkpoint_every": 4}, **over)
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    MODELS[kind]().fit(train, val, CONTEXT, params, full)

    with monkeypatch.context() as patch:
        patch.setattr(trainer_mod, "StopFlag", lambda: SignalAfter(17))  # SIGTERM in the second epoch, off the cadence
        with pytest.raises(Preempted):
            MODELS[kind]().fit(train, val, CONTEXT, params, resumed)
    assert json.loads((resumed / pb.STATE_MARKER).read_text())["step"] == 18
    assert not (resumed / pb.MODEL_FILE).exists()
    MODELS[kind]().fit(train, val, CONTEXT, params, resumed)

    a, b = pb._PerturBenchModel.load(full), pb._PerturBenchModel.load(resumed)
    for key in a["weights"]:
        assert torch.equal(a["weights"][key], b["weights"][key]), key
    for name in ("train_log.csv", "val_log.csv"):
        pd.testing.assert_frame_equal(pd.read_csv(full / name), pd.read_csv(resumed / name))
    assert len(pd.read_csv(full / "train_log.csv")) == 30


# --------------------------------------------------------------------------- demo data


@pytest.mark.parametrize("kind,preset", VARIANTS)
def test_tiny_preset_on_demo_data(kind, preset, demo_processed, tmp_path):
    train = demo_processed[demo_processed.obs["split"] == "train"].copy()
    val = demo_processed[demo_processed.obs["split"] == "val"].copy()
    test = demo_processed[demo_processed.obs["split"] == "test"]
    control = demo_processed[demo_processed.obs["is_control"].to_numpy()].copy()
    params = deep_merge(model_params({"type": kind, "preset": preset}, dataset_cfg=DEMO_COVARIATES), {"trainer": {"max_epochs": 2}})  # speed only
    context = ModelContext("norman_demo", "control", pca=None, embeddings={}, seed=0)
    model = get_model(kind)  # through the registry
    model.fit(train, val, context, params, tmp_path)
    conditions = sorted(set(test.obs["condition"]) - {"control"})
    pred = get_model(kind).sample(tmp_path, conditions, control, 30, context, params, {"seed": 0})
    assert sorted(pred) == conditions
    for c in conditions:
        assert pred[c].shape == (30, demo_processed.n_vars) and pred[c].dtype == np.float32
        assert np.isfinite(pred[c]).all() and (pred[c] >= 0).all()
    info = json.loads((tmp_path / "fit.json").read_text())
    assert info["steps"] == 2 * info["steps_per_epoch"] and info["n_covariates"] == 1
    assert info["train_cells"] == train.n_obs  # controls included (add_controls: false)


@pytest.mark.parametrize("kind,preset", VARIANTS)
def test_sampling_seed_changes_the_cells(kind, preset, fitted, synthetic):
    """issue 20: the sampling seed picks the control cells and the model's noise; a sampler that ignored it
    (always 0) would give identical cells for every seed."""
    train, _ = synthetic
    control = train[train.obs["is_control"].to_numpy()]
    params = _fit_params(kind, preset)
    draw = lambda seed: MODELS[kind]().sample(fitted[(kind, preset)], ["A+B"], control, 50, CONTEXT, params,
                                              {"seed": seed})["A+B"]
    a, b, c = draw(7), draw(7), draw(8)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-4



# --------------------------------------------------------------------------- the later release's CPA (fc13a8c)


def _groups(net):
    adversary = [p for name, p in net.named_parameters() if "adversary" in name]
    generative = [p for name, p in net.named_parameters() if "adversary" not in name]
    return generative, adversary


def _grads(net, loss):
    net.zero_grad(set_to_none=True)
    loss.backward()
    generative, adversary = _groups(net)
    return [p.grad is not None for p in generative], [p.grad is not None for p in adversary]


def test_neurips2025_step_schedule_routes_gradients():
    """warm-up: recon + KL to the generative modules; then on batch_idx % adv_steps == 0 the generative modules step
    on recon + kl_weight KL - adv_weight adv (classifiers fixed); on other batches only the classifiers step."""
    net = _small_cpa("tiny_neurips2025", adv_steps=2, n_warmup_epochs=3, kl_weight=0.7, adv_weight=1.3, dropout=0.0)
    x, pert, cov = _batch()
    v = _loss(net, 1, training=False)  # recon, kl, adv of the same z_basal draw
    net.train()
    for epoch, idx in [(3, 0), (3, 1)]:  # still warm-up (current_epoch <= n_warmup_epochs)
        torch.manual_seed(5)
        loss = net.step_loss(x, pert, cov, idx, epoch)
        assert np.isclose(float(loss.detach()), v["recon"] + 0.7 * v["kl"], rtol=1e-5)
        gen, adv = _grads(net, loss)
        assert any(gen) and not any(adv)
    torch.manual_seed(5)
    loss = net.step_loss(x, pert, cov, 2, 4)  # adversarial phase, generative step
    assert np.isclose(float(loss.detach()), v["recon"] + 0.7 * v["kl"] - 1.3 * v["adv"], rtol=1e-5)
    gen, adv = _grads(net, loss)
    assert all(gen[:2]) and not any(adv)  # the encoder is trained against the (fixed) classifiers
    torch.manual_seed(5)
    loss = net.step_loss(x, pert, cov, 3, 4)  # adversary step: classifiers only
    gen, adv = _grads(net, loss)
    assert all(adv) and not any(gen)
    assert float(loss.detach()) > 1.3 * v["adv"] - 1e-5  # + penalty_weight * gradient penalty >= 0
    torch.manual_seed(5)
    assert np.isclose(float(net.loss(x, pert, cov, 3, training=False)["loss"].detach()), v["recon"] + 0.7 * v["kl"] - 1.3 * v["adv"],
                      rtol=1e-5)  # val_loss


def test_neurips2025_noadv_adversary_steps_update_nothing():
    net = _small_cpa("tiny_noadv_neurips2025", n_warmup_epochs=0, adv_steps=3)
    x, pert, cov = _batch()
    net.train()
    loss = net.step_loss(x, pert, cov, 1, 0)
    assert float(loss.detach()) == 0.0 and not any(_grads(net, loss)[0])


def test_one_adam_with_missing_gradients_equals_two_adams():
    """The trainer's single Adam over all parameters, where a step's loss leaves one group without gradient, makes
    the same updates as upstream's two Adam optimisers (one per group, same lr and weight decay)."""
    nets = [_small_cpa("tiny_neurips2025", adv_steps=2, n_warmup_epochs=0, dropout=0.0) for _ in range(2)]
    one = torch.optim.Adam(nets[0].parameters(), lr=1e-2, weight_decay=1e-3)
    gen, adv = _groups(nets[1])
    two = [torch.optim.Adam(gen, lr=1e-2, weight_decay=1e-3), torch.optim.Adam(adv, lr=1e-2, weight_decay=1e-3)]
    x, pert, cov = _batch()
    for idx in range(5):
        for k, net in enumerate(nets):
            net.train()
            net.zero_grad(set_to_none=True)
            torch.manual_seed(idx)
            net.step_loss(x, pert, cov, idx, 1).backward()
            (one if k == 0 else two[0 if idx % 2 == 0 else 1]).step()
    for (name, a), b in zip(nets[0].named_parameters(), nets[1].parameters()):
        torch.testing.assert_close(a, b, msg=name)

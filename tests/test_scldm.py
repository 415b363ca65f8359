"""scLDM (models/scldm.py, models/_scldm_nets.py): card values in the paper preset, parameter counts at
the paper preset (3,699 genes), the NB likelihood against torch.distributions, counts recovered from
log-normalised data, classifier-free guidance, the Euler integrator on a linear ODE, bit-identical
resume of both stages (periodic saves and SIGTERM), and both stages + sampling on the demo data."""

from __future__ import annotations

import json
import time
from itertools import pairwise
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
import yaml
from fakes import SignalAfter
from seeds import needs_seeds, seed_path
from perturb_repro.config import deep_merge, model_params
from perturb_repro.data.pca import fit_pca
from perturb_repro.models import _scldm_nets as nets
from perturb_repro.models import scldm as S
from perturb_repro.models.base import MODEL_EXTRA_SOURCES, MODEL_REGISTRY, ModelContext
from perturb_repro.training import Preempted
import perturb_repro.trainer as trainer_mod

REPO = Path(__file__).resolve().parents[1]
PRESETS = yaml.safe_load((REPO / "config" / "presets" / "scldm.yaml").read_text())
CARD = seed_path("scldm_cd4_card.txt")

torch.set_num_threads(1)


# --------------------------------------------------------------------------------------------------
# presets and sizes


def test_registered():
    assert MODEL_REGISTRY["scldm"] == "perturb_repro.models.scldm:ScLDMModel"
    assert MODEL_EXTRA_SOURCES["scldm"] == ["perturb_repro.models._scldm_nets", "perturb_repro.models._flow"]


def test_paper_preset_has_the_card_values():
    p = model_params({"type": "scldm", "preset": "paper"})
    assert p["n_genes"] == 3699
    assert p["autoencoder"]["training"]["epochs"] == 60 and p["flow"]["training"]["epochs"] == 150
    assert p["flow"]["training"]["batch_size"] == 360 and p["flow"]["training"]["weight_decay"] == 0.01
    assert p["autoencoder"]["training"]["optimizer"] == p["flow"]["training"]["optimizer"] == "adamw"
    assert p["flow"]["training"]["schedule"]["type"] == p["autoencoder"]["training"]["schedule"]["type"] == "cosine"
    ae_tr, fm_tr = p["autoencoder"]["training"], p["flow"]["training"]
    assert (ae_tr["nodes"], ae_tr["gpus_per_node"], fm_tr["nodes"], fm_tr["gpus_per_node"]) == (1, 8, 4, 8)
    assert S.global_batch_size(ae_tr) == ae_tr["global_batch_size"] == 8 * 8
    assert S.global_batch_size(fm_tr) == fm_tr["global_batch_size"] == 360 * 4 * 8
    assert ae_tr["precision"] == fm_tr["precision"] == "fp32"  # upstream marson_vae / marson_fm: precision 32
    # every value the card does not give is marked in the preset file
    lines = (REPO / "config" / "presets" / "scldm.yaml").read_text().splitlines()
    paper = lines[lines.index("paper:") + 1: lines.index("tiny:")]
    card_keys = ("epochs:", "batch_size: 360", "weight_decay: 0.01", "optimizer: adamw", "schedule:", "n_genes:",
                 "input_aggregation:", "covariates:", "nodes: 1", "nodes: 4", "gpus_per_node: 8",
                 "global_batch_size: 64", "global_batch_size: 11520")
    for line in paper:
        body = line.split("#")[0].strip()
        if body and not body.endswith(":") and not any(k in body for k in card_keys):
            assert "# not in paper" in line, line


def test_paper_parameter_counts():
    p = model_params({"type": "scldm", "preset": "paper"})
    with torch.device("meta"):
        ae = S.Autoencoder(p["n_genes"], p["autoencoder"]["network"])
        net = p["autoencoder"]["network"]
        # scLDM.CD4's condition classes (marson_hvg class_vocab_sizes): 10,571 guide targets, 4 donors, 3 time points
        dit = nets.DiT(net["n_inducing_points"], net["n_embed_latent"], 10571, [4, 3], p["flow"]["network"])
    n_ae, n_dit = nets.count_parameters(ae), nets.count_parameters(dit)
    n_cond = nets.count_parameters(dit.cond)
    print(f"\nscLDM paper preset, 3,699 genes: autoencoder {n_ae:,} parameters (card 15.2M); DiT {n_dit:,} "
          f"(card 44.3M) = {n_dit - n_cond:,} + condition embeddings {n_cond:,}")
    assert abs(n_ae / 15.2e6 - 1) < 0.15
    assert abs(n_dit / 44.3e6 - 1) < 0.15


# --------------------------------------------------------------------------------------------------
# likelihood and counts


def test_nb_loss_is_torch_negative_binomial():
    g = torch.Generator().manual_seed(0)
    mu = torch.rand(7, 40, generator=g, dtype=torch.float64) * 30 + 1e-3
    theta = torch.rand(40, generator=g, dtype=torch.float64) * 5 + 0.05
    x = torch.poisson(mu, generator=g)
    # torch: total_count r, success probability p, mean r p / (1 - p)  =>  r = theta, p = mu / (mu + theta)
    ref = torch.distributions.NegativeBinomial(total_count=theta.expand_as(mu), probs=mu / (mu + theta)).log_prob(x)
    ours = nets.nb_log_prob(x, mu, theta, eps=0.0)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)
    ref_logits = torch.distributions.NegativeBinomial(total_count=theta.expand_as(mu), logits=mu.log() - theta.log())
    torch.testing.assert_close(nets.nb_loss(x, mu, theta).double(), -ref_logits.log_prob(x).sum(1).mean(),
                               rtol=1e-5, atol=1e-5)  # default eps=1e-8 changes it a little


def test_autoencoder_mean_is_proportions_times_library():
    p = model_params({"type": "scldm", "preset": "tiny"})
    ae = S.build_autoencoder({"genes": [f"g{i}" for i in range(30)], "network": p["autoencoder"]["network"]}, 0)
    x = torch.poisson(torch.rand(5, 30) * 4)
    lib = torch.tensor([10.0, 100.0, 1000.0, 7.0, 55.0])
    mu, theta = ae(x, lib)
    torch.testing.assert_close(mu.sum(1), lib)
    assert theta.shape == (30,) and (theta > 0).all()
    z = ae.encode(x)
    assert z.shape == (5, p["autoencoder"]["network"]["n_inducing_points"], p["autoencoder"]["network"]["n_embed_latent"])


def test_counts_from_lognorm_are_recovered():
    import anndata as ad

    rng = np.random.default_rng(0)
    counts = rng.negative_binomial(2, 0.3, size=(50, 40)).astype(np.float64)
    counts[:10] = np.maximum(counts[:10], 2)  # smallest count 2 (gcd 1): the unit is not the smallest value
    counts[:10, 1] = 3
    hidden = rng.integers(100, 5000, size=50)  # counts of genes outside the panel
    total = counts.sum(1) + hidden
    x = np.log1p(counts / total[:, None] * 1e4).astype(np.float32)
    a = ad.AnnData(sp.csr_matrix(x))
    a.obs["ncounts"] = total
    for cp in ({"source": "from_lognorm", "total_counts_column": "ncounts"},
               {"source": "from_lognorm", "total_counts_column": None}, {"source": "auto"}):
        got = S.counts_matrix(a, {**cp, "target_sum": 1e4})
        np.testing.assert_array_equal(got.toarray(), counts)
        # the unit relating X to counts is the data's: target_sum / whole-cell total (not the panel's)
        np.testing.assert_allclose(S.normalisation_units(a, got), 1e4 / total, rtol=1e-5)
    a.layers["counts"] = sp.csr_matrix(counts * 2)
    np.testing.assert_array_equal(S.counts_matrix(a, {"source": "auto"}).toarray(), counts * 2)
    with pytest.raises(ValueError, match="from_lognorm"):
        S.counts_matrix(ad.AnnData(sp.csr_matrix(x)), {"source": "layer"})


# --------------------------------------------------------------------------------------------------
# guidance and integrator


def _random_dit(seed=0) -> nets.DiT:
    p = model_params({"type": "scldm", "preset": "tiny"})
    dit = S.build_dit({"n_tokens": 4, "latent_dim": 6, "vocab": ["A", "B", "C", "D"], "covariate_values": [["x", "y"]],
                       "network": p["flow"]["network"]}, seed)
    with torch.no_grad():  # adaLN-zero init would make the output independent of everything
        g = torch.Generator().manual_seed(seed)
        for q in dit.parameters():
            q.add_(0.1 * torch.randn(q.shape, generator=g))
    return dit.eval()


def test_cfg_weight_one_is_the_conditional_model():
    dit = _random_dit()
    z, t = torch.randn(5, 4, 6), torch.rand(5)
    tok = torch.tensor([[0, 1], [2, -1], [3, -1], [-1, -1], [1, 2]])
    cov = torch.tensor([[0], [1], [-1], [0], [1]])
    with torch.no_grad():
        cond = dit(z, t, tok, cov)
        uncond = dit(z, t, tok, cov, drop=torch.ones(5, dtype=torch.bool))
        assert torch.equal(nets.guided_velocity(dit, z, t, tok, cov, 1.0), cond)
        guided = nets.guided_velocity(dit, z, t, tok, cov, 2.5)
        torch.testing.assert_close(guided, uncond + 2.5 * (cond - uncond), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(guided, cond, atol=1e-4)
        # the null condition ignores perturbation and covariates
        assert torch.equal(dit(z, t, torch.zeros_like(tok), torch.ones_like(cov), drop=torch.ones(5, dtype=torch.bool)),
                           uncond)
        # an unseen gene / covariate value (id -1) contributes nothing
        torch.testing.assert_close(dit(z, t, torch.tensor([[0, -1]] * 5), cov), dit(z, t, torch.tensor([[0]] * 5), cov))
        a = nets.euler_integrate(lambda y, s: nets.guided_velocity(dit, y, s, tok, cov, 1.0), z, 4)
        b = nets.euler_integrate(lambda y, s: dit(y, s, tok, cov), z, 4)
        assert torch.equal(a, b)


def test_euler_on_linear_ode_matches_closed_form():
    x0 = torch.tensor([[1.0, -2.0, 0.5]], dtype=torch.float64)
    for a in (-1.5, 0.7, 2.0):
        errors = {}
        for k in (10, 20, 40, 80, 160):
            xk = nets.euler_integrate(lambda x, t, a=a: a * x, x0, k)
            torch.testing.assert_close(xk, x0 * (1 + a / k) ** k, rtol=1e-12, atol=1e-12)  # Euler = (1 + a/k)^k
            errors[k] = (xk - x0 * np.exp(a)).abs().max().item()
        # first order: error ~ |x0| e^a a^2 / (2k)
        for k, err in errors.items():
            expected = x0.abs().max().item() * np.exp(a) * a * a / (2 * k)
            assert 0.7 < err / expected < 1.3, (a, k, err, expected)
        assert all(1.8 < errors[k] / errors[2 * k] < 2.2 for k in (10, 20, 40, 80))


def test_lr_schedule_warmup_and_cosine():
    s = {"type": "cosine", "warmup_fraction": 0.1, "init_div_factor": 100, "final_lr_factor": 0.1, "fract_decay": 1.0}
    f = [S.lr_factor(i, 100, s) for i in range(101)]
    assert f[0] == pytest.approx(0.01) and f[10] == pytest.approx(1.0) and f[100] == pytest.approx(0.1)
    assert all(a <= b + 1e-12 for a, b in pairwise(f[:11])) and all(a >= b - 1e-12 for a, b in pairwise(f[10:]))


def test_trainer_schedule_gives_the_old_loops_lr_per_update():
    """The shared trainer's per-update LambdaLR (stepped after every update, saved and restored with the
    optimiser) sets exactly the LR the pre-trainer loop set before update s: learning_rate x lr_factor(s)."""
    training = {"learning_rate": 3e-3, "betas": [0.9, 0.95],
                "schedule": {"type": "cosine", "warmup_fraction": 0.1, "init_div_factor": 10, "final_lr_factor": 0.1}}
    total = 30

    def make():
        w = torch.nn.Linear(2, 1)
        opt = S._optimizer(w, training)
        return w, opt, S._schedule(opt, training, total)

    w, opt, sched = make()
    seen = []
    for s in range(total):
        if s == 12:  # resume: fresh objects, state restored in the trainer's order (optimiser, then schedule)
            state = (opt.state_dict(), sched.state_dict())
            w, opt, sched = make()
            opt.load_state_dict(state[0])
            sched.load_state_dict(state[1])
        seen.append(opt.param_groups[0]["lr"])
        w(torch.ones(1, 2)).sum().backward()
        opt.step()
        opt.zero_grad()
        sched.step()
    assert seen == [3e-3 * S.lr_factor(s, total, training["schedule"]) for s in range(total)]


# --------------------------------------------------------------------------------------------------
# the demo data


@pytest.fixture(scope="module")
def context(demo_processed):
    return ModelContext("norman_demo", "control", fit_pca(demo_processed, 10, seed=0), {}, seed=0)


@pytest.fixture(scope="module")
def train(demo_processed):
    return demo_processed[demo_processed.obs["split"] == "train"].copy()


def _params(ae_steps, fm_steps, every=2, batch=16, **extra):
    over = {"autoencoder": {"training": {"num_steps": ae_steps, "checkpoint_every": every, "batch_size": batch}},
            "flow": {"training": {"num_steps": fm_steps, "checkpoint_every": every, "batch_size": batch,
                                  "ema_decay": 0.9, "ema_update_every": 1, "ema_update_after_step": 1}},
            **extra}
    return deep_merge(model_params({"type": "scldm", "preset": "tiny"}), over)


def _weights(path):
    return torch.load(path, weights_only=True)["model"]


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def small_train(train):
    return train[np.random.default_rng(0).choice(train.n_obs, 200, replace=False)].copy()


def test_resume_both_stages_bit_identical(tmp_path, small_train, context, monkeypatch):
    full, part = tmp_path / "full", tmp_path / "part"
    model = S.ScLDMModel()
    model.fit_autoencoder(small_train, None, context, _params(4, 4), full / "ae")
    model.fit(small_train, None, context, _params(4, 4, _autoencoder_dir=str(full / "ae")), full / "fm")
    # stage 1: SIGTERM after the 2nd update -> state saved at step 2, Preempted; the rerun resumes there
    with monkeypatch.context() as m:
        m.setattr(trainer_mod, "StopFlag", lambda: SignalAfter(1))
        with pytest.raises(Preempted):
            model.fit_autoencoder(small_train, None, context, _params(4, 4), part / "ae")
    assert json.loads((part / "ae" / S.STATE_FILE).read_text())["step"] == 2
    assert not (part / "ae" / S.AE_WEIGHTS).exists()
    model.fit_autoencoder(small_train, None, context, _params(4, 4), part / "ae")
    assert _same(_weights(full / "ae" / S.AE_WEIGHTS), _weights(part / "ae" / S.AE_WEIGHTS))
    la, lb = pd.read_csv(full / "ae" / S.LOG_FILE), pd.read_csv(part / "ae" / S.LOG_FILE)
    assert list(lb["step"]) == [0, 1, 2, 3] and np.array_equal(la["loss"], lb["loss"])
    # stage 2: SIGTERM after the 2nd update -> state saved at step 2, Preempted; rerun resumes
    params = _params(4, 4, _autoencoder_dir=str(part / "ae"))
    with monkeypatch.context() as m:
        m.setattr(trainer_mod, "StopFlag", lambda: SignalAfter(1))
        with pytest.raises(Preempted):
            model.fit(small_train, None, context, params, part / "fm")
    assert json.loads((part / "fm" / S.STATE_FILE).read_text())["step"] == 2
    assert not (part / "fm" / S.DIT_WEIGHTS).exists()
    model.fit(small_train, None, context, params, part / "fm")
    assert _same(_weights(full / "fm" / S.DIT_WEIGHTS), _weights(part / "fm" / S.DIT_WEIGHTS))  # EMA weights
    fa = torch.load(full / "fm" / S.FM_TRAIN_STATE, weights_only=True)
    fb = torch.load(part / "fm" / S.FM_TRAIN_STATE, weights_only=True)
    assert _same(fa["model"], fb["model"])
    # a rerun of a finished stage is a no-op; a longer run continues from the saved state
    before = (part / "fm" / S.DIT_WEIGHTS).stat().st_mtime_ns
    model.fit(small_train, None, context, params, part / "fm")
    assert (part / "fm" / S.DIT_WEIGHTS).stat().st_mtime_ns == before
    model.fit(small_train, None, context, _params(4, 6, _autoencoder_dir=str(part / "ae")), part / "fm")
    assert list(pd.read_csv(part / "fm" / S.LOG_FILE)["step"]) == list(range(6))


def test_tiny_two_stages_and_sample(tmp_path, train, demo_processed, context):
    """Both stages with the tiny preset as two calls (two Snakemake jobs), then sampling from the flow
    checkpoint alone (the autoencoder directory is deleted first)."""
    params = _params(60, 100, every=1000, batch=64)
    val = demo_processed[demo_processed.obs["split"] == "val"].copy()
    model = S.ScLDMModel()
    t0 = time.process_time()
    model.fit_autoencoder(train, val, context, params, tmp_path / "ae")
    t1 = time.process_time()
    model.fit(train, val, context, {**params, "_autoencoder_dir": str(tmp_path / "ae")}, tmp_path / "fm")
    t2 = time.process_time()
    ae_log, fm_log = pd.read_csv(tmp_path / "ae" / S.LOG_FILE), pd.read_csv(tmp_path / "fm" / S.LOG_FILE)
    n_ae, n_fm = params["autoencoder"]["training"]["num_steps"], params["flow"]["training"]["num_steps"]
    print(f"\ntiny (fewer updates) on {train.n_obs} x {train.n_vars}: autoencoder {n_ae} updates {t1 - t0:.1f} s CPU "
          f"({n_ae / (t1 - t0):.1f}/s), NB loss {ae_log['loss'].iloc[:10].mean():.1f} -> {ae_log['loss'].iloc[-10:].mean():.1f}; "
          f"flow {n_fm} updates {t2 - t1:.1f} s CPU ({n_fm / (t2 - t1):.1f}/s), "
          f"loss {fm_log['loss'].iloc[:10].mean():.3f} -> {fm_log['loss'].iloc[-10:].mean():.3f}")
    assert ae_log["loss"].iloc[-10:].mean() < 0.5 * ae_log["loss"].iloc[:10].mean()
    assert json.loads((tmp_path / "ae" / "summary.json").read_text())["val_nb_loss"] > 0
    assert fm_log["loss"].iloc[-10:].mean() < fm_log["loss"].iloc[:10].mean()
    assert (tmp_path / "fm" / S.AE_WEIGHTS).read_bytes() == (tmp_path / "ae" / S.AE_WEIGHTS).read_bytes()
    import shutil

    shutil.rmtree(tmp_path / "ae")
    control = demo_processed[demo_processed.obs["is_control"].to_numpy()].copy()
    conditions = ["KLF1+MAP2K6", "HK2", "control"]
    out = {}
    for w in (1.0, 2.0):
        t3 = time.process_time()
        out[w] = model.sample(tmp_path / "fm", conditions, control, 50, context, params,
                              {"steps": 20, "cfg_weight": w, "seed": 0})
        if w == 1.0:
            dt = time.process_time() - t3
            print(f"sampling: {dt / (3 * 50 / 1000) * (100 / 20):.1f} s CPU per 1,000 cells x 100 Euler steps (w = 1)")
        assert list(out[w]) == conditions
        for x in out[w].values():
            assert x.shape == (50, demo_processed.n_vars) and x.dtype == np.float32
            assert np.isfinite(x).all() and (x >= 0).all()
    # normalise: data puts generated cells on the data's scale (X normalised by whole-cell totals)
    real = np.asarray(control.X.mean(0)).ravel()
    gen = out[1.0]["control"].mean(0)
    assert 0.5 < gen.sum() / real.sum() < 2.0, (gen.sum(), real.sum())
    panel = model.sample(tmp_path / "fm", ["HK2"], control, 10, context, {**params, "normalise": "panel"},
                         {"steps": 5, "seed": 0})["HK2"]
    np.testing.assert_allclose(np.expm1(panel.astype(np.float64)).sum(1), 1e4, rtol=1e-3)  # normalize_total
    assert not np.allclose(out[1.0]["HK2"], out[2.0]["HK2"])
    again = model.sample(tmp_path / "fm", ["HK2"], control, 50, context, params, {"steps": 20, "cfg_weight": 1.0, "seed": 0})
    np.testing.assert_allclose(again["HK2"], out[1.0]["HK2"], atol=1e-5)  # per-condition seeds
    nb = model.sample(tmp_path / "fm", ["HK2"], control, 20, context, {**params, "decode": "sample"},
                      {"steps": 5, "seed": 0})["HK2"]
    assert nb.shape == (20, demo_processed.n_vars) and np.isfinite(nb).all() and (nb >= 0).all()


def test_pipeline_steps_two_stages(tmp_path, demo_processed, context):
    """train_step(stage=fit_autoencoder) then train_step(stage=fit, stage_inputs) then predict_step, as the
    Snakemake rules call them."""
    import anndata as ad
    from perturb_repro import steps
    from perturb_repro.data.truth import build_test_truth

    processed, pca, truth = tmp_path / "processed.h5ad", tmp_path / "pca.npz", tmp_path / "truth.h5ad"
    demo_processed.write_h5ad(processed)
    context.pca.save(pca)
    build_test_truth(demo_processed).write_h5ad(truth)
    cfg = {"type": "scldm", "preset": "tiny",
           "overrides": {"autoencoder": {"training": {"num_steps": 2}}, "flow": {"training": {"num_steps": 2}}}}
    params = model_params(cfg)
    steps.train_step("norman_demo", str(processed), str(pca), "", cfg, params, str(tmp_path / "ae"), 0,
                     stage="fit_autoencoder")
    steps.train_step("norman_demo", str(processed), str(pca), "", cfg, params, str(tmp_path / "ckpt"), 0,
                     stage="fit", stage_inputs={"_autoencoder_dir": str(tmp_path / "ae")})
    steps.predict_step("norman_demo", "scldm", str(truth), str(processed), str(pca), "", cfg, params,
                       {"steps": 3, "n_cells_per_condition": 5, "seed": 0, "cfg_weight": 2.0},
                       str(tmp_path / "ckpt"), str(tmp_path / "pred.h5ad"))
    pred = ad.read_h5ad(tmp_path / "pred.h5ad")
    n_test = len(set(pred.obs["condition"]) - {"control"})
    assert pred.n_vars == demo_processed.n_vars and (pred.obs["condition"] != "control").sum() == 5 * n_test


def test_fit_alone_trains_the_autoencoder_in_the_checkpoint(tmp_path, small_train, demo_processed, context):
    """Without ``_autoencoder_dir`` (one rule for both stages) fit trains stage 1 in checkpoint/autoencoder."""
    params = _params(2, 2)
    S.ScLDMModel().fit(small_train, None, context, params, tmp_path)
    assert (tmp_path / S.AE_SUBDIR / S.AE_WEIGHTS).exists() and (tmp_path / S.DIT_WEIGHTS).exists()
    control = demo_processed[demo_processed.obs["is_control"].to_numpy()].copy()
    out = S.ScLDMModel().sample(tmp_path, ["KLF1"], control, 4, context, params, {"steps": 2, "seed": 1})
    assert out["KLF1"].shape == (4, demo_processed.n_vars) and np.isfinite(out["KLF1"]).all()


@needs_seeds
def test_paper_preset_values_are_the_cards():
    """The values test_paper_preset checks are the card's own words."""
    card = CARD.read_text()
    for text in ("3,699", "60 epochs", "150 epochs", "batch size 360", "weight decay 0.01", "AdamW", "cosine decay",
                 "15.2M", "44.3M", "1 node x 8 NVIDIA H100", "4 nodes x 8 NVIDIA H100"):
        assert text in card, text

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
    assert MODEL_EXTRA_SOURCES["scldm"] == ["perturb_repro.models._scldm_nets", "perturb_repro.models._scldm_counts",
                                         "perturb_repro.models._flow"]


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


def _linear(i, o, bias=True):
    return i * o + (o if bias else 0)


def _swiglu(e, mult):  # w1, w2: e -> h, proj: h -> e, no biases; h = 2/3 * 4e rounded up to mult
    h = mult * -(-int(8 * e / 3) // mult)
    return 3 * e * h


def _attention(e, bias, kv_split=False):  # self: qkv + proj; cross: kv + q + proj
    return _linear(e, 2 * e, bias) + 2 * _linear(e, e, bias) if kv_split else _linear(e, 3 * e, bias) + _linear(e, e, bias)


def _expected_autoencoder(g, net):
    """Parameters of the autoencoder by the architecture (module doc of _scldm_nets), counted by hand."""
    e, m, d, n, mult, b = (net["n_embed"], net["n_inducing_points"], net["n_embed_latent"], net["n_layer"],
                           net["multiple_of"], net["bias"])
    block = 2 * 2 * e + _attention(e, b) + _swiglu(e, mult)                    # 2 affine LayerNorms
    cross = 3 * 2 * e + _attention(e, b, kv_split=True) + _swiglu(e, mult)     # ln_x, ln_q, ln_2
    softbin = _linear(1, net["softbin_hidden"]) + _linear(net["softbin_hidden"], net["softbin_bins"]) + net["softbin_bins"] * e
    return (g * e + softbin + (m * e + cross) + n * block + _linear(e, d, b) + _linear(d, e, b) + n * block + cross
            + _linear(e, 1) + g)  # gene embedding ... NB head + per-gene log theta


def _expected_dit(m, d, n_perts, cov_sizes, net):
    e, n, mult, b, f = net["n_embed"], net["n_layer"], net["multiple_of"], net["bias"], net["frequency_embedding_size"]
    block = _attention(e, b) + _swiglu(e, mult) + _linear(e, 6 * e)  # non-affine LayerNorms; adaLN Linear has a bias
    cond = n_perts * e + sum(cov_sizes) * e + e                       # perturbation, covariates, null vector
    return (_linear(f, e) + _linear(e, e) + cond + _linear(d, e, b) + n * block + _linear(e, 2 * e, b)
            + _linear(e, d, b))


def test_paper_parameter_counts():
    """Exact counts against the architecture formula (a DiT with one block fewer, 39.4M, must fail), and
    within 1 % of the card's 15.2M / 44.3M."""
    p = model_params({"type": "scldm", "preset": "paper"})
    net = p["autoencoder"]["network"]
    with torch.device("meta"):
        ae = S.Autoencoder(p["n_genes"], net)
        # scLDM.CD4's condition classes (marson_hvg class_vocab_sizes): 10,571 guide targets, 4 donors, 3 time points
        dit = nets.DiT(net["n_inducing_points"], net["n_embed_latent"], 10571, [4, 3], p["flow"]["network"])
    n_ae, n_dit = nets.count_parameters(ae), nets.count_parameters(dit)
    n_cond = nets.count_parameters(dit.cond)
    print(f"\nscLDM paper preset, 3,699 genes: autoencoder {n_ae:,} parameters (card 15.2M); DiT {n_dit:,} "
          f"(card 44.3M) = {n_dit - n_cond:,} + condition embeddings {n_cond:,}")
    assert n_ae == _expected_autoencoder(3699, net)
    assert n_dit == _expected_dit(net["n_inducing_points"], net["n_embed_latent"], 10571, [4, 3], p["flow"]["network"])
    assert abs(n_ae / 15.2e6 - 1) < 0.01
    assert abs(n_dit / 44.3e6 - 1) < 0.01


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


def test_nb_decoding_draws_integer_counts_with_the_nb_moments():
    from perturb_repro.models._scldm_counts import decode_counts

    rng = np.random.default_rng(0)
    mu = np.array([[0.5, 3.0, 40.0]]).repeat(200_000, axis=0)
    theta = np.array([[0.7, 2.0, 10.0]])
    x = decode_counts(mu, theta, "sample", rng)
    assert np.array_equal(x, np.round(x)) and (x >= 0).all()
    # NB(mean mu, inverse dispersion theta): variance mu + mu^2 / theta
    np.testing.assert_allclose(x.mean(0), mu[0], rtol=0.02)
    np.testing.assert_allclose(x.var(0), mu[0] + mu[0] ** 2 / theta[0], rtol=0.05)
    assert decode_counts(mu, theta, "mean", rng) is mu


def test_library_sizes_are_drawn_per_context(tmp_path):
    """library: context draws log L ~ Normal(mean, sd of the context's log train libraries) (upstream's
    compute_log_size_factors: np.mean / np.std of log totals); unit x L keeps a train cell's unit x library."""
    import anndata as ad
    from perturb_repro.models import _scldm_counts as C

    rng = np.random.default_rng(1)
    n = 400
    donor = np.where(np.arange(n) % 2, "d1", "d2")
    time = np.where(np.arange(n) % 4 < 2, "t0", "t8")
    scale = np.where(donor == "d1", 5.0, 60.0) * np.where(time == "t0", 1.0, 3.0)
    counts = rng.poisson(scale[:, None] * rng.gamma(2.0, 0.5, size=(n, 30)) * rng.uniform(0.3, 3, (n, 1)))
    counts[:, 0] += 1
    total = counts.sum(1) + rng.integers(100, 1000, n)
    a = ad.AnnData(sp.csr_matrix(np.log1p(counts / total[:, None] * 1e4).astype(np.float32)))
    a.obs["experimental_perturbation_time_point"], a.obs["donor_id"] = time, donor
    columns = ["experimental_perturbation_time_point", "donor_id"]
    a.layers["counts"] = sp.csr_matrix(counts.astype(np.float32))
    c = S.counts_matrix(a, {"source": "layer"})
    tmp = tmp_path
    C.write_decode_library(tmp / C.DECODE_LIBRARY_FILE, a, c, columns)
    lib = counts.sum(1).astype(np.float64)
    keys = np.array([f"{t}_{d}" for t, d in zip(time, donor)], dtype=object)
    for key in ("t0_d1", "t8_d2", "t8_d1"):
        ref = np.log(lib[keys == key])
        draw_l, draw_u = C.draw_library(tmp, "context", np.array([key] * 20_000, dtype=object), rng)
        got = np.log(draw_l[:, 0])
        assert abs(got.mean() - ref.mean()) < 0.02 and abs(got.std() / ref.std() - 1) < 0.03, key
        products = np.unique(1e4 * lib[keys == key] / total[keys == key])  # target_sum x panel fraction
        nearest = np.abs(draw_l * draw_u / products[None, :] - 1).min(axis=1)
        assert nearest.max() < 1e-5  # (X is float32)
    pooled = np.log(C.draw_library(tmp, "context", np.array(["t1_d9"] * 20_000, dtype=object), rng)[0][:, 0])
    assert abs(pooled.mean() - np.log(lib).mean()) < 0.03  # an unseen context: all train cells
    assert C.library_columns({"covariates": ["donor_id"]}) == ["donor_id"]
    assert C.library_columns({"covariates": ["donor_id"], "library_context": []}) == []


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


def _upstream_lr_factor(step, total, final=0.1, init_div=100):
    """scLDM.CD4's wsd_schedule with fract_decay 1 and num_warmup_steps = int(0.1 * total)
    (src/scg_vae/_utils.py, _train_utils.setup_datamodule_and_steps), written out here."""
    warm = int(0.1 * total)
    if step < warm:
        return step / warm + (1 - step / warm) / init_div
    if step < total:
        return final + (1 - final) * 0.5 * (1 + np.cos(np.pi * (step - warm) / (total - warm)))
    return final


def test_paper_lr_warms_up_over_ten_percent_in_both_stages():
    p = model_params({"type": "scldm", "preset": "paper"})
    for stage in (p["autoencoder"]["training"], p["flow"]["training"]):
        for total in (107, 1000):  # 107: int(10.7) = 10 warm-up updates, as upstream (round would give 11)
            w = torch.nn.Linear(2, 1)
            opt = S._optimizer(w, stage)
            sched = S._schedule(opt, stage, total)
            seen = []
            for _ in range(total):
                seen.append(opt.param_groups[0]["lr"])
                opt.step()
                sched.step()
            expected = [stage["learning_rate"] * _upstream_lr_factor(s, total) for s in range(total)]
            np.testing.assert_allclose(seen, expected, rtol=1e-12)
            assert seen[0] == pytest.approx(stage["learning_rate"] / 100)
            assert seen[int(0.1 * total)] == pytest.approx(stage["learning_rate"])


def test_paper_preset_decodes_and_samples_as_upstream():
    """Upstream generation: NB counts, per-(time point, donor) log size factors, raw DiT weights, 50 timesteps;
    the preset's sampling block sits between the global sampling and a model entry's own."""
    from perturb_repro.config import sampling_settings, training_params

    p = model_params({"type": "scldm", "preset": "paper"})
    assert (p["decode"], p["library"], p["sample_weights"]) == ("sample", "context", "raw")
    assert p["library_context"] == ["experimental_perturbation_time_point", "donor_id"]
    assert p["sampling"]["steps"] == 50 and p["sampling"]["solver"] == "euler"
    glob = {"steps": 100, "n_cells_per_condition": 10, "seed": 0}
    assert sampling_settings(glob, {"type": "scldm"}, p)["steps"] == 50
    assert sampling_settings(glob, {"type": "scldm", "sampling": {"steps": 7, "solver": "dopri5"}}, p)["steps"] == 7
    assert sampling_settings(glob, {"type": "cellflow"}, model_params({"type": "cellflow", "preset": "paper"}))["steps"] == 100
    assert "sampling" not in training_params(p)


def test_dopri5_matches_analytic_solutions_and_differs_from_euler():
    from perturb_repro.models._flow import integrate

    x0 = torch.tensor([[1.0, -2.0, 0.5], [0.3, 0.0, 4.0]], dtype=torch.float64)
    # dx/dt = cos(t) x  =>  x(1) = x0 exp(sin 1); dx/dt = a x => x0 e^a
    cases = [(lambda x, t: torch.cos(t)[:, None] * x, x0 * np.exp(np.sin(1.0))),
             (lambda x, t: -1.5 * x, x0 * np.exp(-1.5))]
    for f, exact in cases:
        tight = integrate(f, x0, {"solver": "dopri5", "steps": 50, "rtol": 1e-10, "atol": 1e-12})
        torch.testing.assert_close(tight, exact, rtol=1e-8, atol=1e-9)
        loose = integrate(f, x0, {"solver": "dopri5", "steps": 50})  # upstream's rtol 1e-3, atol 1e-6
        assert (loose - exact).abs().max() < 1e-3
        euler = integrate(f, x0, {"solver": "euler", "steps": 4})
        assert (euler - exact).abs().max() > 20 * (loose - exact).abs().max()
        assert torch.equal(euler, nets.euler_integrate(f, x0, 4))
    with pytest.raises(ValueError, match="solver"):
        integrate(cases[0][0], x0, {"solver": "tsit5"})


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
    saved_full = torch.load(full / "fm" / S.DIT_WEIGHTS, weights_only=True)
    saved_part = torch.load(part / "fm" / S.DIT_WEIGHTS, weights_only=True)
    assert _same(saved_full["model"], saved_part["model"]) and _same(saved_full["ema"], saved_part["ema"])
    fa = torch.load(full / "fm" / S.FM_TRAIN_STATE, weights_only=True)
    fb = torch.load(part / "fm" / S.FM_TRAIN_STATE, weights_only=True)
    assert _same(fa["model"], fb["model"])
    # the sampling weights are the raw ones (upstream samples with diffusion_model, not ema_model); EMA beside
    assert _same(saved_full["model"], fa["model"]) and not _same(saved_full["ema"], saved_full["model"])
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


@pytest.fixture(scope="module")
def ema_checkpoint(tmp_path_factory, small_train, context):
    """Two stages of 3 updates each with an EMA that differs from the raw weights."""
    path = tmp_path_factory.mktemp("scldm_ema")
    S.ScLDMModel().fit(small_train, None, context, _params(3, 3), path)
    return path


def _sample(path, demo_processed, context, params, sampling, n=6, conditions=("KLF1",)):
    control = demo_processed[demo_processed.obs["is_control"].to_numpy()].copy()
    return S.ScLDMModel().sample(path, list(conditions), control, n, context, params, sampling)


def test_sample_weights_raw_or_ema(ema_checkpoint, demo_processed, context):
    saved = torch.load(ema_checkpoint / S.DIT_WEIGHTS, weights_only=True)
    raw, _ = S.load_dit(ema_checkpoint, weights="raw")
    ema, _ = S.load_dit(ema_checkpoint, weights="ema")
    assert _same(raw.state_dict(), saved["model"]) and _same(ema.state_dict(), saved["ema"])
    sampling = {"steps": 3, "seed": 0}
    a = _sample(ema_checkpoint, demo_processed, context, _params(3, 3, sample_weights="raw"), sampling)["KLF1"]
    b = _sample(ema_checkpoint, demo_processed, context, _params(3, 3, sample_weights="ema"), sampling)["KLF1"]
    assert not np.allclose(a, b)
    with pytest.raises(ValueError, match="sample_weights"):
        S.load_dit(ema_checkpoint, weights="shadow")


def test_a_different_sampling_seed_gives_different_cells(ema_checkpoint, demo_processed, context):
    for extra in ({}, {"decode": "sample", "library": "context"}):
        params = _params(3, 3, **extra)
        one = _sample(ema_checkpoint, demo_processed, context, params, {"steps": 3, "seed": 1})["KLF1"]
        again = _sample(ema_checkpoint, demo_processed, context, params, {"steps": 3, "seed": 1})["KLF1"]
        other = _sample(ema_checkpoint, demo_processed, context, params, {"steps": 3, "seed": 2})["KLF1"]
        np.testing.assert_array_equal(one, again)
        assert not np.allclose(one, other)


def test_paper_decoding_and_dopri5_run_end_to_end(ema_checkpoint, demo_processed, context):
    """decode: sample + library: context on the demo (context = the covariate column) gives count-derived cells:
    X = log1p(counts x unit) with integer counts, so each cell's non-zero expm1(X) are integer multiples of
    its smallest; dopri5 differs from Euler at 2 steps."""
    params = _params(3, 3, decode="sample", library="context")
    assert (ema_checkpoint / S.DECODE_LIBRARY_FILE).exists()
    x = _sample(ema_checkpoint, demo_processed, context, params, {"steps": 2, "seed": 0}, n=20)["KLF1"]
    assert np.isfinite(x).all() and (x >= 0).all()
    for row in np.expm1(x.astype(np.float64)):
        v = row[row > 0]
        if v.size:
            ratio = v / v.min()
            assert np.allclose(ratio, np.round(ratio), atol=1e-3 * ratio.max())  # a common unit: counts
    euler = _sample(ema_checkpoint, demo_processed, context, _params(3, 3), {"steps": 2, "seed": 0})["KLF1"]
    dopri = _sample(ema_checkpoint, demo_processed, context, _params(3, 3), {"steps": 2, "seed": 0,
                                                                              "solver": "dopri5"})["KLF1"]
    assert np.isfinite(dopri).all() and not np.allclose(euler, dopri)

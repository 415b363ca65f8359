"""PerturBench's SAMS-VAE / SAMS-VAE (S): sizes at the paper presets, the KL terms against
torch.distributions, what the (S) switch changes, bit-identical resume, a synthetic sparse
mechanism, and demo predictions."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
import torch.distributions as D
from fakes import GENES, TRAIN_CONDITIONS, VAL_CONDITIONS, SignalAfter, perturbation_adata, train_val
from perturb_repro.config import deep_merge, model_params
from perturb_repro.models import sams_vae as sv
from perturb_repro.models.base import MODEL_REGISTRY, ModelContext, get_model
import perturb_repro.trainer as trainer_mod
from perturb_repro.training import Preempted

DEMO_COVARIATES = {"covariates": ["cell_type"]}  # config/demo.yaml norman_demo covariates, which the models take


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    torch.set_num_threads(1)


# --------------------------------------------------------------------------- sizes

# Norman 2019 as GEARS ships it: 5,045 genes, 105 perturbed genes, one cell line
N_GENES, N_PERTS, N_COVS = 5045, 105, 1
PAPER_PRESETS = ["paper", "paper_s", "paper_norman19", "paper_norman19_s", "paper_srivatsan20", "paper_srivatsan20_s"]


def _mlp(i, h, o, n):
    """PerturBench's MLP: Linear(i,h), n-1 Linear(h,h), Linear(h,o); LayerNorms carry no parameters."""
    return (i + 1) * h + (n - 1) * (h + 1) * h + (h + 1) * o


def _base_encoder(i, h, latent, n):
    return _mlp(i, h, h, n) + 2 * (h + 1) * latent  # MLP then mean and log-variance heads


def _conditional_encoder(i, c, hx, hc, out, n):
    return _mlp(i, hx, hx, n) + _mlp(c, hc, hx, n) + 2 * (hx + 1) * out


def _expected(g, p, c, m):
    lat, hx, hc = m["latent_dim"], m["hidden_dim_x"], m["hidden_dim_cond"]
    nx, ne, nd = m["n_layers_encoder_x"], m["n_layers_encoder_e"], m["n_layers_decoder"]
    enc_in = g + (c if m["inject_covariates_encoder"] else 0)
    dec_in = lat + (c if m["inject_covariates_decoder"] else 0)
    if m["mean_field_encoding"]:
        n = _base_encoder(enc_in, hx, lat, nx) + _base_encoder(p, p, lat, ne)
    elif m["sparse_additive_mechanism"]:
        n = _conditional_encoder(enc_in, lat, hx, hc, lat, nx) + _conditional_encoder(lat, p, hc, hc, lat, ne)
    else:
        n = _conditional_encoder(enc_in, lat, hx, hc, lat, nx) + _base_encoder(p, p, lat, ne)
    if m["sparse_additive_mechanism"]:
        n += _mlp(p, hc, lat, ne)  # encoder_m
    return n + _mlp(dec_in, hx, g, nd)


def _net(params, g=N_GENES, p=N_PERTS, c=N_COVS):
    return sv.SAMSVAE().build_net(g, p, c, params)


@pytest.mark.parametrize("preset", PAPER_PRESETS)
def test_parameter_counts_at_paper_presets(preset):
    params = model_params({"type": "sams_vae", "preset": preset})
    with torch.device("meta"):  # shapes only
        net = _net(params)
    n = sv.count_parameters(net)
    print(f"sams_vae {preset:20s} {N_GENES} genes, {N_PERTS} perturbations: {n:,} parameters")
    assert n == _expected(N_GENES, N_PERTS, N_COVS, params["model"])
    assert all(not isinstance(mod, torch.nn.LayerNorm) or mod.weight is None for mod in net.modules())


def test_paper_counts_by_hand():
    counts = {}
    for preset in ("paper", "paper_norman19", "paper_srivatsan20"):
        with torch.device("meta"):
            counts[preset] = sv.count_parameters(_net(model_params({"type": "sams_vae", "preset": preset})))
    # paper, by hand: x-encoder 5045-2332x5 (38,970,052) + condition 55-329x5-2332 (1,222,264) + heads
    # 2x2333x55 (256,630); e-encoder 55-329x3 (344,134) + 105-329x3 (360,584) + heads (36,300);
    # mask MLP 105-329x3-55 (270,164); decoder 55-2332x4-5045 (28,222,245)
    assert counts == {"paper": 69_682_373, "paper_norman19": 32_260_765, "paper_srivatsan20": 51_055_569}


def test_registered():
    assert MODEL_REGISTRY["sams_vae"] == "perturb_repro.models.sams_vae:SAMSVAE"
    assert isinstance(get_model("sams_vae"), sv.SAMSVAE)


# --------------------------------------------------------------------------- ELBO terms


def test_kl_terms_match_torch_distributions():
    gen = torch.Generator().manual_seed(0)
    mu, log_var = torch.randn(64, 7, generator=gen) * 2, torch.randn(64, 7, generator=gen) * 1.5
    ref = D.kl_divergence(D.Normal(mu, torch.exp(0.5 * log_var)), D.Normal(torch.zeros_like(mu), torch.ones_like(mu)))
    torch.testing.assert_close(sv.gaussian_kl_standard(mu, log_var), ref, rtol=1e-5, atol=1e-6)

    logits = (torch.rand(64, 7, generator=gen) - 0.5) * 12
    for prior in (1e-3, 0.01, 0.0869, 0.5, 0.956):
        ref = D.kl_divergence(D.Bernoulli(probs=torch.sigmoid(logits)), D.Bernoulli(probs=torch.full_like(logits, prior)))
        torch.testing.assert_close(sv.bernoulli_kl(logits, prior), ref, rtol=1e-4, atol=1e-5)
    assert (sv.bernoulli_kl(torch.tensor([-40.0, 40.0]), 0.01)).isfinite().all()  # no log(0) at saturation


def test_relaxed_bernoulli_matches_torch_and_straight_through_gradient():
    logits = torch.linspace(-4, 4, 9).repeat(50, 1)
    torch.manual_seed(3)
    ours = sv.relaxed_bernoulli_sample(logits, 0.5)
    torch.manual_seed(3)
    ref = D.RelaxedBernoulli(torch.tensor(0.5), logits=logits).rsample()
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)

    cfg = dict(model_params({"type": "sams_vae", "preset": "tiny_s"})["model"])
    torch.manual_seed(0)
    net = sv.SAMSVAENet(20, 4, 1, cfg)
    pert = torch.eye(4)
    m, logits = net.mask(pert)
    assert set(m.detach().unique().tolist()) <= {0.0, 1.0}  # hard samples forward...
    m.sum().backward()  # ...gradient of sigmoid(logits) backward
    ref_net = sv.SAMSVAENet(20, 4, 1, cfg)
    ref_net.load_state_dict(net.state_dict())
    torch.sigmoid(ref_net.encoder_m(pert)).sum().backward()
    for a, b in zip(net.encoder_m.parameters(), ref_net.encoder_m.parameters()):
        torch.testing.assert_close(a.grad, b.grad)


def test_loss_is_l1_plus_kl_terms():
    cfg = model_params({"type": "sams_vae", "preset": "tiny_s"})["model"]
    torch.manual_seed(0)
    net = sv.SAMSVAENet(20, 4, 2, cfg).eval()
    x, pert, cov = torch.rand(8, 20), torch.eye(4)[[0, 1, 2, 3, 0, 1, 2, 3]], torch.eye(2)[[0, 1] * 4]
    torch.manual_seed(1)
    t = net.loss_terms(x, pert, cov)
    assert set(t) == {"recon", "kl_z", "kl_e", "kl_m", "loss", "x_hat"}
    torch.testing.assert_close(t["recon"], (x - t["x_hat"]).abs().sum(1).mean())
    torch.testing.assert_close(t["loss"], t["recon"] + t["kl_z"] + t["kl_e"] + t["kl_m"])
    torch.manual_seed(1)
    torch.testing.assert_close(net(x, pert, cov), t["x_hat"])  # prediction = the same forward pass


# --------------------------------------------------------------------------- the (S) switch


def test_s_switch_changes_only_the_mechanism():
    def model_cfg(preset):
        return model_params({"type": "sams_vae", "preset": preset})

    for plain, sparse in [("tiny", "tiny_s"), ("paper_norman19", "paper_norman19_s"),
                          ("paper_srivatsan20", "paper_srivatsan20_s")]:
        a, b = model_cfg(plain), model_cfg(sparse)
        assert a["model"].pop("sparse_additive_mechanism") is False
        assert b["model"].pop("sparse_additive_mechanism") is True
        assert a == b, (plain, sparse)
    assert model_cfg("paper_s") == model_cfg("paper")  # PerturBench's default is already sparse

    g, p, c = 30, 6, 1
    for mean_field in (True, False):
        base = dict(model_cfg("tiny")["model"], mean_field_encoding=mean_field)
        plain = sv.SAMSVAENet(g, p, c, dict(base, sparse_additive_mechanism=False))
        sparse = sv.SAMSVAENet(g, p, c, dict(base, sparse_additive_mechanism=True))
        assert not hasattr(plain, "encoder_m") and hasattr(sparse, "encoder_m")
        # non-mean-field: the embedding encoder becomes q(e | m, p) (conditional on the mask)
        want = sv.GaussianEncoder if mean_field else sv.ConditionalGaussianEncoder
        assert isinstance(sparse.encoder_e, want) and isinstance(plain.encoder_e, sv.GaussianEncoder)
        x, pert, cov = torch.rand(5, g), torch.eye(p)[:5], torch.ones(5, c)
        assert "kl_m" not in plain.loss_terms(x, pert, cov) and "kl_m" in sparse.loss_terms(x, pert, cov)

        # a mask that is always off removes the perturbation: z_p = m * e = 0
        sparse.eval()
        with torch.no_grad():
            sparse.encoder_m.layers[-1].bias.fill_(-60.0)
        outs = []
        for q in (torch.eye(p)[[0] * 5], torch.eye(p)[[3] * 5]):
            torch.manual_seed(7)
            outs.append(sparse(x, q, cov))
        torch.testing.assert_close(outs[0], outs[1])
        plain.eval()
        outs = []
        for q in (torch.eye(p)[[0] * 5], torch.eye(p)[[3] * 5]):
            torch.manual_seed(7)
            outs.append(plain(x, q, cov))
        assert not torch.allclose(outs[0], outs[1])
        # and its KL to the prior is latent_dim * -log(1 - prior) per cell
        kl_m = sparse.loss_terms(x, torch.eye(p)[:5], cov)["kl_m"]
        torch.testing.assert_close(kl_m, torch.tensor(-np.log1p(-sparse.mask_prior) * sparse.latent_dim, dtype=torch.float32),
                                   rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------- synthetic sparse mechanism



def _synthetic(seed=0, n_cells=40, n_genes=30, latent=6):
    """Cells decoded from a latent basal state; each gene shifts 1-2 latent dimensions (sparse)."""
    rng = np.random.default_rng(seed)
    w = rng.normal(0, 0.8, (latent, n_genes))
    b = rng.uniform(0.5, 1.5, n_genes)
    shift = {}
    for gene in GENES:
        s = np.zeros(latent)
        dims = rng.choice(latent, size=rng.integers(1, 3), replace=False)
        s[dims] = rng.choice([-1, 1], size=len(dims)) * rng.uniform(1.5, 2.5, len(dims))
        shift[gene] = s
    blocks, obs = [], []
    for split, conditions in [("train", ["control"] * 3 + TRAIN_CONDITIONS), ("val", VAL_CONDITIONS)]:
        for condition in dict.fromkeys(conditions):
            k = n_cells * (3 if condition == "control" else 1)
            z = rng.normal(0, 0.5, (k, latent)) + sum((shift[g] for g in condition.split("+") if g in shift), np.zeros(latent))
            x = np.log1p(np.exp(z @ w + b)) + rng.normal(0, 0.05, (k, n_genes))
            blocks.append(np.clip(x, 0, None))
            obs += [(condition, condition == "control", split, "t1")] * k
    return perturbation_adata(blocks, obs)


@pytest.fixture(scope="module")
def synthetic():
    return train_val(_synthetic())


CONTEXT = ModelContext("synthetic", "control", pca=None, embeddings={}, seed=3)


def _fit_params(preset, **over):
    base = {"trainer": {"max_epochs": 60}, "data": {"batch_size": 64}, "early_stopping": {"patience": 60},
            "model": {"lr": 3e-3, "latent_dim": 8}}
    return deep_merge(deep_merge(model_params({"type": "sams_vae", "preset": preset}), base), over)


def _mean_errors(pred, cells):
    return {c: float(np.mean((pred[c].mean(0) - cells[cells.obs["condition"] == c].X.mean(0)) ** 2)) for c in pred}


# SAMS-VAE (S) at the tuned sparse prior (0.087) switches its masks off on this data and predicts
# the control: PerturBench charges the mask's (and embedding's) KL per *cell* -- a mask dimension
# costs ~2.4 nats in every cell -- while the amortised basal encoder can absorb the shift for
# free, so nothing pays for z_p. (Bereket & Karaletsos count the KL of their global m, e once per
# data set.) With a permissive prior the same code does carry the mechanism in z_p = m * e.
FITS = {"tiny": ({}, 0.7), "tiny_s": ({"model": {"mask_prior_probability": 0.9}}, 0.75),
        # the later release draws one global mask per forward pass (also at prediction), so a predicted cell
        # carries a random subset of its perturbation's latent dimensions: a weaker pseudo-bulk fit
        "tiny_neurips2025": ({}, 0.92), "tiny_neurips2025_modified": ({}, 0.7)}
VARIANT = {"tiny": "SAMS-VAE", "tiny_s": "SAMS-VAE (S)", "tiny_neurips2025": "sams",
           "tiny_neurips2025_modified": "sams_modified"}


@pytest.mark.parametrize("preset", FITS)
def test_fits_sparse_mechanism_better_than_control_mean(preset, synthetic, tmp_path):
    train, val = synthetic
    over, bound = FITS[preset]
    params = _fit_params(preset, **over)
    sv.SAMSVAE().fit(train, val, CONTEXT, params, tmp_path)
    control = train[train.obs["is_control"].to_numpy()]
    pred = sv.SAMSVAE().sample(tmp_path, TRAIN_CONDITIONS + VAL_CONDITIONS, control, 200, CONTEXT, params, {"seed": 0})
    cm = {c: control.X.mean(0, keepdims=True) for c in pred}
    model_err = np.mean(list(_mean_errors({c: pred[c] for c in TRAIN_CONDITIONS}, train).values()))
    base_err = np.mean(list(_mean_errors({c: cm[c] for c in TRAIN_CONDITIONS}, train).values()))
    val_err = np.mean(list(_mean_errors({c: pred[c] for c in VAL_CONDITIONS}, val).values()))
    val_base = np.mean(list(_mean_errors({c: cm[c] for c in VAL_CONDITIONS}, val).values()))
    print(preset, "train conditions: model", model_err, "control mean", base_err, "| unseen combos:", val_err, val_base)
    assert model_err < bound * base_err
    assert val_err < val_base  # unseen combinations of seen genes: the additive latent shift helps
    for c in pred:
        assert pred[c].shape == (200, train.n_vars) and pred[c].dtype == np.float32
        assert np.isfinite(pred[c]).all() and (pred[c] >= 0).all()
    info = json.loads((tmp_path / "fit.json").read_text())
    assert info["variant"] == VARIANT[preset]
    assert info["train_cells"] == train.n_obs  # add_controls: false -> controls are training cells too
    log = pd.read_csv(tmp_path / "val_log.csv")
    assert info["best_epoch"] == int(log["val_loss"].idxmin())


def test_add_controls_selects_the_training_cells(synthetic):
    train, _ = synthetic
    enc = sv.InputEncoder.fit(train.obs[~train.obs["is_control"].to_numpy()], ["cell_type"], "control")
    n_ctrl = int(train.obs["is_control"].sum())
    assert len(sv._Cells(train, enc, add_controls=True)) == train.n_obs - n_ctrl
    cells = sv._Cells(train, enc, add_controls=False)
    assert len(cells) == train.n_obs
    is_ctrl = torch.from_numpy(train.obs["is_control"].to_numpy())
    assert cells.pert[is_ctrl].abs().sum() == 0 and (cells.pert[~is_ctrl].sum(1) >= 1).all()


# --------------------------------------------------------------------------- resume


@pytest.mark.parametrize("preset", ["tiny_s", "tiny", "tiny_neurips2025", "tiny_neurips2025_modified"])
def test_preempted_run_resumes_bit_identically(preset, synthetic, tmp_path, monkeypatch):
    train, val = synthetic
    params = _fit_params(preset, trainer={"max_epochs": 3}, training={"checkpoint_every": 4})  # 520 cells: 9 steps/epoch
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    sv.SAMSVAE().fit(train, val, CONTEXT, params, full)

    with monkeypatch.context() as patch:
        patch.setattr(trainer_mod, "StopFlag", lambda: SignalAfter(13))  # SIGTERM in the second epoch, off the cadence
        with pytest.raises(Preempted):
            sv.SAMSVAE().fit(train, val, CONTEXT, params, resumed)
    assert json.loads((resumed / sv.STATE_MARKER).read_text())["step"] == 14
    assert not (resumed / sv.MODEL_FILE).exists()
    sv.SAMSVAE().fit(train, val, CONTEXT, params, resumed)

    a, b = sv.SAMSVAE.load(full), sv.SAMSVAE.load(resumed)
    for key in a["weights"]:
        assert torch.equal(a["weights"][key], b["weights"][key]), key
    for name in ("train_log.csv", "val_log.csv"):
        pd.testing.assert_frame_equal(pd.read_csv(full / name), pd.read_csv(resumed / name))
    assert len(pd.read_csv(full / "train_log.csv")) == 27
    control = train[train.obs["is_control"].to_numpy()]
    pa = sv.SAMSVAE().sample(full, ["A+B"], control, 20, CONTEXT, params, {"seed": 4})
    pb_ = sv.SAMSVAE().sample(resumed, ["A+B"], control, 20, CONTEXT, params, {"seed": 4})
    np.testing.assert_array_equal(pa["A+B"], pb_["A+B"])


# --------------------------------------------------------------------------- demo data


@pytest.mark.parametrize("preset", ["tiny", "tiny_s", "tiny_neurips2025", "tiny_neurips2025_modified"])
def test_tiny_preset_on_demo_data(preset, demo_processed, tmp_path):
    train = demo_processed[demo_processed.obs["split"] == "train"].copy()
    val = demo_processed[demo_processed.obs["split"] == "val"].copy()
    test = demo_processed[demo_processed.obs["split"] == "test"]
    control = demo_processed[demo_processed.obs["is_control"].to_numpy()].copy()
    params = deep_merge(model_params({"type": "sams_vae", "preset": preset}, dataset_cfg=DEMO_COVARIATES), {"trainer": {"max_epochs": 2}})  # speed only
    context = ModelContext("norman_demo", "control", pca=None, embeddings={}, seed=0)
    get_model("sams_vae").fit(train, val, context, params, tmp_path)
    conditions = sorted(set(test.obs["condition"]) - {"control"})
    pred = get_model("sams_vae").sample(tmp_path, conditions, control, 30, context, params, {"seed": 0})
    assert sorted(pred) == conditions
    for c in conditions:
        assert pred[c].shape == (30, demo_processed.n_vars) and pred[c].dtype == np.float32
        assert np.isfinite(pred[c]).all() and (pred[c] >= 0).all()
    info = json.loads((tmp_path / "fit.json").read_text())
    assert info["steps"] == 2 * info["steps_per_epoch"] and info["n_covariates"] == 1
    assert info["sparse_additive_mechanism"] == (preset in ("tiny_s", "tiny_neurips2025"))  # the mask is on


# --------------------------------------------------------------------------- the later release (fc13a8c)

NIPS25 = ["neurips2025_norman19", "neurips2025_norman19_modified", "neurips2025_srivatsan20",
          "neurips2025_srivatsan20_modified", "neurips2025_jiang24", "neurips2025_jiang24_modified"]


def _expected_2025(g, p, c, m):
    """fc13a8c's SparseAdditiveVAE: encoder_x BaseEncoder(genes (+covs) + latent, h_x), encoder_e
    BaseEncoder([mask ;] perturbation, h_x), mask logits [n_perts, latent] (kept with disable_sparsity),
    IsotropicGaussian decoder = MLP(latent (+covs), h_x, genes)."""
    lat, hx = m["latent_dim"], m["hidden_dim_x"]
    enc_in = g + (c if m["inject_covariates_encoder"] else 0) + lat
    e_in = p + (0 if m["disable_sparsity"] else lat)
    dec_in = lat + (c if m["inject_covariates_decoder"] else 0)
    return (_base_encoder(enc_in, hx, lat, m["n_layers_encoder_x"]) + _base_encoder(e_in, hx, lat, m["n_layers_encoder_e"])
            + p * lat + _mlp(dec_in, hx, g, m["n_layers_decoder"]))


@pytest.mark.parametrize("preset", NIPS25)
def test_parameter_counts_at_neurips2025_presets(preset):
    params = model_params({"type": "sams_vae", "preset": preset})
    c = 11 if "jiang24" in preset else N_COVS  # Jiang24: 6 cell lines + 5 cytokine treatments
    with torch.device("meta"):
        net = _net(params, c=c)
    assert isinstance(net, sv.SAMSVAE2025Net)
    n = sv.count_parameters(net)
    print(f"{preset:34s} {N_GENES} genes, {N_PERTS} perts, {c} covariate values: {n:,} parameters")
    assert n == _expected_2025(N_GENES, N_PERTS, c, params["model"])


def _net25(**cfg):
    base = dict(model_params({"type": "sams_vae", "preset": "tiny_neurips2025"})["model"], **cfg)
    torch.manual_seed(0)
    return sv.SAMSVAE2025Net(20, 4, 2, base, perturbation_counts=torch.tensor([5.0, 8.0, 3.0, 10.0]))


def _pert_batch():
    pert = torch.tensor([[1, 0, 0, 0], [0, 1, 1, 0], [0, 0, 0, 0], [0, 0, 0, 1], [1, 0, 0, 1]], dtype=torch.float32)
    return torch.rand(5, 20, generator=torch.Generator().manual_seed(1)) * 2, pert, torch.eye(2)[[0, 1, 0, 1, 1]]


@pytest.mark.parametrize("modified", [False, True])
def test_neurips2025_loss_matches_torch_distributions(modified):
    net = _net25(disable_sparsity=modified, disable_e_dist=modified, mask_prior_probability=0.3).eval()
    x, pert, cov = _pert_batch()
    torch.manual_seed(11)
    inner = net._run(x, pert, cov, inference=False)
    torch.manual_seed(11)  # the same draws
    terms = net.loss_terms(x, pert, cov)
    # upstream's ELBO from the same samples, written with torch.distributions
    counts = net.perturbation_counts
    q_z = D.Normal(inner["z_mu"], torch.exp(0.5 * inner["z_log_var"]))
    z = inner["z_basal"]
    kld = (q_z.log_prob(z).sum(-1) - D.Normal(0.0, 1.0).log_prob(z).sum(-1)).mean()
    if not modified:
        e = inner["e_t"]
        pair = D.Normal(inner["e_mu"], torch.exp(0.5 * inner["e_log_var"])).log_prob(e).sum(-1) - D.Normal(0.0, 1.0).log_prob(e).sum(-1)
        per_cell = torch.zeros(5).index_add(0, inner["cell"], pair)
        adj = 1 / (pert @ counts)
        adj[adj.isinf()] = 0
        kld = kld + (per_cell * adj).mean()
        m = inner["m"]
        q_m, p_m = D.Bernoulli(probs=torch.sigmoid(net.m_logits)), D.Bernoulli(probs=0.3 * torch.ones_like(m))
        kld = kld + ((q_m.log_prob(m) - p_m.log_prob(m)).sum(-1) * pert.sum(0) / counts).sum() / 5
        assert set(torch.unique(m).tolist()) <= {0.0, 1.0}
    else:
        assert "kl_m" not in terms and float(terms["kl_e"]) == 0.0
        assert torch.equal(inner["m"], torch.ones_like(net.m_logits))
    recon = ((x - inner["x_hat"]) ** 2).sum(-1).mean()
    torch.testing.assert_close(terms["loss"], recon + kld, rtol=1e-5, atol=1e-5)


def test_neurips2025_combination_sums_per_gene_effects():
    """z_p of a combination is the sum of its genes' m_k * e_k, each encoded from [m_k ; the cell's multi-hot]."""
    net = _net25(disable_sparsity=True, disable_e_dist=True).eval()
    x, pert, cov = _pert_batch()
    with torch.no_grad():
        inner = net._run(x, pert, cov, inference=True)
        e = net.encoder_e(pert[[1, 1]])[0]  # rows of cell 1 ("B+C"): its multi-hot vector, once per gene
    assert inner["cell"].tolist() == [0, 1, 1, 3, 4, 4] and inner["k"].tolist() == [0, 1, 2, 3, 0, 3]
    torch.testing.assert_close(inner["e_t"][1:3], e)


def test_generative_counterfactual_ignores_the_control_cell():
    net = _net25(generative_counterfactual=True).eval()
    x, pert, cov = _pert_batch()
    outs = []
    for scale in (1.0, 3.0):
        torch.manual_seed(2)
        outs.append(net(x * scale, pert, cov))
    torch.testing.assert_close(outs[0], outs[1])
    net.generative_counterfactual = False
    torch.manual_seed(2)
    assert not torch.allclose(net(x * 3.0, pert, cov), outs[0])


@pytest.mark.parametrize("preset", ["tiny", "tiny_s", "tiny_neurips2025", "tiny_neurips2025_modified"])
def test_sampling_seed_changes_the_cells(preset, synthetic, tmp_path):
    """issue 20: a sampler that ignored the seed (always 0) would give identical cells for every seed."""
    train, val = synthetic
    params = _fit_params(preset, trainer={"max_epochs": 2})
    sv.SAMSVAE().fit(train, val, CONTEXT, params, tmp_path)
    control = train[train.obs["is_control"].to_numpy()]
    draw = lambda seed: sv.SAMSVAE().sample(tmp_path, ["A+B"], control, 40, CONTEXT, params, {"seed": seed})["A+B"]
    a, b, c = draw(5), draw(5), draw(6)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-4
    info = json.loads((tmp_path / "fit.json").read_text())
    assert info["release"] == ("neurips2025" if "neurips2025" in preset else "neurips2024")

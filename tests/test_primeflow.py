"""PRiMeFlow (models/primeflow.py): paper presets vs the Appendix E transcription vs the seed, network
shapes and sizes at the paper presets, classifier-free guidance, the Euler integrator, OT coupling,
bit-identical resume, and fit + sample of every tiny preset on the demo data."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from perturb_repro.config import deep_merge, model_params
from perturb_repro.data.pca import fit_pca
from perturb_repro.models import primeflow as pf
from perturb_repro.models._unet1d import AttentionBlock, Downsample, ResBlock, Upsample
from perturb_repro.models.base import ModelContext
from perturb_repro.training import Preempted
import perturb_repro.trainer as trainer_mod
from fakes import SignalAfter
from seeds import needs_seeds, seed_path

REPO = Path(__file__).resolve().parents[1]
PRESETS = yaml.safe_load((REPO / "config" / "presets" / "primeflow.yaml").read_text())
HPARAMS = yaml.safe_load((REPO / "resources" / "paper_tables" / "primeflow_hparams.yaml").read_text())
SEED_TEXT = seed_path("primeflow_paper.txt")
PAPER = sorted(k for k in PRESETS if k.startswith("paper_"))
TINY = ["tiny", "tiny_mlp", "tiny_fm_pca", "tiny_fm_pca_ot"]

torch.set_num_threads(1)


# --------------------------------------------------------------------------------------------------
# Appendix E: seed -> transcription -> presets

# paper row name -> (preset path, parser of the printed value)
_NUM = float
PAPER_KEYS = {
    "architecture": ("architecture", {"U-Net": "unet", "MLP": "mlp"}.__getitem__),
    "num_res_blocks": ("network.num_res_blocks", int),
    "hidden_dim": ("network.hidden_dim", int),
    "dropout": ("network.dropout", _NUM),
    "channel_mult": ("network.channel_mult", lambda s: [int(v) for v in re.findall(r"\d+", s)]),
    "conv_resample": ("network.conv_resample", {"True": True, "False": False}.__getitem__),
    "num_heads": ("network.num_heads", int),
    "attention_resolutions": ("network.attention_resolutions", lambda s: [int(v) for v in re.findall(r"\d+", s)]),
    "n_layers_gene_expression": ("network.n_layers_gene_expression", int),
    "n_layers_conditions": ("network.n_layers_conditions", int),
    "n_layers_time": ("network.n_layers_time", int),
    "n_layers_decoding": ("network.n_layers_decoding", int),
    "prob_unconditional": ("flow.prob_unconditional", _NUM),
    "interpl_type": ("flow.interpolation", str.lower),
    "sigma": ("flow.sigma", _NUM),
    "learning_rate": ("training.learning_rate", _NUM),
    "weight_decay": ("training.weight_decay", _NUM),
    "batch_size": ("training.batch_size", int),
    "num_gpus": ("training.num_gpus", int),
    "grad_clip_threshold": ("training.grad_clip", _NUM),
    "grad_accum_batches": ("training.grad_accum_steps", int),
    "num_samples_per_condition": ("ot.num_samples_per_condition", int),
    "solver_type": ("ot.solver_type", str),
    "tau_a": ("ot.tau_a", _NUM),
    "tau_b": ("ot.tau_b", _NUM),
}


def _lookup(preset: dict, path: str):
    node = preset
    for key in path.split("."):
        if not isinstance(node, dict) or key not in node:
            return KeyError
        node = node[key]
    return node


def _seed_rows() -> list:
    """Appendix E's rows as printed: header markers, sub-headings and [name, value, description]."""
    lines = SEED_TEXT.read_text(encoding="utf-8").splitlines()
    start = lines.index("Appendix E Hyperparameters")
    out = []
    for line in lines[start + 1:]:
        if not line.startswith("|"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells == ["Hyperparameter", "Value", "Description"]:
            out.append("HEADER")
        elif cells[0] == "Non HPO hyperparameters" and not any(cells[1:]):
            out.append(("SUB", cells[0]))
        else:
            assert len(cells) == 3, line
            out.append(cells)
    return out


@needs_seeds
def test_transcription_is_the_seed_appendix():
    transcribed = []
    for table in HPARAMS["tables"]:
        if table["header_row_printed"]:
            transcribed.append("HEADER")
        for row in table["rows"]:
            transcribed.append(("SUB", row["subheading"]) if isinstance(row, dict) else list(row))
    seed = _seed_rows()
    assert transcribed == seed
    assert len(HPARAMS["tables"]) == 8 and seed.count("HEADER") == 6
    assert HPARAMS["source"]["intro"] in SEED_TEXT.read_text(encoding="utf-8")


def _expected_from_tables() -> dict[str, dict[str, object]]:
    expected: dict[str, dict[str, object]] = {}
    for table in HPARAMS["tables"]:
        for preset in table["presets"]:
            for row in table["rows"]:
                if isinstance(row, dict):
                    continue
                name, printed, _ = row
                path, parse = PAPER_KEYS[name]
                value = parse(printed)
                previous = expected.setdefault(preset, {}).setdefault(path, value)
                assert previous == value, (preset, path)
    return expected


def test_every_paper_preset_is_a_transcribed_table():
    expected = _expected_from_tables()
    assert sorted(expected) == PAPER
    for preset in ["paper_norman19", "paper_srivatsan20", "paper_jiang24", "paper_mlp_norman19",
                   "paper_fm_pca_norman19", "paper_fm_pca_ot_norman19"]:
        assert preset in PRESETS


@pytest.mark.parametrize("name", PAPER)
def test_paper_preset_matches_transcription(name):
    expected = _expected_from_tables()[name]
    preset = model_params({"type": "primeflow", "preset": name})
    for path, value in expected.items():
        assert _lookup(preset, path) == value, f"{name}: {path} = {_lookup(preset, path)!r}, Appendix E prints {value!r}"
    # a paper key the tables do not give this preset must not be set (e.g. channel_mult on an MLP)
    for path, _ in PAPER_KEYS.values():
        if path not in expected:
            assert _lookup(preset, path) is KeyError, f"{name}: {path} is set but not in its Appendix E table"
    variant = (preset["architecture"], preset["space"], preset["coupling"])
    kind = {("unet", "gene", "independent"): "paper_", ("mlp", "gene", "independent"): "paper_mlp_",
            ("mlp", "pca", "independent"): "paper_fm_pca_", ("mlp", "pca", "ot"): "paper_fm_pca_ot_"}[variant]
    assert re.fullmatch(kind + r"(norman19|srivatsan20|jiang24)", name)


# --------------------------------------------------------------------------------------------------
# networks at the paper presets


def _spec(params: dict, dim: int, n_perts: int = 300, esm_dim: int = 320, covariate_values=(("k562",),)) -> dict:
    return {
        "architecture": params["architecture"], "space": params["space"], "coupling": params["coupling"],
        "dim": dim, "n_genes": dim, "network": params["network"],
        "time_scale": 1000.0, "expression_scale": 100.0,
        "vocab": [f"G{i}" for i in range(n_perts)], "max_perts": 2,
        "covariates": ["cell_type"], "covariate_values": [list(v) for v in covariate_values],
        "esm_dim": esm_dim, "cfg_drop": "all", "control_label": "ctrl",
    }


N_GENES = 5045  # the pipeline's Norman19 (GEARS) gene panel; PCA presets use 50 components


@pytest.mark.parametrize("name", [p for p in PAPER if not p.startswith("paper_jiang24")])
def test_paper_preset_networks(name, capsys):
    params = model_params({"type": "primeflow", "preset": name})
    dim = N_GENES if params["space"] == "gene" else 50
    field = pf.build_field(_spec(params, dim), seed=0)
    n = pf.count_parameters(field)
    with capsys.disabled():
        print(f"\n[primeflow] {name}: {n:,} parameters at {dim} {'genes' if dim == N_GENES else 'PCs'}")
    net = params["network"]
    if params["architecture"] == "unet":
        unet = field.net.unet
        levels, nrb = len(net["channel_mult"]), net["num_res_blocks"]
        count = lambda cls: sum(isinstance(m, cls) for m in unet.modules())
        assert count(ResBlock) == levels * nrb + 2 + levels * (nrb + 1)
        assert count(Downsample) == count(Upsample) == levels - 1
        # attention at downsample rate 16 = the last of 5 levels: nrb input + (nrb + 1) output blocks + middle
        assert count(AttentionBlock) == nrb + (nrb + 1) + 1
        assert field.net.n_padded % 2 ** (levels - 1) == 0 and field.net.n_padded - dim < 2 ** (levels - 1)
        assert field.net.emb_dim == 4 * net["hidden_dim"]
        # shapes through the full network on a short gene axis (the size does not depend on it except the
        # gene embedding): 40 genes -> padded to 48
        small = pf.build_field(_spec(params, 40), seed=0).eval()
        assert pf.count_parameters(small) == n - (field.net.n_padded - 48) * net["hidden_dim"]
        dim, field = 40, small
    field.eval()
    x = torch.randn(3, dim)
    with torch.no_grad():
        v = field(x, torch.rand(3), torch.tensor([[0, 1], [2, -1], [-1, -1]]), torch.zeros(3, 1, dtype=torch.long))
    assert v.shape == (3, dim) and torch.isfinite(v).all()


# --------------------------------------------------------------------------------------------------
# guidance, Euler, OT


def _random_tiny_field(seed=0) -> pf.VelocityField:
    params = model_params({"type": "primeflow", "preset": "tiny"})
    field = pf.build_field(_spec(params, 30, n_perts=5, esm_dim=4), seed=seed)
    with torch.no_grad():  # zero-initialised layers (guided-diffusion style) would hide the condition
        g = torch.Generator().manual_seed(seed)
        for p in field.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return field.eval()


def test_cfg_weight_one_is_the_conditional_model():
    field = _random_tiny_field()
    x, t = torch.randn(6, 30), torch.rand(6)
    tok = torch.tensor([[0, 1], [2, -1], [3, 4], [0, -1], [-1, -1], [1, 2]])
    cov = torch.zeros(6, 1, dtype=torch.long)
    with torch.no_grad():
        cond = field(x, t, tok, cov)
        uncond = field(x, t, tok, cov, drop=torch.ones(6, dtype=torch.bool))
        assert torch.equal(pf.guided_velocity(field, x, t, tok, cov, 1.0), cond)
        guided = pf.guided_velocity(field, x, t, tok, cov, 3.0)
        torch.testing.assert_close(guided, uncond + 3.0 * (cond - uncond), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(guided, cond, atol=1e-4)
        # the null embedding really removes the condition: unconditional output ignores tok
        other = field(x, t, torch.full_like(tok, 3), cov, drop=torch.ones(6, dtype=torch.bool))
        assert torch.equal(other, uncond)
        # and the whole Euler solve with w = 1 equals integrating the conditional field
        a = pf.euler_integrate(lambda y, s: pf.guided_velocity(field, y, s, tok, cov, 1.0), x, 5)
        b = pf.euler_integrate(lambda y, s: field(y, s, tok, cov), x, 5)
        assert torch.equal(a, b)


def test_euler_first_order_on_linear_ode():
    a = torch.tensor([[-0.5, 2.0, 0.0], [-2.0, -0.5, 0.3], [0.1, 0.0, -1.0]], dtype=torch.float64)
    x0 = torch.tensor([[1.0, -0.5, 2.0], [0.3, 0.8, -1.0]], dtype=torch.float64)
    exact = x0 @ torch.linalg.matrix_exp(a).T
    errors = {}
    for k in (10, 20, 40, 80, 160):
        xk = pf.euler_integrate(lambda x, t: x @ a.T, x0, k)
        errors[k] = (xk - exact).norm().item()
    ratios = [errors[k] / errors[2 * k] for k in (10, 20, 40, 80)]
    assert all(1.8 < r < 2.3 for r in ratios), (errors, ratios)  # error ~ C / k: first order
    c = [errors[k] * k for k in errors]
    assert max(c) / min(c) < 1.3
    assert errors[160] < 0.02


def test_ot_coupling_pairs_nearby_cells():
    rng = np.random.default_rng(0)
    centres = rng.normal(scale=4.0, size=(8, 5))
    x0 = (centres[rng.integers(0, 8, 128)] + rng.normal(scale=0.3, size=(128, 5))).astype(np.float32)
    x1 = (centres[rng.integers(0, 8, 128)] + rng.normal(scale=0.3, size=(128, 5)) + 0.5).astype(np.float32)
    i, j, fell_back = pf.ot_pairs(x0, x1, np.random.default_rng(1), epsilon=0.01)
    assert not fell_back
    assert len(i) == len(j) == 128
    coupled = ((x0[i] - x1[j]) ** 2).sum(1).mean()
    random_pairs = ((x0[rng.permutation(128)] - x1) ** 2).sum(1).mean()
    assert coupled < 0.25 * random_pairs
    assert len(set(i.tolist())) > 64  # close to a permutation, not everything mapped from a few sources
    plan = pf.ot_plan(x0, x1, 0.01, "mean", 1.0, 1.0)
    np.testing.assert_allclose(plan.sum(1), 1 / 128, rtol=0.05)  # balanced marginals


def test_unseen_perturbations_fall_back():
    enc = pf.ConditionEncoder(n_known=3, cov_sizes=[1], dim=8, n_layers=2, dropout=0.0, esm_dim=4, cfg_drop="all")
    esm = np.array([[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0]], np.float32)
    enc.set_bank(esm, np.array([True, True, True, True, True, False]))
    cov = torch.zeros(3, 1, dtype=torch.long)
    with torch.no_grad():
        out = enc(torch.tensor([[3], [4], [5]]), cov)  # two unseen genes with ESM2, one without
        assert not torch.allclose(out[0], out[1])  # different ESM2 vectors -> different embeddings
        nn_unknown = pf.ConditionEncoder(3, [1], 8, 2, 0.0, 0, "all")
        o2 = nn_unknown(torch.tensor([[3], [4]]), cov[:2])
        assert torch.equal(o2[0], o2[1])  # without ESM2: the shared learned 'unknown' embedding
        # substitution (training) routes a known gene through the same fallback
        sub = enc(torch.tensor([[0]]), cov[:1], substitute=torch.tensor([[True]]))
        known = enc(torch.tensor([[0]]), cov[:1])
        assert not torch.equal(sub, known)


# --------------------------------------------------------------------------------------------------
# fit / resume / sample on the demo data


@pytest.fixture(scope="module")
def context(demo_processed):
    genes = sorted({g for c in demo_processed.obs["condition"] for g in c.split("+")} - {"control"})
    rng = np.random.default_rng(0)
    embeddings = {g: rng.normal(size=16).astype(np.float32) for g in genes}
    return ModelContext("norman_demo", "control", fit_pca(demo_processed, 10, seed=0), embeddings, seed=0)


@pytest.fixture(scope="module")
def train(demo_processed):
    return demo_processed[demo_processed.obs["split"] == "train"].copy()


def _params(preset, steps, every, **training):
    return deep_merge(model_params({"type": "primeflow", "preset": preset}),
                      {"training": {"num_steps": steps, "checkpoint_every": every, "batch_size": 16, **training},
                       "ot": {"num_samples_per_condition": 8}})


def _weights(ckpt):
    return torch.load(Path(ckpt) / pf.MODEL_FILE, weights_only=True)["model"]


@pytest.mark.parametrize("preset", ["tiny", "tiny_fm_pca_ot"])
def test_resume_reaches_the_same_weights(tmp_path, train, context, preset):
    full, part = tmp_path / "full", tmp_path / "part"
    pf.PRiMeFlowModel().fit(train, None, context, _params(preset, 4, 2), full)
    pf.PRiMeFlowModel().fit(train, None, context, _params(preset, 2, 2), part)  # "interrupted" after 2 updates
    assert json.loads((part / pf.STATE_FILE).read_text())["step"] == 2
    pf.PRiMeFlowModel().fit(train, None, context, _params(preset, 4, 2), part)  # rerun continues at 2
    a, b = _weights(full), _weights(part)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    la, lb = pd.read_csv(full / pf.LOG_FILE), pd.read_csv(part / pf.LOG_FILE)
    assert list(lb["step"]) == [0, 1, 2, 3] and np.allclose(la["loss"], lb["loss"]) and np.isfinite(la["loss"]).all()



def test_sigterm_saves_and_resumes(tmp_path, monkeypatch, train, context):
    params = _params("tiny_mlp", 6, 100)
    pf.PRiMeFlowModel().fit(train, None, context, params, tmp_path / "full")
    with monkeypatch.context() as m:
        m.setattr(trainer_mod, "StopFlag", lambda: SignalAfter(2))
        with pytest.raises(Preempted):
            pf.PRiMeFlowModel().fit(train, None, context, params, tmp_path / "cut")
    assert json.loads((tmp_path / "cut" / pf.STATE_FILE).read_text()) == {"step": 3, "done": False}  # saved where it stopped
    pf.PRiMeFlowModel().fit(train, None, context, params, tmp_path / "cut")
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "cut")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("preset", TINY)
def test_tiny_fit_and_sample(tmp_path, train, demo_processed, context, preset):
    pf.PRiMeFlowModel().fit(train, None, context, _params(preset, 3, 3), tmp_path)
    assert len(pd.read_csv(tmp_path / pf.LOG_FILE)) == 3
    control = demo_processed[demo_processed.obs["is_control"].to_numpy()].copy()
    conditions = ["KLF1+MAP2K6", "HK2", "PLK4"]  # a combo of train genes and two genes never seen in train
    for w in (1.0, 3.0):
        out = pf.PRiMeFlowModel().sample(tmp_path, conditions, control, 7, context, _params(preset, 3, 3),
                                         {"steps": 4, "guidance_weight": w, "seed": 0})
        assert sorted(out) == sorted(conditions)
        with np.load(tmp_path / pf.RANGES_FILE) as r:
            hi = r["hi"]
        for x in out.values():
            assert x.shape == (7, demo_processed.n_vars) and x.dtype == np.float32
            assert np.isfinite(x).all() and (x >= 0).all() and (x <= hi + 1e-6).all()
    again = pf.PRiMeFlowModel().sample(tmp_path, conditions[:1], control, 7, context, _params(preset, 3, 3),
                                       {"steps": 4, "guidance_weight": 3.0, "seed": 0})
    # per-condition seeds: a condition's cells do not depend on which others are sampled with it
    # (up to float rounding of a different batch size)
    np.testing.assert_allclose(again["KLF1+MAP2K6"], out["KLF1+MAP2K6"], atol=1e-5)


def test_pipeline_steps_end_to_end(tmp_path, monkeypatch, demo_processed, context):
    """train_step / predict_step as the Snakemake rules call them (registry entry added for the test)."""
    import anndata as ad
    from perturb_repro import steps
    from perturb_repro.data.truth import build_test_truth
    from perturb_repro.models.base import MODEL_REGISTRY

    monkeypatch.setitem(MODEL_REGISTRY, "primeflow", "perturb_repro.models.primeflow:PRiMeFlowModel")
    processed, pca, truth = tmp_path / "processed.h5ad", tmp_path / "pca.npz", tmp_path / "truth.h5ad"
    demo_processed.write_h5ad(processed)
    context.pca.save(pca)
    build_test_truth(demo_processed).write_h5ad(truth)
    cfg = {"type": "primeflow", "preset": "tiny_mlp", "overrides": {"training": {"num_steps": 2}}}
    params = model_params(cfg)
    steps.train_step("norman_demo", str(processed), str(pca), "", cfg, params, str(tmp_path / "ckpt"), 0)
    steps.predict_step("norman_demo", "primeflow_cfg3", str(truth), str(processed), str(pca), "", cfg, params,
                       {"steps": 3, "n_cells_per_condition": 5, "seed": 0, "guidance_weight": 3},
                       str(tmp_path / "ckpt"), str(tmp_path / "pred.h5ad"))
    pred = ad.read_h5ad(tmp_path / "pred.h5ad")
    n_test = len(set(pred.obs["condition"]) - {"control"})
    assert pred.n_vars == demo_processed.n_vars and (pred.obs["condition"] != "control").sum() == 5 * n_test
    assert pred.uns["sampler"]["guidance_weight"] == 3


# --------------------------------------------------------------------------------------------------
# issue 16.7: no fallback training where the task has no unseen perturbation; loud OT fallback


@pytest.mark.parametrize("name", PAPER)
def test_paper_presets_do_not_train_the_unseen_fallback(name):
    # Norman19 combo, Srivatsan20 and Jiang24 covariate transfer: every test perturbation token is a train token,
    # so substituting the fallback for learned rows would only add noise
    assert model_params({"type": "primeflow", "preset": name})["perturbation"]["substitute_prob"] == 0.0


def test_sinkhorn_fallback_is_logged_and_counted(tmp_path, monkeypatch, caplog, train, context):
    monkeypatch.setattr(pf, "ot_plan", lambda x0, x1, *a, **k: np.full((len(x0), len(x1)), np.nan))
    params = _params("tiny_fm_pca_ot", 2, 100)
    with caplog.at_level("WARNING", logger=pf.__name__):
        pf.PRiMeFlowModel().fit(train, None, context, params, tmp_path)
    tr = params["training"]
    per_micro = max(1, int(tr["batch_size"]) // params["ot"]["num_samples_per_condition"])  # condition groups
    expected = 2 * int(tr["grad_accum_steps"]) * int(tr["num_gpus"]) * per_micro
    rows = pd.read_csv(tmp_path / pf.OT_LOG_FILE)
    assert len(rows) == expected and sorted(set(rows["step"])) == [0, 1]
    assert json.loads((tmp_path / pf.FIT_FILE).read_text())["ot_fallbacks"] == expected
    assert sum("Sinkhorn plan unusable" in r.getMessage() for r in caplog.records) == expected
    log = pd.read_csv(tmp_path / "train_log.csv")  # the running count, beside the loss
    assert list(log["ot_fallbacks"]) == [expected // 2, expected]


def test_working_sinkhorn_logs_no_fallback(tmp_path, train, context):
    pf.PRiMeFlowModel().fit(train, None, context, _params("tiny_fm_pca_ot", 1, 100), tmp_path)
    assert json.loads((tmp_path / pf.FIT_FILE).read_text())["ot_fallbacks"] == 0
    assert len(pd.read_csv(tmp_path / pf.OT_LOG_FILE)) == 0
    assert set(pd.read_csv(tmp_path / "train_log.csv")["ot_fallbacks"]) == {0}


# --------------------------------------------------------------------------------------------------
# issue 20: the sampling seed matters; exact parameter counts from the layer sizes


@pytest.mark.parametrize("preset", ["tiny", "tiny_fm_pca_ot"])
def test_sampling_seed_changes_the_cells(tmp_path, train, demo_processed, context, preset):
    params = _params(preset, 2, 100)
    pf.PRiMeFlowModel().fit(train, None, context, params, tmp_path)
    control = demo_processed[demo_processed.obs["is_control"].to_numpy()].copy()
    draw = lambda seed: pf.PRiMeFlowModel().sample(tmp_path, ["KLF1+MAP2K6"], control, 6, context, params,
                                                   {"steps": 3, "guidance_weight": 1.0, "seed": seed})["KLF1+MAP2K6"]
    a, b, c = draw(3), draw(3), draw(4)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-4


def _linear(i, o, bias=True):
    return i * o + (o if bias else 0)


def _conv(i, o, k):
    return i * o * k + o


def _mlp_params(d_in, hidden, d_out, n):
    dims = [d_in] + [hidden] * (n - 1) + [d_out]
    return sum(_linear(a, b) for a, b in zip(dims, dims[1:]))


def _resblock(cin, cout, emb, scale_shift):
    n = 2 * cin + _conv(cin, cout, 3) + _linear(emb, cout * (2 if scale_shift else 1)) + 2 * cout + _conv(cout, cout, 3)
    return n + (_conv(cin, cout, 1) if cin != cout else 0)


def _attention(c):
    return 2 * c + _conv(c, 3 * c, 1) + _conv(c, c, 1)


def _unet_params(h, emb, net):
    """guided-diffusion's UNetModel (1-D, in_channels = h, out_channels = 1), block by block from its
    definition: input conv; per level num_res_blocks ResBlocks (+ attention at the listed downsample rates) and a
    downsample conv except at the last level; middle ResBlock-attention-ResBlock; per level (reversed)
    num_res_blocks + 1 ResBlocks on [h ; skip] (+ attention), an upsample conv closing every level but the first;
    GroupNorm and the output conv."""
    mult, nrb, attn = net["channel_mult"], net["num_res_blocks"], set(net["attention_resolutions"])
    ss, conv = bool(net.get("use_scale_shift_norm", False)), bool(net["conv_resample"])
    total, ch, skips, ds = _conv(h, h * mult[0], 3), h * mult[0], [h * mult[0]], 1
    for level, m in enumerate(mult):
        for _ in range(nrb):
            total += _resblock(ch, h * m, emb, ss) + (_attention(h * m) if ds in attn else 0)
            ch = h * m
            skips.append(ch)
        if level < len(mult) - 1:
            total += _conv(ch, ch, 3) if conv else 0
            skips.append(ch)
            ds *= 2
    total += 2 * _resblock(ch, ch, emb, ss) + _attention(ch)
    for level in reversed(range(len(mult))):
        for i in range(nrb + 1):
            total += _resblock(ch + skips.pop(), h * mult[level], emb, ss)
            ch = h * mult[level]
            total += _attention(ch) if ds in attn else 0
            if level and i == nrb:
                total += _conv(ch, ch, 3) if conv else 0
                ds //= 2
    return total + 2 * ch + _conv(h * mult[0], 1, 3)


def _expected_parameters(params, dim, n_perts, esm_dim, cov_sizes):
    net, h = params["network"], params["network"]["hidden_dim"]
    if params["architecture"] == "unet":
        levels = len(net["channel_mult"])
        padded = -(-dim // 2 ** (levels - 1)) * 2 ** (levels - 1)
        emb = 4 * h
        velocity = (padded * h + _mlp_params(2 * h, h, h, net["n_layers_gene_expression"])
                    + _mlp_params(h, emb, emb, net["n_layers_time"]) + _unet_params(h, emb, net))
    else:
        emb = h
        velocity = (_mlp_params(dim, h, h, net["n_layers_gene_expression"]) + _mlp_params(h, h, h, net["n_layers_time"])
                    + _mlp_params(3 * h, h, dim, net["n_layers_decoding"]))
    # condition: perturbation rows, covariate rows and bias (the first layer), ESM2 projection, unknown and null
    # vectors, then n_layers_conditions - 1 Linear(emb, emb)
    condition = ((n_perts + sum(cov_sizes)) * emb + emb + esm_dim * emb + 2 * emb
                 + (net["n_layers_conditions"] - 1) * _linear(emb, emb))
    return velocity + condition


@pytest.mark.parametrize("name", PAPER)
def test_paper_preset_parameter_counts_are_exact(name, capsys):
    params = model_params({"type": "primeflow", "preset": name})
    dim = N_GENES if params["space"] == "gene" else 50
    cov_values = [[f"c{i}" for i in range(6)], [f"t{i}" for i in range(5)]] if "jiang24" in name else [["k562"]]
    field = pf.build_field(_spec(params, dim, covariate_values=cov_values), seed=0)
    expected = _expected_parameters(params, dim, 300, 320, [len(v) for v in cov_values])
    with capsys.disabled():
        print(f"\n[primeflow] {name}: {expected:,} parameters expected at {dim} {'genes' if dim == N_GENES else 'PCs'}")
    assert pf.count_parameters(field) == expected


# --------------------------------------------------------------------------------------------------
# issue 16.2 / 16.1: which PerturBench release each PRiMeFlow table row runs, recorded beside the transcription

CONFIG = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
LATER_RELEASE = {"cpa": "cpa", "cpa_noadv": "cpa", "sams_vae": "sams_vae", "sams_vae_s": "sams_vae", "biolord": "biolord"}


def _primeflow_tables():
    for name, table in CONFIG["tables"].items():
        if name.startswith("primeflow_table"):
            spec = yaml.safe_load((REPO / table["spec"]).read_text())
            yield name, spec, table["datasets"][spec["cells"][0]["dataset"]]


@pytest.mark.parametrize("table", [t for t in CONFIG["tables"] if t.startswith("primeflow_table")])
def test_table_rows_run_the_later_perturbench_release(table):
    _, spec, dataset = next(t for t in _primeflow_tables() if t[0] == table)
    notes = " ".join(spec["notes"])
    rows = {c["model"] for c in spec["cells"]}
    assert ("biolord" in rows) == (dataset != "jiang24") == ("biolord" in CONFIG["datasets"][dataset]["models"])
    for model in sorted(rows & set(LATER_RELEASE)):
        entry = CONFIG["models"][model]
        params = model_params(entry, dataset=dataset)
        preset = entry.get("preset_by_dataset", {}).get(dataset, entry["preset"])
        assert preset.startswith("neurips2025_") and preset in notes, (model, preset)
        if model != "biolord":  # Biolord's later-release values equal the first release's (same code path)
            assert params["model"]["release"] == "neurips2025", model
    s = model_params(CONFIG["models"]["sams_vae_s"], dataset=dataset)["model"]
    assert s["disable_sparsity"] and s["disable_e_dist"] and s["generative_counterfactual"]  # sams_modified
    assert not model_params(CONFIG["models"]["sams_vae"], dataset=dataset)["model"]["disable_sparsity"]
    normalisation = (CONFIG["scoring"].get("perturbench") or {}).get("rank_normalisation", "n_minus_1")
    assert normalisation == "n_minus_1" and "rank_normalisation: n_minus_1" in notes and "fc13a8c" in notes
    assert "substitute_prob` is 0" in notes

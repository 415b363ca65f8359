"""CellFlow through cellflow-tools: the one-compile sampler (Euler, or the card's adaptive Tsit5) equals
CellFlow.predict, checkpoints reload, an interrupted run resumes to the same weights as an uninterrupted one,
and the sampling seed matters; the velocity field's parameter count at the presets equals the count from the
layer sizes (issue 20)."""


import diffrax
import jax
import numpy as np
import pandas as pd
import pytest

from perturb_repro.config import deep_merge, model_params
from perturb_repro.data.pca import fit_pca
from perturb_repro.models.base import ModelContext
from perturb_repro.models import cellflow as cfm
from perturb_repro.training import Preempted
from fakes import SignalAfter

STEPS = 8


@pytest.fixture(scope="module")
def context(demo_processed):
    genes = sorted({g for c in demo_processed.obs["condition"] for g in c.split("+")} - {"control"})
    rng = np.random.default_rng(0)
    embeddings = {g: rng.normal(size=16).astype(np.float32) for g in genes}
    return ModelContext("norman_demo", "control", fit_pca(demo_processed, 10, seed=0), embeddings, seed=0)


def _params(iterations, every):
    tiny = model_params({"type": "cellflow", "preset": "tiny"})
    return deep_merge(tiny, {"training": {"num_iterations": iterations, "checkpoint_every": every, "batch_size": 64}})


@pytest.fixture(scope="module")
def trained(tmp_path_factory, demo_processed, context):
    train = demo_processed[demo_processed.obs["split"] == "train"].copy()
    ckpt = tmp_path_factory.mktemp("cf")
    cfm.CellFlowModel().fit(train, None, context, _params(20, 10), ckpt)
    return ckpt, train


def _leaves(cf):
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(cf.solver.vf_state.params)]


def test_checkpoint_reloads_with_log(trained):
    ckpt, _ = trained
    cf = cfm.load_cellflow(ckpt)
    assert cf.solver.is_trained
    log = pd.read_csv(ckpt / "train_log.csv")
    assert list(log["step"]) == list(range(20)) and np.isfinite(log["loss"]).all()


def test_euler_sampler_equals_cellflow_predict(trained, demo_processed, context):
    ckpt, _ = trained
    cf = cfm.load_cellflow(ckpt)
    control = demo_processed[demo_processed.obs["is_control"].to_numpy()][:50].copy()
    conditions = ["KLF1", "MAPK1+TGFBR2", "HK2"]
    ours = cfm.EulerSampler(cf, STEPS).predict(cfm._cellflow_view(control, context), conditions, context)

    view = cfm._cellflow_view(control, context)
    view.uns["control_label"] = "control"
    view.uns[cfm.REP_KEY] = cfm._embedding_table(context, sorted(set(context.embeddings) | {"control"}))
    _, _, covariates = cfm.EulerSampler(cf, STEPS).batches(view, conditions)
    # cellflow's own path: representations from view.uns, one ODE solve traced per condition
    theirs = cf.predict(
        view, covariates, sample_rep="X_pca", condition_id_key="condition",
        solver=diffrax.Euler(), dt0=1.0 / STEPS, stepsize_controller=diffrax.ConstantStepSize(),
    )
    for condition in conditions:
        assert ours[condition].shape == (50, 10)
        np.testing.assert_allclose(ours[condition], np.asarray(theirs[condition]), rtol=1e-4, atol=1e-4)
    # conditions are not all mapped to the same cells: the condition reaches the network
    assert not np.allclose(ours["KLF1"], ours["HK2"])


def test_adaptive_solvers_match_analytic_solutions():
    """diffrax_settings' tsit5 / dopri5 (cf.predict's PIDController rtol = atol = 1e-5) solve dy/dt = cos(t) y
    (y(1) = y0 exp(sin 1)) to the tolerance; Euler at 4 steps is far off."""
    y0 = jax.numpy.array([1.0, -2.0, 0.5])
    exact = np.asarray(y0) * np.exp(np.sin(1.0))
    term = diffrax.ODETerm(lambda t, y, args: jax.numpy.cos(t) * y)
    errors = {}
    for solver in ("tsit5", "dopri5", "euler"):
        settings = cfm.diffrax_settings({"solver": solver, "steps": 4})
        y1 = diffrax.diffeqsolve(term, t0=0.0, t1=1.0, y0=y0, **settings).ys[0]
        errors[solver] = float(np.abs(np.asarray(y1) - exact).max())
    assert errors["tsit5"] < 1e-4 and errors["dopri5"] < 1e-4
    assert errors["euler"] > 100 * max(errors["tsit5"], errors["dopri5"])
    tight = cfm.diffrax_settings({"solver": "tsit5", "rtol": 1e-9, "atol": 1e-9, "max_steps": 1000})
    np.testing.assert_allclose(np.asarray(diffrax.diffeqsolve(term, t0=0.0, t1=1.0, y0=y0, **tight).ys[0]), exact,
                               rtol=1e-6, atol=1e-6)  # float32 (JAX's default) floor
    with pytest.raises(ValueError, match="solver"):
        cfm.diffrax_settings({"solver": "rk4"})


def test_tsit5_sampler_equals_cellflow_predict_defaults(trained, demo_processed, context):
    """solver: tsit5 is what cf.predict does with no solver arguments (the card's run); it differs from Euler
    at 2 steps."""
    ckpt, _ = trained
    cf = cfm.load_cellflow(ckpt)
    control = demo_processed[demo_processed.obs["is_control"].to_numpy()][:30].copy()
    conditions = ["KLF1", "HK2"]
    ours = cfm.FlowSampler(cf, {"solver": "tsit5"}).predict(cfm._cellflow_view(control, context), conditions, context)
    view = cfm._cellflow_view(control, context)
    view.uns["control_label"] = "control"
    view.uns[cfm.REP_KEY] = cfm._embedding_table(context, sorted(set(context.embeddings) | {"control"}))
    _, _, covariates = cfm.EulerSampler(cf, 2).batches(view, conditions)
    theirs = cf.predict(view, covariates, sample_rep="X_pca", condition_id_key="condition")
    euler = cfm.EulerSampler(cf, 2).predict(cfm._cellflow_view(control, context), conditions, context)
    for condition in conditions:
        # the same adaptive solve up to where float round-off moves an accepted step (params as an argument here,
        # closed over there): global error of the order of the tolerance
        gap = np.abs(ours[condition] - np.asarray(theirs[condition])).max()
        assert gap < 1e-3
        assert np.abs(ours[condition] - euler[condition]).max() > 10 * max(gap, 1e-4)


def test_a_different_sampling_seed_gives_different_cells(trained, demo_processed, context):
    ckpt, _ = trained
    control = demo_processed[demo_processed.obs["is_control"].to_numpy()].copy()
    params = _params(20, 10)

    def run(seed):
        return cfm.CellFlowModel().sample(ckpt, ["KLF1"], control, 20, context, params, {"steps": 2, "seed": seed})["KLF1"]

    one, again, other = run(1), run(1), run(2)
    np.testing.assert_array_equal(one, again)
    assert not np.allclose(one, other)


def test_resume_reaches_the_same_weights(tmp_path, trained, context):
    ckpt_full, train = trained
    interrupted = tmp_path / "resumed"
    cfm.CellFlowModel().fit(train, None, context, _params(10, 10), interrupted)  # stopped after 10 steps
    cfm.CellFlowModel().fit(train, None, context, _params(20, 10), interrupted)  # rerun continues to 20
    log = pd.read_csv(interrupted / "train_log.csv")
    assert list(log["step"]) == list(range(20))
    for a, b in zip(_leaves(cfm.load_cellflow(ckpt_full)), _leaves(cfm.load_cellflow(interrupted))):
        np.testing.assert_array_equal(a, b)




def test_sigterm_saves_and_exits_nonzero(tmp_path, monkeypatch, trained, context):
    _, train = trained
    monkeypatch.setattr(cfm, "StopFlag", lambda: SignalAfter(3))
    with pytest.raises(Preempted):
        cfm.CellFlowModel().fit(train, None, context, _params(20, 10), tmp_path)
    state = (tmp_path / cfm.STATE_FILE).read_text()
    assert '"step": 4' in state  # saved where it stopped, not at a checkpoint boundary


def test_one_model_object_loads_and_compiles_once_and_samples_as_fresh_ones(trained, demo_processed, context,
                                                                            monkeypatch):
    """steps.predict_step calls sample() once per condition on one model object: the checkpoint is loaded and
    the FlowSampler (one jit) built once per job and solver, and each call's cells equal a fresh object's."""
    ckpt, _ = trained
    control = demo_processed[demo_processed.obs["is_control"].to_numpy()].copy()
    params = _params(20, 10)
    sampling = {"steps": 2, "solver": "euler"}
    fresh = {(c, s): cfm.CellFlowModel().sample(ckpt, [c], control, 20, context, params, {**sampling, "seed": s})[c]
             for c, s in (("KLF1", 1), ("HK2", 2), ("KLF1", 3))}
    loads, builds = [], []
    load, init = cfm.load_cellflow, cfm.FlowSampler.__init__
    monkeypatch.setattr(cfm, "load_cellflow", lambda d: loads.append(d) or load(d))
    monkeypatch.setattr(cfm.FlowSampler, "__init__", lambda self, cf, s: builds.append(dict(s)) or init(self, cf, s))
    model = cfm.CellFlowModel()
    for (condition, seed), expected in fresh.items():
        got = model.sample(ckpt, [condition], control, 20, context, params, {**sampling, "seed": seed})[condition]
        assert got.tobytes() == np.asarray(expected).tobytes()
    assert len(loads) == 1 and len(builds) == 1
    model.sample(ckpt, ["KLF1"], control, 20, context, params, {**sampling, "steps": 3, "seed": 1})
    assert len(loads) == 1 and len(builds) == 2  # another sampler setting compiles its own solve


# --- issue 20: exact velocity-field parameter counts at the presets, from the architecture's layer sizes ---
# Input dims the pipeline feeds CellFlow on Norman: config/config.yaml datasets.norman.pca.n_components (50 PCs);
# the card's gene embedding facebook/esm2_t6_8M_UR50D, hidden size 320; GENE_COLUMNS slots per combination (2).
ESM2_T6_8M_DIM = 320
CF = "cellflow-tools 0.0.6 cellflow/networks/"  # the source every formula line below transcribes


def _norman_pcs():
    import yaml
    from conftest import REPO

    return int(yaml.safe_load((REPO / "config" / "config.yaml").read_text())["datasets"]["norman"]["pca"]["n_components"])


def _dense(n_in, n_out):
    # flax nn.Dense: kernel (n_in, n_out) + bias (n_out)
    return n_in * n_out + n_out


def _mlp(n_in, dims):
    # _utils.py:71-74 MLPBlock: one nn.Dense per entry of dims, each fed the previous one's width
    total, width = 0, n_in
    for d in dims:
        total, width = total + _dense(width, d), d
    return total


def _vf_param_count(model, data_dim, embedding_dim):
    """ConditionalVelocityField's parameter count for CellFlow.prepare_model(**model), counted by hand."""
    # the preset runs prepare_model's defaults for everything it does not set (model/_cellflow.py:230-257)
    assert model.get("condition_mode", "deterministic") == "deterministic"      # no after_pool_modules_var
    assert model.get("conditioning", "concatenation") == "concatenation"        # no film/resnet block
    assert not model.get("layer_norm_before_concatenation", False)              # no LayerNorm params
    assert model["pooling"] == "attention_token"
    # ConditionEncoder (_set_encoders.py:80-88): separate layers per covariate; _utils.py:487-504 _get_layers
    before = 0
    widths = []
    for layers in model["layers_before_pool"].values():
        assert layers["layer_type"] == "mlp"
        before += _mlp(embedding_dim, layers["dims"])
        widths.append(layers["dims"][-1])
    pooled = sum(widths)  # _set_encoders.py:143 concatenates the per-covariate outputs on the last axis
    # _utils.py:465 TokenAttentionPooling: nn.Embed(num_embeddings=1, features=x.shape[-1])
    token = pooled
    # _utils.py:474-478 nn.MultiHeadDotProductAttention(num_heads, qkv_features=qkv_dim), defaults _utils.py:436-437;
    # flax: query/key/value DenseGeneral (in, heads, head_dim) + bias, out (heads, head_dim, in) + bias (out_features
    # defaults to the input width)
    pooling = dict(model.get("pooling_kwargs") or {})
    qkv = pooling.get("qkv_dim", 64)
    attention = 3 * _dense(pooled, qkv) + _dense(qkv, pooled)
    # _set_encoders.py:99 _get_layers(layers_after_pool, output_dim): MLPBlock(s) then nn.Dense(output_dim)
    after_layers = model["layers_after_pool"]
    assert after_layers["layer_type"] == "mlp"
    after = _mlp(pooled, after_layers["dims"]) + _dense(after_layers["dims"][-1], model["condition_embedding_dim"])
    condition_encoder = before + token + attention + after
    # _velocity_field.py:144-149, 203-204: MLPBlock(time_encoder_dims) on ott's cyclical encoding (2 * time_freqs:
    # cos and sin of each frequency, ott/neural/networks/layers/time_encoder.py:32-34)
    time_encoder = _mlp(2 * model["time_freqs"], model["time_encoder_dims"])
    # _velocity_field.py:152-157, 205: MLPBlock(hidden_dims) on x_t (the data dim)
    x_encoder = _mlp(data_dim, model["hidden_dims"])
    # _velocity_field.py:160-165, 217, 225: MLPBlock(decoder_dims) on concat(t_encoded, x_encoded, cond_embedding)
    concat = model["time_encoder_dims"][-1] + model["hidden_dims"][-1] + model["condition_embedding_dim"]
    decoder = _mlp(concat, model["decoder_dims"])
    # _velocity_field.py:167 nn.Dense(output_dim), output_dim = the data dim (model/_cellflow.py:429)
    output_layer = _dense(model["decoder_dims"][-1], data_dim)
    return condition_encoder + time_encoder + x_encoder + decoder + output_layer


@pytest.fixture(scope="module")
def norman_dims_context(demo_processed):
    """The demo cells with Norman's input dims: train-fitted 50-PC basis, 320-dim gene vectors."""
    train = demo_processed[demo_processed.obs["split"] == "train"].copy()
    genes = sorted({g for c in demo_processed.obs["condition"] for g in c.split("+")} - {"control"})
    rng = np.random.default_rng(0)
    embeddings = {g: rng.normal(size=ESM2_T6_8M_DIM).astype(np.float32) for g in genes}
    context = ModelContext("norman_demo", "control", fit_pca(train, _norman_pcs(), seed=0), embeddings, seed=0)
    return train, context


def _built_count(train, context, params):
    # what workflow/bench/bench.py reports as n_params_vf: the leaves of the built velocity field's params
    cf = cfm.build_cellflow(train, context, params)
    assert cf.vf.output_dim == _norman_pcs() and cf.vf.max_combination_length == len(cfm.GENE_COLUMNS)
    return int(sum(leaf.size for leaf in jax.tree_util.tree_leaves(cf.solver.vf_state.params)))


@pytest.mark.parametrize("preset", ["paper", "tiny"])
def test_velocity_field_parameter_count_equals_the_layer_size_formula(preset, norman_dims_context):
    params = model_params({"type": "cellflow", "preset": preset})
    expected = _vf_param_count(params["model"], _norman_pcs(), ESM2_T6_8M_DIM)
    assert _built_count(*norman_dims_context, params) == expected


def test_a_changed_dim_changes_both_the_formula_and_the_build(norman_dims_context):
    import copy

    params = model_params({"type": "cellflow", "preset": "paper"})
    original = _vf_param_count(params["model"], _norman_pcs(), ESM2_T6_8M_DIM)
    planted = copy.deepcopy(params)
    planted["model"]["layers_after_pool"]["dims"][0] = 1000  # was 1024
    changed = _vf_param_count(planted["model"], _norman_pcs(), ESM2_T6_8M_DIM)
    built = _built_count(*norman_dims_context, planted)
    assert changed != original and built != original
    assert built == changed

"""scGPT perturbation fine-tuning: the network has scGPT's exact layout, the official checkpoint
layout loads through the real path (flash-attention names, prefixes, strictness), training and
sampling work on the demo, a preempted run resumes to the same weights, early stopping follows the
validation curve."""

import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from perturb_repro.config import deep_merge, model_params
from perturb_repro.models import _scgpt_loading as loading
from perturb_repro.models import scgpt as sg
from perturb_repro.models import scgpt_training as sg_training
from perturb_repro.errors import PipelineInputError
from perturb_repro.models.base import ModelContext
from perturb_repro.training import Preempted
import perturb_repro.trainer as trainer_mod
from fakes import SignalAfter
from seeds import needs_seeds, seed_path

LAYOUT = Path(__file__).parent / "data" / "scgpt_whole_human_layout.json"
torch.set_num_threads(1)


# --------------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def context(demo_processed):
    genes = sorted({g for c in demo_processed.obs["condition"] for g in c.split("+")} - {"control"})
    rng = np.random.default_rng(0)
    return ModelContext("norman_demo", "control", None, {g: rng.normal(size=8).astype(np.float32) for g in genes}, seed=3)


@pytest.fixture(scope="module")
def small(demo_processed):
    """All train controls, a few train conditions, three val conditions: a few steps per epoch."""
    obs = demo_processed.obs
    train_conditions = ["control", "MAP4K5", "FOXO4", "MIDN"]
    train = demo_processed[(obs["split"] == "train") & obs["condition"].isin(train_conditions)].copy()
    val_conditions = sorted(demo_processed[obs["split"] == "val"].obs["condition"].unique())[:3]
    val = demo_processed[(obs["split"] == "val") & obs["condition"].isin(val_conditions)].copy()
    return train, val


def _params(**training):
    tiny = model_params({"type": "scgpt", "preset": "tiny"})
    # dropout > 0 so resume equivalence covers the per-step seeding of dropout too
    base = {"data": {"max_seq_len": 64}, "model": {"d_model": 16, "nhead": 2, "d_hid": 16, "dropout": 0.1},
            "training": {"max_epochs": 2, "batch_size": 32, "checkpoint_every": 0, "val_max_cells_per_condition": 8,
                         "eval_batch_size": 64}}
    return deep_merge(deep_merge(tiny, base), {"training": training})


# A tiny model in the official checkpoint layout: the pretraining TransformerModel's keys, with the
# attention saved from flash-attention layers (self_attn.Wqkv) and its pretraining heads.
ARGS = {"embsize": 16, "nheads": 2, "d_hid": 24, "nlayers": 2, "n_layers_cls": 3, "dropout": 0.2, "pad_value": -2,
        "fast_transformer": True, "max_seq_len": 1200}
EXTRA_KEYS = {  # pretraining heads scGPT's perturbation fine-tuning leaves out
    "decoder.fc.0.weight": (16, 16), "decoder.fc.0.bias": (16,), "decoder.fc.2.weight": (16, 16),
    "decoder.fc.2.bias": (16,), "decoder.fc.4.weight": (1, 16), "decoder.fc.4.bias": (1,),
    "cls_decoder.out_layer.weight": (1, 16), "cls_decoder.out_layer.bias": (1,),
    "mvc_decoder.gene2query.weight": (16, 16), "mvc_decoder.gene2query.bias": (16,), "mvc_decoder.W.weight": (16, 16),
    "flag_encoder.weight": (2, 16),
}


def official_state(n_tokens: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Written from scGPT's module definitions (not from our classes), values random."""
    g = torch.Generator().manual_seed(seed)
    d, h = ARGS["embsize"], ARGS["d_hid"]
    shapes = {"encoder.embedding.weight": (n_tokens, d), "encoder.enc_norm.weight": (d,), "encoder.enc_norm.bias": (d,),
              "value_encoder.linear1.weight": (d, 1), "value_encoder.linear1.bias": (d,),
              "value_encoder.linear2.weight": (d, d), "value_encoder.linear2.bias": (d,),
              "value_encoder.norm.weight": (d,), "value_encoder.norm.bias": (d,)}
    for i in range(ARGS["nlayers"]):
        p = f"transformer_encoder.layers.{i}"
        shapes.update({f"{p}.self_attn.Wqkv.weight": (3 * d, d), f"{p}.self_attn.Wqkv.bias": (3 * d,),
                       f"{p}.self_attn.out_proj.weight": (d, d), f"{p}.self_attn.out_proj.bias": (d,),
                       f"{p}.linear1.weight": (h, d), f"{p}.linear1.bias": (h,), f"{p}.linear2.weight": (d, h),
                       f"{p}.linear2.bias": (d,), f"{p}.norm1.weight": (d,), f"{p}.norm1.bias": (d,),
                       f"{p}.norm2.weight": (d,), f"{p}.norm2.bias": (d,)})
    shapes.update(EXTRA_KEYS)
    return {k: torch.randn(s, generator=g) for k, s in shapes.items()}


def write_official(directory: Path, genes, state=None, vocab_extra=("<pad>", "<cls>", "<eoc>")) -> dict:
    directory.mkdir(parents=True, exist_ok=True)
    tokens = list(vocab_extra) + list(genes)
    vocab = {t: i for i, t in enumerate(tokens)}
    (directory / "args.json").write_text(json.dumps(ARGS))
    (directory / "vocab.json").write_text(json.dumps(vocab))
    state = official_state(len(vocab)) if state is None else state
    torch.save(state, directory / "best_model.pt")
    return state


@pytest.fixture(scope="module")
def official(tmp_path_factory, demo_processed, context):
    """Vocabulary: every demo gene but the first three, plus the perturbed genes with embeddings."""
    genes = [g for g in demo_processed.var_names[3:]] + sorted(set(context.embeddings) - set(demo_processed.var_names))
    directory = tmp_path_factory.mktemp("scGPT_human_tiny")
    state = write_official(directory, genes)
    return directory, state, list(demo_processed.var_names[:3])


# --------------------------------------------------------------------------------------------
# architecture
# --------------------------------------------------------------------------------------------


def test_whole_human_build_matches_scgpt_layout():
    layout = json.loads(LAYOUT.read_text())
    cfg = layout["config"]
    arch = {"ntoken": cfg["ntoken"], "d_model": cfg["d_model"], "nhead": cfg["nhead"], "d_hid": cfg["d_hid"],
            "nlayers": cfg["nlayers"], "nlayers_cls": cfg["nlayers_cls"], "n_cls": cfg["n_cls"], "dropout": 0.0,
            "pad_token_id": 60694, "pert_pad_id": 2}
    with torch.device("meta"):
        net = sg.build_network(arch)
    ours = {k: list(v.shape) for k, v in net.state_dict().items()}
    assert list(ours.items()) == list(layout["parameters"].items())  # same names, shapes and order
    assert list(ours) == [k for k, _ in net.named_parameters()]  # no buffers
    assert sum(p.numel() for p in net.parameters()) == layout["n_parameters"] == 51_859_459


def test_gene_prior_adds_only_its_own_parameters():
    arch = {"ntoken": 50, "d_model": 8, "nhead": 2, "d_hid": 8, "nlayers": 1, "nlayers_cls": 3, "n_cls": 1,
            "dropout": 0.0, "pad_token_id": 0, "pert_pad_id": 2}
    plain, prior = sg.build_network(arch), sg.build_network(arch, prior_rows=5, prior_dim=4)
    extra = set(prior.state_dict()) - set(plain.state_dict())
    assert extra == {"gene_prior.table", "gene_prior.proj.weight", "gene_prior.proj.bias"}
    assert "gene_prior.table" not in dict(prior.named_parameters())  # frozen
    rows = torch.tensor([[0, 1, 2]])
    prior.gene_prior.proj.weight.data.normal_()
    prior.gene_prior.proj.bias.data.normal_()
    prior.gene_prior.table.normal_()
    out = prior.gene_prior(rows)
    assert torch.all(out[0, 0] == 0) and torch.all(out[0, 1] != 0)  # row 0: no prior, not even the bias


# --------------------------------------------------------------------------------------------
# loading the official checkpoint
# --------------------------------------------------------------------------------------------


def test_official_checkpoint_loads_through_the_real_path(tmp_path, official, demo_processed, context):
    directory, state, absent = official
    train = demo_processed[demo_processed.obs["split"] == "train"].copy()
    params = deep_merge(_params(), {"pretrained_dir": str(directory)})
    net, space, meta = sg.build_for_training(train, context, params, tmp_path)

    # architecture from args.json, not from the preset
    assert (meta["arch"]["d_model"], meta["arch"]["nhead"], meta["arch"]["d_hid"], meta["arch"]["nlayers"]) == (16, 2, 24, 2)
    loaded = net.state_dict()
    prefixed = [k for k in state if k.split(".")[0] in loading.LOAD_PREFIXES]
    for key in prefixed:
        ours = key.replace("self_attn.Wqkv.weight", "self_attn.in_proj_weight").replace("self_attn.Wqkv.bias", "self_attn.in_proj_bias")
        assert torch.equal(loaded[ours], state[key]), key
    report = json.loads((tmp_path / sg.LOAD_REPORT_FILE).read_text())
    assert sorted(report["left_out"]) == sorted(EXTRA_KEYS)
    assert len(report["renamed"]) == 2 * ARGS["nlayers"]
    assert "pert_encoder.weight" in report["fresh"] and "decoder.coeff_decoder.fc.0.weight" in report["fresh"]
    assert not any(k.split(".")[0] in loading.LOAD_PREFIXES for k in report["fresh"])

    # genes absent from the vocabulary are reported and dropped
    gene_space = json.loads((tmp_path / sg.GENE_SPACE_FILE).read_text())
    assert gene_space["dropped_not_in_vocab"] == absent == space.dropped
    assert space.n_kept == demo_processed.n_vars - 3


def test_dropped_genes_keep_the_control_value(tmp_path, official, demo_processed, context):
    directory, _, absent = official
    train = demo_processed[demo_processed.obs["split"] == "train"].copy()
    net, space, _ = sg.build_for_training(train, context, deep_merge(_params(), {"pretrained_dir": str(directory)}), tmp_path)
    x = np.asarray(train[train.obs["is_control"].to_numpy()][:5].X.toarray(), dtype=np.float32)
    pred = sg.predict_cells(net, space, x, "KLF1", 8, torch.device("cpu"), False)
    dropped = [list(train.var_names).index(g) for g in absent]
    np.testing.assert_array_equal(pred[:, dropped], np.clip(x[:, dropped], 0, None))
    assert pred.shape == x.shape and np.all(pred >= 0) and np.isfinite(pred).all()


def test_misshaped_key_fails_with_its_name(tmp_path, demo_processed, context):
    genes = list(demo_processed.var_names)
    state = official_state(len(genes) + 3)
    state["transformer_encoder.layers.1.linear1.weight"] = torch.zeros(ARGS["d_hid"] + 1, ARGS["embsize"])
    write_official(tmp_path / "ckpt", genes, state)
    train = demo_processed[demo_processed.obs["split"] == "train"].copy()
    params = deep_merge(_params(), {"pretrained_dir": str(tmp_path / "ckpt")})
    with pytest.raises(loading.CheckpointMismatch, match=r"transformer_encoder\.layers\.1\.linear1\.weight"):
        sg.build_for_training(train, context, params, tmp_path / "out")


def test_missing_or_unknown_prefixed_key_fails_with_its_name(tmp_path, demo_processed, context):
    genes = list(demo_processed.var_names)
    train = demo_processed[demo_processed.obs["split"] == "train"].copy()
    state = official_state(len(genes) + 3)
    del state["transformer_encoder.layers.0.norm2.bias"]
    write_official(tmp_path / "a", genes, state)
    with pytest.raises(loading.CheckpointMismatch, match=r"transformer_encoder\.layers\.0\.norm2\.bias"):
        sg.build_for_training(train, context, deep_merge(_params(), {"pretrained_dir": str(tmp_path / "a")}), tmp_path / "o1")
    state = official_state(len(genes) + 3)
    state["value_encoder.linear3.weight"] = torch.zeros(2, 2)
    write_official(tmp_path / "b", genes, state)
    with pytest.raises(loading.CheckpointMismatch, match=r"value_encoder\.linear3\.weight"):
        sg.build_for_training(train, context, deep_merge(_params(), {"pretrained_dir": str(tmp_path / "b")}), tmp_path / "o2")


def test_vocab_appends_missing_special_tokens(tmp_path):
    (tmp_path / "vocab.json").write_text(json.dumps({"<pad>": 0, "A": 1, "B": 2}))
    assert loading.read_vocab(tmp_path / "vocab.json") == {"<pad>": 0, "A": 1, "B": 2, "<cls>": 3, "<eoc>": 4}
    (tmp_path / "vocab.json").write_text(json.dumps({"<pad>": 0, "A": 2}))
    with pytest.raises(ValueError, match="consecutive"):
        loading.read_vocab(tmp_path / "vocab.json")


# --------------------------------------------------------------------------------------------
# tokens
# --------------------------------------------------------------------------------------------


def test_assemble_flags_panel_genes_and_appends_genes_outside_the_panel():
    vocab = {g: i for i, g in enumerate(["<pad>", "<cls>", "<eoc>", "A", "B", "C", "D", "OUT"])}
    space = sg.GeneSpace(["A", "B", "C", "D", "NOVOCAB"], vocab, "ctrl", prior_genes=["OUT", "B"])
    assert space.dropped == ["NOVOCAB"] and list(space.kept) == [0, 1, 2, 3]
    tokens = [space.tokens("B"), space.tokens("OUT+C"), space.tokens("UNKNOWN+OUT"), space.tokens("ctrl")]
    assert tokens[2].unknown == ["UNKNOWN"]
    x = np.arange(16, dtype=np.float32).reshape(4, 4)
    b = sg.assemble(space, x, tokens, None, pert_pad_id=2, pad_value=-2.0, use_prior=True)
    assert b.n_panel == 4 and b.src.shape == (4, 6)
    assert b.src[0].tolist() == [3, 4, 5, 6, 0, 0] and b.flags[0].tolist() == [0, 1, 0, 0, 2, 2]
    assert b.src[1].tolist() == [3, 4, 5, 6, 7, 0] and b.flags[1].tolist() == [0, 0, 1, 0, 1, 2]
    assert b.src[2].tolist() == [3, 4, 5, 6, 0, 7] and b.flags[2].tolist() == [0, 0, 0, 0, 1, 1]
    assert b.flags[3].tolist() == [0, 0, 0, 0, 2, 2]
    assert b.padding.tolist() == [[False] * 4 + [True, True], [False] * 5 + [True], [False] * 6, [False] * 4 + [True, True]]
    assert b.values[1].tolist() == [4, 5, 6, 7, -2, -2]
    assert b.prior[1].tolist() == [0, 2, 0, 0, 1, 0]
    # a gene subset: the perturbed panel gene outside it carries no flag; extra tokens always stay
    sub = sg.assemble(space, x[:2], tokens[:2], np.array([0, 2]), 2, 0.0, False)
    assert sub.src.tolist() == [[3, 5, 0], [3, 5, 7]]
    assert sub.flags.tolist() == [[0, 0, 2], [0, 1, 1]] and sub.prior is None


def test_gene_subset_is_capped_and_seeded():
    assert sg.gene_subset(100, 200, 0, 5) is None
    a, b = sg.gene_subset(100, 30, 0, 5), sg.gene_subset(100, 30, 0, 5)
    assert len(a) == 30 and len(set(a.tolist())) == 30 and np.array_equal(a, b)
    assert not np.array_equal(a, sg.gene_subset(100, 30, 0, 6))


# --------------------------------------------------------------------------------------------
# training, sampling, resume, early stopping
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory, small, context):
    train, val = small
    ckpt = tmp_path_factory.mktemp("scgpt")
    sg.ScGPTModel().fit(train, val, context, _params(checkpoint_every=3), ckpt)
    return ckpt


def test_fit_writes_logs_and_sample_predicts(trained, small, demo_processed, context):
    ckpt = trained
    train, _ = small
    stats = json.loads((ckpt / sg.STATS_FILE).read_text())
    assert stats["epochs_trained"] == 2 and stats["stop_reason"] == "max_epochs" and stats["best_epoch"] in (1, 2)
    assert math.isfinite(stats["best_val_pearson_delta"])
    epochs = pd.read_csv(ckpt / sg.EPOCH_LOG)
    assert list(epochs["epoch"]) == [1, 2] and np.isfinite(epochs[["train_loss", "val_mse", "val_pearson_delta"]]).all().all()
    steps_per_epoch = len(train) // 32
    log = pd.read_csv(ckpt / "train_log.csv")
    assert list(log["step"]) == list(range(2 * steps_per_epoch)) and np.isfinite(log["loss"]).all()

    control = demo_processed[demo_processed.obs["is_control"].to_numpy()].copy()
    conditions = ["KLF1", "MAPK1+TGFBR2", "HK2"]  # unseen in this small train set
    sampling = {"seed": 0}
    out = sg.ScGPTModel().sample(ckpt, conditions, control, 12, context, _params(), sampling)
    again = sg.ScGPTModel().sample(ckpt, conditions, control, 12, context, _params(), sampling)
    for c in conditions:
        assert out[c].shape == (12, demo_processed.n_vars) and out[c].dtype == np.float32
        assert np.isfinite(out[c]).all() and (out[c] >= 0).all()
        np.testing.assert_array_equal(out[c], again[c])  # seeded control cells
    assert not np.allclose(out["KLF1"], out["HK2"])  # the perturbation reaches the network


def test_fit_from_pretrained_with_esm2_prior(tmp_path, official, small, demo_processed, context):
    directory, _, absent = official
    train, val = small
    params = deep_merge(_params(max_epochs=1), {"pretrained_dir": str(directory), "gene_prior": "esm2"})
    sg.ScGPTModel().fit(train, val, context, params, tmp_path)
    meta = json.loads((tmp_path / sg.MODEL_FILE).read_text())
    assert meta["prior"]["genes"] == sorted(context.embeddings) and meta["arch"]["d_model"] == ARGS["embsize"]
    best = _weights(tmp_path / sg.BEST_FILE)
    assert torch.equal(best["gene_prior.table"][1:], torch.from_numpy(np.stack([context.embeddings[g] for g in sorted(context.embeddings)])))
    assert best["gene_prior.proj.weight"].abs().sum() > 0  # the projection trained away from its zero start
    control = demo_processed[demo_processed.obs["is_control"].to_numpy()].copy()
    out = sg.ScGPTModel().sample(tmp_path, ["KLF1", "CBL+UBASH3B"], control, 6, context, params, {"seed": 1})
    dropped = [list(demo_processed.var_names).index(g) for g in absent]
    x = np.asarray(control.X.toarray() if hasattr(control.X, "toarray") else control.X, dtype=np.float32)
    pick = np.random.default_rng(1).choice(control.n_obs, size=6, replace=False)
    for cells in out.values():
        assert cells.shape == (6, demo_processed.n_vars) and np.isfinite(cells).all() and (cells >= 0).all()
        np.testing.assert_array_equal(cells[:, dropped], x[pick][:, dropped])  # the sampled control cells' values


def _weights(path):
    state = torch.load(path, weights_only=True)
    return state.get("model", state)




def _assert_same_run(full: Path, resumed: Path) -> None:
    for name in (sg.LAST_FILE, sg.BEST_FILE):
        a, b = _weights(full / name), _weights(resumed / name)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)
    pd.testing.assert_frame_equal(pd.read_csv(full / "train_log.csv"), pd.read_csv(resumed / "train_log.csv"))
    a, b = pd.read_csv(full / sg.EPOCH_LOG), pd.read_csv(resumed / sg.EPOCH_LOG)
    pd.testing.assert_frame_equal(a.drop(columns="seconds"), b.drop(columns="seconds"))
    sa, sb = (json.loads((d / sg.STATS_FILE).read_text()) for d in (full, resumed))
    for s in (sa, sb):
        s.pop("wall_clock_seconds")
    assert sa == sb


def test_preempted_run_resumes_to_the_same_weights(tmp_path, monkeypatch, trained, small, context):
    train, val = small
    steps_per_epoch = len(train) // 32
    assert steps_per_epoch > 3
    with monkeypatch.context() as m:
        # the trainer polls the flag once per step; SIGTERM lands mid-epoch 1
        m.setattr(trainer_mod, "StopFlag", lambda: SignalAfter(2))
        with pytest.raises(Preempted):
            sg.ScGPTModel().fit(train, val, context, _params(checkpoint_every=3), tmp_path)
    state = json.loads((tmp_path / sg.STATE_FILE).read_text())
    assert state == {"step": 3, "done": False} and 3 < steps_per_epoch  # saved where it stopped, mid-epoch 1
    sg.ScGPTModel().fit(train, val, context, _params(checkpoint_every=3), tmp_path)
    _assert_same_run(trained, tmp_path)


def test_resume_mid_epoch_2_keeps_best_weights_schedule_and_counters(tmp_path, monkeypatch, trained, small, context):
    """Cut after epoch 1 validated (best weights, StepLR, early stopping and the history live in the task's
    state) and mid-epoch 2 (a checkpoint written on the signal between two periodic ones): same run."""
    train, val = small
    steps_per_epoch = len(train) // 32
    cut = steps_per_epoch + 2
    assert cut % 3 and cut < 2 * steps_per_epoch  # not a periodic checkpoint, and mid-epoch
    with monkeypatch.context() as m:
        m.setattr(trainer_mod, "StopFlag", lambda: SignalAfter(cut - 1))
        with pytest.raises(Preempted):
            sg.ScGPTModel().fit(train, val, context, _params(checkpoint_every=3), tmp_path)
    assert json.loads((tmp_path / sg.STATE_FILE).read_text()) == {"step": cut, "done": False}
    assert list(pd.read_csv(tmp_path / sg.EPOCH_LOG)["epoch"]) == [1]
    sg.ScGPTModel().fit(train, val, context, _params(checkpoint_every=3), tmp_path)
    _assert_same_run(trained, tmp_path)


def test_paper_presets_train_in_fp16_and_cpu_stays_fp32(tmp_path, trained):
    for preset in ("paper_replogle", "paper_replogle_esm2", "paper_norman"):
        training = model_params({"type": "scgpt", "preset": preset})["training"]
        config = sg.trainer_config(training, 0)
        assert config.precision == "fp16", preset  # the card's AMP: autocast + GradScaler
        assert config.grad_clip == 1.0 and config.total_steps is None and config.device == "auto"
    # the older `amp` key maps onto the trainer's precision; `precision` wins when both are set
    assert sg.precision_of({"amp": True}) == "fp16" and sg.precision_of({"amp": False}) == "fp32"
    assert sg.precision_of({"amp": True, "precision": "bf16"}) == "bf16"
    # on CPU the trainer uses fp32 (no autocast, no scaler): what the demo run recorded
    cpu = trainer_mod.Trainer(sg.trainer_config({"precision": "fp16", "device": "cpu"}, 0), tmp_path, kind="scgpt")
    assert cpu.precision_used == "fp32"
    assert json.loads((trained / sg.STATS_FILE).read_text())["precision"] == "fp32"


def _run_curve(curve, patience):
    stop = sg.EarlyStopping(patience=patience)
    for epoch, score in enumerate(curve, start=1):
        stop.update(epoch, score)
        if stop.should_stop:
            return epoch, stop
    return None, stop


def test_early_stopping_rule():
    # an equal score is no improvement and NaN counts as a bad epoch (scGPT: `val_score > best`)
    curve = [0.10, 0.30, 0.25, float("nan"), 0.30, 0.31, 0.2, 0.2, 0.2, 0.2]
    stopped_at, stop = _run_curve(curve, patience=3)
    assert stopped_at == 5 and stop.best_epoch == 2 and stop.best == pytest.approx(0.30)
    stopped_at, stop = _run_curve(curve, patience=4)
    assert stopped_at == 10 and stop.best_epoch == 6 and stop.best == pytest.approx(0.31)
    assert _run_curve(curve[:7], patience=4)[0] is None  # ran out of epochs first
    assert sg.EarlyStopping.from_dict(stop.as_dict()) == stop
    assert sg.EarlyStopping.from_dict(sg.EarlyStopping(2).as_dict()).best == -math.inf


def test_fit_stops_early_and_keeps_the_best_epoch(tmp_path, monkeypatch, small, context):
    train, val = small
    curve = iter([0.1, 0.5, 0.2, float("nan"), 0.45, 0.9])
    snapshots = {}

    def scripted(net, space, val_, x_val, control_x, params, device, amp, seed, epoch, pad_value):
        snapshots[epoch + 1] = {k: v.clone() for k, v in net.state_dict().items()}
        return {"pearson_delta": next(curve), "mse": 0.0, "n_conditions": 1}

    monkeypatch.setattr(sg_training, "validate", scripted)
    sg.ScGPTModel().fit(train, val, context, _params(max_epochs=10, early_stop_patience=3), tmp_path)
    stats = json.loads((tmp_path / sg.STATS_FILE).read_text())
    assert stats["stop_reason"] == "early_stop" and stats["epochs_trained"] == 5 and stats["best_epoch"] == 2
    assert stats["best_val_pearson_delta"] == 0.5
    best = _weights(tmp_path / sg.BEST_FILE)
    assert all(torch.equal(best[k], snapshots[2][k]) for k in best)
    assert not all(torch.equal(best[k], snapshots[5][k]) for k in best)
    epochs = pd.read_csv(tmp_path / sg.EPOCH_LOG)
    assert list(epochs["best_epoch"]) == [1, 2, 2, 2, 2]
    # a rerun of a finished (early-stopped) run trains no further
    sg.ScGPTModel().fit(train, val, context, _params(max_epochs=10, early_stop_patience=3), tmp_path)
    assert json.loads((tmp_path / sg.STATS_FILE).read_text())["epochs_trained"] == 5


# --------------------------------------------------------------------------------------------
# data parallelism (2 gloo processes on CPU)
# --------------------------------------------------------------------------------------------

# dropout 0: masks are drawn per process, so with dropout the two runs differ by design
DDP_PARAMS = {"model": {"dropout": 0.0}, "training": {"device": "cpu", "progress": False}}


def _ddp_fit(data_dir: str, out: str) -> None:
    """Entry point of the data-parallel job (run by perturb_repro.distributed in each process)."""
    import anndata as ad

    torch.set_num_threads(1)
    train, val = (ad.read_h5ad(Path(data_dir) / f"{n}.h5ad") for n in ("train", "val"))
    context = ModelContext("norman_demo", "control", None, {}, seed=3)
    sg.ScGPTModel().fit(train, val, context, deep_merge(_params(), DDP_PARAMS), out)


def test_two_processes_equal_one_at_the_same_global_batch(tmp_path, monkeypatch, small):
    """Each process computes its half of every global batch of 32; validation and early stopping agree."""
    import os

    from perturb_repro.distributed import launch

    train, val = small
    train.write_h5ad(tmp_path / "train.h5ad")
    val.write_h5ad(tmp_path / "val.h5ad")
    _ddp_fit(str(tmp_path), str(tmp_path / "one"))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    job = {"function": "test_scgpt:_ddp_fit", "kwargs": {"data_dir": str(tmp_path), "out": str(tmp_path / "two")}}
    launch(job, tmp_path / "job.json", nodes=1, tasks_per_node=2, use_srun=False, timeout=300)
    one, two = tmp_path / "one", tmp_path / "two"
    # Averaging two half-batch gradients rounds differently from one full-batch mean (float32), amplified a
    # little by 24 Adam steps at lr 1e-3: observed max |diff| 1.8e-5; a wrong shard or a missing all-reduce
    # moves weights by far more.
    for name in (sg.LAST_FILE, sg.BEST_FILE):
        a, b = _weights(one / name), _weights(two / name)
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], atol=1e-4, rtol=0, msg=lambda m, k=k: f"{name} {k}: {m}")
    sa, sb = (json.loads((d / sg.STATS_FILE).read_text()) for d in (one, two))
    assert (sa["world_size"], sb["world_size"]) == (1, 2)
    for key in ("epochs_trained", "best_epoch", "steps", "cells_seen", "stop_reason", "global_batch"):
        assert sa[key] == sb[key], key
    assert sb["best_val_pearson_delta"] == pytest.approx(sa["best_val_pearson_delta"], abs=1e-4)


# --------------------------------------------------------------------------------------------
# the Replogle card's budget (issue 16.8)
# --------------------------------------------------------------------------------------------


@needs_seeds
def test_paper_replogle_presets_see_the_cards_training_cells():
    """5,400,630 cells seen over 30 epochs (card 'Budget and stopping'), whatever the size of our training pool
    (362,327 three-line cells): the epoch is 180,021 pairs, the last short batch of 117 kept."""
    card = seed_path("scgpt_replogle_card.txt").read_text()
    seen = int(re.search(r"Training cells seen ([\d,]+)", card)[1].replace(",", ""))
    epochs = int(re.search(r"Epochs trained (\d+)", card)[1])
    batch = int(re.search(r"Train batch size (\d+)", card)[1])
    for preset in ("paper_replogle", "paper_replogle_esm2"):
        training = model_params({"type": "scgpt", "preset": preset})["training"]
        assert int(training["max_epochs"]) == epochs and int(training["batch_size"]) == batch
        shape = {"cells_per_epoch": training["cells_per_epoch"], "drop_last": training["drop_last"]}
        per_epoch = [sg.epoch_batches(362_327, batch, 0, e, **shape) for e in range(epochs)]
        assert sum(len(b) for bs in per_epoch for b in bs) == seen, preset
        assert {len(bs) for bs in per_epoch} == {-(-seen // epochs // batch)}  # 938 updates per epoch
        assert all(len(np.unique(np.concatenate(bs))) == seen // epochs for bs in per_epoch)  # no pair twice an epoch
    # Norman keeps GEARS' loader: one pass over every pair, the short batch dropped
    norman = model_params({"type": "scgpt", "preset": "paper_norman"})["training"]
    batches = sg.epoch_batches(1000, 64, 0, 0, cells_per_epoch=norman["cells_per_epoch"], drop_last=norman["drop_last"])
    assert [len(b) for b in batches] == [64] * 15


def test_epoch_budget_larger_than_the_pool_and_the_data_parallel_short_batch():
    batches = sg.epoch_batches(10, 4, 0, 0, cells_per_epoch=25, drop_last=False)
    assert [len(b) for b in batches] == [4] * 6 + [1]
    rows = np.concatenate(batches)
    assert sorted(rows[:10]) == list(range(10)) and sorted(rows[10:20]) == list(range(10))  # whole shuffles first
    # two processes: the short batch is cut to an even number of rows (each process takes half)
    assert [len(b) for b in sg.epoch_batches(11, 4, 0, 0, drop_last=False, multiple_of=2)] == [4, 4, 2]
    # the default is unchanged: the same shuffle as before the budget keys existed, short batch dropped
    assert [len(b) for b in sg.epoch_batches(11, 4, 0, 0)] == [4, 4]


def test_fit_counts_the_configured_cells_per_epoch(tmp_path, small, context):
    train, val = small
    params = _params(max_epochs=2, batch_size=16, cells_per_epoch=40, drop_last=False)
    sg.ScGPTModel().fit(train, val, context, params, tmp_path)
    stats = json.loads((tmp_path / sg.STATS_FILE).read_text())
    assert stats["cells_seen"] == 2 * 40 and stats["steps_per_epoch"] == 3 and stats["steps"] == 6


def _two_lines():
    import anndata as ad

    lines = np.array(["k562"] * 6 + ["hepg2"] * 6)
    control = np.array([True, True, False, False, False, False] * 2)
    obs = pd.DataFrame({"cell_line": lines, "condition": np.where(control, "control", "G1"), "is_control": control},
                       index=[f"c{i}" for i in range(12)])
    return ad.AnnData(np.arange(12 * 3, dtype=np.float32).reshape(12, 3), obs=obs)


def test_controls_are_paired_within_the_cells_own_line():
    """The Replogle card's loader pairs each perturbed cell with a control of its own cell line."""
    adata = _two_lines()
    lines = adata.obs["cell_line"].to_numpy()
    for seed in range(5):
        source, target = sg.train_pairs(adata, seed, ["cell_line"])
        assert np.array_equal(target, np.arange(12)) and np.array_equal(lines[source], lines)
        assert adata.obs["is_control"].to_numpy()[source].all()
    assert model_params({"type": "scgpt", "preset": "paper_replogle"})["data"]["pair_controls_within"] == ["cell_line"]
    # without it any control may be drawn (GEARS; Norman has one line): across 5 seeds some pair crosses lines
    crossed = [np.any(lines[sg.train_pairs(adata, s)[0]] != lines) for s in range(5)]
    assert any(crossed)
    bad = adata[~((adata.obs["cell_line"] == "hepg2") & adata.obs["is_control"])].copy()
    with pytest.raises(PipelineInputError, match="hepg2"):
        sg.train_pairs(bad, 0, ["cell_line"])
    with pytest.raises(PipelineInputError, match="pair_controls_within"):
        sg.train_pairs(adata, 0, ["donor"])


def test_one_group_pairing_within_equals_pairing_across(tmp_path, small, context):
    """On a one-line dataset pairing within the line is GEARS' pairing: the same pairs, validation and weights."""
    train, val = small
    plain = _params(max_epochs=1)
    within = deep_merge(plain, {"data": {"pair_controls_within": ["cell_type"]}})
    assert np.array_equal(sg.train_pairs(train, 3)[0], sg.train_pairs(train, 3, ["cell_type"])[0])
    sg.ScGPTModel().fit(train, val, context, plain, tmp_path / "a")
    sg.ScGPTModel().fit(train, val, context, within, tmp_path / "b")
    logs = [pd.read_csv(tmp_path / d / sg.EPOCH_LOG) for d in "ab"]
    assert logs[0]["val_pearson_delta"].tolist() == logs[1]["val_pearson_delta"].tolist()
    a, b = _weights(tmp_path / "a" / sg.BEST_FILE), _weights(tmp_path / "b" / sg.BEST_FILE)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_gene_prior_projects_the_table_row_for_row():
    """Looking up projected rows equals projecting looked-up rows; row 0 ("no prior") adds nothing."""
    prior = sg.GenePrior(5, 7, 4)
    with torch.no_grad():
        prior.table.copy_(torch.randn(5, 7))
        prior.proj.weight.normal_()
        prior.proj.bias.normal_()
    rows = torch.tensor([[0, 3, 1], [4, 0, 2]])
    expected = prior.table[rows] @ prior.proj.weight.T + prior.proj.bias
    expected[rows == 0] = 0.0
    torch.testing.assert_close(prior(rows), expected)

"""Config: both shipped configs validate; bad keys stop the DAG at parse time naming the key;
the paper preset carries the CellFlow-Norman card verbatim."""

import os
import re
from pathlib import Path

import pytest
import yaml

from perturb_repro.config import model_params
from perturb_repro.errors import PipelineInputError
from seeds import needs_seeds, seed_path
from workflow_helpers import REPO, copy_repo, snakemake

CARD = seed_path("cellflow_norman_card.txt")


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return copy_repo(tmp_path_factory.mktemp("repo"))


def _with(scratch: Path, name: str, edit) -> str:
    config = yaml.safe_load((REPO / "config" / "demo.yaml").read_text())
    edit(config)
    path = scratch / "config" / name
    path.write_text(yaml.safe_dump(config))
    return f"config/{name}"


@pytest.mark.parametrize("configfile", ["config/config.yaml", "config/demo.yaml"])
def test_shipped_configs_validate(scratch, configfile):
    result = snakemake(scratch, "-n", "all", "--configfile", configfile)
    assert result.returncode == 0, result.stderr[-2000:]


def test_paper_config_plans_the_data_chain_of_every_dataset(scratch):
    """download -> split -> preprocess (+ PCA, truth) for every paper dataset; ESM2 embeddings for every dataset
    whose models need them (the drug screen srivatsan20 has no protein targets; cd4's scLDM uses none)."""
    result = snakemake(scratch, "-n", "all", "--configfile", "config/config.yaml")
    assert result.returncode == 0, result.stderr[-2000:]
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    planned = set()
    for block in re.split(r"^(?=(?:local)?rule \w+:$)", result.stdout, flags=re.M):
        rule = re.match(r"(?:local)?rule (\w+):$", block, flags=re.M)
        wildcards = re.search(r"^\s+wildcards: (.*)$", block, flags=re.M)
        if rule and wildcards:
            planned.add((rule.group(1), wildcards.group(1)))
    for dataset, entry in config["datasets"].items():
        for rule in ("split_conditions", "preprocess_dataset", "fit_pca", "extract_test_truth"):
            assert (rule, f"dataset={dataset}") in planned, (rule, dataset)
        if entry["source"].get("url"):
            assert any(r == "download_source" and w.startswith(f"dataset={dataset},") for r, w in planned), dataset
        wants_esm2 = dataset not in ("srivatsan20", "cd4")
        embeds = any(r == "embed_genes" and w.startswith(f"dataset={dataset}, embedding=") for r, w in planned)
        assert embeds == wants_esm2, dataset
        for model in entry["models"]:
            owner = config["models"][model].get("shares_checkpoint_with", model)
            seeds = config["models"][model].get("seeds", [0])  # two or more: one run per seed (<model>/seeds/<s>)
            for run, owner_run in ((f"{model}/seeds/{s}", f"{owner}/seeds/{s}") for s in seeds) if len(seeds) > 1 \
                    else [(model, owner)]:
                assert any(r in ("train_model", "train_model_ddp") and w == f"dataset={dataset}, model={owner_run}"
                           for r, w in planned), (dataset, owner_run)
                assert any((r, f"dataset={dataset}, model={run}") in planned for r in ("sample_model", "merge_predictions"))


@pytest.mark.parametrize(
    "name,edit,expected",
    [
        ("unknown_key.yaml", lambda c: c["sampling"].update(stpes=10), "stpes"),
        ("missing_field.yaml", lambda c: c["datasets"]["norman_demo"].pop("control_label"), "control_label"),
        ("wrong_type.yaml", lambda c: c["sampling"].update(steps="many"), "many"),
        ("unknown_model.yaml", lambda c: c["datasets"]["norman_demo"]["models"].append("geneformer"), "geneformer"),
        # refused by the dry run, not by the sampling job after training: PRiMeFlow integrates with Euler only
        ("unsampled_solver.yaml", lambda c: c["models"]["primeflow_cfg1"].update(sampling={"solver": "dopri5"}),
         "config models.primeflow_cfg1: field 'sampling.solver': 'dopri5' is not a sampler of model type 'primeflow'"),
    ],
)
def test_bad_config_is_refused_naming_the_key(scratch, name, edit, expected):
    result = snakemake(scratch, "-n", "all", "--configfile", _with(scratch, name, edit))
    assert result.returncode != 0
    assert expected in result.stdout + result.stderr


def test_demo_config_replaces_paper_config(scratch):
    """--configfile must not merge the paper datasets into the demo."""
    result = snakemake(scratch, "-n", "all", "--configfile", "config/demo.yaml")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "results/norman_demo/" in result.stdout  # the plan was printed: the absence below means something
    assert "results/norman/" not in result.stdout


def test_norman_target_plans_exactly_its_chain(scratch):
    result = snakemake(scratch, "-n", "results/norman/cellflow/metrics.csv")
    assert result.returncode == 0, result.stderr[-2000:]
    rules = set(re.findall(r"^rule (\w+):", result.stdout, flags=re.M))
    assert rules == {
        # the card's embedding: cellflow-tools' Ensembl canonical sequences, not the UniProt FASTA
        "download_source", "fetch_ensembl_canonical", "split_conditions", "preprocess_dataset", "fit_pca",
        "extract_test_truth", "embed_genes", "train_model", "sample_model", "score_celleval",
    }
    assert "norman_demo" not in result.stdout


@needs_seeds
def test_paper_preset_is_the_card_verbatim():
    text = CARD.read_text()
    paper = model_params({"type": "cellflow", "preset": "paper"})
    model, training = paper["model"], paper["training"]

    def card_int(label):
        return int(re.search(rf"{label}\s+([\d,]+)", text).group(1).replace(",", ""))

    assert paper["solver"] == "otfm"
    assert model["condition_embedding_dim"] == int(re.search(r"condition_embedding_dim=(\d+)", text).group(1))
    for key in ("hidden_dims", "decoder_dims", "time_encoder_dims"):
        dims = re.search(rf"{key}=\(([\d,]+)\)", text).group(1)
        assert model[key] == [int(d) for d in dims.split(",")]
    assert model["decoder_dropout"] == float(re.search(r"decoder_dropout=([\d.]+)", text).group(1))
    assert model["time_freqs"] == int(re.search(r"time_freqs=(\d+)", text).group(1))
    assert model["cond_output_dropout"] == float(re.search(r"cond_output_dropout=([\d.]+)", text).group(1))
    before = re.search(r"layers_before_pool\.target_gene = mlp\[(\d+),(\d+)\] dropout ([\d.]+)", text)
    assert model["layers_before_pool"]["target_gene"] == {
        "layer_type": "mlp", "dims": [int(before[1]), int(before[2])], "dropout_rate": float(before[3])
    }
    after = re.search(r"layers_after_pool = mlp\[(\d+),(\d+)\] dropout ([\d.]+)", text)
    assert model["layers_after_pool"] == {
        "layer_type": "mlp", "dims": [int(after[1]), int(after[2])], "dropout_rate": float(after[3])
    }
    match = re.search(r"epsilon=([\d.]+), scale_cost='(\w+)', tau_a=([\d.]+), tau_b=([\d.]+)", text)
    assert model["match_fn"] == {
        "epsilon": float(match[1]), "scale_cost": match[2], "tau_a": float(match[3]), "tau_b": float(match[4])
    }
    opt = re.search(r"optax\.adam\(([\de.-]+)\), (\d+)\)", text)
    assert model["optimizer"] == {"learning_rate": float(opt[1]), "every_k_schedule": int(opt[2])}
    assert model["probability_path"] == {"constant_noise": float(re.search(r"'constant_noise': ([\d.]+)", text)[1])}
    assert model["pooling"] == re.search(r"pooling = '(\w+)'", text)[1]
    assert training["num_iterations"] == card_int("iterations")
    assert training["batch_size"] == card_int("batch size")
    assert training["valid_freq"] == card_int("valid_freq")
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    assert config["datasets"]["norman"]["pca"]["n_components"] == int(re.search(r"(\d+)-dim PCA", text)[1])
    assert config["datasets"]["norman"]["split"]["seed"] == int(re.search(r"simulation split with seed (\d+)", text)[1])
    card_esm2 = re.search(r"\((facebook/esm2_\w+)\)", text)[1]
    for entry in ("cellflow", "cellflow_fixed_esm2"):  # the card's embedding and the correct one: the card's ESM2 both
        assert config["esm2"]["embeddings"][config["models"][entry]["gene_embedding"]]["model"] == card_esm2


def test_variant_samples_from_the_owner_checkpoint(scratch):
    """A sampling variant (e.g. another CFG weight) reuses its owner's training job."""

    def add_variant(config):
        config["models"]["cellflow_steps10"] = {
            "type": "cellflow", "preset": "tiny", "shares_checkpoint_with": "cellflow", "sampling": {"steps": 10}
        }
        config["datasets"]["norman_demo"]["models"] = ["cellflow", "cellflow_steps10"]

    configfile = _with(scratch, "variant.yaml", add_variant)
    result = snakemake(scratch, "-n", "results/norman_demo/cellflow_steps10/predictions.h5ad", "--configfile", configfile)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "results/norman_demo/cellflow/checkpoint" in result.stdout
    assert "cellflow_steps10/checkpoint" not in result.stdout
    bad = _with(scratch, "bad_variant.yaml", lambda c: (add_variant(c), c["models"]["cellflow_steps10"].update(
        shares_checkpoint_with="nothing")))
    refused = snakemake(scratch, "-n", "all", "--configfile", bad)
    assert refused.returncode != 0 and "shares_checkpoint_with" in refused.stdout + refused.stderr


# ---- model parameters: each type's schema (workflow/schemas/models/<type>.schema.yaml), checked at config load

PRESET_FILES = sorted((REPO / "config" / "presets").glob("*.yaml"))


@pytest.mark.parametrize("preset_file", PRESET_FILES, ids=lambda p: p.stem)
def test_every_preset_validates_against_its_type_schema(preset_file):
    from perturb_repro.config import check_params

    presets = yaml.safe_load(preset_file.read_text())
    assert presets
    for name, params in presets.items():
        check_params(params, preset_file.stem, where=f"{preset_file.name}:{name}")


@pytest.mark.parametrize("configfile", ["config.yaml", "demo.yaml", "cluster_smoke.yaml"])
def test_every_model_entry_of_the_shipped_configs_validates(configfile):
    from perturb_repro.config import check_config

    check_config(yaml.safe_load((REPO / "config" / configfile).read_text()))


@pytest.mark.parametrize(
    "kind,override,key",
    [
        ("cellflow", {"training": {"valid_fre": 10}}, "training.valid_fre"),
        ("primeflow", {"ot": {"solver": "unbalanced"}}, "ot.solver"),
        ("scldm", {"n_gene": 3699}, "n_gene"),
        ("linear", {"model": {"learning_rate": 0.1}}, "model.learning_rate"),
    ],
)
def test_unknown_parameter_is_refused_naming_entry_preset_and_key(kind, override, key):
    entry = {"type": kind, "preset": "tiny", "overrides": override}
    with pytest.raises(PipelineInputError) as refused:
        model_params(entry, dataset="norman_demo", entry=f"my_{kind}")
    message = str(refused.value)
    assert f"models.my_{kind}" in message and "preset 'tiny'" in message and f"config/presets/{kind}.yaml" in message
    assert f"unknown parameter '{key}'" in message


def test_wrong_parameter_type_is_refused():
    with pytest.raises(PipelineInputError, match="model.lr"):
        model_params({"type": "linear", "preset": "tiny", "overrides": {"model": {"lr": "fast"}}})


def test_preset_file_is_parsed_once_yet_edits_and_callers_cannot_go_stale(tmp_path, monkeypatch):
    """model_params caches a preset file per version (the Snakefile resolves params per job): a second call does
    not parse it again, a caller editing its result does not change the next one, and an edited file is re-read."""
    presets = tmp_path / "linear.yaml"
    presets.write_text("small:\n  model:\n    lr: 0.01\n")
    parses = []
    real_load = yaml.load
    monkeypatch.setattr(yaml, "load", lambda *a, **k: parses.append(1) or real_load(*a, **k))
    entry = {"type": "linear", "preset": "small"}
    first = model_params(entry, preset_dir=tmp_path)
    first["model"]["lr"] = 99.0  # a caller's edit stays the caller's
    assert model_params(entry, preset_dir=tmp_path)["model"]["lr"] == 0.01
    assert len(parses) == 1
    presets.write_text("small:\n  model:\n    lr: 0.5\n")
    os.utime(presets, ns=(presets.stat().st_mtime_ns + 10**9,) * 2)  # a new version even on a coarse clock
    assert model_params(entry, preset_dir=tmp_path)["model"]["lr"] == 0.5
    assert len(parses) == 2


def test_unknown_parameter_stops_the_dag_at_parse_time(scratch):
    def typo(config):
        config["models"]["cellflow"]["overrides"] = {"training": {"num_iteration": 5}}

    result = snakemake(scratch, "-n", "all", "--configfile", _with(scratch, "unknown_param.yaml", typo))
    assert result.returncode != 0
    out = result.stdout + result.stderr
    assert "models.cellflow" in out and "unknown parameter 'training.num_iteration'" in out


def test_keys_no_code_read_before_are_read_now(tmp_path):
    """training.valid_freq (CellFlow), ot.solver_type (PRiMeFlow) and n_genes (scLDM) change behaviour now."""
    import anndata as ad
    import numpy as np

    from perturb_repro.models.base import ModelContext
    from perturb_repro.models.cellflow import CellFlowModel
    from perturb_repro.models.primeflow import ot_settings
    from perturb_repro.models.scldm import ScLDMModel

    context = ModelContext("d", "control", pca=None)
    cellflow = model_params({"type": "cellflow", "preset": "tiny", "overrides": {"training": {"valid_freq": 10}}})
    with pytest.raises(ValueError, match="valid_freq 10 < num_iterations"):
        CellFlowModel().fit(None, None, context, cellflow, tmp_path / "cf")

    tiny_ot = model_params({"type": "primeflow", "preset": "tiny_fm_pca_ot"})["ot"]
    assert ot_settings(tiny_ot)["tau_a"] == 1.0
    with pytest.raises(ValueError, match="solver_type balanced"):
        ot_settings({**tiny_ot, "solver_type": "balanced", "tau_a": 0.9})
    with pytest.raises(PipelineInputError, match="ot.solver_type"):
        model_params({"type": "primeflow", "preset": "tiny", "overrides": {"ot": {"solver_type": "sinkhorn"}}})

    scldm = model_params({"type": "scldm", "preset": "tiny", "overrides": {"n_genes": 3699}})
    cells = ad.AnnData(np.zeros((4, 7), dtype=np.float32))
    with pytest.raises(ValueError, match="n_genes is 3699 .* the data has 7 genes"):
        ScLDMModel().fit_autoencoder(cells, None, context, scldm, tmp_path / "ae")


def test_pretrained_file_names_come_from_the_model_specs():
    from perturb_repro.config import check_config
    from perturb_repro.models.base import MODEL_SPECS

    assert MODEL_SPECS["scgpt"].pretrained_files == ("args.json", "vocab.json", "best_model.pt")
    config = yaml.safe_load((REPO / "config" / "demo.yaml").read_text())
    config["pretrained"] = {"ckpt": {"best_model.pt": {"url": "https://example.org/best_model.pt"}}}
    check_config(config)
    config["pretrained"]["ckpt"]["weights.bin"] = {"url": "https://example.org/weights.bin"}
    with pytest.raises(ValueError, match="pretrained.ckpt.weights.bin is not a pretrained file of any model type"):
        check_config(config)


def _planned(stdout: str) -> set[tuple[str, str]]:
    """(rule, wildcards line) of every job in a dry run's plan."""
    planned = set()
    for block in re.split(r"^(?=(?:local)?rule \w+:$)", stdout, flags=re.M):
        rule = re.match(r"(?:local)?rule (\w+):$", block, flags=re.M)
        if rule:
            wildcards = re.search(r"^\s+wildcards: (.*)$", block, flags=re.M)
            planned.add((rule.group(1), wildcards.group(1) if wildcards else ""))
    return planned


def test_paper_config_plans_scoring_tables_and_report(scratch):
    """Past training: every (dataset, model) pair is scored by cell-eval and PerturBench (per seed, then
    aggregated, where the entry has seeds), every configured table and the scFATE audit are built, and one
    report reads them all."""
    result = snakemake(scratch, "-n", "all", "--configfile", "config/config.yaml")
    assert result.returncode == 0, result.stderr[-2000:]
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    planned = _planned(result.stdout)
    rules_of = {}
    for rule, wildcards in planned:
        rules_of.setdefault(wildcards, set()).add(rule)
    celleval = {"score_celleval", "score_celleval_cross"}  # one job, or shards merged by the cross pass
    perturbench = {"score_perturbench"}
    for dataset, entry in config["datasets"].items():
        for model in entry["models"]:
            seeds = config["models"][model].get("seeds") or [None]
            runs = [model] if len(seeds) < 2 else [f"{model}/seeds/{s}" for s in seeds]
            for run in runs:
                rules = rules_of.get(f"dataset={dataset}, model={run}", set())
                assert rules & celleval and rules & perturbench and "provenance" in rules, (dataset, run, rules)
            if len(seeds) >= 2:
                rules = rules_of.get(f"dataset={dataset}, model={model}", set())
                assert "aggregate_celleval_seeds" in rules, (dataset, model, rules)
    tables = {w for r, w in planned if r == "paper_table"}
    assert tables == {f"table={t}" for t in config["tables"]}
    assert ("scfate_table1_audit", "") in planned and ("report", "") in planned



def test_paper_resource_asks_cover_the_scaling_benchmarks_projections(scratch):
    """Issue 15: each data and scoring job of Norman, Replogle and CD4 asks (in the paper dry run, inputs absent:
    the per-dataset size estimates) for at least the memory and time workflow/bench/bench_scale.py projects for it
    (workflow/bench/scale_projection.json), and for no more than the job budget the projection is held to."""
    import json

    bench = json.loads((REPO / "workflow" / "bench" / "scale_projection.json").read_text())
    result = snakemake(scratch, "-n", "all", "--configfile", "config/config.yaml")
    assert result.returncode == 0, result.stderr[-2000:]
    asks: dict[tuple[str, str], list[tuple[int, int]]] = {}
    for block in re.split(r"^(?=(?:local)?rule \w+:$)", result.stdout, flags=re.M):
        rule = re.match(r"(?:local)?rule (\w+):$", block, flags=re.M)
        dataset = re.search(r"^\s+wildcards: .*?dataset=([^,\s]+)", block, flags=re.M)
        resources = re.search(r"^\s+resources: (.*)$", block, flags=re.M)
        if rule and dataset and resources:
            mem, minutes = (re.search(rf"\b{k}=(\d+)", resources.group(1)) for k in ("mem_mb", "runtime"))
            if mem and minutes:  # local rules (downloads, tables) ask for neither
                asks.setdefault((rule.group(1), dataset.group(1)), []).append(
                    (int(mem.group(1)), int(minutes.group(1))))
    budget_mb, budget_min = bench["budget"]["gb"] * 1024, bench["budget"]["h"] * 60
    checked = 0
    for dataset, steps in bench["datasets"].items():
        for step, projected in steps.items():
            rules = bench["steps"][step]
            rules = [rules] if isinstance(rules, str) else rules
            planned = [r for r in rules if (r, dataset) in asks]
            assert planned, (dataset, step, rules)
            rule = planned[-1]  # the shard rule where the dataset is sharded: the job that holds the cells
            for mem_mb, minutes in asks[(rule, dataset)]:
                assert projected["gb"] * 1024 <= mem_mb <= budget_mb, (dataset, step, rule, mem_mb, projected)
                assert projected["hours"] * 60 <= minutes <= budget_min, (dataset, step, rule, minutes, projected)
            checked += 1
    assert checked == sum(len(s) for s in bench["datasets"].values()) >= 18

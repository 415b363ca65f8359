"""Model entries of the config: per-dataset presets, sampling variants of one checkpoint, two-stage models and
pretrained checkpoints planned as rule inputs (fetched by a rule, or a clear error naming where to put them)."""

import re

import pytest
import yaml

from perturb_repro.config import model_params
from perturb_repro.errors import PipelineInputError
from perturb_repro.models.pretrained import fetch_pretrained_file
from workflow_helpers import REPO, copy_repo, snakemake


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return copy_repo(tmp_path_factory.mktemp("repo"))


def _write(scratch, name, config) -> str:
    (scratch / "config" / name).write_text(yaml.safe_dump(config, sort_keys=False))
    return f"config/{name}"


def test_preset_by_dataset_selects_the_dataset_tuned_preset():
    entry = {"type": "primeflow", "preset": "tiny", "preset_by_dataset": {"norman19": "paper_norman19"}}
    presets = yaml.safe_load((REPO / "config" / "presets" / "primeflow.yaml").read_text())
    on_norman19 = model_params(entry, dataset="norman19")
    assert on_norman19["training"]["learning_rate"] == presets["paper_norman19"]["training"]["learning_rate"]
    assert on_norman19["network"]["channel_mult"] == presets["paper_norman19"]["network"]["channel_mult"]
    assert model_params(entry, dataset="srivatsan20")["network"] == presets["tiny"]["network"]
    assert model_params(entry)["network"] == presets["tiny"]["network"]


def test_unknown_dataset_or_preset_in_preset_by_dataset_is_refused_at_parse_time(scratch):
    demo = yaml.safe_load((REPO / "config" / "demo.yaml").read_text())
    demo["models"]["linear"]["preset_by_dataset"] = {"no_such_dataset": "paper"}
    refused = snakemake(scratch, "-n", "all", "--configfile", _write(scratch, "bad_ds.yaml", demo))
    assert refused.returncode != 0
    assert "models.linear.preset_by_dataset names unknown dataset 'no_such_dataset'" in refused.stdout + refused.stderr

    demo = yaml.safe_load((REPO / "config" / "demo.yaml").read_text())
    demo["models"]["linear"]["preset_by_dataset"] = {"norman_demo": "no_such_preset"}
    refused = snakemake(scratch, "-n", "all", "--configfile", _write(scratch, "bad_preset.yaml", demo))
    assert refused.returncode != 0
    out = refused.stdout + refused.stderr
    assert "no_such_preset" in out and "linear.yaml" in out


def test_cfg_variants_sample_from_their_owners_checkpoint(scratch):
    """PRiMeFlow CFG 1/3/5 of the demo: one training job, three sampling jobs."""
    plan = snakemake(scratch, "-n", *(f"results/norman_demo/primeflow_cfg{w}/predictions.h5ad" for w in (1, 3, 5)),
                     "--configfile", "config/demo.yaml")
    assert plan.returncode == 0, plan.stderr[-2000:]
    trained = re.findall(r"output: results/norman_demo/(\w+)/checkpoint", plan.stdout)
    sampled = re.findall(r"output: results/norman_demo/(\w+)/predictions.h5ad", plan.stdout)
    assert trained == ["primeflow_cfg1"]
    assert sorted(sampled) == ["primeflow_cfg1", "primeflow_cfg3", "primeflow_cfg5"]


def test_pretrained_checkpoint_files_are_planned_inputs_of_training(scratch):
    """scGPT on Norman (paper config): its three checkpoint files come from the fetch rule before training."""
    plan = snakemake(scratch, "-n", "results/norman/scgpt/checkpoint")
    assert plan.returncode == 0, plan.stderr[-2000:]
    fetched = set(re.findall(r"output: (resources/pretrained/scGPT_human/\S+)", plan.stdout))
    assert fetched == {f"resources/pretrained/scGPT_human/{f}" for f in ("args.json", "vocab.json", "best_model.pt")}
    train = plan.stdout[plan.stdout.index("rule train_model:"):]
    assert "resources/pretrained/scGPT_human/best_model.pt" in train.split("output:")[0]


def test_missing_pretrained_file_without_url_names_the_file_and_the_config_key(tmp_path):
    out = tmp_path / "resources" / "pretrained" / "scGPT_human" / "best_model.pt"
    with pytest.raises(PipelineInputError) as err:
        fetch_pretrained_file({}, "Download the whole-human folder.", out)
    message = str(err.value)
    assert str(out) in message and "pretrained.scGPT_human.best_model.pt.url" in message
    assert "whole-human" in message
    assert not out.exists() and not list(tmp_path.rglob("*.part"))

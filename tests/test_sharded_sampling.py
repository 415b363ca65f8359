"""Sharded sampling (issue 14, part 5): `sampling.shards: N` samples the test conditions in N jobs whose merged
predictions.h5ad equals one unsharded job's file bit for bit (per-condition seeds, steps.SEED_RULE).

The equivalence runs the pipeline steps directly on the demo's processed inputs (the same functions the
sample_model / sample_shard / merge_predictions rules call); the DAG shape is checked with Snakemake dry runs."""

import re
import weakref

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import DEMO_H5AD
from perturb_repro import steps
from perturb_repro.config import model_params
from perturb_repro.scoring.contract import check_prediction
from workflow_helpers import REPO, copy_repo, snakemake

DEMO = yaml.safe_load((REPO / "config" / "demo.yaml").read_text())
SAMPLING = {"steps": 3, "n_cells_per_condition": 6, "seed": 0}
PRIMEFLOW = {"type": "primeflow", "preset": "tiny_mlp", "overrides": {"training": {"num_steps": 2}}}
LINEAR = {"type": "linear", "preset": "tiny", "overrides": {"trainer": {"max_epochs": 2}}}


def _inputs(out, dataset):
    cfg = dict(DEMO["datasets"][dataset], name=dataset)
    paths = {k: str(out / v) for k, v in {"split": "split.csv", "processed": "processed.h5ad", "summary": "s.json",
                                          "pca": "pca.npz", "truth": "test_truth.h5ad"}.items()}
    steps.split_step(str(DEMO_H5AD), cfg, paths["split"])
    steps.preprocess_step(str(DEMO_H5AD), paths["split"], cfg, paths["processed"], paths["summary"])
    steps.pca_step(paths["processed"], cfg, paths["pca"])
    steps.truth_step(paths["processed"], paths["truth"])
    return paths


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """Demo inputs of both datasets (Norman: no groups; McFaline: per cell line) and trained checkpoints."""
    out = tmp_path_factory.mktemp("sharded")
    runs = {}
    for dataset, models in (("norman_demo", {"control_mean": {"type": "control_mean"}, "primeflow": PRIMEFLOW}),
                            ("mcfaline_demo", {"control_mean": {"type": "control_mean"}, "linear": LINEAR})):
        paths = _inputs(out / dataset, dataset)
        for name, cfg in models.items():
            ckpt = out / dataset / name / "checkpoint"
            steps.train_step(dataset, paths["processed"], paths["pca"], "", cfg, model_params(cfg), str(ckpt), 0)
        runs[dataset] = dict(paths, root=out / dataset, models=models)
    return runs


def _predict(run, dataset, name, sampling, out, shards=1):
    """predictions.h5ad as one job (shards=1) or as `shards` shard jobs + the merge, like the rules."""
    cfg = run["models"][name]
    args = (dataset, name, run["truth"], run["processed"], run["pca"], "", cfg, model_params(cfg))
    ckpt = str(run["root"] / name / "checkpoint")
    if shards == 1:
        steps.predict_step(*args, sampling, ckpt, str(out))
        return ad.read_h5ad(out)
    parts = []
    for i in range(shards):
        parts.append(str(out.parent / f"{out.stem}_shards" / f"{i}-of-{shards}.h5ad"))
        steps.predict_step(*args, sampling, ckpt, parts[-1], shard=i, shards=shards)
    steps.merge_predictions_step(dataset, name, run["truth"], parts, cfg, sampling, str(out))
    return ad.read_h5ad(out)


def _assert_same_file(a: ad.AnnData, b: ad.AnnData) -> None:
    assert a.X.dtype == b.X.dtype == np.float32 and a.X.shape == b.X.shape
    assert a.X.tobytes() == b.X.tobytes()
    assert list(a.obs_names) == list(b.obs_names) and list(a.var_names) == list(b.var_names)
    pd.testing.assert_frame_equal(a.obs, b.obs, check_exact=True)
    pd.testing.assert_frame_equal(a.var, b.var, check_exact=True)
    ua = {k: v for k, v in a.uns.items() if k not in steps.TIMING_KEYS}
    ub = {k: v for k, v in b.uns.items() if k not in steps.TIMING_KEYS}
    assert sorted(ua) == sorted(ub)
    for key in ua:
        if isinstance(ua[key], dict):
            assert sorted(ua[key]) == sorted(ub[key]), key
            for k in ua[key]:
                np.testing.assert_array_equal(np.asarray(ua[key][k]), np.asarray(ub[key][k]), err_msg=f"{key}.{k}")
        else:
            np.testing.assert_array_equal(np.asarray(ua[key]), np.asarray(ub[key]), err_msg=key)


@pytest.mark.parametrize("dataset,name", [("norman_demo", "primeflow"), ("norman_demo", "control_mean"),
                                          ("mcfaline_demo", "linear"), ("mcfaline_demo", "control_mean")])
def test_three_shards_equal_one_job_bit_for_bit(demo, tmp_path, dataset, name):
    run = demo[dataset]
    one = _predict(run, dataset, name, SAMPLING, tmp_path / "one.h5ad")
    three = _predict(run, dataset, name, {**SAMPLING, "shards": 3}, tmp_path / "three.h5ad", shards=3)
    _assert_same_file(one, three)
    # the file is the prediction contract: every test condition, then the real controls once, pred_0.. names
    truth = ad.read_h5ad(run["truth"])
    control = truth.uns["control_label"]
    n_ctrl = int((truth.obs["condition"] == control).sum())
    assert (one.obs["condition"] == control).sum() == n_ctrl
    assert list(one.obs_names) == [f"pred_{i}" for i in range(one.n_obs)]
    assert one.X[-n_ctrl:].tobytes() == np.asarray(truth[truth.obs["condition"] == control].X, np.float32).tobytes()
    plan = steps.sampling_plan(truth.obs, control, steps.group_columns(truth))
    assert len(one.uns["condition_seeds"]["seed"]) == len(plan) and "SeedSequence" in one.uns["seed_rule"]
    assert "shards" not in one.uns["sampler"]  # how the work was split is not a sampler setting
    check_prediction(three, truth, "condition", control, "predictions.h5ad", "test_truth.h5ad")  # scorer's contract
    if name != "control_mean":  # generative: every condition got n_cells_per_condition cells
        assert one.n_obs == len(plan) * SAMPLING["n_cells_per_condition"] + n_ctrl


def test_a_condition_does_not_depend_on_its_shard(demo, tmp_path):
    """2 shards and 3 shards put conditions in different company; their cells are the same."""
    run = demo["norman_demo"]
    two = _predict(run, "norman_demo", "primeflow", SAMPLING, tmp_path / "two.h5ad", shards=2)
    three = _predict(run, "norman_demo", "primeflow", SAMPLING, tmp_path / "three.h5ad", shards=3)
    _assert_same_file(two, three)


def test_another_seed_gives_other_cells(demo, tmp_path):
    run = demo["norman_demo"]
    a = _predict(run, "norman_demo", "primeflow", SAMPLING, tmp_path / "a.h5ad")
    b = _predict(run, "norman_demo", "primeflow", {**SAMPLING, "seed": 1}, tmp_path / "b.h5ad")
    predicted = (a.obs["condition"] != a.uns["control_label"]).to_numpy()
    assert a.shape == b.shape and list(a.obs["condition"]) == list(b.obs["condition"])
    assert not np.array_equal(a.X[predicted], b.X[predicted])
    for condition in sorted(set(a.obs["condition"][predicted]))[:3]:  # each condition, not just one of them
        rows = (a.obs["condition"] == condition).to_numpy()
        assert not np.array_equal(a.X[rows], b.X[rows]), condition
    assert np.array_equal(a.X[~predicted], b.X[~predicted])  # the real controls are the real controls
    assert not np.array_equal(a.uns["condition_seeds"]["seed"], b.uns["condition_seeds"]["seed"])


def test_seed_rule_is_stable_and_keyed_by_group_and_label():
    s = steps.condition_seed(0, (), "KLF1+MAP2K6")
    assert s == steps.condition_seed(0, (), "KLF1+MAP2K6") and 0 <= s < 2**31
    assert len({s, steps.condition_seed(1, (), "KLF1+MAP2K6"), steps.condition_seed(0, ("A172",), "KLF1+MAP2K6"),
                steps.condition_seed(0, (), "KLF1+MAP2K7")}) == 4
    # pinned: the rule is part of the file format (uns['seed_rule']); changing it changes every prediction
    assert steps.condition_seed(0, (), "KLF1+MAP2K6") == 902373854


def test_shards_deal_the_plan_round_robin():
    plan = [((), f"c{i}") for i in range(10)]
    parts = [steps.shard_plan(plan, i, 3) for i in range(3)]
    assert parts[0] == [plan[0], plan[3], plan[6], plan[9]] and sorted(sum(parts, [])) == sorted(plan)
    assert steps.shard_plan(plan[:1], 2, 3) == []  # more shards than conditions: empty shards
    with pytest.raises(ValueError):
        steps.shard_plan(plan, 3, 3)


def test_more_shards_than_conditions_and_a_wrong_shard_set_is_refused(demo, tmp_path):
    run = demo["norman_demo"]
    n = len(steps.sampling_plan(ad.read_h5ad(run["truth"]).obs, "control", []))
    one = _predict(run, "norman_demo", "control_mean", SAMPLING, tmp_path / "one.h5ad")
    many = _predict(run, "norman_demo", "control_mean", SAMPLING, tmp_path / "many.h5ad", shards=n + 2)
    _assert_same_file(one, many)
    parts = sorted(str(p) for p in (tmp_path / "many_shards").glob("*.h5ad"))
    with pytest.raises(ValueError, match="shard"):
        steps.merge_predictions_step("norman_demo", "control_mean", run["truth"], parts[:-1], {"type": "control_mean"},
                                     SAMPLING, str(tmp_path / "bad.h5ad"))
    assert not (tmp_path / "bad.h5ad").exists()


def test_a_failed_sampling_job_leaves_no_output(demo, tmp_path, monkeypatch):
    from perturb_repro.models.baselines import ControlMean

    def broken(self, *args, **kwargs):
        raise RuntimeError("killed")

    monkeypatch.setattr(ControlMean, "sample", broken)
    run = demo["norman_demo"]
    with pytest.raises(RuntimeError):
        _predict(run, "norman_demo", "control_mean", SAMPLING, tmp_path / "p.h5ad", shards=2)
    assert not list(tmp_path.rglob("*.h5ad"))


# -- streaming: predicted blocks go to disk as they are sampled --------------------------------------------------

class _TrackedModel:
    """A model whose blocks are tracked (weak references): how many predicted blocks are alive at each call.
    A block is a function of its entry's seed alone, as a real model's: 5 + seed % 3 rows (row counts vary, as
    the baselines' do)."""

    def __init__(self, fail_at=None):
        self.refs, self.peak, self.calls, self.fail_at = [], 0, 0, fail_at

    def sample(self, checkpoint_dir, conditions, control, n_cells, context, params, sampling):
        if self.calls == self.fail_at:
            raise RuntimeError("killed mid-plan")
        block = _tracked_block(sampling["seed"], control.n_vars)
        self.calls += 1
        self.refs.append(weakref.ref(block))  # ndarrays are weak-referenceable, not hashable (no WeakSet)
        self.peak = max(self.peak, sum(ref() is not None for ref in self.refs))
        return {conditions[0]: block}


def _tracked_block(seed, n_vars):
    return np.random.default_rng(seed).random((5 + seed % 3, n_vars), dtype=np.float32)


@pytest.fixture
def synthetic(tmp_path, monkeypatch):
    """A backed-readable truth of 2 cell lines x 6 test conditions (12 plan entries) and the tracked model."""
    from perturb_repro.models.base import MODEL_SPECS, ModelContext, ModelSpec

    rng = np.random.default_rng(0)
    labels, lines = [], []
    for line in ("A", "B"):
        for label in [f"G{i}" for i in range(6)] + ["control"]:
            labels += [label] * 4
            lines += [line] * 4
    obs = pd.DataFrame({"condition": labels, "is_control": [c == "control" for c in labels], "cell_line": lines},
                       index=[f"c{i}" for i in range(len(labels))])
    truth = ad.AnnData(X=rng.random((len(labels), 7), dtype=np.float32), obs=obs,
                       var=pd.DataFrame(index=[f"g{i}" for i in range(7)]))
    truth.uns = {"control_label": "control", "group_by": ["cell_line"]}
    truth.write_h5ad(tmp_path / "truth.h5ad")
    (tmp_path / "out").mkdir()
    model = _TrackedModel()
    monkeypatch.setattr(steps, "get_model", lambda model_type: model)
    monkeypatch.setitem(MODEL_SPECS, "tracked", ModelSpec("test_sharded_sampling:_TrackedModel", framework="none"))
    monkeypatch.setattr(steps, "_context", lambda dataset, adata, pca, esm2, seed: ModelContext(dataset, "control", None, {}, seed))
    return {"truth": str(tmp_path / "truth.h5ad"), "model": model, "out": tmp_path / "out"}


SYN_CFG, SYN_SAMPLING = {"type": "tracked"}, {"n_cells_per_condition": 5, "seed": 0}


def _syn_predict(syn, out, sampling=SYN_SAMPLING, **shard):
    steps.predict_step("syn", "tracked", syn["truth"], "", "", "", SYN_CFG, {}, sampling, "", str(out), **shard)


def _old_predict(syn, out, shard=None, shards=1):
    """The file the list-collecting predict_step wrote (every block in a list, then written): the reference."""
    truth = ad.read_h5ad(syn["truth"], backed="r")
    group_by = steps.group_columns(truth)
    plan = steps.sampling_plan(truth.obs, "control", group_by)
    plan = plan if shard is None else steps.shard_plan(plan, shard, shards)
    seeds = [steps.condition_seed(0, values, condition) for values, condition in plan]
    blocks = [_tracked_block(seed, truth.n_vars) for seed in seeds]
    if shard is None:
        skeleton = steps._skeleton(truth, plan, [b.shape[0] for b in blocks], seeds, group_by, "syn", "tracked",
                                   SYN_CFG, SYN_SAMPLING, 0.0)
        steps._write_predictions(skeleton, [*blocks, *steps._control_chunks(truth, 8192)], str(out))
    else:
        labels = [c for (_, c), x in zip(plan, blocks) for _ in range(x.shape[0])]
        obs = pd.DataFrame({"condition": labels}, index=[f"shard{shard}_{i}" for i in range(len(labels))])
        obs["cell_line"] = [v[0] for (v, _), x in zip(plan, blocks) for _ in range(x.shape[0])]
        steps.write_h5ad(ad.AnnData(X=np.vstack(blocks), obs=obs, var=truth.var[[]].copy(), uns={
            "shard": shard, "shards": shards, "shard_rule": steps.SHARD_RULE, "sample_seconds": 0.0,
            "entries": steps._key_table(plan, group_by, seed=seeds, rows=[b.shape[0] for b in blocks])}), str(out))
    truth.file.close()
    return ad.read_h5ad(out)


@pytest.mark.parametrize("shard", [None, 0])
def test_sampling_holds_one_predicted_block_at_a_time(synthetic, tmp_path, shard):
    """Peak memory is one block, not the plan: at every model call at most one earlier block is still alive (the
    list-collecting code held all 12, or the shard's 6; a block kept one call too long makes it 2)."""
    kwargs = {} if shard is None else {"shard": shard, "shards": 2}
    _syn_predict(synthetic, synthetic["out"] / "p.h5ad", **kwargs)
    assert synthetic["model"].calls == (12 if shard is None else 6)
    assert synthetic["model"].peak == 1


@pytest.mark.parametrize("shard", [None, 0, 1])
def test_the_streamed_file_is_the_file_the_in_memory_code_wrote(synthetic, tmp_path, shard):
    kwargs = {} if shard is None else {"shard": shard, "shards": 2}
    _syn_predict(synthetic, tmp_path / "streamed.h5ad", **kwargs)
    _assert_same_file(ad.read_h5ad(tmp_path / "streamed.h5ad"), _old_predict(synthetic, tmp_path / "old.h5ad", **kwargs))


def test_streamed_shards_merge_to_the_streamed_one_job_file(synthetic, tmp_path):
    _syn_predict(synthetic, tmp_path / "one.h5ad")
    parts = [str(tmp_path / f"{i}-of-3.h5ad") for i in range(3)]
    for i, part in enumerate(parts):
        _syn_predict(synthetic, part, {**SYN_SAMPLING, "shards": 3}, shard=i, shards=3)
    steps.merge_predictions_step("syn", "tracked", synthetic["truth"], parts, SYN_CFG, SYN_SAMPLING,
                                 str(tmp_path / "merged.h5ad"))
    _assert_same_file(ad.read_h5ad(tmp_path / "one.h5ad"), ad.read_h5ad(tmp_path / "merged.h5ad"))


@pytest.mark.parametrize("shard", [None, 0])
def test_a_model_failing_mid_plan_leaves_no_output_and_no_scratch(synthetic, shard):
    synthetic["model"].fail_at = 4  # blocks 0..3 are already in the scratch file
    kwargs = {} if shard is None else {"shard": shard, "shards": 2}
    with pytest.raises(RuntimeError, match="killed mid-plan"):
        _syn_predict(synthetic, synthetic["out"] / "p.h5ad", **kwargs)
    assert synthetic["model"].calls == 4
    assert list(synthetic["out"].iterdir()) == []  # hidden temps included


def test_a_killed_jobs_scratch_file_is_swept_by_the_next_job(synthetic):
    """SIGKILL / OOM run no ``finally``: the orphaned scratch is removed when the job is rerun."""
    out = synthetic["out"]
    (out / ".p.scratch.ab12cd_3.tmp.h5").write_bytes(b"half a file")
    _syn_predict(synthetic, out / "p.h5ad")
    assert sorted(p.name for p in out.iterdir()) == ["p.h5ad"]


# -- the DAG -------------------------------------------------------------------------------------------------

def _planned(stdout: str) -> list[tuple[str, str, str]]:
    """(rule, wildcards, resources) of every job of a dry run."""
    jobs = []
    for block in re.split(r"^(?=(?:local)?rule \w+:$)", stdout, flags=re.M):
        rule = re.match(r"(?:local)?rule (\w+):$", block, flags=re.M)
        if rule:
            wildcards = re.search(r"^\s+wildcards: (.*)$", block, flags=re.M)
            resources = re.search(r"^\s+resources: (.*)$", block, flags=re.M)
            jobs.append((rule.group(1), wildcards.group(1) if wildcards else "", resources.group(1) if resources else ""))
    return jobs


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return copy_repo(tmp_path_factory.mktemp("repo"))


def test_demo_dag_with_three_shards(scratch):
    config = yaml.safe_load((REPO / "config" / "demo.yaml").read_text())
    config["models"]["primeflow_cfg3"]["sampling"]["shards"] = 3
    (scratch / "config" / "shards3.yaml").write_text(yaml.safe_dump(config))
    target = "results/norman_demo/primeflow_cfg3/predictions.h5ad"
    result = snakemake(scratch, "-n", target, "--configfile", "config/shards3.yaml")
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = _planned(result.stdout)
    shards = sorted(w for r, w, _ in jobs if r == "sample_shard")
    assert shards == [f"dataset=norman_demo, model=primeflow_cfg3, shard={i}, shards=3" for i in range(3)]
    assert [w for r, w, _ in jobs if r == "merge_predictions"] == ["dataset=norman_demo, model=primeflow_cfg3"]
    assert not any(r == "sample_model" for r, _, _ in jobs)
    # shards: 1 (the default) keeps one sample_model job
    result = snakemake(scratch, "-n", "results/norman_demo/primeflow_cfg1/predictions.h5ad", "--configfile",
                       "config/shards3.yaml")
    assert result.returncode == 0, result.stderr[-3000:]
    rules = [r for r, _, _ in _planned(result.stdout)]
    assert rules.count("sample_model") == 1 and "sample_shard" not in rules and "merge_predictions" not in rules


def test_paper_replogle_scgpt_plans_its_shards(scratch):
    """config/config.yaml (inputs absent): the Replogle scGPT entry samples in 8 one-GPU jobs, merged once."""
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    n = config["models"]["scgpt_replogle"]["sampling"]["shards"]
    assert n > 1 and config["models"]["scldm_cd4"]["sampling"]["shards"] > 1
    result = snakemake(scratch, "-n", "results/replogle/scgpt_replogle/predictions.h5ad",
                       "--configfile", "config/config.yaml")
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = _planned(result.stdout)
    shards = [(w, res) for r, w, res in jobs if r == "sample_shard"]
    assert sorted(w for w, _ in shards) == sorted(
        f"dataset=replogle, model=scgpt_replogle, shard={i}, shards={n}" for i in range(n))
    gpu = config["models"]["scgpt_replogle"]["resources"]["gpu"]
    assert all(f"gpu={gpu}" in res for _, res in shards)  # each shard is its own GPU job
    assert [r for r, _, _ in jobs].count("merge_predictions") == 1
    assert "sample_model" not in [r for r, _, _ in jobs]


def test_a_rerun_in_a_new_process_gives_the_same_file(demo, tmp_path):
    """A requeued or retried sampling job (a fresh interpreter: new RNG state, new JAX/torch start-up) writes
    the same predictions.h5ad bit for bit as the first run."""
    import json
    import subprocess
    import sys

    run = demo["norman_demo"]
    here = _predict(run, "norman_demo", "primeflow", SAMPLING, tmp_path / "here.h5ad")
    cfg = run["models"]["primeflow"]
    job = {"args": ["norman_demo", "primeflow", run["truth"], run["processed"], run["pca"], "", cfg,
                    model_params(cfg), SAMPLING, str(run["root"] / "primeflow" / "checkpoint"),
                    str(tmp_path / "there.h5ad")]}
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); from perturb_repro import steps; "
            "steps.predict_step(*json.loads(sys.argv[2])['args'])")
    done = subprocess.run([sys.executable, "-c", code, str(REPO / "workflow" / "src"), json.dumps(job)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    _assert_same_file(here, ad.read_h5ad(tmp_path / "there.h5ad"))


# -- one load per job (base.job_cached) ---------------------------------------------------------------------

@pytest.mark.parametrize("dataset,name,module,loader", [
    ("norman_demo", "primeflow", "perturb_repro.models.primeflow", "load_field"),
    ("mcfaline_demo", "linear", "perturb_repro.models.perturbench_baselines", "_PerturBenchModel.load_net")])
def test_a_sampling_job_loads_its_checkpoint_once_and_writes_what_per_call_loading_wrote(
        demo, tmp_path, monkeypatch, dataset, name, module, loader):
    """One predict_step (one model call per condition, more than one condition) reads the weights once; the file
    equals, bit for bit, a job whose every call loads the checkpoint afresh (the behaviour before the cache)."""
    import importlib

    mod = importlib.import_module(module)
    owner, attr = (getattr(mod, loader.split(".")[0]), loader.split(".")[1]) if "." in loader else (mod, loader)
    original, calls = getattr(owner, attr), []

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    run = demo[dataset]
    n_entries = len(steps.sampling_plan(ad.read_h5ad(run["truth"]).obs, "control", steps.group_columns(ad.read_h5ad(run["truth"]))))
    assert n_entries > 1
    monkeypatch.setattr(owner, attr, counted)
    cached = _predict(run, dataset, name, SAMPLING, tmp_path / "cached.h5ad")
    assert len(calls) == 1
    monkeypatch.setattr(mod, "job_cached", lambda model, key, build: build())  # the old per-call loading
    fresh = _predict(run, dataset, name, SAMPLING, tmp_path / "fresh.h5ad")
    assert len(calls) == 1 + n_entries
    _assert_same_file(cached, fresh)


@pytest.mark.parametrize("solver", ["dopri5", "tsit5"])
def test_a_solver_the_model_does_not_integrate_with_is_refused(demo, tmp_path, solver):
    """PRiMeFlow (and the linear baseline, no ODE at all) sample with Euler only: another solver is an error
    naming the model entry and key, not Euler recorded under another name; nothing is written."""
    from perturb_repro.errors import PipelineInputError

    for dataset, name in (("norman_demo", "primeflow"), ("mcfaline_demo", "linear")):
        with pytest.raises(PipelineInputError, match=rf"models\.{name}.*sampling\.solver.*{solver}"):
            _predict(demo[dataset], dataset, name, {**SAMPLING, "solver": solver}, tmp_path / f"{name}.h5ad")
        assert not (tmp_path / f"{name}.h5ad").exists()
    steps.check_solver("cellflow_tsit5", {"type": "cellflow"}, {"solver": solver})  # CellFlow has both
    steps.check_solver("scldm_cd4_dopri5", {"type": "scldm"}, {"solver": "dopri5"})
    with pytest.raises(PipelineInputError, match="scldm_x"):
        steps.check_solver("scldm_x", {"type": "scldm"}, {"solver": "tsit5"})
    from perturb_repro.models._flow import TORCH_SOLVERS
    from perturb_repro.models.base import get_model

    assert set(get_model("scldm").SOLVERS) <= set(TORCH_SOLVERS)  # the spec promises only what the integrator has

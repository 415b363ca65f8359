"""Faults a real job meets: SIGKILL mid-run (OOM killer, node failure: nothing to catch), SIGKILL mid-checkpoint,
a real SIGTERM (SLURM preemption), and a sampling job killed while writing predictions.h5ad.

Each training case runs tests/kill_resume_job.py as its own process, kills it with a real signal at a known
point, reruns it, and checks that the rerun resumed (its train log restarts at the saved step, not 0) and ends
with exactly the weights of an uninterrupted run. CellFlow (JAX) has its own loop and checkpoint; the linear
PerturBench baseline stands for the PyTorch models of the shared trainer.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import kill_resume_job as job

JOB = Path(__file__).with_name("kill_resume_job.py")


@pytest.fixture(scope="module")
def jax_cache(tmp_path_factory):
    """One persistent XLA cache for the module's CellFlow processes: each would otherwise compile the same step."""
    return str(tmp_path_factory.mktemp("xla_cache"))


def _start(model, out, *extra, cache=None):
    env = dict(os.environ)
    if cache:
        env.update(JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    return subprocess.Popen([sys.executable, str(JOB), model, str(out), *extra], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def _run(model, out, cache=None, timeout=600):
    proc = _start(model, out, cache=cache)
    stdout, stderr = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, stderr[-3000:]
    return stdout


def _wait_for(path, proc, timeout=600):
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, f"the job ended before {path.name} appeared: {proc.stderr.read()[-3000:]}"
        assert time.time() < deadline, f"{path} did not appear in {timeout} s"
        time.sleep(0.02)


def _kill_at(model, out, pause, cache=None):
    """Run until the job holds at ``pause`` (see kill_resume_job), then SIGKILL it there."""
    proc = _start(model, out, pause, cache=cache)
    _wait_for(out.parent / "paused", proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    (out.parent / "paused").unlink()


def _resumed_from(stdout):
    return [int(line.split()[1]) for line in stdout.splitlines() if line.startswith("RESUMED_FROM")]


def _assert_same_weights(model, a, b):
    wa, wb = job.weights(model, a), job.weights(model, b)
    assert wa.keys() == wb.keys() and wa
    for name in wa:
        np.testing.assert_array_equal(wa[name], wb[name], err_msg=name)


def _no_temps(directory):
    return [p.name for p in Path(directory).rglob("*") if ".tmp" in p.name]


@pytest.fixture(scope="module")
def cellflow_reference(tmp_path_factory, jax_cache):
    out = tmp_path_factory.mktemp("cf_ref") / "ckpt"
    _run("cellflow", out, cache=jax_cache)
    return out


def test_cellflow_sigkill_between_model_and_marker_resumes_exactly(tmp_path, cellflow_reference, jax_cache):
    """SIGKILL right after the 3rd checkpoint's model file lands, before state.json says so: the rerun must
    continue from the step inside the pickle (120), not from the marker's 80 on top of step-120 weights."""
    out = tmp_path / "ckpt"
    _kill_at("cellflow", out, "pause:CellFlow.pkl:3:after", cache=jax_cache)
    assert json.loads((out / "state.json").read_text())["step"] == 2 * job.CELLFLOW_EVERY  # marker lags
    stdout = _run("cellflow", out, cache=jax_cache)
    assert _resumed_from(stdout) == [3 * job.CELLFLOW_EVERY]
    _assert_same_weights("cellflow", cellflow_reference, out)
    assert not _no_temps(out)


def test_cellflow_sigkill_mid_checkpoint_keeps_the_previous_one(tmp_path, cellflow_reference, jax_cache):
    """SIGKILL while the 2nd checkpoint is written (temp file complete, not renamed): the 1st stays whole, the
    rerun resumes from it, ends equal, and the orphaned temp file is removed."""
    out = tmp_path / "ckpt"
    _kill_at("cellflow", out, "pause:CellFlow.pkl:2:before", cache=jax_cache)
    assert _no_temps(out)  # the orphan the kill left
    stdout = _run("cellflow", out, cache=jax_cache)
    assert _resumed_from(stdout) == [job.CELLFLOW_EVERY]
    _assert_same_weights("cellflow", cellflow_reference, out)
    assert not _no_temps(out)


@pytest.fixture(scope="module")
def linear_reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("lin_ref") / "ckpt"
    _run("linear", out)
    return out


def test_trainer_sigkill_mid_checkpoint_resumes_exactly(tmp_path, linear_reference):
    """The shared trainer (PyTorch), SIGKILL mid-write of its 3rd periodic checkpoint."""
    out = tmp_path / "ckpt"
    _kill_at("linear", out, "pause:trainer_state.pt:3:before")
    assert json.loads((out / "trainer_state.json").read_text()) == {"step": 2 * job.LINEAR_EVERY, "done": False}
    assert not (out / "model.pt").exists()  # final weights are written only when training ends
    stdout = _run("linear", out)
    assert _resumed_from(stdout) == [2 * job.LINEAR_EVERY]
    _assert_same_weights("linear", linear_reference, out)
    assert not _no_temps(out)


def test_real_sigterm_checkpoints_then_resumes_exactly(tmp_path, linear_reference):
    """A real SIGTERM to a training process (no stand-in flag): the trainer finishes the update, saves where it
    stopped, exits non-zero with Preempted; the rerun resumes there and ends with the uninterrupted weights."""
    out = tmp_path / "ckpt"
    proc = _start("linear", out)
    _wait_for(out / "trainer_state.json", proc)  # training is under way (a periodic checkpoint exists)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 1 and "Preempted" in stderr, stderr[-3000:]
    state = json.loads((out / "trainer_state.json").read_text())
    total = len(_train_log(linear_reference))
    assert not state["done"] and job.LINEAR_EVERY <= state["step"] < total, state
    assert len(_train_log(out)) == state["step"]  # the log holds every update up to the save
    stdout = _run("linear", out)
    assert _resumed_from(stdout) == [state["step"]]
    _assert_same_weights("linear", linear_reference, out)
    assert _train_log(out) == _train_log(linear_reference)


def _train_log(directory):
    return (Path(directory) / "train_log.csv").read_text().splitlines()[1:]


SAMPLER = """
import sys, time, pathlib
sys.path.insert(0, {src!r})
import h5py
from perturb_repro import steps

writes, real_setitem = [0], h5py.Dataset.__setitem__

def setitem(self, key, value):  # hold the job once X is partly written: the kill lands mid-write
    real_setitem(self, key, value)
    if self.name == "/X":
        writes[0] += 1
        if writes[0] == 2:
            pathlib.Path({flag!r}).write_text("paused")
            time.sleep(600)

h5py.Dataset.__setitem__ = setitem
steps.predict_step(*{args!r})
"""


def test_sampling_job_killed_mid_write_leaves_no_predictions(tmp_path, demo_processed, demo_cfg):
    """predictions.h5ad is written into a temp file renamed when whole: SIGKILL while X is half written leaves no
    file Snakemake could take as the output; the rerun writes it and sweeps the orphaned temp file."""
    from perturb_repro import steps
    from perturb_repro.io import write_h5ad

    processed, pca, truth = tmp_path / "processed.h5ad", tmp_path / "pca.npz", tmp_path / "test_truth.h5ad"
    write_h5ad(demo_processed, processed)
    steps.pca_step(str(processed), demo_cfg, str(pca))
    steps.truth_step(str(processed), str(truth))
    ckpt, model_cfg = tmp_path / "checkpoint", {"type": "control_mean"}
    steps.train_step("norman_demo", str(processed), str(pca), None, model_cfg, {}, str(ckpt), seed=0)
    out = tmp_path / "predictions.h5ad"
    args = ["norman_demo", "control_mean", str(truth), str(processed), str(pca), None, model_cfg, {},
            {"n_cells_per_condition": 20, "seed": 0, "steps": 10}, str(ckpt), str(out)]
    flag = tmp_path / "paused"
    code = SAMPLER.format(src=str(job.REPO / "workflow" / "src"), flag=str(flag), args=args)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(flag, proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()
    orphans = [p for p in tmp_path.iterdir() if p.name.startswith(".predictions.")]
    assert len(orphans) == 1 and orphans[0].stat().st_size > 0  # the half-written temp file, under another name

    steps.predict_step(*args)  # the rerun
    import anndata as ad

    pred = ad.read_h5ad(out)
    assert pred.n_obs > 0 and np.isfinite(pred.X).all()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".predictions.")]


def test_train_log_drops_a_row_cut_short_by_a_kill(tmp_path):
    """A kill can leave the log's last row cut (its buffer is flushed when full, not per row): '1' of '105,0.3'
    must not come back as a row of step 1 when the run resumes at step 100."""
    from perturb_repro.training import TrainLog

    path = tmp_path / "train_log.csv"
    path.write_text("step,loss\n" + "".join(f"{i},0.5\n" for i in range(103)) + "1")
    log = TrainLog(path, 100)
    log.add(100, 0.25)
    log.close()
    rows = path.read_text().splitlines()[1:]
    assert [r.split(",")[0] for r in rows] == [str(i) for i in range(101)]


def test_sibling_outputs_are_written_all_or_none(tmp_path):
    """A rule's two tables (metrics + per-condition) must agree: when the second write fails, the first (already
    renamed into place) is removed again, and no temp file is left beside either."""
    import pandas as pd

    from perturb_repro.io import write_csvs

    class Unwritable(pd.DataFrame):
        def to_csv(self, *args, **kwargs):
            raise OSError("disk full")

    first, second = tmp_path / "metrics.csv", tmp_path / "per_condition.csv"
    with pytest.raises(OSError, match="disk full"):
        write_csvs((pd.DataFrame({"a": [1]}), first), (Unwritable({"b": [2]}), second), index=False)
    assert list(tmp_path.iterdir()) == []
    write_csvs((pd.DataFrame({"a": [1]}), first), (pd.DataFrame({"b": [2]}), second), index=False)
    assert pd.read_csv(first)["a"].tolist() == [1] and pd.read_csv(second)["b"].tolist() == [2]

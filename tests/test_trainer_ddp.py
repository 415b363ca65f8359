"""The shared trainer's data parallelism on CPU: 2 gloo processes on this machine against 1 process at the same
global batch, and a preempted data-parallel run resuming from its checkpoint."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from perturb_repro.distributed import launch

sys.path.insert(0, str(Path(__file__).parent))
import ddp_trainer_job  # noqa: E402

STEPS, BATCH = 8, 64
# Gradient averaging across ranks sums the two half-batch means in another order than one full-batch mean:
# float32 rounding, amplified a little by 8 Adam steps. Observed max |diff| 3.0e-8; a wrong shard split or a
# missing all-reduce moves weights by > 1e-2.
ATOL = 1e-5


def _job(out, **kw):
    return {"function": "ddp_trainer_job:train_tiny", "kwargs": {"out_dir": str(out), "steps": STEPS, "global_batch": BATCH, **kw}}


def _run(tmp_path, name, world, **kw):
    out = tmp_path / name
    if world == 1:
        ddp_trainer_job.train_tiny(str(out), STEPS, BATCH, **kw)
    else:
        launch(_job(out, **kw), tmp_path / f"{name}.json", nodes=1, tasks_per_node=world, use_srun=False, timeout=240)
    return out


def _weights(out):
    return torch.load(Path(out) / "weights.pt", weights_only=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    env_path = str(Path(__file__).parent)
    import os

    os.environ["PYTHONPATH"] = os.pathsep.join([env_path, os.environ.get("PYTHONPATH", "")])
    one = _run(tmp, "one", 1)
    two = _run(tmp, "two", 2)
    with pytest.raises(RuntimeError, match="rank"):
        _run(tmp, "cut", 2, preempt_after=4)  # SIGTERM seen after update 5: both ranks save and stop
    cut_state = json.loads((tmp / "cut" / "trainer_state.json").read_text())
    _run(tmp, "cut", 2)  # rerun: resumes from the checkpoint
    return one, two, tmp / "cut", cut_state


def test_two_processes_equal_one_at_the_same_global_batch(runs):
    one, two, _, _ = runs
    a, b = _weights(one), _weights(two)
    diffs = {k: float((a[k] - b[k]).abs().max()) for k in a}
    assert max(diffs.values()) < ATOL, diffs
    assert json.loads((two / "trainer.json").read_text())["world_size"] == 2
    assert json.loads((two / "trainer.json").read_text())["backend"] == "gloo"


def test_the_shard_split_matters(runs, tmp_path):
    """Control: a different global batch gives clearly different weights (the tolerance is not vacuous)."""
    one, *_ = runs
    other = tmp_path / "other"
    ddp_trainer_job.train_tiny(str(other), STEPS, BATCH // 2)
    a, b = _weights(one), _weights(other)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) > 100 * ATOL


def test_preempted_ddp_run_resumes_to_the_same_weights(runs):
    _, two, cut, cut_state = runs
    assert cut_state == {"step": 5, "done": False}
    a, b = _weights(two), _weights(cut)
    assert all(torch.equal(a[k], b[k]) for k in a)  # same world size: bit-identical
    log = (cut / "train_log.csv").read_text().splitlines()
    assert [int(r.split(",")[0]) for r in log[1:]] == list(range(STEPS))


def test_a_failing_rank_stops_the_others_at_once(tmp_path, monkeypatch):
    """Without the launcher's fail-fast, the surviving rank waits for its dead peer until the timeout (here 120 s);
    with it the job fails within seconds, naming the failed rank, and leaves no rank running."""
    import os
    import time

    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).parent))
    out = tmp_path / "fail"
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match=r"rank\(s\) \[\(1, 1\)\].*stopped rank\(s\) \[0\]"):
        launch({"function": "ddp_trainer_job:fail_on_rank", "kwargs": {"out_dir": str(out), "failing_rank": 1}},
               tmp_path / "fail.json", nodes=1, tasks_per_node=2, use_srun=False, timeout=120)
    assert time.monotonic() - t0 < 60
    survivor = int((out / "rank0.pid").read_text())
    with pytest.raises(ProcessLookupError):  # killed and reaped
        os.kill(survivor, 0)

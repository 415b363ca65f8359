"""Data-parallel training through the shared trainer on CPU: 2 gloo ranks on this machine
(``perturb_repro.distributed.launch``), both scLDM stages of the tiny preset (tests/ddp_job.py).

(a) 2 processes at a global batch of 16 (8 rows each) end with the weights 1 process reaches at the same
    global batch, within ATOL: every random draw (cells, noise, times, CFG drops) is made for the global
    batch from (seed, step) and each rank keeps its rows; dropout is 0. What differs is only the float
    summation order of the gradient mean (one reduction over 16 rows vs two 8-row means averaged by gloo's
    all-reduce), ~1e-7 relative per step, which Adam's normalised updates carry over a few steps.
    The one exception is the autoencoder's ``head.bias``: it adds the same number to every gene's logit
    before the softmax, so its exact gradient is 0 and Adam turns the rounding noise of that 0 into
    +-lr steps; it changes nothing the model computes, so it is checked through the decoded NB means.
(b) a DDP run preempted mid-flow-stage (SIGTERM seen by rank 0 only; the trainer spreads it to every
    rank, saves and raises Preempted) and relaunched resumes from its checkpoint and ends bit-identical
    to the uninterrupted DDP run (same ranks, same reduction order).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from perturb_repro.distributed import launch

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))
import ddp_job  # noqa: E402

ATOL = 1e-5  # weights are O(1); observed max abs difference 2.4e-7 (autoencoder), 1.9e-7 (DiT), 5e-8 (its EMA)
GAUGE = {"head.bias"}  # see the module doc


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def _max_diff(a, b, skip=()):
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a if k not in skip)


def test_ddp_matches_one_process_and_resumes(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(TESTS))  # the workers import ddp_job; launch() adds workflow/src
    one, two, cut = tmp_path / "one", tmp_path / "two", tmp_path / "cut"
    t0 = time.perf_counter()
    ddp_job.train(str(one))  # 1 process, global batch 16
    t1 = time.perf_counter()
    job = {"function": "ddp_job:train_runs",
           "kwargs": {"runs": [{"out_dir": str(two)},  # 2 ranks x 8 rows, uninterrupted
                               {"out_dir": str(cut), "stop_stage": "fm", "stop_after": 1}]}}  # SIGTERM after update 2
    with pytest.raises(RuntimeError, match="rank"):  # the preempted run fails the job (Snakemake would rerun it)
        launch(job, tmp_path / "job1.json", nodes=1, tasks_per_node=2, use_srun=False, timeout=300)
    t2 = time.perf_counter()
    # the uninterrupted run finished; the preempted one saved its state at update 2 of the flow stage
    assert json.loads((two / "fm" / "trainer_state.json").read_text()) == {"step": 4, "done": True}
    assert json.loads((cut / "ae" / "trainer_state.json").read_text()) == {"step": 4, "done": True}
    assert json.loads((cut / "fm" / "trainer_state.json").read_text()) == {"step": 2, "done": False}
    assert not (cut / "fm" / "dit.pt").exists()
    ae_written = (cut / "ae" / "autoencoder.pt").stat().st_mtime_ns
    report = json.loads((two / "fm" / "trainer.json").read_text())
    assert report["world_size"] == 2 and report["backend"] == "gloo" and report["precision_used"] == "fp32"

    # (a) 2 processes == 1 process at the same global batch
    ae1, ae2 = _weights(one / "ae" / "autoencoder.pt"), _weights(two / "ae" / "autoencoder.pt")
    d_ae = _max_diff(ae1, ae2, GAUGE)
    d_fm = _max_diff(_weights(one / "fm" / "dit.pt"), _weights(two / "fm" / "dit.pt"))  # EMA weights
    d_raw = _max_diff(torch.load(one / "fm" / "trainer_state.pt", weights_only=False)["model"],
                      torch.load(two / "fm" / "trainer_state.pt", weights_only=False)["model"])
    from perturb_repro.models import scldm as S

    cells = ddp_job.synthetic_cells()
    x = torch.as_tensor(cells.layers["counts"].toarray())
    mus = []
    for ae_dir in (one / "ae", two / "ae"):
        ae, _ = S.load_autoencoder(ae_dir)
        with torch.no_grad():
            mus.append(ae(x, x.sum(1))[0])
    d_mu = ((mus[0] - mus[1]).abs() / (1 + mus[0].abs())).max().item()
    l1, l2 = (pd.read_csv(d / "fm" / "train_log.csv")["loss"] for d in (one, two))
    print(f"\nDDP 2 gloo ranks vs 1 process, global batch 16: max |weight difference| autoencoder {d_ae:.2e} "
          f"(without {sorted(GAUGE)}; decoded NB means rel. {d_mu:.2e}), DiT {d_raw:.2e} (EMA {d_fm:.2e}); "
          f"tolerance {ATOL:g}. Times: 1 process {t1 - t0:.1f} s, DDP launch (2 runs) {t2 - t1:.1f} s")
    assert d_ae < ATOL and d_fm < ATOL and d_raw < ATOL and d_mu < ATOL
    assert (l1 - l2).abs().max() < 1e-4 * l1.abs().max()

    # (b) the preempted DDP run resumes from its checkpoint: same weights as the uninterrupted DDP run
    launch({"function": "ddp_job:train", "kwargs": {"out_dir": str(cut)}}, tmp_path / "job2.json", nodes=1,
           tasks_per_node=2, use_srun=False, timeout=300)
    t3 = time.perf_counter()
    print(f"DDP resume launch {t3 - t2:.1f} s")
    assert (cut / "ae" / "autoencoder.pt").stat().st_mtime_ns == ae_written  # stage 1 was complete: not rerun
    assert list(pd.read_csv(cut / "fm" / "train_log.csv")["step"]) == [0, 1, 2, 3]
    for name in ("dit.pt",):
        a, b = _weights(two / "fm" / name), _weights(cut / "fm" / name)
        assert all(torch.equal(a[k], b[k]) for k in a), name
    a = torch.load(two / "fm" / "trainer_state.pt", weights_only=False)
    b = torch.load(cut / "fm" / "trainer_state.pt", weights_only=False)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert all(torch.equal(a["ema"][k], b["ema"][k]) for k in a["ema"])
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"] == 4


def test_only_rank_zero_writes_the_checkpoint_metadata(tmp_path, monkeypatch):
    """Every file has one writer: an atomic write sweeps the temps of its target, so a second rank writing the same
    meta file removed rank 0's temp mid-rename (FileNotFoundError on rank 0, its peer then waiting forever)."""
    from perturb_repro.models import scldm

    spec = {"n_genes": 3}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    scldm._check_meta(tmp_path / "meta.json", spec)
    assert not (tmp_path / "meta.json").exists()
    monkeypatch.setenv("RANK", "0")
    scldm._check_meta(tmp_path / "meta.json", spec)
    assert json.loads((tmp_path / "meta.json").read_text()) == spec
    monkeypatch.setenv("RANK", "1")  # a non-main rank still refuses a checkpoint written for other params
    with pytest.raises(ValueError, match="other params"):
        scldm._check_meta(tmp_path / "meta.json", {"n_genes": 4})

"""The no-silent-CPU guard: a job that asked for GPUs its framework cannot see fails at once, naming the job,
what was requested, what is seen and the fix; ``allow_cpu: true`` lets it run. This machine has no GPU, so
the failure path is the one exercised here (the GPU path runs in workflow/bench/bench_gpu.py on a GPU node)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from perturb_repro.devices import AcceleratorUnavailable, guard_job, require_accelerators
from perturb_repro.errors import PipelineInputError
from perturb_repro.steps import train_job

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_gpu_request_without_gpu_fails_naming_job_and_fix(framework):
    with pytest.raises(AcceleratorUnavailable) as err:
        require_accelerators(2, framework, rule="train_model", dataset="norman", model="cellflow")
    text = str(err.value)
    for part in ("rule train_model", "dataset norman", "model cellflow", "requested 2 GPU(s)", f"{framework} sees 0",
                 "envs/requirements-gpu.txt", "models.cellflow.allow_cpu: true"):
        assert part in text, (part, text)
    assert isinstance(err.value, PipelineInputError)  # logged() turns it into one clear line and exit 1


def test_allow_cpu_runs_and_says_so():
    report = require_accelerators(1, "torch", rule="sample_model", dataset="d", model="m", allow_cpu=True)
    assert report.device == "cpu" and report.visible_gpus == 0 and report.requested_gpus == 1 and report.allow_cpu
    assert "allow_cpu: true" in report.notes[0]
    assert "CUDA build" in report.framework_build


def test_no_gpu_requested_is_not_checked():
    report = require_accelerators(0, "torch", rule="r", dataset="d", model="m")
    assert report.device == "cpu" and report.framework_build is None


def _job(gpu, allow_cpu=None, nodes=None, tmp_path=Path("/nonexistent")):
    entry = {"type": "primeflow"} | ({"allow_cpu": allow_cpu} if allow_cpu is not None else {})
    resources = {"gpu": gpu} | ({"nodes": nodes} if nodes else {})
    return SimpleNamespace(
        rule="train_model", resources=resources, wildcards=SimpleNamespace(dataset="norman_demo", model="pf"),
        config={"models": {"pf": entry}},
        params=SimpleNamespace(model_cfg=entry, params={}, seed=0, get=lambda k, d=None: d),
        input=SimpleNamespace(processed=str(tmp_path / "missing.h5ad"), pca=str(tmp_path / "missing.npz"),
                              get=lambda k, d=None: d),
        output=[str(tmp_path / "checkpoint")],
    )


def test_guard_reads_resources_and_config():
    with pytest.raises(AcceleratorUnavailable, match="requested 4 GPU"):
        guard_job(_job(gpu=16, nodes=4), "torch")  # per node: 16 GPUs over 4 nodes
    assert guard_job(_job(gpu=1, allow_cpu=True), "torch").device == "cpu"


def test_training_job_fails_before_any_work(tmp_path):
    """The guard runs before the job reads its inputs: the error is the guard's, not a missing file."""
    with pytest.raises(AcceleratorUnavailable, match="rule train_model .*model pf"):
        train_job(_job(gpu=1, tmp_path=tmp_path))
    assert not (tmp_path / "checkpoint").exists() and not (tmp_path / "checkpoint.partial").exists()


def test_paper_dry_run_shows_data_parallel_jobs():
    """`snakemake --profile slurm all -n` on the paper config: scLDM.CD4's training jobs carry the card's
    node and GPU counts (tasks per node = GPUs per node)."""
    cmd = [sys.executable, "-m", "snakemake", "-n", "--profile", "workflow/profiles/slurm",
           "results/cd4/scldm_cd4/checkpoint"]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:] + out.stdout[-3000:]
    text = out.stdout
    ae = text[text.index("rule train_autoencoder_ddp"):].split("\n\n")[0]
    flow = text[text.index("rule train_model_ddp"):].split("\n\n")[0]

    def resources(block):
        line = next(ln for ln in block.splitlines() if ln.strip().startswith("resources:"))
        return dict(kv.strip().split("=", 1) for kv in line.split(":", 1)[1].split(","))

    expected_ae = {"gpu": "8", "nodes": "1", "tasks_per_node": "8", "mpi": "srun"}
    expected_flow = {"gpu": "32", "nodes": "4", "tasks_per_node": "8", "mpi": "srun"}
    assert expected_ae.items() <= resources(ae).items(), ae
    assert expected_flow.items() <= resources(flow).items(), flow

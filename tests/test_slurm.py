"""Cluster execution on a real SLURM: a small DAG through `snakemake --profile workflow/profiles/slurm` and the
Snakemake SLURM executor plugin, on a single-node cluster with one fake GPU (tests/slurm/start_slurm.sh, which
installs slurm-wlm/munge with apt-get when they are missing; root only, as in CI).

One SLURM run of config/cluster_smoke.yaml (CellFlow given a GPU, 2 GB and 10 minutes) checks that the DAG
finishes, that CellFlow's training and sampling jobs were scheduled with that GPU, memory and time limit, and that
a job killed by `scancel` is resubmitted by Snakemake's retry and the DAG still finishes. Wall time against the
local profile is a benchmark, not a test: workflow/bench/bench_cluster.py.

The profile tests at the end need no cluster: install.sh and the dry run of the paper configuration.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest
import yaml
from workflow_helpers import REPO, SNAKEMAKE, copy_repo

SLURM_DIR = Path("/tmp/slurm-test")  # the directory .ci/run starts the cluster with
START = REPO / "tests" / "slurm" / "start_slurm.sh"
STOP = REPO / "tests" / "slurm" / "stop_slurm.sh"
# `timeout -s KILL` bound of the Snakemake run (a Snakemake that cannot poll its jobs waits forever), far above
# the times seen on a 2-core machine shared with other work (394-513 s).
SLURM_LIMIT_S = 900

MODELS = ("control_mean", "cellflow")
CONFIG_ARGS = ("--configfile", "config/cluster_smoke.yaml")
# The cancelled job: short, and off the critical path (CellFlow's training is longer).
CANCEL_COMMENT = "rule_train_model_wildcards_norman_demo_control_mean"


def _scratch(tmp_path_factory, name: str) -> Path:
    root = copy_repo(tmp_path_factory.mktemp(name))
    models = yaml.safe_load((root / CONFIG_ARGS[1]).read_text())["datasets"]["norman_demo"]["models"]
    assert tuple(models) == MODELS, "the assertions below are written for these two models"
    return root


def _run(cmd: list[str], cwd: Path, env: dict, log: Path, limit_s: int) -> tuple[int, float]:
    """Run bounded by `timeout -s KILL`; return (exit code, wall seconds). Output goes to `log`."""
    start = time.monotonic()
    with log.open("w") as out:
        code = subprocess.run(
            ["timeout", "-s", "KILL", str(limit_s), *cmd],
            cwd=cwd,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            check=False,
        ).returncode
    return code, time.monotonic() - start


def _parse_job(line: str) -> dict[str, str]:
    return dict(re.findall(r"(?:^|\s)([A-Za-z_/:]+)=(\S*)", line))


class ClusterWatch(threading.Thread):
    """Polls SLURM while Snakemake runs: keeps every job's last `scontrol -d show job` record (finished jobs
    leave scontrol after MinJobAge) and cancels the first running job whose comment is `cancel_comment`."""

    def __init__(self, workdir: Path, cancel_comment: str):
        super().__init__(daemon=True)
        self.workdir = os.path.realpath(workdir)
        self.cancel_comment = cancel_comment
        self.cancelled: str | None = None
        self.jobs: dict[str, dict[str, str]] = {}
        self.gres_detail: dict[str, str] = {}  # job id -> per-node GRES with device index, seen while running
        self.errors: list[str] = []
        self._halt = threading.Event()

    def run(self):
        last_scontrol = 0.0
        while not self._halt.is_set():
            try:
                if self.cancelled is None:
                    self._maybe_cancel()
                if time.monotonic() - last_scontrol > 1.0:
                    self._record()
                    last_scontrol = time.monotonic()
            except (OSError, subprocess.SubprocessError) as error:  # a failed poll must not end the watch
                self.errors.append(repr(error))
            self._halt.wait(0.25)
        self._record()

    def stop(self):
        self._halt.set()
        self.join(timeout=30)

    def _maybe_cancel(self):
        out = subprocess.run(
            ["squeue", "-h", "-o", "%i|%T|%k|%Z"], capture_output=True, check=False, text=True, timeout=20
        ).stdout
        for line in out.splitlines():
            jobid, state, comment, workdir = (line.split("|") + ["", "", ""])[:4]
            if (
                comment.strip() == self.cancel_comment
                and state == "RUNNING"
                and os.path.realpath(workdir.strip()) == self.workdir
            ):
                subprocess.run(["scancel", jobid], check=True, timeout=20)
                self.cancelled = jobid
                return

    def _record(self):
        out = subprocess.run(
            ["scontrol", "-d", "show", "job", "-o"], capture_output=True, check=False, text=True, timeout=20
        )
        for line in out.stdout.splitlines():
            fields = _parse_job(line)
            if (
                "JobId" not in fields or os.path.realpath(fields.get("WorkDir", "")) != self.workdir
            ):  # jobs of this run only
                continue
            self.jobs[fields["JobId"]] = fields
            if fields.get("GRES"):
                self.gres_detail[fields["JobId"]] = fields["GRES"]


@pytest.fixture(scope="module")
def slurm_cluster():
    """The test cluster, started (or found running) by start_slurm.sh and stopped at the end. Without root and
    without an installed SLURM there is no way to start one: skipped, saying why."""
    if os.geteuid() != 0 and shutil.which("sbatch") is None:
        pytest.skip("no SLURM here and not root (start_slurm.sh installs and starts one as root, as in CI)")
    start = subprocess.run(
        ["bash", str(START), str(SLURM_DIR)], capture_output=True, check=False, text=True, timeout=900
    )
    if start.returncode != 0:
        subprocess.run(["bash", str(STOP), str(SLURM_DIR)], capture_output=True, check=False, timeout=120)
        reason = f"tests/slurm/start_slurm.sh failed: {start.stderr.strip()[-2000:]}"
        if shutil.which("sbatch") is None:
            pytest.skip(f"no SLURM on this machine (sbatch absent) and {reason}")
        pytest.fail(reason)
    yield SLURM_DIR
    subprocess.run(["bash", str(STOP), str(SLURM_DIR)], capture_output=True, check=False, timeout=120)


@pytest.fixture(scope="module")
def runs(slurm_cluster, tmp_path_factory):
    """The DAG once on SLURM, one job cancelled mid-run."""
    env = dict(os.environ, SLURM_PARTITION="main", SLURM_ACCOUNT="perturbtest")
    env.pop("SLURM_QOS", None)

    cluster_root = _scratch(tmp_path_factory, "slurm")
    watch = ClusterWatch(cluster_root, CANCEL_COMMENT)
    watch.start()
    try:
        slurm_code, slurm_s = _run(
            [
                SNAKEMAKE,
                "--profile",
                str(cluster_root / "workflow" / "profiles" / "slurm"),
                "all",
                *CONFIG_ARGS,
                # this cluster has no accounting database (sacct cannot see jobs) and the test wants short polls
                "--slurm-status-command",
                "squeue",
                "--slurm-init-seconds-before-status-checks",
                "2",
                "--slurm-keep-successful-logs",
                # the paper-scale memory of these rules does not fit the test node; the demo needs little
                "--set-resources",
                "preprocess_dataset:mem_mb=2000",
                "score_celleval:mem_mb=2000",
            ],
            cluster_root,
            env,
            cluster_root / "snakemake_slurm.log",
            SLURM_LIMIT_S,
        )
    finally:
        watch.stop()

    return {
        "slurm_root": cluster_root,
        "slurm_code": slurm_code,
        "slurm_s": slurm_s,
        "slurm_log": (cluster_root / "snakemake_slurm.log").read_text(),
        "watch": watch,
    }


def _jobs_with_comment(runs, comment: str) -> list[dict[str, str]]:
    jobs = [job for job in runs["watch"].jobs.values() if job.get("Comment") == comment]
    return sorted(jobs, key=lambda job: int(job["JobId"]))


def _assert_demo_outputs(root: Path):
    results = root / "results"
    for model in MODELS:
        for name in ("predictions.h5ad", "metrics.csv", "per_condition.csv"):
            assert (results / "norman_demo" / model / name).stat().st_size > 0, (model, name)
        assert (results / "norman_demo" / model / "checkpoint").is_dir()
    assert (results / "tables" / "cellflow_norman.csv").stat().st_size > 0
    assert (results / "report.html").stat().st_size > 0
    assert not list(results.rglob("*.partial"))


@pytest.mark.slow
@pytest.mark.slurm
def test_demo_dag_finishes_on_slurm(runs):
    assert runs["slurm_code"] == 0, runs["slurm_log"][-5000:]
    _assert_demo_outputs(runs["slurm_root"])
    submitted = re.findall(r"has been submitted with SLURM jobid (\d+)", runs["slurm_log"])
    assert len(submitted) >= 8, "the jobs went to SLURM"
    assert "Group job prep" in runs["slurm_log"], "the profile groups the preparation chain into one job"
    finished = [runs["watch"].jobs[j] for j in submitted if j in runs["watch"].jobs]
    assert finished and all(job["Partition"] == "main" for job in finished), "SLURM_PARTITION reached sbatch"
    assert all(job["Account"] == "perturbtest" for job in finished), "SLURM_ACCOUNT reached sbatch"


@pytest.mark.slow
@pytest.mark.slurm
def test_cellflow_jobs_asked_for_the_configured_gpu_memory_and_time(runs):
    watch = runs["watch"]
    for rule in ("train_model", "sample_model"):
        jobs = _jobs_with_comment(runs, f"rule_{rule}_wildcards_norman_demo_cellflow")
        assert jobs, f"no {rule} job for cellflow was seen in SLURM"
        job = jobs[-1]
        assert job["JobState"] == "COMPLETED", job
        assert job.get("TresPerJob") == "gres:gpu:1", job  # sbatch --gpus=1 from resources gpu: 1
        assert job["MinMemoryNode"] == "2000M" and job["TimeLimit"] == "00:10:00" and job["NumCPUs"] == "1", job
        if job["JobId"] in watch.gres_detail:  # seen while running: the fake device was handed to the job
            assert watch.gres_detail[job["JobId"]].startswith("gpu:fake:1(IDX:"), watch.gres_detail
        # the plugin's own log of the job: the Snakemake inside the allocation saw the same resources
        log = runs["slurm_root"] / ".snakemake" / "slurm_logs" / f"rule_{rule}" / "norman_demo_cellflow"
        text = (log / f"{job['JobId']}.log").read_text()
        assert re.search(r"resources: .*\bmem_mb=2000\b.*\bruntime=10\b.*\bgpu=1\b.*\bcpus_per_task=1\b", text), text
    assert any(j.startswith("gpu:fake:1(IDX:") for j in watch.gres_detail.values()), "no job ever held the GPU"
    for job in _jobs_with_comment(runs, "rule_train_model_wildcards_norman_demo_control_mean"):
        assert "gpu" not in job.get("TresPerJob", ""), "a CPU model asked for a GPU"


@pytest.mark.slow
@pytest.mark.slurm
def test_cancelled_job_is_retried_and_the_dag_finishes(runs):
    watch = runs["watch"]
    assert watch.cancelled, f"the control_mean training job was never seen running (poll errors: {watch.errors})"
    attempts = _jobs_with_comment(runs, CANCEL_COMMENT)
    assert watch.jobs[watch.cancelled]["JobState"] == "CANCELLED", watch.jobs[watch.cancelled]
    assert attempts[-1]["JobState"] == "COMPLETED" and int(attempts[-1]["JobId"]) > int(watch.cancelled), attempts
    assert re.search(rf"SLURM-job '{watch.cancelled}' failed, SLURM status is: 'CANCELLED'", runs["slurm_log"])
    assert "Trying to restart job" in runs["slurm_log"]
    assert runs["slurm_code"] == 0
    assert (runs["slurm_root"] / "results/norman_demo/control_mean/checkpoint").is_dir()


# ---- profiles without a cluster -------------------------------------------------------------------------------


def _train_resources(dry_run_output: str, model: str) -> str:
    for block in dry_run_output.split("\n\n"):
        if "rule train_model:" in block and f"model={model}" in block:
            return re.search(r"resources: (.*)", block).group(1)
    raise AssertionError(f"no train_model job for {model} in the dry run:\n{dry_run_output[-3000:]}")


def test_installed_profile_names_resolve_and_paper_dry_run_asks_for_gpus(tmp_path):
    """install.sh links both profiles into the user's Snakemake config dir (twice: idempotent); then
    `snakemake --profile slurm all -n` from the repository root resolves the name and, with the paper config,
    shows the GPU, memory, runtime and CPUs of CellFlow's training job and the partition from the environment."""
    config_home = tmp_path / "xdg"
    env = dict(os.environ, XDG_CONFIG_HOME=str(config_home), SLURM_PARTITION="gpu", SLURM_ACCOUNT="lab")
    env.pop("SLURM_QOS", None)
    install = REPO / "workflow" / "profiles" / "install.sh"
    for _ in range(2):
        result = subprocess.run(
            ["bash", str(install)], env=env, capture_output=True, check=False, text=True, timeout=60
        )
        assert result.returncode == 0, result.stderr
    for name in ("slurm", "local"):
        link = config_home / "snakemake" / name
        assert link.is_symlink() and link.resolve() == (REPO / "workflow" / "profiles" / name).resolve()
    assert "already installed" in result.stdout

    (tmp_path / "repo").mkdir()
    root = copy_repo(tmp_path / "repo")
    dry = subprocess.run(
        [SNAKEMAKE, "--profile", "slurm", "all", "-n"],
        cwd=root,
        env=env,
        capture_output=True,
        check=False,
        text=True,
        timeout=300,
    )
    out = dry.stdout + dry.stderr
    assert dry.returncode == 0, out[-3000:]
    assert "Using profile slurm for setting default command line arguments" in out
    wanted = yaml.safe_load((root / "config" / "config.yaml").read_text())["models"]["cellflow"]["resources"]
    assert wanted["gpu"] >= 1, "the paper configuration trains CellFlow on a GPU"
    cellflow = _train_resources(out, "cellflow")
    expected = [f"gpu={wanted['gpu']}", f"mem_mb={wanted['mem_mb']}", f"runtime={wanted['runtime']}"]
    expected += [f"cpus_per_task={wanted['cpus']}", "slurm_partition=gpu", "slurm_account=lab"]
    for item in expected:
        assert re.search(rf"(^|, ){re.escape(item)}(,|$)", cellflow), (item, cellflow)
    assert re.search(r"(^|, )gpu=0(,|$)", _train_resources(out, "control_mean"))


@pytest.mark.parametrize("profile", ["slurm", "local"])
def test_profile_paths_work_without_installing(tmp_path, profile):
    env = dict(os.environ, XDG_CONFIG_HOME=str(tmp_path / "empty"))
    root = copy_repo(tmp_path)
    dry = subprocess.run(
        [SNAKEMAKE, "--profile", f"workflow/profiles/{profile}", "all", "-n", "--configfile", "config/demo.yaml"],
        cwd=root,
        env=env,
        capture_output=True,
        check=False,
        text=True,
        timeout=300,
    )
    out = dry.stdout + dry.stderr
    assert dry.returncode == 0, out[-3000:]
    assert f"Using profile workflow/profiles/{profile} for setting default command line arguments" in out

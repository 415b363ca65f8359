"""Data-parallel training jobs: who this process is in the job, and how the job's processes start.

One training job = ``nodes × tasks_per_node`` processes, one per GPU (or a few CPU processes for a test).
Under SLURM the job script (a Snakemake ``mpi`` job: Snakemake runs it once, in the allocation, not
through ``srun``) starts them with ``srun``; off SLURM they start as local subprocesses. Every process
runs the same training function on the same inputs; the shared trainer splits each global batch
between them, and only rank 0 writes files.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

WORKER_MODULE = "perturb_repro.distributed"


@dataclass(frozen=True)
class World:
    rank: int = 0
    local_rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def current_world() -> World:
    """This process's place in the job: torchrun-style variables (set by our launchers)."""
    if "WORLD_SIZE" not in os.environ:
        return World()
    return World(int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ["WORLD_SIZE"]))


def init_process_group(world: World, device_type: str) -> bool:
    """Join the job's process group (NCCL on GPUs, gloo on CPU); False for a one-process job."""
    if world.size <= 1:
        return False
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo", init_method="env://",
                                rank=world.rank, world_size=world.size)
    return True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _slurm_master() -> str:
    nodes = os.environ.get("SLURM_JOB_NODELIST", "")
    if shutil.which("scontrol") and nodes:
        out = subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True, text=True, check=True)
        return out.stdout.split()[0]
    return socket.gethostname()


def launch(job: Mapping[str, Any], spec_path: Path, *, nodes: int, tasks_per_node: int, use_srun: bool | None = None,
           timeout: float | None = None) -> None:
    """Run ``job`` (a JSON-able ``{"function": "module:name", "kwargs": {...}}``) in ``nodes × tasks_per_node``
    processes and wait; a failing rank fails the job (its exit code, and the other ranks are stopped)."""
    spec_path = Path(spec_path)
    spec_path.parent.mkdir(parents=True, exist_ok=True)
    spec_path.write_text(json.dumps(job, default=str))
    world = nodes * tasks_per_node
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                         os.environ.get("PYTHONPATH", "")])}
    if use_srun is None:
        use_srun = bool(os.environ.get("SLURM_JOB_ID")) and shutil.which("srun") is not None
    cmd = [sys.executable, "-m", WORKER_MODULE, str(spec_path)]
    if use_srun:
        # srun sets SLURM_PROCID/SLURM_LOCALID/SLURM_NTASKS per task; the worker maps them to RANK etc.
        env.update({"MASTER_ADDR": _slurm_master(), "MASTER_PORT": str(20000 + int(os.environ.get("SLURM_JOB_ID", 0)) % 20000)})
        srun = ["srun", f"--nodes={nodes}", f"--ntasks-per-node={tasks_per_node}", f"--ntasks={world}",
                "--kill-on-bad-exit=1", "--cpu-bind=none"]
        subprocess.run(srun + cmd, env=env, check=True, timeout=timeout)
        return
    if nodes != 1:
        raise RuntimeError(f"a {nodes}-node training job needs SLURM (srun); off SLURM only one node can be used")
    env.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": str(world)})
    procs = [subprocess.Popen(cmd, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}) for r in range(world)]
    try:
        codes = _wait_all_or_first_failure(procs, cmd, timeout)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    bad = [(r, c) for r, c in enumerate(codes) if c not in (0, None)]
    if bad:
        stopped = [r for r, c in enumerate(codes) if c is None]
        raise RuntimeError(f"data-parallel training failed: rank(s) {bad} (rank, exit code)"
                           + (f"; stopped rank(s) {stopped}" if stopped else "") + "; see the job log")


def _wait_all_or_first_failure(procs: list[subprocess.Popen], cmd: list[str], timeout: float | None) -> list[int | None]:
    """Exit codes once every rank has exited, or as soon as one fails (None for those still running): the others
    would otherwise wait in their next collective forever, as torchrun and srun --kill-on-bad-exit also assume."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        codes = [p.poll() for p in procs]
        if all(c is not None for c in codes) or any(c not in (0, None) for c in codes):
            return codes
        if deadline is not None and time.monotonic() > deadline:
            raise subprocess.TimeoutExpired(cmd, timeout)
        time.sleep(0.1)


def _worker(spec_path: str) -> None:
    if "SLURM_PROCID" in os.environ and "RANK" not in os.environ:
        os.environ.update({"RANK": os.environ["SLURM_PROCID"], "LOCAL_RANK": os.environ.get("SLURM_LOCALID", "0"),
                           "WORLD_SIZE": os.environ["SLURM_NTASKS"]})
    job = json.loads(Path(spec_path).read_text())
    module, name = job["function"].split(":")
    import importlib

    getattr(importlib.import_module(module), name)(**job["kwargs"])


if __name__ == "__main__":
    _worker(sys.argv[1])

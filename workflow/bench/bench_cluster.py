#!/usr/bin/env python
"""Benchmark: wall time of config/cluster_smoke.yaml through the SLURM profile vs the local profile.

Run from the repository root with the project's venv, on a machine where `sbatch` reaches a cluster (here: the
single-node test cluster of tests/slurm/start_slurm.sh, which needs root):

    tests/slurm/start_slurm.sh && .venv/bin/python workflow/bench/bench_cluster.py [--out results/bench/cluster.json]

Both runs start from a fresh copy of the repository (no results), so every job runs. The SLURM run polls with
`squeue` (the test cluster has no accounting database) and waits 2 s before its first status check; on a real
cluster drop those flags with --plain-slurm. Prints both wall times and their ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PARTS = ("Snakefile", "workflow", "config", "resources", "envs")
IGNORE = shutil.ignore_patterns("results", ".venv", ".git", ".snakemake", "__pycache__", "*.pyc")
CONFIG = "config/cluster_smoke.yaml"
TEST_CLUSTER_FLAGS = ["--slurm-status-command", "squeue", "--slurm-init-seconds-before-status-checks", "2",
                      "--set-resources", "preprocess_dataset:mem_mb=2000", "score_celleval:mem_mb=2000"]


def fresh_copy() -> Path:
    tmp = Path(tempfile.mkdtemp(prefix="bench_cluster_"))
    for part in PARTS:
        src = ROOT / part
        if src.is_dir():
            shutil.copytree(src, tmp / part, ignore=IGNORE)
        else:
            shutil.copy2(src, tmp / part)
    return tmp


def timed_run(args: list[str], limit_s: int) -> dict:
    root = fresh_copy()
    snakemake = Path(sys.executable).parent / "snakemake"
    # targets first: --set-resources takes every word after it
    cmd = ["timeout", "-s", "KILL", str(limit_s), str(snakemake), "all", *args, "--configfile", CONFIG]
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    log = root / "snakemake.log"
    print(f"[bench_cluster] {' '.join(cmd[4:])}  (cwd {root})", flush=True)
    start = time.perf_counter()
    with log.open("w") as out:
        code = subprocess.run(cmd, cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT, check=False).returncode
    wall = time.perf_counter() - start
    if code != 0:
        raise SystemExit(f"snakemake exited {code} after {wall:.0f} s; log: {log}\n" + log.read_text()[-3000:])
    shutil.rmtree(root, ignore_errors=True)
    return {"command": " ".join(cmd[4:]), "wall_seconds": wall}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="results/bench/cluster.json")
    ap.add_argument("--cores", type=int, default=2, help="cores for the local profile run (default: %(default)s)")
    ap.add_argument("--plain-slurm", action="store_true", help="no test-cluster flags (a real cluster)")
    ap.add_argument("--limit", type=int, default=1800, help="seconds before a run is killed")
    args = ap.parse_args(argv)
    if shutil.which("sbatch") is None:
        raise SystemExit("sbatch not found: start a cluster first (tests/slurm/start_slurm.sh, as root)")
    slurm_flags = [] if args.plain_slurm else TEST_CLUSTER_FLAGS
    slurm = timed_run(["--profile", "workflow/profiles/slurm", *slurm_flags], args.limit)
    local = timed_run(["--profile", "workflow/profiles/local", f"-c{args.cores}"], args.limit)
    result = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "slurm": slurm,
        "local": local,
        "ratio_slurm_over_local": slurm["wall_seconds"] / local["wall_seconds"],
    }
    out = ROOT / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"SLURM profile: {slurm['wall_seconds']:.0f} s   local profile (-c{args.cores}): "
          f"{local['wall_seconds']:.0f} s   ratio SLURM/local: {result['ratio_slurm_over_local']:.2f}")
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Run the real Snakemake DAG in a scratch copy of the repository."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = str(Path(sys.executable).parent / "snakemake")


def copy_repo(dest: Path) -> Path:
    """The workflow's own files only (no results, no venv), so a run starts from nothing."""
    shutil.copy2(REPO / "Snakefile", dest / "Snakefile")
    for part in ("workflow", "config", "resources", "envs"):
        shutil.copytree(REPO / part, dest / part, ignore=shutil.ignore_patterns("__pycache__", "raw"))
    return dest


def snakemake(workdir: Path, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run(
        [SNAKEMAKE, *args], cwd=workdir, capture_output=True, text=True, timeout=timeout
    )

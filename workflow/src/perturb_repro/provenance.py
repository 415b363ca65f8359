"""What a reader needs to trust a number: config and data digests, code version, package versions."""

from __future__ import annotations

import hashlib
import json
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable, Mapping

PACKAGES = ("cellflow-tools", "cell-eval", "anndata", "scanpy", "jax", "torch", "transformers", "snakemake")


def code_version(repo: Path = Path(__file__).resolve().parents[3]) -> str:
    try:
        out = subprocess.run(["git", "-C", str(repo), "describe", "--always", "--dirty"], capture_output=True, text=True)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def package_versions(names: Iterable[str] = PACKAGES) -> dict[str, str]:
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def collect_provenance(configfiles: Iterable[str], sources: Mapping[str, Any], summaries: Iterable[str]) -> dict:
    configs = {str(f): hashlib.sha256(Path(f).read_bytes()).hexdigest() for f in configfiles if Path(f).exists()}
    return {
        "config files (sha256)": configs,
        "data sources (configured sha256)": {d: s.get("sha256") or "not pinned" for d, s in sources.items()},
        "dataset summaries": {Path(p).parent.name: json.loads(Path(p).read_text()) for p in summaries},
        "code version (git)": code_version(),
        "packages": package_versions(),
    }

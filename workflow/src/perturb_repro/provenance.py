"""What a reader needs to trust a number: config and data digests, code version, package versions."""

from __future__ import annotations

import hashlib
import json
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable, Mapping

PACKAGES = ("cellflow-tools", "cell-eval", "anndata", "scanpy", "jax", "torch", "transformers", "snakemake")


# What makes a result: the workflow's code and the presets. Outside a git checkout (a copied tree, an unpacked
# release) the code version is their content digest, so it is never "unknown".
CODE_GLOBS = ("Snakefile", "workflow/**/*.py", "workflow/**/*.smk", "workflow/**/*.yaml", "config/presets/*.yaml")


def code_digest(repo: Path) -> str:
    """sha256 over the relative paths and bytes of the code files (CODE_GLOBS), in path order."""
    files = sorted({f for pattern in CODE_GLOBS for f in repo.glob(pattern) if f.is_file() and "__pycache__" not in f.parts})
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.relative_to(repo).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return digest.hexdigest()


def code_version(repo: Path = Path(__file__).resolve().parents[3]) -> str:
    """``git describe --always --dirty`` of the checkout, or ``tree-sha256:<code_digest>`` without git."""
    try:
        out = subprocess.run(
            ["git", "-C", str(repo), "describe", "--always", "--dirty"], capture_output=True, text=True
        )
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except OSError:  # no git on the node
        pass
    return "tree-sha256:" + code_digest(repo)


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


def _device() -> str:
    try:
        import jax

        return ",".join(sorted({d.platform for d in jax.devices()}))
    except Exception:  # JAX absent or broken: the job ran on CPU as far as we can tell
        return "cpu"


def _benchmark_seconds(paths: Iterable[str]) -> dict[str, float]:
    """Wall seconds of each job from its Snakemake benchmark file (first column ``s``), keyed ``<stage>/<run>``:
    benchmarks/<stage>/<dataset>/<run>.tsv, where a replicate's run is ``<model>/seeds/<seed>``."""
    out = {}
    for path in paths:
        p = Path(path)
        if p.exists():
            lines = p.read_text().splitlines()
            if len(lines) > 1:
                parts = p.with_suffix("").parts
                at = parts.index("benchmarks") if "benchmarks" in parts else len(parts) - 3
                key = "/".join([parts[at + 1], *parts[at + 3:]]) if len(parts) > at + 3 else f"{p.parent.parent.name}/{p.stem}"
                out[key] = float(lines[-1].split("\t")[0])
    return out


def run_manifest(
    inputs: Mapping[str, Iterable[str] | str],
    settings: Mapping[str, Any],
    seed: int,
    benchmarks: Iterable[str],
) -> dict:
    """Everything needed to trust or redo one (dataset, model) result."""
    digests: dict[str, str] = {}
    for role, paths in inputs.items():
        for path in [paths] if isinstance(paths, str) else list(paths):
            p = Path(path)
            files = sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p]
            for f in files:
                digests[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
    settings_json = json.dumps(settings, sort_keys=True, default=str)
    return {
        "inputs_sha256": digests,
        "settings": json.loads(settings_json),
        "settings_sha256": hashlib.sha256(settings_json.encode()).hexdigest(),
        "code_version": code_version(),
        "packages": package_versions(),
        "seed": seed,
        "device": _device(),
        "training_devices": _training_devices(inputs.get("checkpoint")),
        "wall_seconds": _benchmark_seconds(benchmarks),
    }


def _training_devices(checkpoint: Iterable[str] | str | None) -> dict[str, Any]:
    """What the training job asked for and ran on: the GPU guard's report (config_used.json) and the shared
    trainer's device, precision and world size (trainer.json)."""
    if not checkpoint:
        return {}
    directory = Path(checkpoint if isinstance(checkpoint, str) else list(checkpoint)[0])
    out: dict[str, Any] = {}
    used = directory / "config_used.json"
    if used.exists():
        out["guard"] = json.loads(used.read_text()).get("devices", {})
    trainer = directory / "trainer.json"
    if trainer.exists():
        report = json.loads(trainer.read_text())
        out["trainer"] = {k: report.get(k) for k in ("device", "gpu_model", "precision_requested", "precision_used",
                                                     "world_size", "backend", "steps")}
    return out

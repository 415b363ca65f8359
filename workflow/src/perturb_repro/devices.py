"""Which accelerators a job asked for, which its framework sees, and the guard between the two.

A SLURM job that asked for a GPU and got none (or got one its framework cannot see: a CPU build of
torch, JAX without its CUDA plugin) would otherwise train on the CPU for days and "succeed". Every
job whose resources ask for GPUs calls :func:`require_accelerators` before doing any work.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

from .errors import PipelineInputError

GPU_ENV_HINT = (
    "install the GPU environment on the GPU node (`pip install -r envs/requirements-gpu.txt`, or "
    "`--sdm conda` with envs/pipeline-gpu.yaml; README 'Cluster' shows how to check that JAX and torch see "
    "the GPU)"
)


class AcceleratorUnavailable(PipelineInputError):
    """A job asked for GPUs its framework cannot see."""

    def __init__(self, message: str) -> None:
        ValueError.__init__(self, message)  # the message names rule, dataset and model itself
        self.source, self.field, self.problem = "resources", "gpu", message


@dataclass
class DeviceReport:
    """What a job asked for and what it ran on; written into the job's outputs for provenance."""

    framework: str
    requested_gpus: int
    visible_gpus: int
    device: str
    gpu_model: str | None = None
    framework_build: str | None = None
    cuda_visible_devices: str | None = None
    allow_cpu: bool = False
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def visible_accelerators(framework: str) -> tuple[int, str | None, str | None]:
    """(count, model name of the first, build string) of the accelerators ``framework`` sees."""
    if framework == "jax":
        import jax

        try:
            gpus = jax.devices("gpu")
        except RuntimeError:  # no GPU backend: JAX without its CUDA plugin, or no driver
            gpus = []
        build = f"jax {jax.__version__}, default backend {jax.default_backend()}"
        return len(gpus), (gpus[0].device_kind if gpus else None), build
    if framework == "torch":
        import torch

        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        build = f"torch {torch.__version__}, CUDA build {torch.version.cuda or 'none (CPU-only wheel)'}"
        return n, (torch.cuda.get_device_name(0) if n else None), build
    if framework == "none":
        return 0, None, None
    raise ValueError(f"unknown framework {framework!r} (jax, torch or none)")


def require_accelerators(
    requested: int, framework: str, *, rule: str, dataset: str, model: str, allow_cpu: bool = False,
) -> DeviceReport:
    """Fail at once, naming the job and the fix, when ``framework`` sees fewer than ``requested`` GPUs.

    ``requested`` is per process (per node for a multi-node job: each node's processes share its GPUs).
    With ``allow_cpu`` the job goes on and the report says it ran on the CPU on purpose."""
    requested = int(requested or 0)
    seen, name, build = visible_accelerators(framework) if requested > 0 else (0, None, None)
    report = DeviceReport(
        framework=framework, requested_gpus=requested, visible_gpus=seen,
        device="cuda" if requested > 0 and seen >= requested else "cpu", gpu_model=name, framework_build=build,
        cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"), allow_cpu=bool(allow_cpu),
    )
    if requested > 0 and seen < requested:
        if allow_cpu:
            report.notes.append(f"asked for {requested} GPU(s), {framework} sees {seen}: running on CPU (allow_cpu: true)")
            return report
        raise AcceleratorUnavailable(
            f"rule {rule} (dataset {dataset}, model {model}) requested {requested} GPU(s) but {framework} sees {seen} "
            f"[{build}; CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}]. "
            f"Fix: {GPU_ENV_HINT}; or set models.{model}.allow_cpu: true to run this model on the CPU on purpose."
        )
    return report


def guard_job(snakemake, framework: str) -> DeviceReport:
    """The guard as a rule script calls it: requested GPUs from the job's resources (per node), the
    model entry's ``allow_cpu`` from the config."""
    resources: Mapping[str, Any] = snakemake.resources
    wildcards = snakemake.wildcards
    model = str(getattr(wildcards, "model", "?"))
    nodes = max(1, int(resources.get("nodes", 1) or 1))
    requested = int(resources.get("gpu", 0) or 0) // nodes
    allow_cpu = bool(snakemake.config.get("models", {}).get(model, {}).get("allow_cpu", False))
    return require_accelerators(
        requested, framework, rule=snakemake.rule, dataset=str(getattr(wildcards, "dataset", "?")), model=model,
        allow_cpu=allow_cpu,
    )

"""Requested targets checked against the config before Snakemake builds its DAG.

``wildcard_constraints`` built from the config keep ``{dataset}``/``{model}`` to configured keys, so a path with
an unknown key matches no rule and Snakemake says only "No rule to produce results/nosuch/...". The Snakefile
calls :func:`target_problems` with the targets of the command line (the same list with or without
``--profile``) and stops with a message naming the unknown key and the configured ones.
"""

from __future__ import annotations

import os
from pathlib import PurePosixPath
from typing import Iterable, Mapping, Sequence

# results/<name>/... entries that are not datasets
NON_DATASET_DIRS = {"tables", "esm2"}
# results/<dataset>/<name>/... entries that are not models
NON_MODEL_DIRS = {"embeddings"}
EXTRA_TABLES = {"scfate_table1"}  # built by the audit rule, not a key of `tables`


def _relative(target: str, workdir: str) -> str | None:
    path = os.path.normpath(target)
    if os.path.isabs(path):
        rel = os.path.relpath(path, workdir)
        if rel.startswith(".."):
            return None
        path = rel
    return PurePosixPath(*path.split(os.sep)).as_posix()


def target_problems(
    targets: Iterable[str], datasets: Sequence[str], models: Sequence[str], models_of: Mapping[str, Sequence[str]],
    tables: Sequence[str], workdir: str = ".",
) -> list[str]:
    """One message per requested path under ``results/`` whose dataset, model or table is not configured.

    Args:
        targets: The requested targets (file paths or rule names; rule names are ignored).
        datasets: Keys of ``datasets``.
        models: The model keys the ``{model}`` wildcard accepts (models some dataset runs).
        models_of: Dataset -> its ``datasets.<d>.models``, listed in the message.
        tables: Keys of ``tables``.
        workdir: The working directory absolute targets are taken relative to.
    """
    problems = []
    for target in targets:
        rel = _relative(str(target), workdir)
        if rel is None:
            continue
        parts = rel.split("/")
        if parts[0] != "results" or len(parts) < 3:
            continue
        head = parts[1]
        if head == "tables":
            name = parts[2].rsplit(".", 1)[0]
            known = sorted({*tables, *EXTRA_TABLES})
            if len(parts) == 3 and name not in known:
                problems.append(f"target {rel}: unknown table '{name}' (config key tables); configured: {known}")
            continue
        if head in NON_DATASET_DIRS:
            continue
        if head not in datasets:
            problems.append(f"target {rel}: unknown dataset '{head}' (config key datasets); configured: "
                            f"{sorted(datasets)}")
            continue
        if len(parts) >= 4:
            model = parts[2]
            if model not in models and model not in NON_MODEL_DIRS:
                problems.append(f"target {rel}: unknown model '{model}' (config keys models and "
                                f"datasets.{head}.models); configured for '{head}': {sorted(models_of.get(head, ()))}")
    return problems


__all__ = ["NON_DATASET_DIRS", "NON_MODEL_DIRS", "target_problems"]

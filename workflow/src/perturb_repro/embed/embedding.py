"""One gene-embedding file from its config entry (``esm2.embeddings.<name>``): the embed rule's entry point."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from perturb_repro.embed.esm2 import run_esm2
from perturb_repro.embed.identity import run_identity
from perturb_repro.errors import PipelineInputError

KINDS = ("esm2", "one_hot")


def run_embedding(
    spec: Mapping[str, Any], conditions: Iterable[str], control_label: str, out_path: str | os.PathLike, *,
    sequences: str | None = None, model: str | None = None, release_note: str | None = None,
    shared: Mapping[str, Any] | None = None,
) -> Path:
    """``spec``: kind (esm2 | one_hot), pooling, genes, dtype; ``shared``: the esm2 block's batch_size,
    allow_missing, uniprot_release, taxon_id. ``model``: the hub name or local directory to load."""
    kind = spec.get("kind", "esm2")
    if kind == "one_hot":
        return run_identity(conditions, control_label, out_path)
    if kind != "esm2":
        raise PipelineInputError("esm2.embeddings", "kind", f"must be one of {KINDS}, not {kind!r}")
    shared = shared or {}
    return run_esm2(
        conditions, control_label, sequences, model, out_path, batch_size=int(shared.get("batch_size", 8)),
        allow_missing=bool(shared.get("allow_missing", False)), release=shared.get("uniprot_release"),
        release_note=release_note or None, taxon_id=shared.get("taxon_id"),
        genes=spec.get("genes", "perturbed"), pooling=spec.get("pooling", "mean"), dtype=spec.get("dtype"),
    )

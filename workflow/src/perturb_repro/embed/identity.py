"""One-hot gene identity: a perturbation representation that tells genes apart and claims nothing else.

The offline demo has no real ESM2 (a tiny random-weight model over placeholder sequences gives nearly the
same vector for every gene: mean pairwise cosine 0.88), so a model conditioned on it cannot tell one
perturbation from another and its demo row says nothing about the code. Gene ``i`` of the sorted perturbed
genes gets the unit vector ``e_i`` (pairwise cosine exactly 0); the control keeps the zero vector, as in
every embedding file. It carries no biology: a gene unseen in training is a direction the model never
trained on, which is the honest answer for identity features. Same ``.npz`` layout as the ESM2 files
(:func:`perturb_repro.embed.esm2.write_embeddings`), so the models read it unchanged.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from perturb_repro.embed.esm2 import genes_of_conditions, write_embeddings
from perturb_repro.errors import PipelineInputError

MODEL_NAME = "one_hot_gene_identity"


def identity_embeddings(genes: Iterable[str]) -> dict[str, np.ndarray]:
    """Sorted unique genes -> one-hot float32 vectors of length ``len(genes)``."""
    names = sorted(set(genes))
    eye = np.eye(len(names), dtype=np.float32)
    return {gene: eye[i] for i, gene in enumerate(names)}


def run_identity(conditions: Iterable[str], control_label: str, out_path: str | os.PathLike) -> Path:
    """Write the one-hot embedding of every gene perturbed in ``conditions`` (the embed rule's ``one_hot`` kind)."""
    genes = genes_of_conditions(conditions, control_label)
    if not genes:
        raise PipelineInputError("conditions", "condition", f"no perturbed genes besides '{control_label}'")
    metadata = {"kind": "one_hot", "note": "gene identity, not a protein language model"}
    return write_embeddings(out_path, identity_embeddings(genes), control_label, MODEL_NAME, [], metadata)


def mean_pairwise_cosine(embeddings: dict[str, np.ndarray], control_label: str) -> tuple[float, float]:
    """(mean, max) cosine similarity over pairs of distinct perturbed genes (the control's zero row left out)."""
    vectors = np.stack([v for g, v in embeddings.items() if g != control_label]).astype(np.float64)
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    sims = unit @ unit.T
    off = sims[~np.eye(len(sims), dtype=bool)]
    return float(off.mean()), float(off.max())

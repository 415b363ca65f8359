"""Embedding stage: per-gene vectors of the perturbed genes -- ESM2 protein-language-model embeddings (any ESM2
model, the CellFlow card's pooling as a mode, optionally every FASTA gene) or one-hot gene identity.

torch and transformers are imported lazily inside the functions that need them, so importing this
package (e.g. while Snakemake parses rules) stays cheap.
"""

from perturb_repro.embed.esm2 import (
    embed_genes,
    genes_of_conditions,
    load_embeddings,
    read_fasta,
    run_esm2,
    write_embeddings,
)
from perturb_repro.embed.embedding import run_embedding
from perturb_repro.embed.identity import run_identity
from perturb_repro.embed.tiny_esm import build_tiny_esm2, write_placeholder_fasta

__all__ = [
    "build_tiny_esm2",
    "embed_genes",
    "genes_of_conditions",
    "load_embeddings",
    "read_fasta",
    "run_embedding",
    "run_esm2",
    "run_identity",
    "write_embeddings",
    "write_placeholder_fasta",
]

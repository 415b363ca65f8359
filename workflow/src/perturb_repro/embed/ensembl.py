"""Ensembl canonical protein sequences of the perturbed genes, fetched the way the CellFlow-Norman card's run did.

The card embedded genes with cellflow-tools' ``get_esm_embedding``, whose sequences come from the Ensembl REST
API: gene id -> its canonical transcript (``lookup/id?expand=1``, ``is_canonical``) -> that transcript's protein
(``sequence/id?type=protein``); genes whose canonical transcript is not protein coding get none. The card's
runner passed Ensembl gene ids mapped from the GEARS ``var`` (symbol -> id). This module calls cellflow-tools'
own :func:`cellflow.preprocessing.prot_sequence_from_ensembl` on those ids and writes a ``>SYMBOL`` FASTA
(read by :func:`perturb_repro.embed.esm2.read_fasta`), so the card's sequence source is a file with a sha256
in the embedding's provenance. Needs network; nothing else in the pipeline does this lookup.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path

import anndata as ad

from perturb_repro.embed.esm2 import genes_of_conditions
from perturb_repro.errors import PipelineInputError
from perturb_repro.io import write_text

logger = logging.getLogger(__name__)


def symbol_to_ensembl(var, symbol_column: str, source: str = "var") -> dict[str, str]:
    """Gene symbol -> Ensembl gene id from a ``var`` table whose index holds the ids (GEARS' layout)."""
    if symbol_column not in var:
        raise PipelineInputError(source, symbol_column, "symbol column not in var (needed to map symbols to Ensembl ids)")
    ids = [str(i) for i in var.index]
    if not all(i.startswith("ENSG") for i in ids):
        raise PipelineInputError(source, "var_names", "var_names must be Ensembl gene ids (ENSG...) to look sequences up")
    return dict(zip(map(str, var[symbol_column]), ids, strict=True))


def fetch_canonical_fasta(
    conditions: Iterable[str], control_label: str, processed: str | os.PathLike, out_path: str | os.PathLike,
    symbol_column: str = "gene_name",
) -> Path:
    """Write ``>SYMBOL ensembl=ENSG transcript=ENST`` records of the perturbed genes' canonical proteins."""
    from cellflow.preprocessing import prot_sequence_from_ensembl

    genes = genes_of_conditions(conditions, control_label)
    var = ad.read_h5ad(processed, backed="r").var
    mapping = symbol_to_ensembl(var, symbol_column, str(processed))
    unknown = [g for g in genes if g not in mapping]
    if unknown:
        raise PipelineInputError(str(processed), symbol_column, f"perturbed genes without an Ensembl id in var: {unknown}")
    table = prot_sequence_from_ensembl([mapping[g] for g in genes])
    by_id = {str(r.gene_id): r for r in table.itertuples()}
    records, none = [], []
    for gene in genes:
        row = by_id.get(mapping[gene])
        if row is None or not isinstance(row.protein_sequence, str) or not row.protein_sequence:
            none.append(gene)  # cellflow leaves these out silently; the embedding step lists them
            continue
        records.append(f">{gene} ensembl={mapping[gene]} transcript={row.transcript_id}\n{row.protein_sequence}\n")
    if none:
        logger.warning("Ensembl: no canonical protein for %d gene(s): %s", len(none), none)
    if not records:
        raise PipelineInputError("rest.ensembl.org", "protein_sequence", "no perturbed gene has a canonical protein")
    write_text("".join(records), out_path)
    return Path(out_path)

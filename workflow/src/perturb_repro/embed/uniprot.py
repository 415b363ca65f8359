"""UniProtKB FASTA -> one protein sequence per gene symbol (``GN=``), for the ESM2 gene embeddings.

UniProt FASTA headers (https://www.uniprot.org/help/fasta-headers)::

    >db|UniqueIdentifier|EntryName ProteinName OS=OrganismName OX=OrganismIdentifier [GN=GeneName ]PE=ProteinExistence SV=SequenceVersion

``db`` is ``sp`` (UniProtKB/Swiss-Prot, reviewed) or ``tr`` (TrEMBL, unreviewed). Alternative isoforms
(the ``*_varsplic`` files, or the REST stream with ``includeIsoform=true``) carry ``-N`` after the
accession (``P12345-2``) and have no ``PE``/``SV``. ``GN=`` is absent for entries without a gene name.

CellFlow (``cellflow.preprocessing.get_esm_embedding`` / ``protein_features_from_genes``) fetches one
canonical sequence per gene symbol; here the sequences come from a downloaded file instead, and the
choice among several records with the same ``GN=`` is made explicit and deterministic:

1. reviewed (``sp``) before unreviewed (``tr``);
2. the canonical entry (no ``-N`` isoform suffix) before isoforms;
3. stronger protein evidence (lower ``PE``), then the lowest accession.

A remaining tie (two canonical Swiss-Prot entries with the same ``GN=``, e.g. genes duplicated on
two loci) is resolved by rule 3 and logged. Records without ``GN=`` cannot be keyed and are counted.
Which file and UniProt release the sequences come from is returned in :class:`SequenceSet` so the
embedding file can record it.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from perturb_repro.errors import PipelineInputError

logger = logging.getLogger(__name__)

_HEADER = re.compile(r"^(?P<db>sp|tr)\|(?P<accession>[^|\s]+)\|(?P<entry>\S+)(?:\s+(?P<rest>.*))?$")
_ISOFORM = re.compile(r"^(?P<base>.+)-(?P<n>\d+)$")
_FIELD = re.compile(r"\s(OS|OX|GN|PE|SV)=")
_RELEASE = re.compile(r"Release\s+(\d{4}_\d{2})")


@dataclass(frozen=True)
class UniProtHeader:
    """The parsed fields of one UniProt FASTA header."""

    db: str  # 'sp' (reviewed) or 'tr'
    accession: str  # without the isoform suffix
    isoform: int | None  # N of 'P12345-N'; None for the canonical entry
    entry_name: str
    protein_name: str
    organism: str | None
    taxon_id: int | None
    gene: str | None  # GN=; None when the entry has no gene name
    protein_existence: int | None
    sequence_version: int | None

    @property
    def reviewed(self) -> bool:
        return self.db == "sp"

    @property
    def canonical(self) -> bool:
        return self.isoform is None

    def rank(self) -> tuple:
        """Sort key: the best record for a gene sorts first."""
        pe = self.protein_existence if self.protein_existence is not None else 9
        return (not self.reviewed, not self.canonical, pe, self.accession, self.isoform or 0)


@dataclass
class SequenceSet:
    """Gene symbol -> sequence, with where it came from."""

    sequences: dict[str, str]
    source: str
    format: str  # 'uniprot' or 'symbol' (the placeholder '>SYMBOL description' format)
    release: str | None = None
    chosen: dict[str, str] = field(default_factory=dict)  # gene -> accession[-isoform] used
    without_gene_name: int = 0
    skipped_other_taxon: int = 0


def is_uniprot_header(line: str) -> bool:
    """True for a UniProt header line (with or without the leading '>')."""
    return bool(_HEADER.match(line.lstrip(">").strip()))


def parse_header(line: str, source: str = "FASTA") -> UniProtHeader:
    """Parse one UniProt FASTA header line.

    Raises:
        PipelineInputError: The line is not ``>sp|ACC|ENTRY ...`` or ``>tr|ACC|ENTRY ...``, or a
            numeric field (OX, PE, SV) is not a number.
    """
    text = line.strip()
    match = _HEADER.match(text.removeprefix(">"))
    if not match:
        raise PipelineInputError(source, "header", f"not a UniProt header (>sp|ACC|ENTRY ...): {text[:80]!r}")
    accession, isoform = match["accession"], None
    iso = _ISOFORM.match(accession)
    if iso:
        accession, isoform = iso["base"], int(iso["n"])
    rest = " " + (match["rest"] or "")
    parts = _FIELD.split(rest)  # [protein name, key, value, key, value, ...]
    fields = {parts[i]: parts[i + 1].strip() for i in range(1, len(parts) - 1, 2)}

    def number(key: str) -> int | None:
        if key not in fields:
            return None
        try:
            return int(fields[key])
        except ValueError:
            raise PipelineInputError(source, "header", f"{key}={fields[key]!r} is not a number in {text[:80]!r}") from None

    return UniProtHeader(
        db=match["db"], accession=accession, isoform=isoform, entry_name=match["entry"],
        protein_name=parts[0].strip(), organism=fields.get("OS"), taxon_id=number("OX"),
        gene=fields.get("GN") or None, protein_existence=number("PE"), sequence_version=number("SV"),
    )  # fmt: skip


def _records(path: Path, source: str):
    """Yield (header line, sequence) for each FASTA record, sequence upper-cased without whitespace."""
    header, chunks = None, []
    with open(path, encoding="utf-8") as handle:
        for lineno, raw in enumerate(handle, start=1):
            line = raw.strip()
            if not line:
                continue
            if line.startswith(">"):
                if header is not None:
                    yield header, "".join(chunks)
                header, chunks = (lineno, line), []
            elif header is None:
                raise PipelineInputError(source, "header", f"line {lineno}: sequence text before the first '>' header")
            else:
                chunks.append("".join(line.split()).upper())
    if header is not None:
        yield header, "".join(chunks)


def read_uniprot_fasta(path: str | os.PathLike, taxon_id: int | None = None, release: str | None = None) -> SequenceSet:
    """Read a UniProt FASTA into gene symbol (``GN=``) -> sequence, one record per gene.

    Args:
        path: UniProtKB FASTA (Swiss-Prot, optionally with isoforms and/or TrEMBL records).
        taxon_id: Keep only records with this ``OX=`` (e.g. 9606); ``None`` keeps all.
        release: UniProt release to record (see :func:`read_release`).

    Returns:
        The chosen sequences (see the module docstring for the preference order) and provenance.

    Raises:
        PipelineInputError: The file is missing, has no UniProt records, a header is malformed, or
            a sequence is empty or has characters outside the ESM2 alphabet.
    """
    from perturb_repro.embed.esm2 import VALID_RESIDUES

    source = str(path)
    p = Path(path)
    if not p.is_file():
        raise PipelineInputError(source, "file", "FASTA file does not exist")
    best: dict[str, tuple[UniProtHeader, str]] = {}
    ties: dict[str, list[str]] = {}
    n_records = no_gene = other_taxon = 0
    for (lineno, line), sequence in _records(p, source):
        n_records += 1
        head = parse_header(line, f"{source} line {lineno}")
        if taxon_id is not None and head.taxon_id != taxon_id:
            other_taxon += 1
            continue
        if head.gene is None:
            no_gene += 1
            continue
        if not sequence:
            raise PipelineInputError(source, "sequence", f"line {lineno}: {head.accession} has an empty sequence")
        bad = sorted(set(sequence) - VALID_RESIDUES)
        if bad:
            raise PipelineInputError(source, "sequence", f"line {lineno}: {head.accession} has characters {bad}")
        current = best.get(head.gene)
        if current is not None and head.reviewed and head.canonical and current[0].reviewed and current[0].canonical:
            ties.setdefault(head.gene, [_label(current[0])]).append(_label(head))
        if current is None or head.rank() < current[0].rank():
            best[head.gene] = (head, sequence)
    if n_records == 0:
        raise PipelineInputError(source, "records", "no FASTA records (no '>' header lines)")
    if not best:
        raise PipelineInputError(source, "GN", f"none of the {n_records} records has a gene name (GN=) for the taxon")
    for gene, labels in sorted(ties.items()):
        logger.warning("UniProt %s: gene %s has several reviewed canonical entries %s; using %s",
                       source, gene, labels, _label(best[gene][0]))
    if no_gene:
        logger.info("UniProt %s: %d record(s) without GN= skipped", source, no_gene)
    return SequenceSet(
        sequences={gene: seq for gene, (_, seq) in sorted(best.items())},
        source=source, format="uniprot", release=release,
        chosen={gene: _label(head) for gene, (head, _) in sorted(best.items())},
        without_gene_name=no_gene, skipped_other_taxon=other_taxon,
    )  # fmt: skip


def _label(head: UniProtHeader) -> str:
    return f"{head.db}|{head.accession}" + (f"-{head.isoform}" if head.isoform else "")


def read_release(release: str | None = None, release_note: str | os.PathLike | None = None) -> str | None:
    """The UniProt release: the configured string, else parsed from a release note, else ``None``.

    ``release_note`` is UniProt's ``reldate.txt`` ("UniProtKB/Swiss-Prot Release 2025_01 of ...").

    Raises:
        PipelineInputError: The note is missing or names no ``Release YYYY_MM``.
    """
    if release:
        return str(release)
    if not release_note:
        return None
    note = Path(release_note)
    if not note.is_file():
        raise PipelineInputError(str(note), "file", "UniProt release note does not exist")
    text = note.read_text(encoding="utf-8", errors="replace")
    swissprot = re.search(r"Swiss-Prot\s+Release\s+(\d{4}_\d{2})", text)
    match = swissprot or _RELEASE.search(text)
    if not match:
        raise PipelineInputError(str(note), "release", "no 'Release YYYY_MM' in the release note")
    return match.group(1)


def first_header(path: str | os.PathLike) -> str | None:
    """The first '>' line of a FASTA file (None if it has none or does not exist)."""
    p = Path(path)
    if not p.is_file():
        return None
    with open(p, encoding="utf-8") as handle:
        for line in handle:
            if line.startswith(">"):
                return line.strip()
    return None

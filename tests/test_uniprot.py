"""UniProt FASTA -> gene-keyed sequences for ESM2: headers, canonical preference, provenance, missing genes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from perturb_repro.embed.esm2 import (
    load_embeddings,
    load_sequences,
    missing_report_path,
    read_metadata,
    run_esm2,
)
from perturb_repro.embed.tiny_esm import build_tiny_esm2
from perturb_repro.embed.uniprot import (
    is_uniprot_header,
    parse_header,
    read_release,
    read_uniprot_fasta,
)
from perturb_repro.errors import PipelineInputError

# Headers in UniProt's documented layout; sequences are short made-up strings (not real proteins).
FASTA = """\
>sp|P04637|P53_HUMAN Cellular tumor antigen p53 OS=Homo sapiens OX=9606 GN=TP53 PE=1 SV=4
MEEPQSDPSV
EPPLSQETFS
>sp|P04637-2|P53_HUMAN Isoform 2 of Cellular tumor antigen p53 OS=Homo sapiens OX=9606 GN=TP53
MEEPQSDPSVAAAA
>tr|A0A024R1R8|A0A024R1R8_HUMAN Tumor protein p53 OS=Homo sapiens OX=9606 GN=TP53 PE=1 SV=1
MKKKKKKKKK
>tr|Q9XXX1|Q9XXX1_HUMAN Uncharacterized protein OS=Homo sapiens OX=9606 GN=ONLYTR PE=4 SV=1
MTTTTTTT
>sp|Q99999-3|ISO_HUMAN Isoform 3 of Only isoforms protein OS=Homo sapiens OX=9606 GN=ISOONLY
MIIIIII
>sp|Q99999-2|ISO_HUMAN Isoform 2 of Only isoforms protein OS=Homo sapiens OX=9606 GN=ISOONLY
MII
>sp|P0DPI2|NOGN_HUMAN Protein without gene name OS=Homo sapiens OX=9606 PE=1 SV=1
MNNNNN
>sp|P12345|KLF1_MOUSE Krueppel-like factor 1 OS=Mus musculus OX=10090 GN=KLF1 PE=1 SV=2
MMMMMM
>sp|Q13351|KLF1_HUMAN Krueppel-like factor 1 OS=Homo sapiens OX=9606 GN=KLF1 PE=1 SV=2
mattsss
"""

RELDATE = """\
UniProt Knowledgebase Release 2025_01 consists of:
UniProtKB/Swiss-Prot Release 2025_01 of 05-Feb-2025
UniProtKB/TrEMBL Release 2025_01 of 05-Feb-2025
"""


@pytest.fixture
def fasta(tmp_path: Path) -> Path:
    path = tmp_path / "uniprot.fasta"
    path.write_text(FASTA)
    return path


def test_parse_reviewed_canonical_header():
    head = parse_header(">sp|P04637|P53_HUMAN Cellular tumor antigen p53 OS=Homo sapiens OX=9606 GN=TP53 PE=1 SV=4")
    assert (head.db, head.accession, head.isoform, head.entry_name) == ("sp", "P04637", None, "P53_HUMAN")
    assert head.protein_name == "Cellular tumor antigen p53"
    assert (head.organism, head.taxon_id, head.gene, head.protein_existence, head.sequence_version) == (
        "Homo sapiens", 9606, "TP53", 1, 4,
    )  # fmt: skip
    assert head.reviewed and head.canonical


def test_parse_isoform_trembl_and_missing_gene_name():
    iso = parse_header(">sp|P04637-2|P53_HUMAN Isoform 2 of Cellular tumor antigen p53 OS=Homo sapiens OX=9606 GN=TP53")
    assert (iso.accession, iso.isoform, iso.gene, iso.protein_existence, iso.sequence_version) == ("P04637", 2, "TP53", None, None)
    assert not iso.canonical
    tr = parse_header(">tr|A0A024R1R8|A0A024R1R8_HUMAN Tumor protein p53 OS=Homo sapiens OX=9606 GN=TP53 PE=1 SV=1")
    assert not tr.reviewed and tr.canonical
    no_gn = parse_header(">sp|P0DPI2|NOGN_HUMAN Protein without gene name OS=Homo sapiens OX=9606 PE=1 SV=1")
    assert no_gn.gene is None and no_gn.organism == "Homo sapiens"
    # organism names with parentheses and spaces stay whole
    virus = parse_header(">sp|P03485|M1_I34A1 Matrix protein 1 OS=Influenza A virus (strain A/Puerto Rico/8/1934 H1N1) OX=211044 GN=M PE=1 SV=1")
    assert virus.organism == "Influenza A virus (strain A/Puerto Rico/8/1934 H1N1)" and virus.gene == "M"
    assert is_uniprot_header(">tr|X|Y_HUMAN z") and not is_uniprot_header(">TP53 PLACEHOLDER not a real protein")


@pytest.mark.parametrize("line", [">TP53 description", ">sp|P04637 no entry name", ">sp|P1|E_HUMAN x OX=human GN=A"])
def test_malformed_headers_are_named(line):
    with pytest.raises(PipelineInputError, match="header"):
        parse_header(line)


def test_canonical_reviewed_entry_is_preferred(fasta):
    seqs = read_uniprot_fasta(fasta, taxon_id=9606)
    # TP53: canonical sp beats its isoform and the TrEMBL entry; multi-line sequence joined
    assert seqs.sequences["TP53"] == "MEEPQSDPSVEPPLSQETFS" and seqs.chosen["TP53"] == "sp|P04637"
    # a gene only in TrEMBL is still used; a gene with isoforms only uses the lowest isoform number
    assert seqs.chosen["ONLYTR"] == "tr|Q9XXX1"
    assert seqs.chosen["ISOONLY"] == "sp|Q99999-2" and seqs.sequences["ISOONLY"] == "MII"
    # the taxon filter drops the mouse KLF1; lower case is upper-cased
    assert seqs.sequences["KLF1"] == "MATTSSS" and seqs.chosen["KLF1"] == "sp|Q13351"
    assert seqs.without_gene_name == 1 and seqs.skipped_other_taxon == 1
    assert sorted(seqs.sequences) == ["ISOONLY", "KLF1", "ONLYTR", "TP53"]
    # the same file read twice, or with records in another order, gives the same choice
    reordered = fasta.with_name("rev.fasta")
    records = [">" + r for r in FASTA.split(">")[1:]]
    reordered.write_text("".join(reversed(records)))
    assert read_uniprot_fasta(reordered, taxon_id=9606).chosen == seqs.chosen


def test_two_reviewed_canonical_entries_for_one_gene_pick_strongest_evidence(tmp_path, caplog):
    path = tmp_path / "dup.fasta"
    path.write_text(">sp|Q2|B_HUMAN b OS=Homo sapiens OX=9606 GN=DUP PE=3 SV=1\nMBB\n"
                    ">sp|Q1|A_HUMAN a OS=Homo sapiens OX=9606 GN=DUP PE=1 SV=1\nMAA\n"
                    ">sp|Q0|C_HUMAN c OS=Homo sapiens OX=9606 GN=DUP PE=1 SV=1\nMCC\n")
    seqs = read_uniprot_fasta(path)
    assert seqs.chosen["DUP"] == "sp|Q0"
    assert "several reviewed canonical entries" in caplog.text


def test_release_from_config_or_release_note(tmp_path):
    note = tmp_path / "reldate.txt"
    note.write_text(RELDATE)
    assert read_release("2024_06", note) == "2024_06"
    assert read_release(None, note) == "2025_01"
    assert read_release(None, None) is None
    (tmp_path / "bad.txt").write_text("nothing here")
    with pytest.raises(PipelineInputError, match="release"):
        read_release(None, tmp_path / "bad.txt")


def test_load_sequences_dispatches_on_the_header_format(fasta, tmp_path):
    assert load_sequences(fasta, release="2025_01").format == "uniprot"
    plain = tmp_path / "plain.fasta"
    plain.write_text(">TP53 PLACEHOLDER not a real protein sequence (offline demo only)\nMKV\n")
    seqs = load_sequences(plain)
    assert seqs.format == "symbol" and seqs.sequences == {"TP53": "MKV"}


def test_missing_genes_are_reported_and_never_zeroed(fasta, tmp_path):
    model = build_tiny_esm2(tmp_path / "tiny", seed=0)
    out = tmp_path / "esm2.npz"
    conditions = ["control", "TP53", "KLF1+NOTAPROTEIN", "ONLYTR+TP53", "LINC00473"]
    with pytest.raises(PipelineInputError, match="LINC00473") as err:
        run_esm2(conditions, "control", fasta, model, out, taxon_id=9606)
    assert "missing_genes.csv" in str(err.value) and not out.exists()
    report = pd.read_csv(missing_report_path(out))
    assert report["gene"].tolist() == ["LINC00473", "NOTAPROTEIN"]

    note = tmp_path / "reldate.txt"
    note.write_text(RELDATE)
    run_esm2(conditions, "control", fasta, model, out, taxon_id=9606, allow_missing=True, release_note=note)
    emb = load_embeddings(out)
    assert sorted(emb) == ["KLF1", "ONLYTR", "TP53", "control"]
    assert not np.allclose(emb["TP53"], 0) and np.allclose(emb["control"], 0)
    meta = read_metadata(out)
    assert meta["sequence_source"] == str(fasta) and meta["sequence_release"] == "2025_01"
    assert meta["sequence_format"] == "uniprot" and len(meta["sequence_sha256"]) == 64
    with np.load(out) as npz:
        assert npz["missing"].tolist() == ["LINC00473", "NOTAPROTEIN"]
    assert pd.read_csv(missing_report_path(out))["gene"].tolist() == ["LINC00473", "NOTAPROTEIN"]

"""Tests for the ESM2 gene-embedding module, run offline against a tiny random-weight ESM2."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from perturb_repro.embed.esm2 import (
    embed_genes,
    genes_of_conditions,
    load_embeddings,
    read_fasta,
    run_esm2,
    write_embeddings,
)
from perturb_repro.embed.tiny_esm import (
    ESM2_VOCAB,
    PLACEHOLDER_DESCRIPTION,
    build_tiny_esm2,
    placeholder_sequence,
    write_placeholder_fasta,
)
from perturb_repro.errors import PipelineInputError
from transformers import AutoTokenizer, EsmModel
from transformers.models.esm.configuration_esm import get_default_vocab_list

REPO = Path(__file__).resolve().parents[1]
DEMO_FASTA = REPO / "resources" / "esm2" / "demo_sequences.fasta"
DEVEL_H5AD = REPO / "resources" / "demo" / "perturbench_devel.h5ad"  # shipped with the repository
# The perturbed genes of the demo data (perturbench devel subset), frozen here so the resource check
# does not need the data; test_demo_gene_list_matches_data checks it against the data when present.
DEMO_GENES = [
    "BPGM", "CBL", "CEBPE", "CNN1", "FOXL2", "FOXO4", "HK2", "HOXB9", "IER5L", "KLF1", "KMT2A",
    "MAP2K3", "MAP2K6", "MAP3K21", "MAP4K3", "MAP4K5", "MAPK1", "MIDN", "NIT1", "PLK4", "PTPN12",
    "PTPN9", "RUNX1T1", "SAMD1", "SET", "SGK1", "SLC38A2", "TBX3", "TGFBR2", "TMSB4X", "ZBTB10",
]  # fmt: skip

SHORT = "MKTAYIAKQR"  # 10 residues
LONG = "MSDNGELEDKPPAPPVRMSSTIFSTGGKDPLSANHSLKPLPSVPEEKKPRHKIISIFSGTEKGSKKKEKERPEISPPSDFE"  # 80 residues


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny model for the module: building it is the slow part."""
    return build_tiny_esm2(tmp_path_factory.mktemp("esm") / "tiny", seed=0)


def _reference_embedding(model_dir: Path, sequence: str) -> np.ndarray:
    """Independent computation: one sequence, no batch, no padding, drop CLS and EOS by slicing."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = EsmModel.from_pretrained(model_dir, add_pooling_layer=False).eval()
    tokens = tokenizer(sequence, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**tokens).last_hidden_state
    return hidden[0, 1:-1].mean(0).numpy()


# ---------------------------------------------------------------- tiny model


def test_tiny_model_builds_loads_and_is_deterministic(tmp_path: Path, tiny_model: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = EsmModel.from_pretrained(tiny_model, add_pooling_layer=False)
    # The real ESM2 vocabulary and ids; transformers' own ESM2 default list is an independent reference.
    assert list(ESM2_VOCAB) == list(get_default_vocab_list())
    assert [tokenizer.convert_ids_to_tokens(i) for i in range(33)] == list(ESM2_VOCAB)
    assert (tokenizer.cls_token_id, tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.mask_token_id) == (
        0, 1, 2, 32,
    )  # fmt: skip
    # one token per residue, wrapped in <cls> ... <eos>
    assert tokenizer("MKV")["input_ids"] == [0, 20, 15, 7, 2]
    cfg = model.config
    assert (cfg.position_embedding_type, cfg.token_dropout, cfg.vocab_size) == ("rotary", True, 33)
    assert (cfg.mask_token_id, cfg.pad_token_id) == (32, 1)
    assert "random" in (tiny_model / "README.txt").read_text().lower()

    same = build_tiny_esm2(tmp_path / "same", seed=0)
    other = build_tiny_esm2(tmp_path / "other", seed=1)
    sha = lambda d: hashlib.sha256((d / "model.safetensors").read_bytes()).hexdigest()  # noqa: E731
    assert sha(same) == sha(tiny_model)
    assert sha(other) != sha(tiny_model)
    # Rebuilding in place replaces the directory and leaves no temporary siblings behind.
    build_tiny_esm2(tmp_path / "same", seed=1)
    assert sha(tmp_path / "same") == sha(other)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other", "same"]


# ---------------------------------------------------------------- embedding


def test_embed_genes_matches_unbatched_reference_despite_padding(tiny_model: Path) -> None:
    seqs = {"SHORTG": SHORT, "LONGG": LONG}
    # batch_size=2 puts both in one batch, so SHORTG carries 70 padding positions.
    batched, missing = embed_genes(["SHORTG", "LONGG"], seqs, tiny_model, batch_size=2, device="cpu")
    assert missing == []
    ref_short = _reference_embedding(tiny_model, SHORT)
    ref_long = _reference_embedding(tiny_model, LONG)
    assert batched["SHORTG"].dtype == np.float32 and batched["SHORTG"].shape == (32,)
    np.testing.assert_allclose(batched["SHORTG"], ref_short, atol=1e-5, rtol=1e-4)
    np.testing.assert_allclose(batched["LONGG"], ref_long, atol=1e-5, rtol=1e-4)

    # Negative controls: the pooling choices we exclude give clearly different vectors, so the
    # comparison above would fail if padding or the special tokens leaked into the mean.
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = EsmModel.from_pretrained(tiny_model, add_pooling_layer=False).eval()
    tokens = tokenizer([SHORT, LONG], padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**tokens).last_hidden_state
    with_padding = hidden[0, 1:].mean(0).numpy()
    with_specials = hidden[0, : len(SHORT) + 2].mean(0).numpy()
    assert not np.allclose(with_padding, ref_short, atol=1e-3)
    assert not np.allclose(with_specials, ref_short, atol=1e-3)


def test_embed_genes_truncates_long_sequences_with_warning(tiny_model: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="perturb_repro.embed.esm2"):
        out, _ = embed_genes(["LONGG"], {"LONGG": LONG}, tiny_model, device="cpu", max_length=12)
    assert any("LONGG" in r.getMessage() for r in caplog.records)
    # 12 tokens incl. CLS/EOS -> the first 10 residues, exactly as tokenizer truncation (cellflow) keeps them.
    np.testing.assert_allclose(out["LONGG"], _reference_embedding(tiny_model, LONG[:10]), atol=1e-5, rtol=1e-4)


def test_missing_gene_raises_naming_it_unless_allowed(tiny_model: Path) -> None:
    with pytest.raises(PipelineInputError, match="NOSEQ1"):
        embed_genes(["A1", "NOSEQ1"], {"A1": SHORT}, tiny_model, sequences_source="demo.fasta")
    out, missing = embed_genes(["A1", "NOSEQ1"], {"A1": SHORT}, tiny_model, allow_missing=True)
    assert missing == ["NOSEQ1"] and sorted(out) == ["A1"]


# ---------------------------------------------------------------- npz file


def test_npz_round_trip_with_zero_control_row(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    emb = {"B": rng.normal(size=4).astype(np.float32), "A": rng.normal(size=4).astype(np.float32)}
    path = write_embeddings(tmp_path / "emb.npz", emb, "control", "tiny-model", missing=["Z"])

    raw = np.load(path, allow_pickle=False)
    assert raw["genes"].tolist() == ["control", "A", "B"]
    assert raw["embeddings"].dtype == np.float32 and raw["embeddings"].shape == (3, 4)
    assert np.all(raw["embeddings"][0] == 0.0)
    assert str(raw["model_name"]) == "tiny-model" and raw["missing"].tolist() == ["Z"]

    back = load_embeddings(path)
    assert list(back) == ["control", "A", "B"]
    assert np.all(back["control"] == 0.0)
    for gene in emb:
        np.testing.assert_array_equal(back[gene], emb[gene])
    assert [p.name for p in tmp_path.iterdir()] == ["emb.npz"]  # no temp file left


def test_load_embeddings_rejects_malformed_files(tmp_path: Path) -> None:
    partial = tmp_path / "partial.npz"
    np.savez(partial, genes=np.array(["control", "A"]), model_name=np.array("m"), missing=np.array([], dtype=str))
    with pytest.raises(PipelineInputError, match="embeddings"):
        load_embeddings(partial)
    garbage = tmp_path / "garbage.npz"
    garbage.write_text("not a zip")
    with pytest.raises(PipelineInputError, match="garbage.npz"):
        load_embeddings(garbage)


def test_write_embeddings_rejects_control_as_gene(tmp_path: Path) -> None:
    with pytest.raises(PipelineInputError, match="control"):
        write_embeddings(tmp_path / "e.npz", {"control": np.ones(3)}, "control", "m", [])


# ---------------------------------------------------------------- FASTA and conditions


@pytest.mark.parametrize(
    ("text", "gene"),
    [
        (">GOOD\nMKV\n>BADCHR some description\nMK*V\n", "BADCHR"),
        (">GOOD\nMKV\n>EMPTYSEQ\n>NEXT\nMKV\n", "EMPTYSEQ"),
        (">DUPL\nMKV\n>DUPL\nMKV\n", "DUPL"),
    ],
)
def test_malformed_fasta_names_file_and_gene(tmp_path: Path, text: str, gene: str) -> None:
    path = tmp_path / "bad.fasta"
    path.write_text(text)
    with pytest.raises(PipelineInputError) as err:
        read_fasta(path)
    assert str(path) in str(err.value) and gene in str(err.value)


def test_fasta_without_records_names_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.fasta"
    path.write_text("\n\n")
    with pytest.raises(PipelineInputError, match="empty.fasta"):
        read_fasta(path)


def test_read_fasta_multiline_and_lowercase(tmp_path: Path) -> None:
    path = tmp_path / "ok.fasta"
    path.write_text(">A1 desc words\nmkv\nLAX\n\n>B2\nWWU\n")
    assert read_fasta(path) == {"A1": "MKVLAX", "B2": "WWU"}


def test_genes_of_conditions() -> None:
    conds = ["control", "B+A", "C+ctrl", "A", "ctrl+D", "B+A"]
    assert genes_of_conditions(conds, "control") == ["A", "B", "C", "D"]
    with pytest.raises(PipelineInputError, match="A\\+\\+B"):
        genes_of_conditions(["A++B"], "control")


# ---------------------------------------------------------------- demo resources


def test_placeholder_fasta_resource_matches_generator(tmp_path: Path) -> None:
    regenerated = write_placeholder_fasta(DEMO_GENES, tmp_path / "demo.fasta")
    assert DEMO_FASTA.read_bytes() == regenerated.read_bytes()
    seqs = read_fasta(DEMO_FASTA)
    assert sorted(seqs) == DEMO_GENES
    assert all(100 <= len(s) <= 400 for s in seqs.values())
    assert len(set(seqs.values())) == len(seqs)
    assert DEMO_FASTA.read_text().splitlines()[0] == f">BPGM {PLACEHOLDER_DESCRIPTION}"
    # Pin one value so a change of the generator itself (not just of the file) is noticed.
    assert placeholder_sequence("BPGM")[:12] == "TYNDNVKSIEQE"


def test_demo_gene_list_matches_data() -> None:
    import anndata as ad

    adata = ad.read_h5ad(DEVEL_H5AD, backed="r")
    try:
        assert genes_of_conditions(adata.obs["condition"].unique(), "control") == DEMO_GENES
    finally:
        adata.file.close()


def test_run_esm2_end_to_end_on_demo(tmp_path: Path, tiny_model: Path) -> None:
    conditions = ["control", "BPGM", "CBL+CEBPE", "TBX3+ctrl", "NOTINFASTA"]
    with pytest.raises(PipelineInputError, match="NOTINFASTA"):
        run_esm2(conditions, "control", DEMO_FASTA, tiny_model, tmp_path / "x.npz")
    assert not (tmp_path / "x.npz").exists()

    out = run_esm2(conditions, "control", DEMO_FASTA, tiny_model, tmp_path / "e.npz", allow_missing=True)
    emb = load_embeddings(out)
    assert list(emb) == ["control", "BPGM", "CBL", "CEBPE", "TBX3"]
    assert np.all(emb["control"] == 0) and not np.allclose(emb["BPGM"], emb["CBL"])
    assert np.load(out)["missing"].tolist() == ["NOTINFASTA"]

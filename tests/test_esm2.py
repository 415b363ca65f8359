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
from perturb_repro.embed.esm2 import read_metadata  # provenance keys (pooling, gene_scope)
from perturb_repro.embed.tiny_esm import ESM2_VOCAB, PLACEHOLDER_DESCRIPTION, build_tiny_esm2, placeholder_sequence
from perturb_repro.embed.tiny_esm import write_placeholder_fasta
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


# ---------------------------------------------------------------- the CellFlow card's embedding (issue 16.5)


def _cellflow_tools_embeddings(monkeypatch, model_dir: Path, sequences: dict[str, str]) -> dict[str, np.ndarray]:
    """cellflow-tools' own protein_features_from_genes (its batching and loop), with the Ensembl lookup and the
    hub download replaced by the given sequences and the local tiny model."""
    import pandas as pd
    from cellflow.preprocessing import _gene_emb

    table = pd.DataFrame({"gene_id": list(sequences), "transcript_id": "T", "display_name": "", "is_protein_coding": True,
                          "seq_len": [len(s) for s in sequences.values()], "protein_sequence": list(sequences.values())})
    monkeypatch.setattr(_gene_emb, "prot_sequence_from_ensembl", lambda ids: table[table.gene_id.isin(ids)])

    def local(model_name, use_cuda, cache_dir):
        model = EsmModel.from_pretrained(model_dir, add_pooling_layer=False).eval().requires_grad_(False)
        return model, AutoTokenizer.from_pretrained(model_dir)

    monkeypatch.setattr(_gene_emb, "get_model_and_tokenizer", local)
    monkeypatch.setenv("HF_HOME", str(model_dir))
    results, _ = _gene_emb.protein_features_from_genes(list(sequences), use_cuda=False, toks_per_batch=256)
    return {g: v.numpy() for g, v in results.items()}


def test_cellflow_card_pooling_equals_cellflow_tools_own_embedding(monkeypatch, tiny_model: Path) -> None:
    sequences = {"A": LONG, "B": SHORT + "GGHHWW", "C": SHORT, "D": LONG[:45]}
    theirs = _cellflow_tools_embeddings(monkeypatch, tiny_model, sequences)
    ours, _ = embed_genes(sequences, sequences, tiny_model, batch_size=2, pooling="cellflow_card")
    for gene in sequences:
        np.testing.assert_allclose(ours[gene], theirs[gene], rtol=1e-5, atol=1e-6, err_msg=gene)
    # the bug: every gene but the shortest is averaged over its first len(SHORT) residues only, so the card's
    # vectors differ from the correct mean (which is ours by default) for every longer protein
    correct, _ = embed_genes(sequences, sequences, tiny_model)
    np.testing.assert_allclose(correct["C"], theirs["C"], rtol=1e-5, atol=1e-6)
    for gene in ("A", "B", "D"):
        assert not np.allclose(correct[gene], theirs[gene], atol=1e-4), gene
        np.testing.assert_allclose(correct[gene], _reference_embedding(tiny_model, sequences[gene]), rtol=1e-4, atol=1e-5)


def test_run_esm2_records_the_pooling_and_rejects_unknown_modes(tmp_path: Path, tiny_model: Path) -> None:
    out = run_esm2(["control", "BPGM", "CBL"], "control", DEMO_FASTA, tiny_model, tmp_path / "c.npz", pooling="cellflow_card")
    assert read_metadata(out)["pooling"] == "cellflow_card"
    with pytest.raises(ValueError, match="pooling"):
        embed_genes(["BPGM"], {"BPGM": SHORT}, tiny_model, pooling="first_residue")


def test_ensembl_canonical_fasta_from_cellflow_tools_lookup(monkeypatch, tmp_path: Path) -> None:
    import anndata as ad
    import pandas as pd
    from cellflow import preprocessing as cfpp
    from perturb_repro.embed.ensembl import fetch_canonical_fasta

    var = pd.DataFrame({"gene_name": ["BPGM", "CBL", "LINC1"]}, index=["ENSG01", "ENSG02", "ENSG03"])
    processed = tmp_path / "processed.h5ad"
    ad.AnnData(np.zeros((2, 3), dtype=np.float32), var=var).write_h5ad(processed)
    asked = []

    def lookup(ids):  # cellflow's table: a non-coding canonical transcript has no protein sequence
        asked.extend(ids)
        return pd.DataFrame({"gene_id": ids, "transcript_id": ["ENST1", "ENST2", "ENST3"],
                             "protein_sequence": [SHORT, LONG, None]})

    monkeypatch.setattr(cfpp, "prot_sequence_from_ensembl", lookup)
    out = fetch_canonical_fasta(["ctrl", "BPGM+CBL", "LINC1+ctrl"], "ctrl", processed, tmp_path / "e.fasta")
    assert asked == ["ENSG01", "ENSG02", "ENSG03"]  # Ensembl ids, as the card's runner passed them
    assert read_fasta(out) == {"BPGM": SHORT, "CBL": LONG}
    with pytest.raises(PipelineInputError, match="NOPE"):
        fetch_canonical_fasta(["NOPE"], "ctrl", processed, tmp_path / "f.fasta")


# ---------------------------------------------------------------- whole-vocabulary prior (issue 16.3)


def test_all_genes_scope_embeds_every_fasta_gene_but_requires_only_the_perturbed(tmp_path: Path, tiny_model: Path) -> None:
    fasta = tmp_path / "s.fasta"
    fasta.write_text(f">BPGM\n{SHORT}\n>CBL\n{LONG}\n>PANEL1\n{LONG[:30]}\n>PANEL2\n{LONG[5:50]}\n")
    out = run_esm2(["control", "BPGM+CBL"], "control", fasta, tiny_model, tmp_path / "all.npz", genes="all")
    emb = load_embeddings(out)
    assert sorted(emb) == ["BPGM", "CBL", "PANEL1", "PANEL2", "control"]
    np.testing.assert_allclose(emb["PANEL1"], _reference_embedding(tiny_model, LONG[:30]), rtol=1e-4, atol=1e-5)
    assert read_metadata(out)["gene_scope"] == "all"
    assert sorted(load_embeddings(run_esm2(["control", "BPGM+CBL"], "control", fasta, tiny_model, tmp_path / "p.npz"))) == [
        "BPGM", "CBL", "control"]
    with pytest.raises(PipelineInputError, match="NOTINFASTA"):
        run_esm2(["control", "NOTINFASTA"], "control", fasta, tiny_model, tmp_path / "x.npz", genes="all")


# ---------------------------------------------------------------- demo representation (issue 17.4)


def test_demo_models_condition_on_gene_identity_that_tells_genes_apart(tmp_path: Path, tiny_model: Path) -> None:
    import yaml
    from perturb_repro.embed.embedding import run_embedding
    from perturb_repro.embed.identity import mean_pairwise_cosine

    demo = yaml.safe_load((REPO / "config" / "demo.yaml").read_text())
    spec = demo["esm2"]["embeddings"][demo["esm2"]["embedding"]]
    assert all("gene_embedding" not in demo["models"][m] for m in ("cellflow", "primeflow_cfg1"))  # the default
    conditions = ["control"] + DEMO_GENES
    emb = load_embeddings(run_embedding(spec, conditions, "control", tmp_path / "demo.npz"))
    vectors = np.stack([emb[g] for g in DEMO_GENES]).astype(np.float64)
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    cos = unit @ unit.T
    assert np.abs(cos[~np.eye(len(DEMO_GENES), dtype=bool)]).max() < 1e-12 and np.all(emb["control"] == 0)
    assert read_metadata(tmp_path / "demo.npz")["model_name"] != "tiny"  # not presented as ESM2
    # what it replaces: the tiny random ESM2 over the placeholder sequences barely separates the genes
    tiny = load_embeddings(run_esm2(conditions, "control", DEMO_FASTA, tiny_model, tmp_path / "tiny.npz"))
    mean_cos, max_cos = mean_pairwise_cosine(tiny, "control")
    assert mean_cos > 0.5 and max_cos > 0.9
    assert mean_pairwise_cosine(emb, "control") == (0.0, 0.0)


# ---------------------------------------------------------------- the DAG: one embedding file per (dataset, embedding)


def test_paper_config_gives_each_model_entry_its_own_esm2(tmp_path: Path) -> None:
    """CellFlow-Norman twice (the card's embedding, the correct one), both on the card's t6_8M; scGPT+ESM on
    ESM2-15B over every FASTA gene; each a file keyed by its embedding name."""
    import re

    import yaml
    from workflow_helpers import copy_repo, snakemake

    scratch = copy_repo(tmp_path)
    targets = [f"results/{d}/{m}/checkpoint" for d, m in
               (("norman", "cellflow"), ("norman", "cellflow_fixed_esm2"), ("replogle", "scgpt_replogle_esm"))]
    result = snakemake(scratch, "-n", "-p", *targets, "--configfile", "config/config.yaml")
    assert result.returncode == 0, result.stderr[-2000:]
    inputs = {}
    for block in re.split(r"^(?=(?:local)?rule \w+:$)", result.stdout, flags=re.M):
        out = re.search(r"^\s+output: (.*)$", block, flags=re.M)
        got = re.search(r"^\s+input: (.*)$", block, flags=re.M)
        if out and got:
            inputs[out.group(1).split(",")[0].strip()] = [p.strip() for p in got.group(1).split(",")]
    assert "results/norman/embeddings/esm2_t6_8M_UR50D_cellflow_card.npz" in inputs["results/norman/cellflow/checkpoint"]
    assert "results/norman/embeddings/esm2_t6_8M_UR50D.npz" in inputs["results/norman/cellflow_fixed_esm2/checkpoint"]
    assert "results/replogle/embeddings/esm2_t48_15B_UR50D.npz" in inputs["results/replogle/scgpt_replogle_esm/checkpoint"]
    # the card's embedding reads the Ensembl canonical proteins, the correct one UniProt
    assert "results/norman/embeddings/ensembl_canonical_proteins.fasta" in inputs[
        "results/norman/embeddings/esm2_t6_8M_UR50D_cellflow_card.npz"]
    assert "resources/raw/esm2/uniprot_human_reviewed.fasta" in inputs["results/norman/embeddings/esm2_t6_8M_UR50D.npz"]
    spec = yaml.safe_load((REPO / "config" / "config.yaml").read_text())["esm2"]["embeddings"]["esm2_t48_15B_UR50D"]
    assert spec["model"] == "facebook/esm2_t48_15B_UR50D" and spec["genes"] == "all"


def test_unknown_embedding_name_or_pooling_stops_the_dag_naming_the_key(tmp_path: Path) -> None:
    import yaml
    from workflow_helpers import copy_repo, snakemake

    scratch = copy_repo(tmp_path)
    base = yaml.safe_load((REPO / "config" / "demo.yaml").read_text())
    for name, edit, needle in (
        ("name.yaml", lambda c: c["models"]["cellflow"].update(gene_embedding="nope"), "models.cellflow.gene_embedding 'nope'"),
        ("pool.yaml", lambda c: c["esm2"]["embeddings"]["tiny"].update(pooling="first"), "first"),
    ):
        config = yaml.safe_load(yaml.safe_dump(base))
        edit(config)
        (scratch / "config" / name).write_text(yaml.safe_dump(config))
        result = snakemake(scratch, "-n", "results/norman_demo/cellflow/metrics.csv", "--configfile", f"config/{name}")
        assert result.returncode != 0 and needle in result.stderr + result.stdout, name

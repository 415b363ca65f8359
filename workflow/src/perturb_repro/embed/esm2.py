"""ESM2 gene embeddings: protein sequence -> mean residue representation, one vector per perturbed gene.

CellFlow conditions gene perturbations on ESM2 embeddings (cellflow.preprocessing.get_esm_embedding).
This module computes the same quantity from a local FASTA and any ESM2 checkpoint (hub name or local
directory): the mean of ``last_hidden_state`` over the residue positions of the (truncated) sequence,
excluding the CLS/BOS and EOS tokens and the padding.

Where we deliberately differ from cellflow-tools 0.x ``protein_features_from_genes``:

* cellflow overwrites its ``trunc_len`` inside the per-sequence loop (``trunc_len = min(trunc_len,
  len(seq))``), so after the first short sequence every later sequence is averaged over only the
  first ``len(shortest sequence)`` residues. We average each sequence over all of its own residues.
* cellflow truncates with the tokenizer's ``max_length=1022`` (which counts CLS and EOS, so 1020
  residues are kept) but then averages positions ``1 .. 1022``, which includes the EOS token for
  sequences longer than 1020 residues. We truncate the same way but never average the EOS token.
* cellflow silently leaves genes without a protein sequence out of its result; we raise unless the
  caller explicitly allows missing genes, and then record them in the output file. Either way
  :func:`run_esm2` lists them in ``<out>_missing_genes.csv`` beside the ``.npz``.

``pooling="cellflow_card"`` reproduces the first point on purpose (the CellFlow-Norman card's embeddings were
computed that way, issue 16.5): every gene is averaged over residues ``1 .. min(1022, shortest sequence)``,
the shortest over the genes embedded together, exactly what cellflow's loop ends up using because its batches
run shortest first. It is a mode for reproducing that table, never the default.

Sequences come from a UniProt FASTA (``>sp|P12345|NAME_HUMAN ... GN=SYMBOL ...``, keyed by ``GN=``,
canonical reviewed entry preferred; :mod:`perturb_repro.embed.uniprot`) or from a ``>SYMBOL`` FASTA
such as the demo placeholders. The ``.npz`` records the FASTA's path, format, sha256 and UniProt
release (``sequence_*`` keys, see :func:`read_metadata`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from perturb_repro.data.conditions import unique_genes
from perturb_repro.data.source import sha256_of
from perturb_repro.embed.uniprot import SequenceSet, first_header, is_uniprot_header, read_release, read_uniprot_fasta
from perturb_repro.errors import PipelineInputError
from perturb_repro.io import atomic_path, write_csv

logger = logging.getLogger(__name__)

# 20 standard residues + the ambiguity/rare codes that have their own ESM2 token (X B U Z O).
VALID_RESIDUES = frozenset("ACDEFGHIKLMNPQRSTVWY" "XUBZO")

# cellflow's default ``trunc_len``: passed to the tokenizer as max_length, so it counts CLS and EOS.
CELLFLOW_TRUNC_LEN = 1022

# How a sequence's residue representations become one vector (embed_genes' ``pooling``).
POOLINGS = ("mean", "cellflow_card")
# Which genes run_esm2 embeds: the perturbed ones, or every gene of the FASTA too (scGPT's vocabulary prior).
GENE_SCOPES = ("perturbed", "all")

# Keys of the .npz written by write_embeddings (all required when loading).
NPZ_KEYS = ("genes", "embeddings", "control_label", "model_name", "missing")


def read_fasta(path: str | os.PathLike) -> dict[str, str]:
    """Read a protein FASTA into gene symbol -> sequence.

    The symbol is the first word of the header (``>SYMBOL optional description``). Sequences may span
    several lines and may be lower case (they are upper-cased, because the ESM tokenizer maps lower case
    letters to ``<unk>``).

    Args:
        path: FASTA file.

    Returns:
        Mapping from gene symbol to upper-case amino-acid sequence, in file order.

    Raises:
        PipelineInputError: If the file is missing, has no records, has text before the first header,
            an empty header, a duplicated symbol, a record with an empty sequence, or characters other
            than the 20 amino acids and X/U/B/Z/O. The message names the file and the gene.
    """
    source = str(path)
    p = Path(path)
    if not p.is_file():
        raise PipelineInputError(source, "file", "FASTA file does not exist")
    records: dict[str, list[str]] = {}
    current: str | None = None
    with open(p, encoding="utf-8") as fh:
        for lineno, raw in enumerate(fh, start=1):
            line = raw.strip()
            if not line:
                continue
            if line.startswith(">"):
                words = line[1:].split(maxsplit=1)
                if not words:
                    raise PipelineInputError(source, "header", f"line {lineno}: header has no gene symbol")
                current = words[0]
                if current in records:
                    # Two sequences for one gene would make the embedding depend on file order.
                    raise PipelineInputError(source, "header", f"line {lineno}: gene '{current}' appears twice")
                records[current] = []
                continue
            if current is None:
                raise PipelineInputError(source, "header", f"line {lineno}: sequence text before the first '>' header")
            chunk = "".join(line.split()).upper()
            bad = sorted(set(chunk) - VALID_RESIDUES)
            if bad:
                raise PipelineInputError(
                    source,
                    "sequence",
                    f"gene '{current}' (line {lineno}) has characters {bad} outside the 20 amino acids + X/U/B/Z/O",
                )
            records[current].append(chunk)
    if not records:
        raise PipelineInputError(source, "records", "no FASTA records (no '>' header lines)")
    sequences = {gene: "".join(chunks) for gene, chunks in records.items()}
    empty = [gene for gene, seq in sequences.items() if not seq]
    if empty:
        raise PipelineInputError(source, "sequence", f"gene(s) {empty} have an empty sequence")
    return sequences


def load_sequences(
    path: str | os.PathLike,
    *,
    taxon_id: int | None = None,
    release: str | None = None,
    release_note: str | os.PathLike | None = None,
) -> SequenceSet:
    """Gene symbol -> sequence from either FASTA format, with its provenance.

    A file whose first header is a UniProt header (``>sp|P12345|NAME_HUMAN ... GN=SYMBOL ...``) is read
    by :func:`perturb_repro.embed.uniprot.read_uniprot_fasta` (keyed by ``GN=``, canonical reviewed
    entry preferred); any other file by :func:`read_fasta` (``>SYMBOL description``, e.g. the demo
    placeholders).

    Args:
        path: FASTA file.
        taxon_id: UniProt only: keep records with this ``OX=``.
        release: UniProt release to record (wins over ``release_note``).
        release_note: UniProt ``reldate.txt`` to read the release from.
    """
    header = first_header(path)
    if header is not None and is_uniprot_header(header):
        return read_uniprot_fasta(path, taxon_id=taxon_id, release=read_release(release, release_note))
    return SequenceSet(read_fasta(path), source=str(path), format="symbol", release=read_release(release, release_note))


def missing_report_path(out_path: str | os.PathLike) -> Path:
    """Where :func:`run_esm2` lists the genes without a sequence: ``<out stem>_missing_genes.csv`` beside it."""
    out = Path(out_path)
    return out.with_name(out.stem + "_missing_genes.csv")


def genes_of_conditions(conditions: Iterable[str], control_label: str, delimiter: str = "+") -> list[str]:
    """Sorted unique gene symbols named in condition labels such as ``A``, ``A+B``, ``A+ctrl``.

    Tokens equal to ``control_label`` or GEARS' ``ctrl`` are dropped. Parsing is delegated to
    ``perturb_repro.data.conditions`` so that the data stage and the embedding stage agree on it.

    Args:
        conditions: Condition labels (duplicates allowed).
        control_label: Label of the unperturbed control.
        delimiter: Separator between genes in a combination.

    Returns:
        Sorted unique gene symbols.

    Raises:
        PipelineInputError: If a label has an empty token (e.g. ``A++B`` or ``+A``).
    """
    conditions = list(conditions)
    genes = unique_genes(conditions, control_label, delimiter)
    if "" in genes:
        bad = sorted({c for c in conditions if "" in c.split(delimiter)})
        raise PipelineInputError("conditions", "condition", f"labels with an empty gene token: {bad}")
    return genes


def embed_genes(
    genes: Iterable[str],
    sequences: Mapping[str, str],
    model_name_or_path: str | os.PathLike,
    batch_size: int = 8,
    device: str | None = None,
    max_length: int | None = None,
    *,
    allow_missing: bool = False,
    sequences_source: str = "sequences",
    pooling: str = "mean",
    dtype: str | None = None,
) -> tuple[dict[str, np.ndarray], list[str]]:
    """Mean-pooled ESM2 embedding per gene.

    For each gene the sequence is tokenised as ``<cls> residues <eos>`` and run through ``EsmModel`` in
    eval mode without gradients; the embedding is the mean of ``last_hidden_state`` over the residue
    positions only (CLS, EOS and padding excluded via the attention mask), i.e. ESM's "mean
    representation". Sequences are sorted by length before batching to keep padding small; results do
    not depend on batching beyond float rounding.

    Args:
        genes: Gene symbols to embed (duplicates ignored).
        sequences: Gene symbol -> upper-case amino-acid sequence (e.g. from :func:`read_fasta`).
        model_name_or_path: Hub name (``facebook/esm2_t6_8M_UR50D``) or a local model directory.
        batch_size: Sequences per forward pass.
        device: Torch device; ``None`` picks CUDA when available, else CPU.
        max_length: Token budget per sequence *including* CLS and EOS, as cellflow's ``trunc_len``
            (default 1022, i.e. 1020 residues), capped by the model's position limit. Longer sequences
            keep their N-terminal residues and a warning names the gene.
        allow_missing: If True, genes without a sequence are skipped and returned in the second element
            instead of raising.
        sequences_source: Name of where ``sequences`` came from (e.g. the FASTA path), used in errors.
        pooling: ``mean`` (every residue of the gene's own sequence) or ``cellflow_card`` (residues
            ``1 .. min(1022, shortest sequence of this call)``, cellflow-tools 0.x's loop; see the module doc).
        dtype: Torch dtype the model is loaded in (``float16`` for ESM2-15B on one GPU); ``None``: float32.
            Pooling is always computed in float32.

    Returns:
        ``(embeddings, missing)``: gene -> float32 vector of the model's hidden size, and the sorted
        genes that had no sequence (always empty unless ``allow_missing``).

    Raises:
        PipelineInputError: If genes lack sequences (and ``allow_missing`` is False), or a sequence is
            empty or has invalid characters.
        ValueError: If ``batch_size`` or ``max_length`` is too small.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    wanted = sorted(set(genes))
    missing = [g for g in wanted if g not in sequences]
    if missing and not allow_missing:
        # Never substitute zeros: a zero vector is the control's embedding and would silently
        # make the gene look like "no perturbation".
        raise PipelineInputError(sequences_source, "sequence", f"no protein sequence for gene(s) {missing}")
    present = [g for g in wanted if g in sequences]
    for gene in present:
        seq = sequences[gene]
        if not seq:
            raise PipelineInputError(sequences_source, "sequence", f"gene '{gene}' has an empty sequence")
        bad = sorted(set(seq) - VALID_RESIDUES)
        if bad:
            raise PipelineInputError(
                sequences_source, "sequence", f"gene '{gene}' has characters {bad} outside the amino-acid alphabet"
            )
    if not present:
        return {}, missing

    import torch
    from transformers import AutoTokenizer, EsmModel

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(str(model_name_or_path))
    # The mean-pooling below assumes <cls> x1..xn <eos> <pad>...; make right padding explicit.
    tokenizer.padding_side = "right"
    # No pooler: we pool ourselves, and cellflow loads it the same way.
    torch_dtype = getattr(torch, dtype) if dtype else None
    model = EsmModel.from_pretrained(str(model_name_or_path), add_pooling_layer=False, torch_dtype=torch_dtype)
    model.eval()
    model.requires_grad_(False)
    model.to(device)

    token_limit = _token_limit(model.config, max_length)
    residue_limit = token_limit - 2
    for gene in present:
        n = len(sequences[gene])
        if n > residue_limit:
            logger.warning(
                "ESM2: gene %s has %d residues, more than the %d the model takes (%d tokens incl. CLS/EOS); "
                "keeping the first %d residues, as cellflow does",
                gene, n, residue_limit, token_limit, residue_limit,
            )  # fmt: skip

    # Shortest first, like cellflow/fair-esm batching, so each batch pads to similar lengths.
    order = sorted(present, key=lambda g: (len(sequences[g]), g))
    # cellflow's trunc_len after its first (= shortest) sequence: min(1022, len(shortest)); it averages
    # hidden positions 1 .. window of every later sequence (capped by the positions the sequence has)
    window = min(CELLFLOW_TRUNC_LEN, len(sequences[order[0]])) if pooling == "cellflow_card" else None
    if window is not None:
        logger.warning("ESM2 pooling cellflow_card: every gene averaged over its first %d residues (the shortest "
                       "sequence, %s), as cellflow-tools' loop does -- the card's embedding, not a correct one",
                       window, order[0])
    embeddings: dict[str, np.ndarray] = {}
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            batch_genes = order[start : start + batch_size]
            batch_seqs = [sequences[g] for g in batch_genes]
            tokens = tokenizer(
                batch_seqs,
                padding=True,
                truncation=True,
                max_length=token_limit,
                return_tensors="pt",
            )
            input_ids = tokens["input_ids"].to(device)
            attention_mask = tokens["attention_mask"].to(device)
            lengths = attention_mask.sum(dim=1)  # tokens incl. CLS and EOS
            expected = torch.tensor([min(len(s), residue_limit) + 2 for s in batch_seqs], device=device)
            if not torch.equal(lengths, expected):
                # A tokenizer that does not give one token per residue would make the pooling wrong.
                raise RuntimeError(
                    f"tokenizer of {model_name_or_path} did not produce one token per residue "
                    f"(got {lengths.tolist()} tokens, expected {expected.tolist()})"
                )
            hidden = model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            # Residue mask = attention mask minus the CLS (position 0) and EOS (last real position).
            residue_mask = attention_mask.clone()
            residue_mask[:, 0] = 0
            rows = torch.arange(residue_mask.shape[0], device=device)
            residue_mask[rows, lengths - 1] = 0
            if window is not None:  # cellflow: positions 1 .. window, EOS included when the window reaches it
                positions = torch.arange(residue_mask.shape[1], device=device)
                residue_mask = ((positions >= 1) & (positions <= window)).unsqueeze(0) & attention_mask.bool()
                residue_mask = residue_mask.to(attention_mask.dtype)
            hidden = hidden.float()
            weights = residue_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1)
            for gene, vector in zip(batch_genes, pooled.float().cpu().numpy(), strict=True):
                embeddings[gene] = vector.astype(np.float32, copy=True)
    return {g: embeddings[g] for g in present}, missing


def _token_limit(config, max_length: int | None) -> int:
    """Tokens per sequence (incl. CLS/EOS): cellflow's 1022 unless given, never above the model's limit."""
    # ESM positions start after the padding index, so a model with N position slots takes N - 2 tokens
    # (1026 -> 1024 for ESM2, the length it was trained on).
    model_limit = int(config.max_position_embeddings) - 2
    limit = CELLFLOW_TRUNC_LEN if max_length is None else int(max_length)
    if limit > model_limit:
        logger.warning("ESM2: max_length %d exceeds the model's %d tokens; using %d", limit, model_limit, model_limit)
        limit = model_limit
    if limit < 3:
        raise ValueError(f"max_length must leave room for CLS, EOS and one residue (>= 3), got {limit}")
    return limit


def write_embeddings(
    path: str | os.PathLike,
    embeddings: Mapping[str, np.ndarray],
    control_label: str,
    model_name: str,
    missing: Sequence[str],
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write gene embeddings to an ``.npz`` file, atomically.

    Arrays: ``genes`` (str; the control label first, then the genes sorted), ``embeddings`` (float32
    ``[n_genes, dim]``; the control's row is all zeros, i.e. "no perturbation"), and for provenance
    ``control_label`` and ``model_name`` (0-d str) and ``missing`` (str; genes that had no sequence and
    therefore have no row).

    Args:
        path: Output ``.npz`` path.
        embeddings: Gene -> 1-d vector, all of the same length.
        control_label: Label of the unperturbed control; must not be one of the genes.
        model_name: Model name or path used, recorded for provenance.
        missing: Genes left without an embedding.
        metadata: Extra provenance stored as 0-d string arrays (e.g. ``sequence_source``,
            ``sequence_release``); keys must not clash with the arrays above.

    Returns:
        The written path.

    Raises:
        PipelineInputError: If there are no embeddings, the control label is among the genes, or
            vectors are not 1-d, differ in length or contain non-finite values.
    """
    source = str(path)
    if not embeddings:
        raise PipelineInputError(source, "embeddings", "no gene embeddings to write")
    if control_label in embeddings:
        raise PipelineInputError(source, "genes", f"control label '{control_label}' is also a gene")
    genes = sorted(embeddings)
    vectors = [np.asarray(embeddings[g]) for g in genes]
    dim = vectors[0].shape
    for gene, vec in zip(genes, vectors, strict=True):
        if vec.ndim != 1 or vec.shape != dim:
            raise PipelineInputError(source, "embeddings", f"gene '{gene}' has shape {vec.shape}, expected {dim}")
        if not np.all(np.isfinite(vec)):
            raise PipelineInputError(source, "embeddings", f"gene '{gene}' has non-finite values")
    matrix = np.vstack([np.zeros(dim, dtype=np.float32)] + vectors).astype(np.float32)
    extra = {str(k): np.array("" if v is None else str(v), dtype=str) for k, v in (metadata or {}).items()}
    clash = sorted(set(extra) & set(NPZ_KEYS))
    if clash:
        raise PipelineInputError(source, "metadata", f"metadata keys {clash} clash with the embedding arrays")
    with atomic_path(path) as tmp:
        # Write through a file handle so numpy cannot append its own ".npz" to the temp name.
        with open(tmp, "wb") as fh:
            np.savez(
                fh,
                genes=np.array([control_label, *genes], dtype=str),
                embeddings=matrix,
                control_label=np.array(control_label, dtype=str),
                model_name=np.array(str(model_name), dtype=str),
                missing=np.array(sorted(missing), dtype=str).reshape(-1),
                **extra,
            )
    return Path(path)


def load_embeddings(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read an ``.npz`` written by :func:`write_embeddings` back into gene -> float32 vector.

    The control label is included (with its zero vector).

    Args:
        path: ``.npz`` file.

    Returns:
        Gene -> 1-d float32 array, in file order (control first).

    Raises:
        PipelineInputError: If the file is missing or unreadable, lacks a key (the message names it),
            or its arrays are inconsistent.
    """
    source = str(path)
    if not Path(path).is_file():
        raise PipelineInputError(source, "file", "embedding file does not exist")
    try:
        # allow_pickle=False: all arrays are plain str/float; never execute pickles from disk.
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except Exception as exc:  # numpy raises several types for a non-npz file
        raise PipelineInputError(source, "file", f"not a readable .npz file ({exc})") from exc
    for key in NPZ_KEYS:
        if key not in arrays:
            raise PipelineInputError(source, key, "missing from the embedding file")
    genes, matrix = arrays["genes"], arrays["embeddings"]
    if genes.ndim != 1 or genes.dtype.kind != "U":
        raise PipelineInputError(source, "genes", f"expected a 1-d string array, got {genes.dtype} {genes.shape}")
    if matrix.ndim != 2 or matrix.shape[0] != genes.shape[0]:
        raise PipelineInputError(
            source, "embeddings", f"shape {matrix.shape} does not match {genes.shape[0]} genes"
        )
    if len(set(genes.tolist())) != genes.shape[0]:
        raise PipelineInputError(source, "genes", "duplicated gene symbols")
    return {str(g): matrix[i].astype(np.float32, copy=True) for i, g in enumerate(genes)}


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The 0-d string arrays of an embedding ``.npz`` (model name, control label, sequence provenance)."""
    with np.load(path, allow_pickle=False) as npz:
        return {key: str(npz[key]) for key in npz.files if npz[key].ndim == 0}


def run_esm2(
    conditions: Iterable[str],
    control_label: str,
    fasta_path: str | os.PathLike,
    model_name_or_path: str | os.PathLike,
    out_path: str | os.PathLike,
    batch_size: int = 8,
    *,
    allow_missing: bool = False,
    device: str | None = None,
    max_length: int | None = None,
    release: str | None = None,
    release_note: str | os.PathLike | None = None,
    taxon_id: int | None = None,
    genes: str = "perturbed",
    pooling: str = "mean",
    dtype: str | None = None,
) -> Path:
    """Embed every gene perturbed in ``conditions`` and write the ``.npz`` (the Snakemake rule's entry point).

    Genes without a sequence are never given a zero vector: they are listed in
    :func:`missing_report_path` (CSV ``gene,reason``, written on every run, empty when none is
    missing) and logged, and then the run fails unless ``allow_missing``, in which case they are
    recorded in the file's ``missing`` array.

    Args:
        conditions: Condition labels (e.g. the unique values of ``obs['condition']``).
        control_label: Label of the unperturbed control; gets the zero vector.
        fasta_path: Protein FASTA: UniProt headers (keyed by ``GN=``) or ``>SYMBOL`` headers.
        model_name_or_path: ESM2 hub name or local directory.
        out_path: Output ``.npz``.
        batch_size: Sequences per forward pass.
        allow_missing: Record genes without a sequence in the file's ``missing`` array instead of failing.
        device: Torch device; ``None`` picks CUDA when available.
        max_length: Token budget incl. CLS/EOS (see :func:`embed_genes`).
        release: UniProt release recorded in the ``.npz`` (``sequence_release``).
        release_note: UniProt ``reldate.txt`` to read the release from when ``release`` is unset.
        taxon_id: UniProt only: keep records with this ``OX=`` (e.g. 9606).
        genes: ``perturbed`` (the genes of ``conditions``) or ``all``: those plus every gene of the FASTA, so a
            model can give every gene of its vocabulary a prior (the scGPT-Replogle card's +ESM run, whose
            table covers each vocabulary gene with an ESM2 vector). Only perturbed genes must have a sequence.
        pooling: see :func:`embed_genes` (``cellflow_card``: the CellFlow card's truncation bug, on purpose).
        dtype: model dtype (see :func:`embed_genes`).

    Returns:
        The written path.
    """
    if genes not in GENE_SCOPES:
        raise PipelineInputError("esm2", "genes", f"must be one of {GENE_SCOPES}, not {genes!r}")
    scope = genes
    genes = genes_of_conditions(conditions, control_label)
    if not genes:
        raise PipelineInputError("conditions", "condition", f"no perturbed genes besides '{control_label}'")
    seqset = load_sequences(fasta_path, taxon_id=taxon_id, release=release, release_note=release_note)
    missing = [g for g in genes if g not in seqset.sequences]
    report = missing_report_path(out_path)
    reason = "no UniProt record with this GN= symbol" if seqset.format == "uniprot" else "no FASTA record"
    write_csv(pd.DataFrame({"gene": missing, "reason": [reason] * len(missing)}), report, index=False)
    if missing:
        logger.warning(
            "ESM2: no sequence in %s for %d of %d gene(s) (listed in %s): %s",
            fasta_path, len(missing), len(genes), report, missing,
        )  # fmt: skip
        if not allow_missing:
            raise PipelineInputError(
                str(fasta_path), "sequence",
                f"no protein sequence for {len(missing)} gene(s) {missing[:20]} (all listed in {report}); "
                "fix the FASTA or set esm2.allow_missing: true to leave them without an embedding",
            )  # fmt: skip
    if scope == "all":
        genes = sorted(set(genes) | (set(seqset.sequences) - {control_label}))
    embeddings, missing = embed_genes(
        genes,
        seqset.sequences,
        model_name_or_path,
        batch_size=batch_size,
        device=device,
        max_length=max_length,
        allow_missing=allow_missing,
        sequences_source=str(fasta_path),
        pooling=pooling,
        dtype=dtype,
    )
    if not embeddings:
        raise PipelineInputError(str(fasta_path), "sequence", f"none of the genes {genes} has a sequence")
    metadata = {
        "sequence_source": seqset.source,
        "sequence_format": seqset.format,
        "sequence_release": seqset.release or "",
        "sequence_sha256": sha256_of(fasta_path),
        "pooling": pooling,
        "gene_scope": scope,
    }
    return write_embeddings(out_path, embeddings, control_label, str(model_name_or_path), missing, metadata)

"""Offline stand-ins for ESM2: a tiny random-weight model and placeholder protein sequences.

Neither is scientifically meaningful. They exist so the ESM2 embedding code path (tokenizer, batching,
padding, mean pooling, file format) can be exercised in tests and in the demo without network access
and without redistributing real protein sequences.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

from perturb_repro.errors import PipelineInputError
from perturb_repro.io import atomic_path

# The ESM2 alphabet in token-id order, exactly as in facebook/esm2_t6_8M_UR50D's vocab.txt and fair-esm's
# ``proteinseq_toks`` (note "... T I D P K ...": the order matters because ids are positions in this list).
ESM2_VOCAB: tuple[str, ...] = (
    "<cls>", "<pad>", "<eos>", "<unk>",
    "L", "A", "G", "V", "S", "E", "R", "T", "I", "D", "P", "K", "Q", "N", "F", "Y",
    "M", "H", "W", "C", "X", "B", "U", "Z", "O", ".", "-",
    "<null_1>", "<mask>",
)  # fmt: skip

# Special-token ids of the real ESM2 checkpoints (positions in ESM2_VOCAB).
CLS_ID, PAD_ID, EOS_ID, UNK_ID, MASK_ID = 0, 1, 2, 3, 32

# Only the 20 standard residues go into placeholder sequences, so they look like ordinary proteins.
STANDARD_AMINO_ACIDS = "ACDEFGHIKLMNPQRSTVWY"
PLACEHOLDER_MIN_LEN = 100
PLACEHOLDER_MAX_LEN = 400
PLACEHOLDER_DESCRIPTION = "PLACEHOLDER not a real protein sequence (offline demo only)"
# UniProt wraps sequence lines at 60 residues; mimic it so the file reads like a normal FASTA.
FASTA_LINE_WIDTH = 60

TINY_README = """\
Tiny ESM2-architecture model with RANDOM weights (seed {seed}).

It is NOT a trained protein language model and its embeddings carry no biological meaning.
It exists only so the ESM2 embedding code can run in offline tests and in the demo
(no network, no multi-GB download). Built by perturb_repro.embed.tiny_esm.build_tiny_esm2.

Architecture: hidden {hidden}, {layers} layers, {heads} heads, intermediate {intermediate},
rotary positions, token_dropout, the real 33-token ESM2 vocabulary (same token ids as
facebook/esm2_t6_8M_UR50D), so any ESM2 checkpoint can be swapped in for it.
"""


def build_tiny_esm2(
    out_dir: str | os.PathLike,
    seed: int = 0,
    *,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 2,
    intermediate_size: int = 64,
) -> Path:
    """Build a tiny randomly initialised ESM2 model + tokenizer loadable with ``from_pretrained``.

    The directory is assembled in a temporary sibling and renamed into place, so ``out_dir`` is either
    the old complete model or the new complete model, never half-written. Calling it again with the same
    seed rebuilds identical weights, replacing whatever was there.

    Args:
        out_dir: Directory to create; ``AutoTokenizer.from_pretrained(out_dir)`` and
            ``EsmModel.from_pretrained(out_dir)`` load it offline.
        seed: Seed for the random weights; the same seed gives the same weights.
        hidden_size: Width of the residue representations.
        num_layers: Number of transformer layers.
        num_heads: Number of attention heads (must divide ``hidden_size``).
        intermediate_size: Width of the feed-forward layers.

    Returns:
        The path of the built model directory.
    """
    # Heavy imports stay inside the function so that importing this module (e.g. while Snakemake
    # parses the workflow) does not pay for torch/transformers.
    import torch
    from transformers import EsmConfig, EsmModel, EsmTokenizer

    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        vocab_file = tmp / "vocab.txt"
        vocab_file.write_text("\n".join(ESM2_VOCAB), encoding="utf-8")
        tokenizer = EsmTokenizer(str(vocab_file))
        tokenizer.save_pretrained(tmp)

        # Mirrors facebook/esm2_t6_8M_UR50D's config.json except for the sizes.
        config = EsmConfig(
            vocab_size=len(ESM2_VOCAB),
            mask_token_id=MASK_ID,
            pad_token_id=PAD_ID,
            eos_token_id=EOS_ID,
            hidden_size=hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            intermediate_size=intermediate_size,
            hidden_act="gelu",
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            max_position_embeddings=1026,
            initializer_range=0.02,
            layer_norm_eps=1e-5,
            position_embedding_type="rotary",
            emb_layer_norm_before=False,
            token_dropout=True,
        )
        # fork_rng: seed locally without changing the caller's global torch RNG state.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = EsmModel(config, add_pooling_layer=False)
        model.save_pretrained(tmp)
        (tmp / "README.txt").write_text(
            TINY_README.format(
                seed=seed,
                hidden=hidden_size,
                layers=num_layers,
                heads=num_heads,
                intermediate=intermediate_size,
            ),
            encoding="utf-8",
        )
        # mkdtemp creates 0700; a model directory should be as readable as any other output.
        os.chmod(tmp, 0o755)
        _replace_dir(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out


def _replace_dir(new: Path, target: Path) -> None:
    """Move directory ``new`` onto ``target``; an existing ``target`` is moved aside first, then deleted.

    Directories cannot be replaced atomically with one rename, so there is a brief moment with no
    ``target``; there is never a moment with a partial one.
    """
    old: Path | None = None
    if target.exists() or target.is_symlink():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
        old.rmdir()  # only the unique name was wanted
        os.replace(target, old)
    os.replace(new, target)
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old)
        else:
            old.unlink()


def placeholder_sequence(symbol: str) -> str:
    """A deterministic pseudo-random amino-acid string for ``symbol`` (NOT its real protein).

    Derived from SHA-256 of the symbol only (no numpy/random), so it is identical on every platform and
    library version; the committed demo FASTA can therefore be regenerated byte for byte.

    Args:
        symbol: Gene symbol.

    Returns:
        A string of 100-400 standard amino acids.
    """
    seed = hashlib.sha256(symbol.encode("utf-8")).digest()
    span = PLACEHOLDER_MAX_LEN - PLACEHOLDER_MIN_LEN + 1
    length = PLACEHOLDER_MIN_LEN + int.from_bytes(seed[:4], "big") % span
    residues: list[str] = []
    counter = 0
    while len(residues) < length:
        block = hashlib.sha256(seed + counter.to_bytes(8, "big")).digest()
        counter += 1
        for byte in block:
            # Rejection sampling: 240 = 12 * 20, so accepted bytes map uniformly onto the 20 residues.
            if byte < 240:
                residues.append(STANDARD_AMINO_ACIDS[byte % 20])
                if len(residues) == length:
                    break
    return "".join(residues)


def placeholder_fasta_text(genes: Iterable[str]) -> str:
    """The full text of the placeholder FASTA for ``genes`` (sorted, de-duplicated)."""
    lines: list[str] = []
    for symbol in sorted(set(genes)):
        if not symbol or any(ch.isspace() for ch in symbol) or symbol.startswith(">"):
            raise PipelineInputError("genes", "symbol", f"{symbol!r} cannot be used as a FASTA header")
        sequence = placeholder_sequence(symbol)
        lines.append(f">{symbol} {PLACEHOLDER_DESCRIPTION}")
        lines.extend(sequence[i : i + FASTA_LINE_WIDTH] for i in range(0, len(sequence), FASTA_LINE_WIDTH))
    return "\n".join(lines) + "\n"


def write_placeholder_fasta(genes: Iterable[str], path: str | os.PathLike) -> Path:
    """Write placeholder sequences for ``genes`` as a FASTA file, atomically.

    Args:
        genes: Gene symbols (order and duplicates do not matter; records are written sorted).
        path: Output FASTA path.

    Returns:
        The written path.
    """
    text = placeholder_fasta_text(genes)
    with atomic_path(path) as tmp:
        # newline="" and explicit "\n": identical bytes on every OS.
        with open(tmp, "w", encoding="ascii", newline="") as fh:
            fh.write(text)
        # mkstemp creates 0600; the FASTA is a shared resource, so make it readable like a normal file.
        os.chmod(tmp, 0o644)
    return Path(path)

"""Reading an official scGPT checkpoint directory the way scGPT's perturbation fine-tuning does.

A pretrained scGPT model is distributed as a directory holding ``args.json`` (architecture and
pretraining settings), ``vocab.json`` (gene symbol -> token id) and ``best_model.pt`` (a state
dict). Tutorial_Perturbation (scGPT v0.2.4) then:

* overrides the model size from ``args.json`` (``embsize``, ``nheads``, ``d_hid``, ``nlayers``,
  ``n_layers_cls``);
* appends any special token (``<pad>``, ``<cls>``, ``<eoc>``) the vocabulary lacks;
* keeps only the checkpoint keys under the prefixes ``encoder``, ``value_encoder`` and
  ``transformer_encoder``: the perturbation-flag encoder and every decoder start fresh.

The released whole-human weights were saved from flash-attention layers, whose fused projection is
``self_attn.Wqkv``; PyTorch's native attention calls the same tensor ``self_attn.in_proj_weight`` /
``in_proj_bias`` (scgpt.utils.load_pretrained renames ``Wqkv.`` to ``in_proj_`` for the same reason).

Unlike the tutorial (``model_dict.update(...)`` then ``load_state_dict``) every kept key must land
on a parameter of the same name and shape, and every model parameter under those prefixes must be
provided: a checkpoint that does not fit the architecture fails naming the key instead of being
silently skipped or half-loaded.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import PipelineInputError

logger = logging.getLogger(__name__)

ARGS_FILE = "args.json"
VOCAB_FILE = "vocab.json"
WEIGHTS_FILE = "best_model.pt"
PAD_TOKEN = "<pad>"
SPECIAL_TOKENS = (PAD_TOKEN, "<cls>", "<eoc>")
LOAD_PREFIXES = ("encoder", "value_encoder", "transformer_encoder")
FLASH_RENAMES = {
    "self_attn.Wqkv.weight": "self_attn.in_proj_weight",
    "self_attn.Wqkv.bias": "self_attn.in_proj_bias",
}
# args.json key -> our model-config key (the five Tutorial_Perturbation reads from args.json)
ARCH_KEYS = {"embsize": "d_model", "nheads": "nhead", "d_hid": "d_hid", "nlayers": "nlayers", "n_layers_cls": "nlayers_cls"}


class CheckpointMismatch(PipelineInputError):
    """A pretrained key that does not fit the model (or a model parameter the checkpoint lacks)."""


@dataclass
class LoadReport:
    loaded: list[str] = field(default_factory=list)  # model parameter names filled from the checkpoint
    renamed: dict[str, str] = field(default_factory=dict)  # checkpoint key -> model name (flash-attention keys)
    left_out: list[str] = field(default_factory=list)  # checkpoint keys outside the prefixes
    fresh: list[str] = field(default_factory=list)  # model parameters initialised fresh

    def as_dict(self) -> dict:
        return {"loaded": self.loaded, "renamed": self.renamed, "left_out": self.left_out, "fresh": self.fresh}


def read_args(directory: str | Path) -> dict:
    path = Path(directory) / ARGS_FILE
    if not path.is_file():
        raise PipelineInputError(path, ARGS_FILE, "pretrained scGPT directory has no args.json")
    args = json.loads(path.read_text())
    missing = [k for k in ARCH_KEYS if k not in args]
    if missing:
        raise PipelineInputError(path, missing[0], "architecture key missing from args.json")
    return args


def arch_from_args(args: Mapping) -> dict:
    """The model sizes Tutorial_Perturbation takes from args.json, under our config names."""
    return {ours: int(args[theirs]) for theirs, ours in ARCH_KEYS.items()}


def read_vocab(path: str | Path) -> dict[str, int]:
    """``vocab.json`` (token -> id, ids 0..n-1 as GeneVocab requires) plus any missing special token,
    appended at the next id as ``GeneVocab.append_token`` does."""
    path = Path(path)
    if not path.is_file():
        raise PipelineInputError(path, VOCAB_FILE, "vocabulary file does not exist")
    vocab = {str(k): int(v) for k, v in json.loads(path.read_text()).items()}
    if sorted(vocab.values()) != list(range(len(vocab))):
        raise PipelineInputError(path, VOCAB_FILE, "token ids must be the consecutive integers 0..n-1")
    for token in SPECIAL_TOKENS:
        if token not in vocab:
            vocab[token] = len(vocab)
    return vocab


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise PipelineInputError(path, WEIGHTS_FILE, "pretrained weights file does not exist")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, Mapping):
        raise PipelineInputError(path, WEIGHTS_FILE, "expected a state dict (parameter name -> tensor)")
    return dict(state)


def rename_flash_keys(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Flash-attention names -> native ``nn.MultiheadAttention`` names; returns (state, old->new)."""
    out: dict[str, torch.Tensor] = {}
    renamed: dict[str, str] = {}
    for key, value in state.items():
        new = key
        for old_part, new_part in FLASH_RENAMES.items():
            if key.endswith(old_part):
                new = key[: -len(old_part)] + new_part
                renamed[key] = new
        if new in out:
            raise CheckpointMismatch(WEIGHTS_FILE, key, f"renaming gives '{new}', which the checkpoint also holds")
        out[new] = value
    return out, renamed


def _under(key: str, prefixes) -> bool:
    """scGPT's test is ``key.startswith(prefix)``; prefixes here are module names, so also require the
    dot (``encoder`` must not capture a module that merely starts with those letters)."""
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def load_pretrained(
    model: torch.nn.Module,
    state: Mapping[str, torch.Tensor],
    prefixes=LOAD_PREFIXES,
    source: str = WEIGHTS_FILE,
) -> LoadReport:
    """Copy the checkpoint's tensors under ``prefixes`` into ``model``; strict over those prefixes.

    Raises CheckpointMismatch naming the key if a kept key has no model parameter of that name, if
    its shape differs, or if a model parameter under the prefixes is not in the checkpoint.
    """
    renamed_state, renamed = rename_flash_keys(state)
    kept = {k: v for k, v in renamed_state.items() if _under(k, prefixes)}
    report = LoadReport(renamed={k: v for k, v in renamed.items() if v in kept})
    report.left_out = sorted(k for k in renamed_state if k not in kept)
    target = model.state_dict()
    for key, value in kept.items():
        if key not in target:
            raise CheckpointMismatch(source, key, "checkpoint key has no model parameter of that name")
        if tuple(value.shape) != tuple(target[key].shape):
            raise CheckpointMismatch(
                source, key, f"checkpoint shape {tuple(value.shape)} != model shape {tuple(target[key].shape)}"
            )
    missing = [k for k in target if _under(k, prefixes) and k not in kept]
    if missing:
        raise CheckpointMismatch(source, missing[0], f"model parameter not in the checkpoint ({len(missing)} missing)")
    with torch.no_grad():
        params = dict(model.named_parameters())
        buffers = dict(model.named_buffers())
        for key, value in kept.items():
            dest = params.get(key, buffers.get(key))
            dest.copy_(value.to(dtype=dest.dtype, device=dest.device))
    report.loaded = sorted(kept)
    report.fresh = [k for k in target if k not in kept]
    logger.info("scGPT pretrained: loaded %d tensors under %s from %s", len(kept), list(prefixes), source)
    if report.renamed:
        logger.info("scGPT pretrained: renamed %d flash-attention keys (Wqkv -> in_proj)", len(report.renamed))
    if report.left_out:
        logger.info("scGPT pretrained: left out %d checkpoint keys: %s", len(report.left_out), report.left_out)
    logger.info("scGPT pretrained: initialised fresh: %s", report.fresh)
    return report

"""Genes -> scGPT tokens: the dataset's genes against a vocabulary, and one batch's model input.

Each row is a control cell's expression of the kept panel genes (``include_zero_gene="all"``), flag 1 on
the condition's perturbed panel genes, and the perturbed genes outside the panel appended as extra tokens
(see :mod:`perturb_repro.models.scgpt`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ..data.conditions import genes_of
from . import _scgpt_loading as loading

PERT_FLAG_OFF, PERT_FLAG_ON = 0, 1


@dataclass
class ConditionTokens:
    panel_pos: list[int]  # perturbed genes' positions among the kept panel genes
    extra_ids: list[int]  # vocabulary ids of perturbed genes outside the kept panel
    extra_prior: list[int]  # their prior-table rows (0 = none)
    unknown: list[str]  # perturbed genes in neither the kept panel nor the vocabulary


@dataclass
class GeneSpace:
    """The dataset's genes (truth order) against a vocabulary: which are model tokens, which dropped."""

    genes: list[str]
    vocab: Mapping[str, int]
    control_label: str
    prior_genes: Sequence[str] = ()
    kept: np.ndarray = field(init=False)
    kept_ids: np.ndarray = field(init=False)
    kept_prior: np.ndarray = field(init=False)
    dropped: list[str] = field(init=False)

    def __post_init__(self) -> None:
        self.pad_id = int(self.vocab[loading.PAD_TOKEN])
        self.kept = np.array([i for i, g in enumerate(self.genes) if g in self.vocab], dtype=np.int64)
        self.dropped = [g for g in self.genes if g not in self.vocab]
        self.kept_ids = np.array([self.vocab[self.genes[i]] for i in self.kept], dtype=np.int64)
        self._prior = {g: r + 1 for r, g in enumerate(self.prior_genes)}
        self.kept_prior = np.array([self._prior.get(self.genes[i], 0) for i in self.kept], dtype=np.int64)
        self._pos = {self.genes[i]: j for j, i in enumerate(self.kept)}

    @property
    def n_kept(self) -> int:
        return len(self.kept)

    def tokens(self, condition: str) -> ConditionTokens:
        t = ConditionTokens([], [], [], [])
        for gene in genes_of(condition, self.control_label):
            if gene in self._pos:
                t.panel_pos.append(self._pos[gene])
                continue
            t.extra_ids.append(int(self.vocab.get(gene, self.pad_id)))
            t.extra_prior.append(self._prior.get(gene, 0))
            if gene not in self.vocab:
                t.unknown.append(gene)
        return t


@dataclass
class Batch:
    src: torch.Tensor
    values: torch.Tensor
    flags: torch.Tensor
    padding: torch.Tensor | None
    prior: torch.Tensor | None
    n_panel: int  # the first n_panel positions are panel genes, the rest extra perturbation tokens

    def to(self, device: torch.device) -> Batch:
        def move(t):
            return None if t is None else t.to(device, non_blocking=True)

        return Batch(move(self.src), move(self.values), move(self.flags), move(self.padding), move(self.prior), self.n_panel)


def assemble(
    space: GeneSpace,
    x_kept: np.ndarray,
    tokens: Sequence[ConditionTokens],
    cols: np.ndarray | None,
    pert_pad_id: int,
    pad_value: float,
    use_prior: bool,
) -> Batch:
    """Model input for control cells ``x_kept`` (rows, kept genes) under one condition per row.

    ``cols`` selects the panel genes given to the model (None: all, as ``include_zero_gene="all"``).
    """
    n = len(tokens)
    cols = np.arange(space.n_kept) if cols is None else np.asarray(cols)
    n_panel = len(cols)
    n_extra = max((len(t.extra_ids) for t in tokens), default=0)
    length = n_panel + n_extra
    src = np.full((n, length), space.pad_id, dtype=np.int64)
    src[:, :n_panel] = space.kept_ids[cols]
    values = np.full((n, length), pad_value, dtype=np.float32)
    values[:, :n_panel] = x_kept[:, cols]
    flags = np.full((n, length), pert_pad_id, dtype=np.int64)
    flags[:, :n_panel] = PERT_FLAG_OFF
    padding = np.zeros((n, length), dtype=bool)
    prior = np.zeros((n, length), dtype=np.int64)
    prior[:, :n_panel] = space.kept_prior[cols]
    where = np.full(space.n_kept, -1, dtype=np.int64)
    where[cols] = np.arange(n_panel)
    for row, t in enumerate(tokens):
        for pos in t.panel_pos:
            if where[pos] >= 0:  # a perturbed panel gene outside the random subset carries no flag (as scGPT)
                flags[row, where[pos]] = PERT_FLAG_ON
        k = len(t.extra_ids)
        src[row, n_panel : n_panel + k] = t.extra_ids
        flags[row, n_panel : n_panel + k] = PERT_FLAG_ON
        prior[row, n_panel : n_panel + k] = t.extra_prior
        padding[row, n_panel + k :] = True
    return Batch(
        torch.from_numpy(src),
        torch.from_numpy(values),
        torch.from_numpy(flags),
        torch.from_numpy(padding) if padding.any() else None,
        torch.from_numpy(prior) if use_prior else None,
        n_panel,
    )


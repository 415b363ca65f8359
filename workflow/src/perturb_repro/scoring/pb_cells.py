"""Cells grouped by condition and the blockwise energy sums of PerturBench's MMD (used by ``perturbench.py``).

Conditions are index arrays into one matrix (in memory, or an h5py dataset of a file opened ``backed="r"``):
nothing is copied per condition. Rows are read in blocks; a contiguous run of rows is read as one slice
(what h5py reads efficiently). The energy kernel is ``sqrt(max(|a - b|^2, 1e-8))`` (geomloss's tensorised
backend), on numpy or torch (CUDA).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp

_DIST_CLAMP = 1e-8  # geomloss: distances = sqrt(clamp_min(squared_distances, 1e-8))

def read_rows(x, idx: np.ndarray, dtype=None) -> np.ndarray:
    """Dense rows ``idx`` (sorted) of ``x`` (one block; the whole matrix is never copied). A contiguous run is
    read as a slice: one h5py read for a backed matrix instead of a point selection."""
    contiguous = len(idx) > 0 and int(idx[-1]) - int(idx[0]) + 1 == len(idx)
    block = x[int(idx[0]) : int(idx[-1]) + 1] if contiguous else x[idx]
    block = block.toarray() if sp.issparse(block) else np.asarray(block)
    return block if dtype is None or block.dtype == dtype else block.astype(dtype)


@dataclass
class Cells:
    """Rows of one matrix that belong to conditions ``0..C-1``, ordered by condition (indices only)."""

    x: object
    rows: np.ndarray  # indices into x, sorted by condition
    codes: np.ndarray  # condition code of each sorted row
    counts: np.ndarray  # (C,)

    @property
    def offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.counts)])

    @classmethod
    def of(cls, x, labels: np.ndarray, conditions: list[str], candidates: np.ndarray) -> "Cells":
        codes = pd.Categorical(labels[candidates], categories=conditions).codes.astype(np.int64)
        keep = codes >= 0
        rows, codes = candidates[keep], codes[keep]
        order = np.argsort(codes, kind="stable")
        return cls(x, rows[order], codes[order], np.bincount(codes, minlength=len(conditions)))

    def subsample(self, m: int | None, rng: np.random.Generator) -> "Cells":
        """At most ``m`` rows per condition, drawn without replacement (seeded); ``None`` = all rows."""
        if m is None or self.counts.max(initial=0) <= m:
            return self
        offsets = self.offsets
        keep = []
        for c in range(len(self.counts)):
            n = int(self.counts[c])
            pick = np.arange(n) if n <= m else np.sort(rng.choice(n, size=m, replace=False))
            keep.append(offsets[c] + pick)
        keep = np.concatenate(keep)
        return Cells(self.x, self.rows[keep], self.codes[keep], np.minimum(self.counts, m))


def _segments(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(unique codes, start of each run) of a sorted code array."""
    starts = np.flatnonzero(np.r_[True, codes[1:] != codes[:-1]])
    return codes[starts], starts


def condition_stats(cells: Cells, n_genes: int, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-condition mean and scanpy variance ``(C, G)`` float64, in row blocks.

    As scanpy's ``_get_mean_var`` (what ``rank_genes_groups`` uses): mean and mean of the element-wise
    squares in the input dtype, both accumulated in float64, ``var = (E[x^2] - E[x]^2) * n / (n - 1)``.
    """
    n_cond = len(cells.counts)
    sums = np.zeros((n_cond, n_genes))
    sq = np.zeros((n_cond, n_genes))
    for i0 in range(0, len(cells.rows), block):
        xb = read_rows(cells.x, cells.rows[i0 : i0 + block])
        uniq, starts = _segments(cells.codes[i0 : i0 + block])
        sums[uniq] += np.add.reduceat(xb, starts, axis=0, dtype=np.float64)
        sq[uniq] += np.add.reduceat(xb * xb, starts, axis=0, dtype=np.float64)
    n = cells.counts[:, None].astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        mean = sums / n
        var = (sq / n - mean**2) * np.where(n > 1, n / (n - 1), 1.0)
    return mean, var


class Points:
    """Sorted rows of one side of an energy distance, served in blocks of the compute dtype."""

    def __init__(self, cells: Cells, dtype, center: np.ndarray | None = None, coords: np.ndarray | None = None):
        self.codes, self.counts, self.offsets = cells.codes, cells.counts, cells.offsets
        self._cells, self._dtype, self._coords = cells, dtype, coords
        self._center = None if center is None else center.astype(dtype)

    def __len__(self) -> int:
        return len(self.codes)

    def block(self, i0: int, i1: int) -> np.ndarray:
        if self._coords is not None:
            return self._coords[i0:i1].astype(self._dtype, copy=False)
        b = read_rows(self._cells.x, self._cells.rows[i0:i1], self._dtype)
        return b - self._center if self._center is not None else b


class Kernel:
    """sqrt(max(|a_i - b_j|^2, 1e-8)) blocks and their per-condition sums, on numpy or torch (CUDA)."""

    def __init__(self, backend: str):
        self.torch = None
        if backend == "torch-cuda":
            import torch

            self.torch, self.device = torch, torch.device("cuda")

    def dist(self, a, b, na, nb, zero_diagonal: bool):
        if self.torch is not None:
            a, b = self.torch.as_tensor(a, device=self.device), self.torch.as_tensor(b, device=self.device)
            na, nb = self.torch.as_tensor(na, device=self.device), self.torch.as_tensor(nb, device=self.device)
            d2 = na[:, None] + nb[None, :] - 2.0 * (a @ b.T)
            if zero_diagonal:
                d2.fill_diagonal_(0.0)
            return self.torch.sqrt(self.torch.clamp_min(d2, _DIST_CLAMP))
        d2 = a @ b.T
        d2 *= -2.0
        d2 += na[:, None]
        d2 += nb[None, :]
        if zero_diagonal:
            np.fill_diagonal(d2, 0.0)  # the exact |x - x| = 0, which the expansion only approximates
        np.maximum(d2, _DIST_CLAMP, out=d2)
        return np.sqrt(d2, out=d2)

    def total(self, d) -> float:
        if self.torch is not None:
            return float(d.sum(dtype=self.torch.float64))
        return float(d.sum(dtype=np.float64))

    def segment_sums(self, d, codes_a: np.ndarray, codes_b: np.ndarray):
        """(unique a codes, unique b codes, float64 sums of d over each (a condition, b condition) tile)."""
        ua, sa = _segments(codes_a)
        ub, sb = _segments(codes_b)
        if self.torch is not None:
            t = self.torch
            ia = t.as_tensor(np.repeat(np.arange(len(ua)), np.diff(np.r_[sa, len(codes_a)])), device=self.device)
            ib = t.as_tensor(np.repeat(np.arange(len(ub)), np.diff(np.r_[sb, len(codes_b)])), device=self.device)
            rows = t.zeros((len(ua), d.shape[1]), dtype=t.float64, device=self.device).index_add_(0, ia, d.double())
            tiles = t.zeros((len(ua), len(ub)), dtype=t.float64, device=self.device).index_add_(1, ib, rows)
            return ua, ub, tiles.cpu().numpy()
        rows = np.add.reduceat(d, sa, axis=0, dtype=np.float64)
        return ua, ub, np.add.reduceat(rows, sb, axis=1)


def _sq_norms(a):
    return (a * a).sum(axis=1)


def self_means(points: Points, kernel: Kernel, block: int) -> np.ndarray:
    """Per condition c: mean over all ordered pairs (diagonal included) of cells of c."""
    out = np.zeros(len(points.counts))
    offsets = points.offsets
    for c in range(len(points.counts)):
        o0, o1 = int(offsets[c]), int(offsets[c + 1])
        total = 0.0
        for a0 in range(o0, o1, block):
            a = points.block(a0, min(a0 + block, o1))
            na = _sq_norms(a)
            for b0 in range(a0, o1, block):
                if b0 == a0:
                    total += kernel.total(kernel.dist(a, a, na, na, zero_diagonal=True))
                else:
                    b = points.block(b0, min(b0 + block, o1))
                    total += 2.0 * kernel.total(kernel.dist(a, b, na, _sq_norms(b), zero_diagonal=False))
        n = o1 - o0
        out[c] = total / (n * n) if n else np.nan
    return out


def energy_matrix(pred: Points, truth: Points, kernel: Kernel, block: int) -> np.ndarray:
    """M[i, j] = geomloss energy loss between predicted set i and true set j, for all pairs at once.

    ``E|x-y| - E|x-x'|/2 - E|y-y'|/2`` with ``|.| = sqrt(max(d^2, 1e-8))``: the cross sums come from one
    blockwise pass over (all predicted cells) x (all true cells), each distance block summed per
    (condition, condition) tile; the self terms from each condition's own blocks.
    """
    cross = np.zeros((len(pred.counts), len(truth.counts)))
    for i0 in range(0, len(pred), block):
        i1 = min(i0 + block, len(pred))
        a = pred.block(i0, i1)
        na = _sq_norms(a)
        for j0 in range(0, len(truth), block):
            j1 = min(j0 + block, len(truth))
            b = truth.block(j0, j1)
            d = kernel.dist(a, b, na, _sq_norms(b), zero_diagonal=False)
            ua, ub, tiles = kernel.segment_sums(d, pred.codes[i0:i1], truth.codes[j0:j1])
            cross[np.ix_(ua, ub)] += tiles
    n_p, n_t = pred.counts.astype(np.float64), truth.counts.astype(np.float64)
    self_p, self_t = self_means(pred, kernel, block), self_means(truth, kernel, block)
    return cross / np.outer(n_p, n_t) - 0.5 * self_p[:, None] - 0.5 * self_t[None, :]

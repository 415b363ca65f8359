"""scLDM's count space: counts recovered from the data (``counts_matrix``), the units relating them to the
data's log-normalised X (``normalisation_units``), and the library sizes generated cells are decoded with
(``draw_library``: upstream's per-context log-normal size factors, or a random train cell's library).
Used by ``scldm.py``; see its module doc for the choices."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import scipy.sparse as sp

from ..io import atomic_path

LIBRARY_FILE = "library.npy"        # train cells' (panel library size, normalisation unit), for decoding
DECODE_LIBRARY_FILE = "decode_library.npz"  # the same per train cell + its library context (stage 2)

# ------------------------------------------------------------------------------------------------
# counts


def counts_matrix(adata: ad.AnnData, counts_params: Mapping[str, Any] | None) -> sp.csr_matrix:
    """Integer-valued counts [cells, genes] (float32 CSR) per ``params.counts`` (see module doc).

    ``from_lognorm`` is approximate: round(expm1(X) * total / target_sum), total from
    ``obs[total_counts_column]``, or -- if that column is absent and ``infer_total`` (default true) --
    inferred per cell by taking its smallest non-zero expm1(X) as one count."""
    cp = dict(counts_params or {})
    source = str(cp.get("source", "auto"))
    layer = str(cp.get("layer", "counts"))
    if source == "auto":
        source = "layer" if layer in adata.layers else "from_lognorm"
    if source == "layer":
        if layer not in adata.layers:
            raise ValueError(f"counts.source is 'layer' but adata.layers has no '{layer}' (layers: {list(adata.layers)}); "
                             "use counts.source: from_lognorm for log-normalised-only data")
        x = adata.layers[layer]
        x = sp.csr_matrix(x, dtype=np.float32) if not sp.issparse(x) else x.tocsr().astype(np.float32)
        if x.nnz and (x.data.min() < 0 or not np.allclose(x.data, np.round(x.data))):
            raise ValueError(f"adata.layers['{layer}'] is not a count matrix (negative or non-integer values)")
        return x
    if source != "from_lognorm":
        raise ValueError(f"counts.source must be layer, from_lognorm or auto, not {source!r}")
    column = cp.get("total_counts_column", "ncounts")
    x = sp.csr_matrix(adata.X, dtype=np.float64) if not sp.issparse(adata.X) else adata.X.tocsr().astype(np.float64)
    rows = np.repeat(np.arange(x.shape[0]), np.diff(x.indptr))
    values = np.expm1(x.data)  # = count * target_sum / total
    if column and column in adata.obs:
        unit = float(cp.get("target_sum", 1e4)) / adata.obs[column].to_numpy(dtype=np.float64)
    elif cp.get("infer_total", True):
        # no totals column (e.g. dropped by preprocessing): unit = target_sum / total is the largest
        # value that makes every non-zero value of the cell an integer multiple of it: the smallest
        # value divided by k = 1, 2, ... (k > 1 when the cell's smallest count in the panel is k). A cell
        # whose counts share a divisor d > 1 comes out divided by d (X cannot tell the two apart).
        vmin = np.full(x.shape[0], np.inf)
        np.minimum.at(vmin, rows, np.where(values > 0, values, np.inf))
        vmin[~np.isfinite(vmin)] = 1.0
        unit = vmin.copy()
        todo = np.ones(x.shape[0], dtype=bool)
        for k in range(1, int(cp.get("infer_max_k", 20)) + 1):
            r = values / (vmin[rows] / k)
            bad = np.zeros(x.shape[0], dtype=bool)
            np.logical_or.at(bad, rows, np.abs(r - np.round(r)) > 0.05)
            fix = todo & ~bad
            unit[fix] = vmin[fix] / k
            todo &= bad
            if not todo.any():
                break
    else:
        raise ValueError(f"counts.total_counts_column '{column}' is not in obs: {list(adata.obs.columns)}")
    data = np.round(values / unit[rows])
    out = sp.csr_matrix((data.astype(np.float32), x.indices.copy(), x.indptr.copy()), shape=x.shape)
    out.eliminate_zeros()
    return out


def normalisation_units(adata: ad.AnnData, counts: sp.csr_matrix) -> np.ndarray:
    """Per cell u with X = log1p(counts * u), i.e. u = target_sum / (the total X was normalised with).

    The processed X is normalised by the cell's whole-transcriptome total before gene selection, so
    u is not target_sum / (counts over the panel): it is read off the data as the median over the
    cell's non-zero genes of expm1(X) / counts (cells without counts get the median of the others)."""
    x = sp.csr_matrix(adata.X, dtype=np.float64) if not sp.issparse(adata.X) else adata.X.tocsr().astype(np.float64)
    c = counts.tocsr().astype(np.float64)
    xm = sp.csr_matrix(x.multiply(c > 0))
    cm = sp.csr_matrix(c.multiply(x > 0))
    for m in (xm, cm):
        m.eliminate_zeros()
        m.sort_indices()
    if not (np.array_equal(xm.indptr, cm.indptr) and np.array_equal(xm.indices, cm.indices)):
        raise ValueError("X and the counts disagree on which entries are non-zero")
    ratio = np.expm1(xm.data) / cm.data
    rows = np.repeat(np.arange(c.shape[0]), np.diff(xm.indptr))
    order = np.lexsort((ratio, rows))  # by row, then value: a per-row median without a Python loop
    n = np.diff(xm.indptr)
    u = np.full(c.shape[0], np.nan)
    has = n > 0
    lo = xm.indptr[:-1][has] + (n[has] - 1) // 2
    hi = xm.indptr[:-1][has] + n[has] // 2
    u[has] = 0.5 * (ratio[order][lo] + ratio[order][hi])
    if not has.any():
        raise ValueError("cannot relate X to the counts: no cell has a gene non-zero in both")
    u[~has] = np.median(u[has])
    return u


def log_normalize(x: np.ndarray, target_sum: float) -> np.ndarray:
    """normalize_total(target_sum) + log1p; rows with zero total stay zero."""
    total = x.sum(axis=1, keepdims=True)
    scale = np.divide(target_sum, total, out=np.zeros_like(total), where=total > 0)
    return np.log1p(x * scale).astype(np.float32)


# ------------------------------------------------------------------------------------------------
# decoding: library sizes of generated cells


def library_columns(params: Mapping[str, Any]) -> list[str]:
    """obs columns whose joint value is a generated cell's library context (upstream: time point x donor)."""
    columns = params.get("library_context")
    return [str(c) for c in (params.get("covariates") or [] if columns is None else columns)]


def context_keys(obs, columns: list[str]) -> np.ndarray:
    """Per cell, its context: the values of ``columns`` joined by "_" (upstream's size-factor keys)."""
    missing = [c for c in columns if c not in obs]
    if missing:
        raise ValueError(f"library_context columns {missing} are not in obs: {list(obs.columns)}")
    if not columns:
        return np.full(len(obs), "", dtype=object)
    parts = [obs[c].astype(str).to_numpy(dtype=object) for c in columns]
    return np.array(["_".join(v) for v in zip(*parts)], dtype=object)


def write_decode_library(path: Path, train: ad.AnnData, counts: sp.csr_matrix, columns: list[str]) -> None:
    """Per train cell: panel library, normalisation unit (see ``normalisation_units``) and context code."""
    keys, code = np.unique(context_keys(train.obs, columns).astype(str), return_inverse=True)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            np.savez(handle, library=np.asarray(counts.sum(axis=1), dtype=np.float64).ravel(),
                     unit=normalisation_units(train, counts), code=code.astype(np.int64),
                     keys=keys.astype(str), columns=np.array(columns, dtype=str))


def _has_decode_library(directory: Path, n_cells: int, columns: list[str]) -> bool:
    path = Path(directory) / DECODE_LIBRARY_FILE
    if not path.exists():
        return False
    with np.load(path) as table:
        return table["code"].shape[0] == n_cells and table["columns"].tolist() == columns


def size_factor_stats(library: np.ndarray, code: np.ndarray, n_keys: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation (ddof 0) of log(library) per context over train cells with library > 0,
    as upstream's scripts/compute_log_size_factors.py (np.mean / np.std of log total counts per context)."""
    ok = library > 0
    log_lib, c = np.log(library[ok]), code[ok]
    n = np.bincount(c, minlength=n_keys).astype(np.float64)
    mu = np.bincount(c, log_lib, minlength=n_keys) / np.maximum(n, 1)
    var = np.bincount(c, (log_lib - mu[c]) ** 2, minlength=n_keys) / np.maximum(n, 1)
    return mu, np.sqrt(var)


@functools.lru_cache(maxsize=2)
def _decode_table(path: str, mtime_ns: int):
    """The decode library with per-context (mu, sd) and member cells, read once per process (sample() is called
    once per condition)."""
    with np.load(path) as table:
        library, unit, code, known = table["library"], table["unit"], table["code"], table["keys"].tolist()
    mu, sd = size_factor_stats(library, code, len(known))
    ok = np.flatnonzero(library > 0)
    order = ok[np.argsort(code[ok], kind="stable")]
    bounds = np.searchsorted(code[order], np.arange(len(known) + 1))
    members = {k: order[bounds[k]: bounds[k + 1]] for k in range(len(known)) if bounds[k + 1] > bounds[k]}
    pooled = np.log(library[ok])
    stats = {k: (mu[k], sd[k]) for k in members}
    stats[-1], members[-1] = (pooled.mean(), pooled.std()), ok
    index = {key: k for k, key in enumerate(known) if k in members}
    return library, unit, index, stats, members


def draw_library(directory: Path, mode: str, keys: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(panel library L, normalisation unit u) of each generated cell, as two [n, 1] columns.

    ``train_cell``: both of a random train cell of any context. ``context`` (upstream): log L ~ Normal(mu_k, sd_k)
    of the cell's context k (``size_factor_stats``); u = u_j l_j / L with j a random train cell of context k, i.e.
    the generated cell keeps j's panel fraction of its whole-transcriptome total. A context without train cells
    draws from all train cells pooled (upstream's generation raises there)."""
    if mode == "train_cell":
        library = np.load(Path(directory) / LIBRARY_FILE)
        draw = library[rng.integers(0, len(library), size=len(keys))]
        return draw[:, :1], draw[:, 1:]
    if mode != "context":
        raise ValueError(f"library must be context or train_cell, not {mode!r}")
    path = Path(directory) / DECODE_LIBRARY_FILE
    library, unit, index, stats, members = _decode_table(str(path), path.stat().st_mtime_ns)
    lib_out, unit_out = np.empty(len(keys)), np.empty(len(keys))
    for key in sorted(set(keys.tolist())):
        rows = np.flatnonzero(keys == key)
        k = index.get(key, -1)  # -1: the pooled train cells
        log_l = rng.normal(stats[k][0], stats[k][1], size=rows.size)
        j = members[k][rng.integers(0, members[k].size, size=rows.size)]
        lib_out[rows] = np.exp(log_l)
        unit_out[rows] = unit[j] * library[j] / lib_out[rows]
    return lib_out[:, None], unit_out[:, None]


def decode_counts(mu: np.ndarray, theta: np.ndarray, decode: str, rng: np.random.Generator) -> np.ndarray:
    """Generated cells in count space: ``sample`` draws NB(mean mu, inverse dispersion theta) counts as a
    gamma-Poisson mixture (upstream ``NegativeBinomialSCVI(mu, theta).sample()``, the same construction);
    ``mean`` returns mu itself."""
    if decode == "mean":
        return mu
    if decode == "sample":
        return rng.poisson(rng.gamma(theta, mu / theta)).astype(np.float64)
    raise ValueError(f"decode must be mean or sample, not {decode!r}")

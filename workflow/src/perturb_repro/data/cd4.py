"""CD4+ T-cell Perturb-seq (Zhu et al. 2025; scLDM.CD4): chunked reading of a very large h5ad, and its split.

Data: "Primary Human CD4+ T Cell Perturb-seq" (Zhu, Dann, ..., Pritchard, Marson; bioRxiv
10.64898/2025.12.23.696273; CZI Virtual Cells Platform, ~22M cells, 4 donors x 3 stimulation time
points, CRISPRi of all expressed genes). scLDM.CD4 (card: ``/work/shared/seeds/scldm_cd4_card.txt``)
trains on ~14.5M pre-processed cells restricted to a fixed panel of 3,699 HVGs, conditioned on
``donor_id``, ``guide_target_ensembl`` (control ``NTC``) and ``experimental_perturbation_time_point``
(upstream config: shntnu/scldm_cd4 ``experiments/config/datamodule/single_anndata.yaml``,
``experiments/config/marson_fm.yaml``).

Reader (``source.reader: backed_chunked``): the file is opened with ``anndata.read_h5ad(backed="r")``
and read in windows of ``source.chunk_size`` consecutive rows. From each window only the cells that
pass ``obs_filter`` and the genes of ``source.gene_panel`` are kept, as a CSR block; the whole matrix is
never loaded and never densified (a dense-stored file is densified one window at a time only). Per
block: ``layers["counts"]`` = the panel counts; library size = the cell's total over *all* genes of the
file (obs ``library_size``), so restricting to the panel does not change the normalisation;
``X = log1p(counts / library_size * target_sum)``. The result is assembled from the sparse blocks.
Memory: the output (nnz of the selected cells x panel, twice) plus one window.

Split (recipe ``cd4_context_holdout``): the card does not define its split. It says validation
(~1.1M cells) and test (~2.4M cells) are "disjoint from the training and validation data", that the
model serves "new donors and time points when their empirical training data are limited", and that
only conditions (donor, target, time point values) seen in training can be generated. Our reading,
expressible as a condition-level split table (group_by = donor and time point): a share of the
(target, donor, time point) combinations is held out for test and validation, chosen so that every
held-out target is still trained on in some other donor/time point and every context keeps training
cells. The shares default to the card's cell proportions (1.1 / 18.0 and 2.4 / 18.0 of all cells). A
cell-level random split (the other reading) cannot be written as a split table and is not offered.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..errors import PipelineInputError
from .checks import ValueScan

logger = logging.getLogger(__name__)

CONDITION = "condition"
DEFAULT_CHUNK_SIZE = 50_000
# Card: ~14.5M train, ~1.1M validation, ~2.4M test cells.
CARD_VAL_SHARE = round(1.1 / (14.5 + 1.1 + 2.4), 3)
CARD_TEST_SHARE = round(2.4 / (14.5 + 1.1 + 2.4), 3)


def read_gene_panel(path: str | Path) -> list[str]:
    """Gene panel file: one gene per line, or a CSV whose ``gene`` column (else first column) lists them.

    Raises:
        PipelineInputError: The file is missing, empty or lists a gene twice.
    """
    p = Path(path)
    if not p.is_file():
        raise PipelineInputError(str(p), "source.gene_panel", "gene panel file does not exist")
    if p.suffix.lower() in (".csv", ".tsv"):
        frame = pd.read_csv(p, sep="\t" if p.suffix.lower() == ".tsv" else ",", dtype=str, keep_default_na=False)
        genes = frame["gene" if "gene" in frame.columns else frame.columns[0]].tolist()
    else:
        genes = [line.strip() for line in p.read_text().splitlines()]
    genes = [g for g in genes if g and not g.startswith("#")]
    if not genes:
        raise PipelineInputError(str(p), "source.gene_panel", "gene panel is empty")
    dup = sorted({g for g in genes if genes.count(g) > 1}) if len(set(genes)) != len(genes) else []
    if dup:
        raise PipelineInputError(str(p), "source.gene_panel", f"genes listed twice: {dup[:10]}")
    return genes


def _filter_mask(obs: pd.DataFrame, obs_filter: Mapping[str, Any] | None, source: str) -> np.ndarray:
    mask = np.ones(len(obs), dtype=bool)
    for column, value in (obs_filter or {}).items():
        if column not in obs:
            raise PipelineInputError(source, f"obs['{column}']", "column named in obs_filter is missing")
        mask &= (obs[column].astype(str) == str(value)).to_numpy()
        if not mask.any():
            raise PipelineInputError(source, f"obs['{column}']", f"no cells have value '{value}'")
    return mask


def _panel_columns(var_names: pd.Index, panel: list[str], source: str, panel_source: str) -> np.ndarray:
    position = pd.Index(var_names).get_indexer(panel)
    missing = [g for g, i in zip(panel, position, strict=True) if i < 0]
    if missing:
        raise PipelineInputError(
            source, "var_names", f"{len(missing)} gene(s) of the panel {panel_source} are not in the file: {missing[:10]}"
        )
    return position


def _read_block(matrix, lo: int, hi: int):
    """Rows [lo, hi) of a backed matrix: CSR for sparse storage, ndarray (one window only) for dense."""
    block = matrix[lo:hi]
    return block.tocsr() if sp.issparse(block) else np.asarray(block)


def _normalise_block(block, rows: np.ndarray, columns: np.ndarray, target_sum: float) -> tuple[sp.csr_matrix, sp.csr_matrix, np.ndarray]:
    """(panel counts, log-normalised panel, library size over all genes) for the selected rows of a block."""
    block = block[rows]
    library = np.asarray(block.sum(axis=1), dtype=np.float64).ravel()
    counts = sp.csr_matrix(block[:, columns], dtype=np.float32)
    scale = np.divide(target_sum, library, out=np.zeros_like(library), where=library > 0)
    logn = sp.csr_matrix(sp.diags(scale.astype(np.float32)) @ counts, dtype=np.float32)
    np.log1p(logn.data, out=logn.data)
    return counts, logn, library


class PanelChunks:
    """The selected cells x gene panel of a large h5ad, served chunk by chunk (``with PanelChunks(...) as p``).

    ``p.obs`` = the selected cells' obs (file order), ``p.var`` = the panel genes' var (panel order, indexed by
    the panel), ``p.chunks()`` yields ``(panel counts, log-normalised panel, library size)`` per window of
    ``source.chunk_size`` rows (CSR float32; windows without selected cells are skipped), in obs order.
    """

    def __init__(self, path: str | Path, dataset_cfg: Mapping[str, Any]):
        source_cfg = dataset_cfg["source"]
        self.source = str(path)
        if not Path(path).is_file():
            raise PipelineInputError(self.source, "source", "file does not exist")
        if not source_cfg.get("gene_panel"):
            raise PipelineInputError("config", "source.gene_panel", "reader backed_chunked needs a gene panel file")
        self.chunk_size = int(source_cfg.get("chunk_size", DEFAULT_CHUNK_SIZE))
        if self.chunk_size < 1:
            raise PipelineInputError("config", "source.chunk_size", f"must be >= 1, got {self.chunk_size}")
        self.target_sum = float((dataset_cfg.get("preprocess") or {}).get("target_sum", 1e4))
        self._cfg, self._path = dataset_cfg, path
        self.n_chunks = 0

    def __enter__(self) -> "PanelChunks":
        try:
            self._backed = ad.read_h5ad(self._path, backed="r")
        except Exception as err:  # h5py raises many types for a damaged file
            raise PipelineInputError(self.source, "h5ad", f"cannot be read as AnnData ({err})") from err
        try:
            self.mask = _filter_mask(self._backed.obs, self._cfg.get("obs_filter"), self.source)
            self.obs = self._backed.obs.iloc[np.flatnonzero(self.mask)].copy()
        except BaseException:
            self._backed.file.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._backed.file.close()

    def panel(self) -> tuple[list[str], np.ndarray, pd.DataFrame]:
        """(panel genes, their columns in the file, their var rows indexed by the panel)."""
        source_cfg, backed = self._cfg["source"], self._backed
        panel = read_gene_panel(source_cfg["gene_panel"])
        var_column = source_cfg.get("var_column")
        if var_column and var_column not in backed.var:
            raise PipelineInputError(self.source, f"var['{var_column}']", "column named in source.var_column is missing")
        names = pd.Index(backed.var[var_column].astype(str)) if var_column else pd.Index(backed.var_names.astype(str))
        columns = _panel_columns(names, panel, self.source, str(source_cfg["gene_panel"]))
        var = backed.var.iloc[columns].copy()
        var.index = pd.Index(panel)
        return panel, columns, var

    def value_scan(self) -> ValueScan:
        """A scan of the raw values (every gene of the selected cells) for :meth:`chunks` to fill."""
        return ValueScan(self.source, "X", list(self._backed.var_names.astype(str)))

    def chunks(self, columns: np.ndarray, scan: ValueScan | None = None):
        backed = self._backed
        cell_names = backed.obs_names.to_numpy()
        for lo in range(0, backed.n_obs, self.chunk_size):
            hi = min(lo + self.chunk_size, backed.n_obs)
            rows = np.flatnonzero(self.mask[lo:hi])
            if rows.size == 0:
                continue
            self.n_chunks += 1
            block = _read_block(backed.X, lo, hi)
            if scan is not None:
                scan.update(block[rows], cell_names[lo + rows])
            yield _normalise_block(block, rows, columns, self.target_sum)


def check_counts(scan: ValueScan, dataset_cfg: Mapping[str, Any]) -> None:
    """Refuse a file whose selected cells are not raw counts (the reader normalises them itself)."""
    scan.check("counts", f"datasets.{dataset_cfg.get('name', '<dataset>')}.source.reader: backed_chunked",
               "this reader normalises raw counts itself; a log-normalised file needs the memory reader")


def read_backed_chunked(path: str | Path, dataset_cfg: Mapping[str, Any], obs_only: bool = False) -> ad.AnnData:
    """Selected cells x gene panel from a large h5ad, read in row chunks (see the module docstring).

    Args:
        path: The raw ``.h5ad`` (counts in X, sparse or dense storage).
        dataset_cfg: The dataset's config entry: ``source.gene_panel`` (required), ``source.chunk_size``,
            ``source.var_column`` (var column matching the panel; default var_names), ``obs_filter``,
            ``preprocess.target_sum``.
        obs_only: Return the selected cells' obs without reading X (what the split step needs).

    Returns:
        AnnData with CSR float32 ``X`` (log-normalised) and ``layers["counts"]``, var = panel genes in
        panel order, obs of the selected cells plus ``library_size``. (The preprocessing rule does not hold
        this whole: :func:`perturb_repro.data.preprocess.preprocess_streamed` writes the chunks as they come.)
    """
    reader = PanelChunks(path, dataset_cfg)
    with reader:
        obs = reader.obs
        if obs_only:
            return ad.AnnData(obs=obs)
        _, columns, var = reader.panel()
        counts_blocks, x_blocks, libraries = [], [], []
        scan = reader.value_scan()  # every gene of the selected cells feeds the library size: all are checked
        for counts, logn, library in reader.chunks(columns, scan):
            counts_blocks.append(counts)
            x_blocks.append(logn)
            libraries.append(library)
    if not counts_blocks:
        raise PipelineInputError(reader.source, "obs_filter", "no cells selected")
    check_counts(scan, dataset_cfg)
    obs["library_size"] = np.concatenate(libraries)
    out = ad.AnnData(X=sp.vstack(x_blocks, format="csr"), obs=obs, var=var)
    out.layers["counts"] = sp.vstack(counts_blocks, format="csr")
    logger.info("%s: %d of %d cells x %d panel genes read in %d chunk(s) of <= %d rows",
                reader.source, out.n_obs, len(reader.mask), out.n_vars, reader.n_chunks, reader.chunk_size)
    return out


def cd4_context_holdout_split(
    pairs: pd.DataFrame,
    control_label: str,
    seed: int,
    val_fraction: float = CARD_VAL_SHARE,
    test_fraction: float = CARD_TEST_SHARE,
) -> pd.DataFrame:
    """Hold out (target, context) combinations; every held-out target stays trained in another context.

    Args:
        pairs: Unique (condition, *context columns) rows (duplicates dropped); the context columns
            are all columns besides ``condition`` (the dataset's ``group_by``: donor, time point).
        control_label: The control (``NTC``); its rows are train in every context.
        seed: Seed of the draw.
        val_fraction: Share of perturbed (condition, context) rows for validation.
        test_fraction: Share for test.

    Returns:
        One row per (condition, context): ``condition``, the group columns, ``split``, ``subgroup``
        (``control``, ``seen_target`` for held-out rows).
    """
    if CONDITION not in pairs.columns:
        raise PipelineInputError("split", CONDITION, f"pairs table lacks column '{CONDITION}'; has {list(pairs.columns)}")
    group_columns = [c for c in pairs.columns if c != CONDITION]
    if not group_columns:
        raise PipelineInputError("config", "group_by", "cd4_context_holdout needs group_by context columns (donor, time point)")
    keys = [CONDITION, *group_columns]
    if val_fraction < 0 or test_fraction <= 0 or val_fraction + test_fraction >= 1:
        raise PipelineInputError("config", "split", f"need 0 <= val_fraction, 0 < test_fraction, sum < 1; got {val_fraction}, {test_fraction}")
    table = pairs[keys].astype(str).drop_duplicates().sort_values(keys).reset_index(drop=True)
    control = (table[CONDITION] == control_label).to_numpy()
    perturbed = np.flatnonzero(~control)
    rng = np.random.default_rng(seed)
    order = perturbed[rng.permutation(perturbed.size)]
    n_test = round(perturbed.size * test_fraction)
    n_val = round(perturbed.size * val_fraction)
    # a target may be held out in a context only while it keeps >= 1 training context
    train_contexts = table.loc[~control, CONDITION].value_counts().to_dict()
    split = np.array(["train"] * len(table), dtype=object)
    wanted = [("test", n_test), ("val", n_val)]
    for i in order:
        if not wanted:
            break
        name, left = wanted[0]
        condition = table.at[i, CONDITION]
        if train_contexts[condition] <= 1:
            continue
        split[i] = name
        train_contexts[condition] -= 1
        wanted[0] = (name, left - 1)
        if left - 1 <= 0:
            wanted.pop(0)
    if wanted:
        logger.warning("cd4_context_holdout: only part of the requested held-out rows could be drawn (%s left): "
                       "targets measured in a single context always stay in train", wanted)
    table["split"] = split
    table["subgroup"] = np.where(control, "control", np.where(split == "train", "", "seen_target"))
    return table.sort_values(["split", "subgroup", *keys]).reset_index(drop=True)

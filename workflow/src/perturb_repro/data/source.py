"""Read a dataset's raw file: verify its checksum, select its cells, check the columns the config names."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Mapping

import anndata as ad
import numpy as np

from ..errors import PipelineInputError
from .checks import check_expression, check_labels

CONDITION = "condition"
IS_CONTROL = "is_control"


def sha256_of(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def verify_sha256(path: str | Path, expected: str | None) -> str:
    """Raise if the file's sha256 differs from ``expected``; return the actual digest."""
    if not Path(path).exists():
        raise PipelineInputError(path, "source", "file does not exist")
    actual = sha256_of(path)
    if expected and actual != expected.lower():
        raise PipelineInputError(
            path, "sha256", f"checksum mismatch: expected {expected}, got {actual} (corrupted or wrong file)"
        )
    return actual


def source_gene_count(path: str | Path, dataset_cfg: Mapping[str, Any]) -> int:
    """Genes the preprocessing step will see: the gene panel of the chunked reader, else the file's X columns
    (read from the HDF5 shape, without loading obs, var or X)."""
    if dataset_cfg["source"].get("reader", "memory") == "backed_chunked":
        from .cd4 import read_gene_panel

        return len(read_gene_panel(dataset_cfg["source"]["gene_panel"]))
    import h5py

    with h5py.File(path, "r") as handle:
        x = handle["X"]
        return int(x.attrs["shape"][1] if isinstance(x, h5py.Group) else x.shape[1])


def load_source(
    path: str | Path, dataset_cfg: Mapping[str, Any], verify: bool = True, obs_only: bool = False
) -> ad.AnnData:
    """Load the cells of one configured dataset with canonical ``condition`` and ``is_control`` columns.

    Args:
        path: The raw ``.h5ad`` file.
        dataset_cfg: The dataset's config entry (``perturbation_column``, ``control_label``,
            optional ``obs_filter`` and ``source.sha256``).
        verify: Check the sha256 first (the download rule already did for fetched files).
        obs_only: Only obs is needed (the split step): X is not read (the returned AnnData has
            no genes).

    Every cell must have a condition label; when X is read its values are checked (finite, non-negative, raw
    counts or log-normalised as ``preprocess.normalize`` says: :func:`perturb_repro.data.checks.check_expression`)
    on the selected cells, so a spoiled file stops here naming the field, the count and the first (cell, gene).

    With ``source.reader: backed_chunked`` (very large files) the file is read in row chunks
    restricted to ``source.gene_panel``: see :func:`perturb_repro.data.cd4.read_backed_chunked`.
    """
    if verify:
        verify_sha256(path, dataset_cfg["source"].get("sha256"))
    chunked = dataset_cfg["source"].get("reader", "memory") == "backed_chunked"
    if chunked:
        from .cd4 import read_backed_chunked  # applies obs_filter itself

        adata = read_backed_chunked(path, dataset_cfg, obs_only=obs_only)
    else:
        try:
            if obs_only:  # backed: obs is read, X stays on disk
                backed = ad.read_h5ad(path, backed="r")
                adata = ad.AnnData(obs=backed.obs.copy())
                backed.file.close()
            else:
                adata = ad.read_h5ad(path)
        except Exception as err:  # h5py raises many types for a damaged file
            raise PipelineInputError(path, "h5ad", f"cannot be read as AnnData ({err})") from err
    for column, value in ({} if chunked else dataset_cfg.get("obs_filter") or {}).items():
        if column not in adata.obs:
            raise PipelineInputError(path, f"obs['{column}']", "column named in obs_filter is missing")
        adata = adata[adata.obs[column].astype(str) == str(value)].copy()
        if adata.n_obs == 0:
            raise PipelineInputError(path, f"obs['{column}']", f"no cells have value '{value}'")
    pert_col = dataset_cfg["perturbation_column"]
    control = dataset_cfg["control_label"]
    if pert_col not in adata.obs:
        raise PipelineInputError(
            path, f"obs['{pert_col}']", f"perturbation column missing; obs has {list(adata.obs.columns)}"
        )
    check_labels(adata.obs[pert_col], str(path), pert_col)
    labels = adata.obs[pert_col].astype(str)
    if not (labels == control).any():
        seen = sorted(labels.unique())[:8]
        raise PipelineInputError(
            path, f"obs['{pert_col}']", f"control label '{control}' not found; labels include {seen}"
        )
    for covariate in dataset_cfg.get("covariates", []):
        if covariate not in adata.obs:
            raise PipelineInputError(path, f"obs['{covariate}']", "covariate column named in the config is missing")
    for column in dataset_cfg.get("group_by") or []:
        if column not in adata.obs:
            raise PipelineInputError(path, f"obs['{column}']", "group_by column named in the config is missing")
    adata.obs[CONDITION] = labels.values
    adata.obs[IS_CONTROL] = (labels == control).values
    adata.var_names_make_unique()
    if not obs_only and not chunked:  # the chunked reader checks each window as it reads it
        check_expression(adata, str(path), dataset_cfg)
    if adata.X is not None and not np.issubdtype(adata.X.dtype, np.floating):
        adata.X = adata.X.astype(np.float32)
    return adata

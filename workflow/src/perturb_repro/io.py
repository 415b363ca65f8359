"""Atomic writers: an output either appears whole or not at all, so Snakemake never sees half a file.

Also the checked CSV reader of the report's inputs, so an unreadable file or a missing column fails
with the same :class:`PipelineInputError` wording wherever it is read.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import tempfile
from pathlib import Path
from typing import Iterator, Sequence

import anndata as ad
import pandas as pd

from perturb_repro.errors import PipelineInputError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(target)
    # keep the real suffix last: numpy and anndata look at it
    fd, tmp = tempfile.mkstemp(prefix=f".{target.stem}.", suffix=f".tmp{target.suffix}", dir=target.parent)
    os.close(fd)
    # mkstemp creates 0600; outputs should carry the usual permissions
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _temp_pattern(target: Path) -> re.Pattern:
    # mkstemp's random part: 8 characters of [a-z0-9_]
    return re.compile(rf"^\.{re.escape(target.stem)}\.[a-z0-9_]{{8}}\.tmp{re.escape(target.suffix)}$")


def remove_stale_temps(target: str | os.PathLike) -> list[Path]:
    """Delete temp files an earlier writer of ``target`` left when it was killed (SIGKILL, OOM: no ``finally``).

    Each output has one writer at a time (one Snakemake job; rank 0 for checkpoints), so a temp file of the same
    target found when a new write starts is an orphan. Returns what was removed.
    """
    target = Path(target)
    pattern = _temp_pattern(target)
    stale = [p for p in target.parent.glob(f".{glob.escape(target.stem)}.*") if pattern.match(p.name)]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def write_h5ad(adata: ad.AnnData, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        adata.write_h5ad(tmp)


def write_csv(frame: pd.DataFrame, path: str | os.PathLike, **kwargs) -> None:
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, **kwargs)


def write_csvs(*outputs: tuple[pd.DataFrame, str | os.PathLike], **kwargs) -> None:
    """Write each ``(frame, path)`` atomically, and all of them or none: a failure removes those already written,
    so a rule's sibling outputs (metrics + per-condition table) never disagree."""
    try:
        for frame, path in outputs:
            write_csv(frame, path, **kwargs)
    except BaseException:
        remove_outputs(*(path for _, path in outputs))
        raise


def remove_outputs(*paths: str | os.PathLike) -> None:
    """Delete outputs that may not exist (a rerun's stale ones, or siblings of a failed write)."""
    for path in paths:
        Path(path).unlink(missing_ok=True)


def write_text(text: str, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def read_csv_checked(path: str | os.PathLike, columns: Sequence[str] = (), **read_csv_kwargs) -> pd.DataFrame:
    """``pd.read_csv(path, **read_csv_kwargs)``, raising :class:`PipelineInputError` if the file cannot be
    read as CSV or lacks one of ``columns`` (the first missing one, in the order given, is named)."""
    src = str(path)
    try:
        frame = pd.read_csv(path, **read_csv_kwargs)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise PipelineInputError(src, "<file>", f"cannot be read as CSV: {exc}") from exc
    for column in columns:
        if column not in frame.columns:
            raise PipelineInputError(src, column, "column is missing")
    return frame

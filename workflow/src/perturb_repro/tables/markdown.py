"""The Markdown and CSV writing every table module shares (paper tables, the scFATE audit)."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Sequence

import pandas as pd

from perturb_repro.errors import PipelineInputError
from perturb_repro.io import atomic_path, write_csv


def md_cell(text: Any) -> str:
    """One Markdown table cell: None/NaN/NA as empty, pipes and backslashes escaped, one line."""
    if text is None or text is pd.NA or (isinstance(text, float) and math.isnan(text)):
        return ""
    # a pipe would split a Markdown table cell
    return str(text).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def md_table(header: Sequence[str], aligns: str, rows: Iterable[Sequence[Any]]) -> list[str]:
    """Lines of a Markdown table; ``aligns`` has one letter per column: ``l`` (left) or ``r`` (right)."""
    if len(aligns) != len(header):
        raise ValueError(f"{len(header)} columns but {len(aligns)} alignments")
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if a == "r" else "---" for a in aligns) + "|"]
    lines += ["| " + " | ".join(md_cell(c) for c in row) + " |" for row in rows]
    return lines


def md_bullets(heading: str, items: Sequence[str]) -> list[str]:
    """``heading``, a blank line, one ``- item`` per entry and a blank line; nothing when empty."""
    if not items:
        return []
    return [heading, ""] + [f"- {md_cell(item)}" for item in items] + [""]


def md_source_header(title: str, seed: str, section: str, spec_path: str) -> list[str]:
    """Title and the "Source: seed, section (spec: file)" line every table starts with."""
    return [
        f"# {md_cell(title)}",
        "",
        f"Source: {md_cell(seed)}, section \"{md_cell(section)}\" (spec: {md_cell(Path(spec_path).name)})",
        "",
    ]


def ordered_counts(values: Iterable[Any], order: Sequence[str]) -> dict[str, int]:
    """Count ``values`` in the canonical ``order`` (zeros included), unknown values after it, sorted."""
    counts = Counter(str(v) for v in values)
    ordered = {name: counts.pop(name, 0) for name in order}
    ordered.update(sorted(counts.items()))
    return ordered


def write_csv_and_markdown(
    frame: pd.DataFrame, columns: Sequence[str], markdown: str, csv_path: str | Path, md_path: str | Path, what: str
) -> None:
    """Write ``frame[columns]`` as CSV and ``markdown`` beside it, each atomically.

    Raises:
        PipelineInputError: naming ``what`` and the first of ``columns`` the frame lacks.
    """
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise PipelineInputError(what, missing[0], "column is missing")
    write_csv(frame[list(columns)], csv_path, index=False, encoding="utf-8")
    with atomic_path(md_path) as tmp:
        tmp.write_text(markdown, encoding="utf-8")

"""Compare numbers a paper printed with the numbers our pipeline reproduced.

A table spec (YAML, schema in ``resources/paper_tables/*.yaml`` header) lists every printed number
as a string, so its printed precision survives. :func:`reproduce_table` looks each one up in the
``metrics.csv`` of the matching run and gives it a status; :func:`write_table` writes CSV + Markdown.

Optional schema additions (all backwards compatible: a spec without them loads and reproduces
exactly as before, and an older loader rejects them loudly as unknown keys):

* cell ``blank: true`` -- the printed cell holds no number (empty, or a marker such as ``N/A``,
  kept verbatim in ``reported``). Such a cell is recorded, never compared: its status is
  ``not-comparable`` (or ``not-run``), our value is shown for information.
* cell ``reported_std`` -- the ``± x`` part of a ``mean ± std`` cell, a quoted fixed-point string
  like ``reported``; recorded, not used in the comparison.
* top-level ``assumptions`` -- list of ``{claim, evidence}`` mappings: readings of the source that
  are not stated in it (e.g. which uncaptioned table is which), with the evidence for each.

CLI::

    python -m perturb_repro.tables.paper_table --spec X.yaml \
        --metrics norman_demo:cellflow=results/norman_demo/cellflow/metrics.csv \
        --scale norman_demo=demo --map norman=norman_demo --csv out.csv --md out.md
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any, Mapping, Sequence

import pandas as pd
import yaml

from perturb_repro.errors import PipelineInputError
from perturb_repro.io import atomic_path, write_csv

SCHEMA_VERSION = 1

# Order matters: it is the order of the legend and of the summary line.
STATUSES: tuple[str, ...] = (
    "match",
    "within-noise",
    "mismatch",
    "unverifiable",
    "not-run",
    "not-comparable",
)

STATUS_DESCRIPTIONS: dict[str, str] = {
    "match": "reproduced value, rounded to the printed number of decimals, equals the printed value",
    "within-noise": "|reproduced - reported| <= tolerance",
    "mismatch": "differs by more than the tolerance",
    "unverifiable": "a value was reported but ours cannot be computed (NaN, or metric absent from metrics.csv)",
    "not-run": "the run this cell needs was not built or not configured",
    "not-comparable": "run at demo scale, or the paper printed no number (blank cell): value shown for information, not compared",
}

# Every metrics.csv summary column except `count` is a legal statistic; the card only uses
# mean/median/max but other tables may print e.g. a std.
STATISTICS: tuple[str, ...] = ("mean", "std", "min", "q25", "median", "q75", "max")

SCALES: tuple[str, ...] = ("paper", "demo")

OUTPUT_COLUMNS: tuple[str, ...] = (
    "dataset",
    "run_dataset",
    "model",
    "metric",
    "statistic",
    "reported",
    "reproduced",
    "difference",
    "status",
)

# A printed number: optional sign, digits, optional fraction. No exponents: papers print fixed point,
# and an exponent would make "number of decimals" ambiguous.
_REPORTED_RE = re.compile(r"^[+-]?\d+(\.\d+)?$")

# Float noise guard for the tolerance comparison: 0.5830 - 0.5630 is 0.020000000000000018 in binary,
# which must still count as within a 0.02 tolerance.
_TOLERANCE_EPS = 1e-12

_TOP_KEYS = {
    "schema_version",
    "table",
    "title",
    "source",
    "notes",
    "assumptions",
    "default_tolerance",
    "tolerance_source",
    "cells",
}
_CELL_REQUIRED = ("dataset", "model", "metric", "statistic", "reported")
_CELL_KEYS = set(_CELL_REQUIRED) | {"tolerance", "blank", "reported_std"}
_ASSUMPTION_KEYS = ("claim", "evidence")

# How a blank cell's `reported` appears in the output CSV/Markdown. The printed text itself ("" or
# "N/A") would come back from pandas.read_csv as NaN and be shown as "nan"; a parenthesised form
# survives the round trip and cannot be mistaken for a number.
BLANK_EMPTY_LABEL = "(blank)"


@dataclass(frozen=True)
class CellSpec:
    """One printed number of a paper table.

    Attributes:
        dataset: Paper's dataset key (e.g. ``norman``).
        model: Model key (e.g. ``cellflow``).
        metric: cell-eval metric name (a ``metric`` row of metrics.csv).
        statistic: Column of metrics.csv to read (mean, median, max, ...).
        reported: The number exactly as printed, e.g. ``"0.5630"``; for a blank cell the printed
            text verbatim (``""`` or a marker such as ``"N/A"``).
        tolerance: Absolute tolerance for ``within-noise``; None means the table default.
        blank: The printed cell holds no number; it is recorded but never compared.
        reported_std: The printed ``± std`` of the cell, if any (recorded, not compared).
    """

    dataset: str
    model: str
    metric: str
    statistic: str
    reported: str
    tolerance: float | None = None
    blank: bool = False
    reported_std: str | None = None

    @property
    def decimals(self) -> int:
        """Number of printed decimals, i.e. the precision the paper committed to (0 if blank)."""
        if self.blank:
            return 0
        _, _, frac = self.reported.partition(".")
        return len(frac)

    @property
    def reported_value(self) -> float:
        """The printed number as a float (NaN for a blank cell)."""
        return math.nan if self.blank else float(self.reported)

    @property
    def reported_label(self) -> str:
        """``reported`` as written to the outputs: a blank cell as ``(blank)`` or ``(N/A)``."""
        if not self.blank:
            return self.reported
        return f"({self.reported})" if self.reported else BLANK_EMPTY_LABEL


@dataclass(frozen=True)
class Assumption:
    """A reading of the source that the source does not state, with the evidence for it."""

    claim: str
    evidence: str


@dataclass(frozen=True)
class TableSpec:
    """A validated paper-table spec (see the YAML header for the schema).

    Attributes:
        path: File the spec was loaded from (for error messages and provenance).
        table: Short identifier.
        title: Human-readable title.
        source_seed: Seed file the numbers were transcribed from.
        source_section: Section of the seed holding the table.
        notes: Assumptions and caveats.
        default_tolerance: Absolute tolerance used when a cell has none.
        tolerance_source: Where ``default_tolerance`` comes from.
        cells: The printed numbers, in file order.
        assumptions: Explicit readings of the source with their evidence (may be empty).
    """

    path: str
    table: str
    title: str
    source_seed: str
    source_section: str
    notes: tuple[str, ...]
    default_tolerance: float
    tolerance_source: str
    cells: tuple[CellSpec, ...] = field(default_factory=tuple)
    assumptions: tuple[Assumption, ...] = field(default_factory=tuple)

    @property
    def blank_cells(self) -> tuple[CellSpec, ...]:
        """Cells the source printed without a number."""
        return tuple(c for c in self.cells if c.blank)

    def tolerance_for(self, cell: CellSpec) -> float:
        """Return the tolerance that applies to ``cell``."""
        return self.default_tolerance if cell.tolerance is None else cell.tolerance


# --------------------------------------------------------------------------------------------------
# Loading and validation


def _require_str(src: str, data: Mapping[str, Any], key: str, where: str) -> str:
    value = data.get(key)
    if value is None:
        raise PipelineInputError(src, where, "is missing")
    if not isinstance(value, str) or not value.strip():
        raise PipelineInputError(src, where, f"must be a non-empty string, got {value!r}")
    return value


def _require_tolerance(src: str, value: Any, where: str) -> float:
    # bool is an int subclass; `tolerance: yes` is a typo, not 1.0
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PipelineInputError(src, where, f"must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise PipelineInputError(src, where, f"must be a finite number >= 0, got {value!r}")
    return value


def _parse_cell(src: str, index: int, raw: Any) -> CellSpec:
    where = f"cells[{index}]"
    if not isinstance(raw, Mapping):
        raise PipelineInputError(src, where, f"must be a mapping, got {type(raw).__name__}")
    unknown = sorted(set(map(str, raw)) - _CELL_KEYS)
    if unknown:
        raise PipelineInputError(src, f"{where}.{unknown[0]}", f"unknown key (allowed: {sorted(_CELL_KEYS)})")
    for key in _CELL_REQUIRED:
        if key not in raw or raw[key] is None:
            raise PipelineInputError(src, f"{where}.{key}", "is missing")

    blank = raw.get("blank", False)
    if not isinstance(blank, bool):
        raise PipelineInputError(src, f"{where}.blank", f"must be true or false, got {blank!r}")

    reported = raw["reported"]
    if not isinstance(reported, str):
        # An unquoted YAML number has already lost its printed precision ("1.0000" -> 1.0), so it
        # cannot be repaired here; insist on the quoted form.
        raise PipelineInputError(
            src, f"{where}.reported", f"must be a quoted string exactly as printed (e.g. \"0.5630\"), got {reported!r}"
        )
    reported = reported.strip()
    if blank:
        # the printed text of a cell without a number: "" or a marker such as "N/A"
        if _REPORTED_RE.match(reported):
            raise PipelineInputError(src, f"{where}.reported", f"is a number ({reported!r}) but the cell says blank: true")
        for key in ("tolerance", "reported_std"):
            if raw.get(key) is not None:
                raise PipelineInputError(src, f"{where}.{key}", "is not allowed on a blank cell")
    elif not reported:
        raise PipelineInputError(
            src, f"{where}.reported", "is empty; for a cell the source printed without a number write blank: true"
        )
    elif not _REPORTED_RE.match(reported):
        raise PipelineInputError(src, f"{where}.reported", f"is not a fixed-point number: {reported!r}")

    reported_std = raw.get("reported_std")
    if reported_std is not None:
        if not isinstance(reported_std, str):
            raise PipelineInputError(
                src, f"{where}.reported_std", f"must be a quoted string exactly as printed (e.g. \"0.012\"), got {reported_std!r}"
            )
        reported_std = reported_std.strip()
        if not _REPORTED_RE.match(reported_std) or reported_std.startswith("-"):
            raise PipelineInputError(src, f"{where}.reported_std", f"is not a non-negative fixed-point number: {reported_std!r}")

    statistic = raw["statistic"]
    if statistic not in STATISTICS:
        raise PipelineInputError(src, f"{where}.statistic", f"unknown statistic {statistic!r} (allowed: {list(STATISTICS)})")

    values = {key: _require_str(src, raw, key, f"{where}.{key}") for key in ("dataset", "model", "metric")}
    tolerance = raw.get("tolerance")
    if tolerance is not None:
        tolerance = _require_tolerance(src, tolerance, f"{where}.tolerance")
    return CellSpec(
        statistic=statistic, reported=reported, tolerance=tolerance, blank=blank, reported_std=reported_std, **values
    )


def _parse_assumptions(src: str, raw: Any) -> tuple[Assumption, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise PipelineInputError(src, "assumptions", "must be a list of {claim, evidence} mappings")
    out = []
    for i, item in enumerate(raw):
        where = f"assumptions[{i}]"
        if not isinstance(item, Mapping):
            raise PipelineInputError(src, where, f"must be a mapping with keys {list(_ASSUMPTION_KEYS)}, got {type(item).__name__}")
        unknown = sorted(set(map(str, item)) - set(_ASSUMPTION_KEYS))
        if unknown:
            raise PipelineInputError(src, f"{where}.{unknown[0]}", f"unknown key (allowed: {list(_ASSUMPTION_KEYS)})")
        out.append(Assumption(**{key: _require_str(src, item, key, f"{where}.{key}") for key in _ASSUMPTION_KEYS}))
    return tuple(out)


def load_table_spec(path: str | Path) -> TableSpec:
    """Load and validate a paper-table YAML spec.

    Args:
        path: YAML file following the schema documented in its header.

    Returns:
        The validated spec.

    Raises:
        PipelineInputError: If the file is missing, is not YAML, or breaks the schema; the error names
            the file and the offending field (e.g. ``cells[3].reported``).
    """
    src = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise PipelineInputError(src, "<file>", f"cannot be read: {exc}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise PipelineInputError(src, "<file>", f"is not valid YAML: {exc}") from exc
    if not isinstance(data, Mapping):
        raise PipelineInputError(src, "<file>", "top level must be a mapping")

    unknown = sorted(set(map(str, data)) - _TOP_KEYS)
    if unknown:
        raise PipelineInputError(src, unknown[0], f"unknown key (allowed: {sorted(_TOP_KEYS)})")

    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise PipelineInputError(src, "schema_version", f"must be {SCHEMA_VERSION}, got {version!r}")

    table = _require_str(src, data, "table", "table")
    title = _require_str(src, data, "title", "title")

    source = data.get("source")
    if not isinstance(source, Mapping):
        raise PipelineInputError(src, "source", "must be a mapping with keys seed and section")
    seed = _require_str(src, source, "seed", "source.seed")
    section = _require_str(src, source, "section", "source.section")

    notes_raw = data.get("notes") or []
    if not isinstance(notes_raw, list) or not all(isinstance(n, str) for n in notes_raw):
        raise PipelineInputError(src, "notes", "must be a list of strings")

    if "default_tolerance" not in data:
        raise PipelineInputError(src, "default_tolerance", "is missing")
    default_tolerance = _require_tolerance(src, data["default_tolerance"], "default_tolerance")
    tolerance_source = _require_str(src, data, "tolerance_source", "tolerance_source")
    assumptions = _parse_assumptions(src, data.get("assumptions"))

    cells_raw = data.get("cells")
    if not isinstance(cells_raw, list) or not cells_raw:
        raise PipelineInputError(src, "cells", "must be a non-empty list")
    cells = tuple(_parse_cell(src, i, raw) for i, raw in enumerate(cells_raw))

    seen: dict[tuple[str, str, str, str], int] = {}
    for i, cell in enumerate(cells):
        key = (cell.dataset, cell.model, cell.metric, cell.statistic)
        if key in seen:
            raise PipelineInputError(src, f"cells[{i}]", f"duplicates cells[{seen[key]}] {key}")
        seen[key] = i

    return TableSpec(
        path=src,
        table=table,
        title=title,
        source_seed=seed,
        source_section=section,
        notes=tuple(notes_raw),
        default_tolerance=default_tolerance,
        tolerance_source=tolerance_source,
        cells=cells,
        assumptions=assumptions,
    )


# --------------------------------------------------------------------------------------------------
# Reproduction


def _read_metrics(path: str) -> pd.DataFrame:
    """Read a metrics.csv into a frame indexed by metric, with numeric statistic columns."""
    try:
        frame = pd.read_csv(path)
    except FileNotFoundError as exc:
        # A path was given, so the run is configured; a missing file means broken wiring, which
        # must not be disguised as "not-run".
        raise PipelineInputError(path, "<file>", "does not exist (pass None for a run that was not built)") from exc
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise PipelineInputError(path, "<file>", f"cannot be parsed as CSV: {exc}") from exc
    if "metric" not in frame.columns:
        raise PipelineInputError(path, "metric", "column is missing")
    duplicated = frame["metric"][frame["metric"].duplicated()].tolist()
    if duplicated:
        raise PipelineInputError(path, "metric", f"duplicate rows for {duplicated}")
    frame = frame.set_index(frame["metric"].astype(str))
    for column in STATISTICS:
        if column in frame.columns:
            try:
                frame[column] = pd.to_numeric(frame[column], errors="raise").astype(float)
            except (ValueError, TypeError) as exc:
                raise PipelineInputError(path, column, f"has non-numeric values: {exc}") from exc
    return frame


def _read_metric_files(paths: Sequence[str]) -> pd.DataFrame:
    """cell-eval's metrics.csv and PerturBench's perturbench.csv of one run, as one frame by metric."""
    frames = [_read_metrics(path) for path in paths]
    frame = pd.concat(frames) if len(frames) > 1 else frames[0]
    duplicated = frame.index[frame.index.duplicated()].tolist()
    if duplicated:
        raise PipelineInputError(" + ".join(paths), "metric", f"defined in more than one file: {duplicated}")
    return frame


def is_match(reproduced: float, reported: str) -> bool:
    """Whether ``reproduced`` prints as ``reported`` at the reported precision.

    Rounding goes through Python's fixed-point formatting (round-half-even on the exact binary
    value), i.e. the way the published number was most likely produced from a float.

    Args:
        reproduced: Our value (finite).
        reported: The printed string, e.g. ``"0.5630"``.

    Returns:
        True when ``f"{reproduced:.{decimals}f}"`` equals the printed number numerically
        (so ``-0.0000`` equals ``0.0000``).
    """
    decimals = len(reported.partition(".")[2])
    return Decimal(f"{reproduced:.{decimals}f}") == Decimal(reported)


def _status_for(cell: CellSpec, reproduced: float, tolerance: float) -> str:
    if not math.isfinite(reproduced):
        return "unverifiable"
    if is_match(reproduced, cell.reported):
        return "match"
    if abs(reproduced - cell.reported_value) <= tolerance + _TOLERANCE_EPS:
        return "within-noise"
    return "mismatch"


def reproduce_table(
    spec: TableSpec,
    metrics_by_run: Mapping[tuple[str, str], str | Path | None],
    scale_by_dataset: Mapping[str, str],
    dataset_map: Mapping[str, str] | None = None,
) -> pd.DataFrame:
    """Look up every printed number in our metrics and assign a status.

    Status precedence: ``not-run`` (no metrics file), then ``not-comparable`` (demo scale, or a blank
    cell: the value is shown but not compared), then ``unverifiable`` (metric absent or NaN), then
    ``match``, ``within-noise`` and ``mismatch``.

    Args:
        spec: Loaded table spec.
        metrics_by_run: ``(run_dataset, model)`` -> metrics.csv path (or a list of paths whose metric
            rows are read together: metrics.csv and perturbench.csv), or None when the run was not
            built/configured. A missing key is treated like None.
        scale_by_dataset: ``run_dataset`` -> ``"paper"`` or ``"demo"``; required for every run that
            has a metrics file.
        dataset_map: Paper dataset key -> dataset actually run (e.g. ``{"norman": "norman_demo"}``);
            unmapped keys run under their own name.

    Returns:
        One row per cell, columns ``dataset, run_dataset, model, metric, statistic, reported,
        reproduced, difference, status`` (``reported`` is the printed string; ``reproduced`` and
        ``difference = reproduced - reported`` are floats, NaN when not compared/computable; a blank
        cell's ``reported`` is ``(blank)`` or its printed marker in parentheses, e.g. ``(N/A)``).

    Raises:
        PipelineInputError: On a bad scale, a metrics path that does not exist, or a metrics.csv that
            breaks its contract.
    """
    dataset_map = dict(dataset_map or {})
    cache: dict[str, pd.DataFrame] = {}
    rows: list[dict[str, Any]] = []
    for cell in spec.cells:
        run_dataset = dataset_map.get(cell.dataset, cell.dataset)
        row: dict[str, Any] = {
            "dataset": cell.dataset,
            "run_dataset": run_dataset,
            "model": cell.model,
            "metric": cell.metric,
            "statistic": cell.statistic,
            "reported": cell.reported_label,
            "reproduced": math.nan,
            "difference": math.nan,
        }
        metrics_path = metrics_by_run.get((run_dataset, cell.model))
        if metrics_path is None:
            row["status"] = "not-run"
            rows.append(row)
            continue

        scale = scale_by_dataset.get(run_dataset)
        if scale not in SCALES:
            # Guessing "paper" would turn a demo run into a wall of mismatches; refuse instead.
            problem = "no scale given" if scale is None else f"unknown scale {scale!r}"
            raise PipelineInputError(
                "scale_by_dataset", run_dataset, f"{problem}; expected one of {list(SCALES)} (CLI: --scale {run_dataset}=paper|demo)"
            )

        paths = [str(metrics_path)] if isinstance(metrics_path, (str, Path)) else [str(x) for x in metrics_path]
        path = " + ".join(paths)
        if path not in cache:
            cache[path] = _read_metric_files(paths)
        metrics = cache[path]
        if cell.statistic not in metrics.columns:
            raise PipelineInputError(path, cell.statistic, "column is missing")

        reproduced = float(metrics.at[cell.metric, cell.statistic]) if cell.metric in metrics.index else math.nan
        row["reproduced"] = reproduced
        if scale == "demo" or cell.blank:
            row["status"] = "not-comparable"
        else:
            row["status"] = _status_for(cell, reproduced, spec.tolerance_for(cell))
            if math.isfinite(reproduced):
                row["difference"] = reproduced - cell.reported_value
        rows.append(row)

    frame = pd.DataFrame(rows, columns=list(OUTPUT_COLUMNS))
    frame["reproduced"] = frame["reproduced"].astype(float)
    frame["difference"] = frame["difference"].astype(float)
    return frame


# --------------------------------------------------------------------------------------------------
# Output


def format_value(value: Any, reported: str, extra_digits: int = 2, signed: bool = False) -> str:
    """Format ``value`` at the printed precision of ``reported`` plus ``extra_digits``.

    Two extra digits show how close a value is to the rounding boundary without pretending to more
    precision than the comparison uses.

    Args:
        value: Number to format; NaN/None/non-numeric gives ``"n/a"`` (never 0).
        reported: The printed string whose decimals set the precision; when it is not a number (a
            blank cell) there is no printed precision and 6 significant digits are shown.
        extra_digits: Digits beyond the printed precision.
        signed: Prefix positive numbers with ``+`` (for differences).

    Returns:
        The formatted string.
    """
    try:
        number = float(value)
    except (TypeError, ValueError):
        return "n/a"
    if not math.isfinite(number):
        return "n/a"
    if not _REPORTED_RE.match(str(reported).strip()):
        return f"{number:+.6g}" if signed else f"{number:.6g}"
    decimals = len(str(reported).partition(".")[2]) + extra_digits
    return f"{number:+.{decimals}f}" if signed else f"{number:.{decimals}f}"


def status_counts(statuses: Sequence[str] | pd.Series) -> dict[str, int]:
    """Count statuses in the canonical order, zeros included (unknown values are counted too)."""
    counts = Counter(str(s) for s in statuses)
    ordered = {status: counts.pop(status, 0) for status in STATUSES}
    ordered.update(sorted(counts.items()))
    return ordered


def _md_escape(text: Any) -> str:
    # a pipe would split a Markdown table cell
    return str(text).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def render_markdown(frame: pd.DataFrame, spec: TableSpec) -> str:
    """Render a reproduced table as Markdown (see :func:`write_table`)."""
    lines = [
        f"# {_md_escape(spec.title)}",
        "",
        f"Source: {_md_escape(spec.source_seed)}, section \"{_md_escape(spec.source_section)}\" (spec: {_md_escape(Path(spec.path).name)})",
        "",
        f"Tolerance for within-noise: {spec.default_tolerance:g} absolute unless a cell overrides it; {_md_escape(spec.tolerance_source)}",
        "",
    ]
    if spec.notes:
        lines.append("Notes:")
        lines.append("")
        lines.extend(f"- {_md_escape(note)}" for note in spec.notes)
        lines.append("")
    if spec.assumptions:
        lines.append("Assumptions (readings of the source it does not state):")
        lines.append("")
        lines.extend(f"- {_md_escape(a.claim)} Evidence: {_md_escape(a.evidence)}" for a in spec.assumptions)
        lines.append("")
    n_blank = len(spec.blank_cells)
    if n_blank:
        lines.append(
            f"{n_blank} of {len(spec.cells)} cells are blank in the source (no printed number): "
            "they are listed with our value for information and never compared."
        )
        lines.append("")
    lines.append("Status legend:")
    lines.append("")
    lines.extend(f"- `{status}`: {STATUS_DESCRIPTIONS[status]}" for status in STATUSES)
    lines.append("")
    lines.append(
        "Reproduced values and differences are shown at the printed precision + 2 digits; "
        "`n/a` means the value is undefined (never read it as 0)."
    )
    lines.append("")

    header = ["dataset", "run dataset", "model", "metric", "statistic", "reported", "reproduced", "difference", "status"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join(["---"] * 5 + ["---:"] * 3 + ["---"]) + "|")
    for row in frame.itertuples(index=False):
        cells = [
            row.dataset,
            row.run_dataset,
            row.model,
            row.metric,
            row.statistic,
            row.reported,
            format_value(row.reproduced, row.reported),
            format_value(row.difference, row.reported, signed=True),
            row.status,
        ]
        lines.append("| " + " | ".join(_md_escape(c) for c in cells) + " |")
    lines.append("")
    summary = ", ".join(f"{status} {count}" for status, count in status_counts(frame["status"]).items())
    lines.append(f"Status summary ({len(frame)} cells): {summary}")
    lines.append("")
    return "\n".join(lines)


def write_table(frame: pd.DataFrame, csv_path: str | Path, md_path: str | Path, spec: TableSpec) -> None:
    """Write a reproduced table as CSV (unchanged) and Markdown (formatted), both atomically.

    The Markdown has the title, the source, the tolerance, notes, a status legend, the rows with
    reproduced values at the printed precision + 2 digits (NaN as ``n/a``) and a per-status summary.

    Args:
        frame: Output of :func:`reproduce_table`.
        csv_path: CSV destination.
        md_path: Markdown destination.
        spec: The spec the frame was built from.
    """
    missing = [c for c in OUTPUT_COLUMNS if c not in frame.columns]
    if missing:
        raise PipelineInputError("reproduced table", missing[0], "column is missing")
    write_csv(frame, csv_path, index=False, encoding="utf-8")
    text = render_markdown(frame, spec)
    with atomic_path(md_path) as tmp:
        tmp.write_text(text, encoding="utf-8")


# --------------------------------------------------------------------------------------------------
# CLI


def _split_pairs(values: Sequence[str], option: str) -> list[tuple[str, str]]:
    pairs = []
    for value in values:
        key, sep, rest = value.partition("=")
        if not sep or not key:
            raise PipelineInputError("command line", option, f"expected KEY=VALUE, got {value!r}")
        pairs.append((key, rest))
    return pairs


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m perturb_repro.tables.paper_table",
        description="Compare a paper table (YAML spec) with reproduced metrics.csv files.",
    )
    parser.add_argument("--spec", required=True, help="paper-table YAML spec")
    parser.add_argument(
        "--metrics",
        action="append",
        default=[],
        metavar="RUN_DATASET:MODEL=PATH",
        help="metrics.csv of a run; an empty PATH marks the run as not built (repeatable)",
    )
    parser.add_argument("--scale", action="append", default=[], metavar="RUN_DATASET=paper|demo", help="(repeatable)")
    parser.add_argument("--map", action="append", default=[], metavar="PAPER_DATASET=RUN_DATASET", help="(repeatable)")
    parser.add_argument("--csv", required=True, help="output CSV")
    parser.add_argument("--md", required=True, help="output Markdown")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit code (2 on bad input, with the reason on stderr)."""
    args = _parse_args(argv)
    try:
        spec = load_table_spec(args.spec)
        metrics_by_run: dict[tuple[str, str], str | None] = {}
        for key, path in _split_pairs(args.metrics, "--metrics"):
            run_dataset, sep, model = key.partition(":")
            if not sep or not run_dataset or not model:
                raise PipelineInputError("command line", "--metrics", f"expected RUN_DATASET:MODEL=PATH, got key {key!r}")
            metrics_by_run[(run_dataset, model)] = path or None
        scale_by_dataset = dict(_split_pairs(args.scale, "--scale"))
        for run_dataset, scale in scale_by_dataset.items():
            if scale not in SCALES:
                raise PipelineInputError("command line", "--scale", f"{run_dataset}: expected one of {list(SCALES)}, got {scale!r}")
        dataset_map = dict(_split_pairs(args.map, "--map"))
        frame = reproduce_table(spec, metrics_by_run, scale_by_dataset, dataset_map)
        write_table(frame, args.csv, args.md, spec)
    except PipelineInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    counts = status_counts(frame["status"])
    print(f"{spec.table}: " + ", ".join(f"{s} {n}" for s, n in counts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

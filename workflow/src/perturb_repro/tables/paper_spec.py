"""Paper-table specs: the printed numbers of one table, loaded and validated.

The keys, types and printed-number rules are the JSON schema ``workflow/schemas/paper_table.schema.yaml``;
this module turns a valid document into frozen dataclasses and checks what a schema cannot (finite
tolerances, unique cells).

Optional fields (a spec without them loads exactly as before):

* cell ``blank: true`` -- the printed cell holds no number (empty, or a marker such as ``N/A``,
  kept verbatim in ``reported``). Such a cell is recorded, never compared.
* cell ``reported_std`` -- the ``± x`` part of a ``mean ± std`` cell, quoted like ``reported``: the cell's
  within-noise tolerance unless the cell sets its own ``tolerance`` (:meth:`TableSpec.tolerance_used`).
* top-level ``assumptions`` -- ``{claim, evidence}`` mappings: readings of the source that are not
  stated in it, with the evidence for each.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from perturb_repro.errors import PipelineInputError
from perturb_repro.tables.printed import decimals
from perturb_repro.tables.spec_schema import load_schema, load_spec_document, SpecHeader, reject_duplicate_cells, spec_header

SCHEMA_NAME = "paper_table"
SCHEMA_VERSION = 1

# Every metrics.csv summary column except `count` is a legal statistic (the schema's enum).
STATISTICS: tuple[str, ...] = tuple(load_schema(SCHEMA_NAME)["$defs"]["cell"]["properties"]["statistic"]["enum"])

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
        reported_std: The printed ``± std`` of the cell, if any (its within-noise tolerance, see
            :meth:`TableSpec.tolerance_used`).
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
        return 0 if self.blank else decimals(self.reported)

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
class TableSpec(SpecHeader):
    """A validated paper-table spec (schema: ``workflow/schemas/paper_table.schema.yaml``).

    Attributes (after the :class:`SpecHeader` fields):
        default_tolerance: Absolute tolerance used when a cell has none.
        tolerance_source: Where ``default_tolerance`` comes from.
        cells: The printed numbers, in file order.
        assumptions: Explicit readings of the source with their evidence (may be empty).
    """

    default_tolerance: float
    tolerance_source: str
    cells: tuple[CellSpec, ...] = field(default_factory=tuple)
    assumptions: tuple[Assumption, ...] = field(default_factory=tuple)

    @property
    def blank_cells(self) -> tuple[CellSpec, ...]:
        """Cells the source printed without a number."""
        return tuple(c for c in self.cells if c.blank)

    def tolerance_used(self, cell: CellSpec) -> tuple[float, str]:
        """The within-noise tolerance of ``cell`` and where it comes from (a reproduced table's
        ``tolerance_from``): the cell's own ``tolerance`` ("cell"), else the paper's printed ``± std``
        ("reported_std"; PRiMeFlow's is over five seeds), else the table default ("table_default")."""
        if cell.tolerance is not None:
            return cell.tolerance, "cell"
        if cell.reported_std is not None:
            return float(cell.reported_std), "reported_std"
        return self.default_tolerance, "table_default"

    def tolerance_for(self, cell: CellSpec) -> float:
        """Return the tolerance that applies to ``cell``."""
        return self.tolerance_used(cell)[0]


def _finite(src: str, value: float | None, where: str) -> float | None:
    # the schema's `minimum: 0` lets .nan and .inf through
    if value is not None and not math.isfinite(value):
        raise PipelineInputError(src, where, f"must be a finite number >= 0, got {value!r}")
    return None if value is None else float(value)


def load_table_spec(path: str | Path) -> TableSpec:
    """Load and validate a paper-table YAML spec.

    Args:
        path: YAML file following ``workflow/schemas/paper_table.schema.yaml``.

    Returns:
        The validated spec.

    Raises:
        PipelineInputError: If the file is missing, is not YAML, or breaks the schema; the error names
            the file and the offending field (e.g. ``cells[3].reported``).
    """
    src = str(path)
    data = load_spec_document(path, SCHEMA_NAME)
    cells = []
    for i, raw in enumerate(data["cells"]):
        std = raw.get("reported_std")
        cells.append(
            CellSpec(
                dataset=raw["dataset"],
                model=raw["model"],
                metric=raw["metric"],
                statistic=raw["statistic"],
                reported=raw["reported"].strip(),
                tolerance=_finite(src, raw.get("tolerance"), f"cells[{i}].tolerance"),
                blank=raw["blank"],
                reported_std=None if std is None else std.strip(),
            )
        )
    reject_duplicate_cells(src, [(c.dataset, c.model, c.metric, c.statistic) for c in cells])
    return TableSpec(
        **spec_header(src, data),
        default_tolerance=_finite(src, data["default_tolerance"], "default_tolerance"),
        tolerance_source=data["tolerance_source"],
        cells=tuple(cells),
        assumptions=tuple(Assumption(a["claim"], a["evidence"]) for a in data["assumptions"]),
    )

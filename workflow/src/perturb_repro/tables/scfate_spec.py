"""scFATE audit specs: Table 1 cells as the model card shows them, plus the card's own audit claims.

Keys, types and printed-number rules are the JSON schema ``workflow/schemas/scfate_audit.schema.yaml``;
this module turns a valid document into frozen dataclasses and checks the cross-references a schema
cannot (a cell's dataset/metric are keys of the token tables; cells are unique).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from perturb_repro.errors import PipelineInputError
from perturb_repro.tables.spec_schema import load_schema, load_spec_document, SpecHeader, reject_duplicate_cells, spec_header

SCHEMA_NAME = "scfate_audit"
SCHEMA_VERSION = 1

VERDICTS: tuple[str, ...] = tuple(load_schema(SCHEMA_NAME)["$defs"]["card_fact"]["properties"]["outcome"]["enum"])

UNITS: tuple[str, ...] = tuple(load_schema(SCHEMA_NAME)["$defs"]["cell"]["properties"]["unit"]["enum"])
_UNIT_FACTOR = {"as-logged": 1.0, "percent-of-logged": 100.0}

_TOKEN_RE = re.compile(r"[a-z0-9]+")


def tokens(text: str) -> frozenset[str]:
    """Lower-cased ``[a-z0-9]+`` runs of ``text`` (the unit of every name match)."""
    return frozenset(_TOKEN_RE.findall(str(text).lower()))


@dataclass(frozen=True)
class CardFact:
    """The card's own claim about one cell.

    Attributes:
        outcome: ``backed``, ``differs`` or ``unverifiable``.
        file: (backed) file name the card says backs the cell.
        key: (backed) flattened key inside that file.
        value: (backed) the value the card quotes for that key, as printed.
        difference_approx: (differs) the card's ``~x``, unsigned, as printed.
        quote: Verbatim card text.
        applies_to: How the quote was mapped onto this cell.
    """

    outcome: str
    quote: str
    file: str | None = None
    key: str | None = None
    value: str | None = None
    difference_approx: str | None = None
    applies_to: str | None = None

    def describe(self) -> str:
        """Short text for the ``expected`` column."""
        if self.outcome == "backed":
            where = f" ({self.file}:{self.key}" + (f" = {self.value}" if self.value else "") + ")" if self.file else ""
            return f"backed{where}"
        if self.outcome == "differs":
            return f"differs by ~{self.difference_approx}" if self.difference_approx else "differs"
        return self.outcome


@dataclass(frozen=True)
class AuditCell:
    """One Table 1 cell as the card shows it (see the spec header for the fields)."""

    dataset: str
    metric: str
    variant: str | None
    reported: str | None
    unit: str
    printed_in: str
    variant_tokens: tuple[str, ...] = ()
    card_fact: CardFact | None = None

    @property
    def factor(self) -> float:
        """Multiply a logged value by this to get the printed unit."""
        return _UNIT_FACTOR[self.unit]


@dataclass(frozen=True)
class AuditSpec(SpecHeader):
    """A validated audit spec (the :class:`SpecHeader` fields, then the audit's own)."""

    ambiguities: tuple[str, ...]
    dataset_tokens: dict[str, frozenset[str]]
    metric_tokens: dict[str, frozenset[str]]
    cells: tuple[AuditCell, ...]


def _fact(raw: dict | None) -> CardFact | None:
    if raw is None:
        return None
    strip = {k: (v.strip() if k in ("value", "difference_approx") and isinstance(v, str) else v) for k, v in raw.items()}
    return CardFact(**strip)


def load_audit_spec(path: str | Path) -> AuditSpec:
    """Load and validate an audit spec (schema: ``workflow/schemas/scfate_audit.schema.yaml``).

    Raises:
        PipelineInputError: naming the file and the offending field.
    """
    src = str(path)
    data = load_spec_document(path, SCHEMA_NAME)
    datasets = {name: frozenset(entry["tokens"]) for name, entry in data["datasets"].items()}
    metrics = {name: frozenset(entry["tokens"]) for name, entry in data["metrics"].items()}
    cells = []
    for i, raw in enumerate(data["cells"]):
        for key, table in (("dataset", datasets), ("metric", metrics)):
            if raw[key] not in table:
                raise PipelineInputError(src, f"cells[{i}].{key}", f"{raw[key]!r} is not a key of {key}s {sorted(table)}")
        cells.append(
            AuditCell(
                dataset=raw["dataset"],
                metric=raw["metric"],
                variant=raw["variant"],
                reported=None if raw["reported"] is None else raw["reported"].strip(),
                unit=raw["unit"],
                printed_in=raw["printed_in"],
                variant_tokens=tuple(raw["variant_tokens"]),
                card_fact=_fact(raw.get("card_fact")),
            )
        )
    reject_duplicate_cells(src, [(c.dataset, c.metric, c.variant) for c in cells])
    return AuditSpec(
        **spec_header(src, data),
        ambiguities=tuple(data["ambiguities"]),
        dataset_tokens=datasets,
        metric_tokens=metrics,
        cells=tuple(cells),
    )

"""Audit scFATE's Table 1 against the authors' saved evaluation logs.

The scFATE model card says which Table 1 numbers its published eval logs back and which they do not.
This module checks such claims mechanically: it reads every JSON/CSV log under a directory, flattens
each to ``(file, key, value)`` triples and, for every Table 1 cell of the audit spec
(``resources/paper_tables/scfate_table1.yaml``), looks for a logged value that prints as the
published number.

Matching rule (also written into the Markdown output, see :data:`MATCHING_RULE`):

* Tokens are lower-cased runs of ``[a-z0-9]``: ``metric_da.tanimoto_morgan2048`` -> ``metric``,
  ``da``, ``tanimoto``, ``morgan2048``.
* A logged value is a *candidate* for a cell when one of the dataset's tokens occurs in the log
  file's path (relative to the logs dir, suffix dropped) or in its key, AND one of the metric's tokens
  occurs in its key. If the cell lists ``variant_tokens`` and some candidates carry one of them (path
  or key), only those candidates are kept.
* ``backed (file:key)``: a candidate whose value, rounded to the printed number of decimals, equals the
  printed number (``"0.700"`` is backed by 0.7004, not by 0.7006). Percent cells compare
  100 x the logged value.
* ``differs by d (file:key)``: no candidate backs it; the candidate nearest to the printed value is
  reported, ``d = found - reported`` in the printed unit.
* ``unverifiable``: no logs, no candidate, or the card does not print the cell's value.

Log formats: ``*.json`` - nested dicts/lists flattened with dots (``a.b.0.c``), numeric leaves only
(bools, strings, NaN/inf skipped). ``*.csv`` - if the first column is non-numeric it labels the rows
and every other numeric cell gives ``column:label``; otherwise a single-row CSV gives ``column`` and a
multi-row CSV gives ``column:row_index``. Files and directories starting with ``.`` are ignored.

CLI::

    python -m perturb_repro.tables.scfate_audit --spec resources/paper_tables/scfate_table1.yaml \
        --logs path/to/table1_inputs --csv results/tables/scfate_table1.csv \
        --md results/tables/scfate_table1.md
"""

from __future__ import annotations

import argparse
import json
import math
import numbers
import re
import sys
from collections import Counter
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import pandas as pd
import yaml

from perturb_repro.errors import PipelineInputError
from perturb_repro.io import write_csv, write_text
from perturb_repro.tables.paper_table import format_value, is_match

SCHEMA_VERSION = 1

VERDICTS: tuple[str, ...] = ("backed", "differs", "unverifiable")

VERDICT_DESCRIPTIONS: dict[str, str] = {
    "backed": "a candidate log value, rounded to the printed decimals, equals the printed number",
    "differs": "candidates exist but none prints as the published number; the nearest one is shown",
    "unverifiable": "no logs, no candidate value for this dataset/metric, or the value is not printed on the card",
}

UNITS: tuple[str, ...] = ("as-logged", "percent-of-logged")
_UNIT_FACTOR = {"as-logged": 1.0, "percent-of-logged": 100.0}

OUTPUT_COLUMNS: tuple[str, ...] = (
    "dataset",
    "metric",
    "variant",
    "reported",
    "status",
    "file",
    "key",
    "found_value",
    "difference",
    "expected",
    "agrees_with_card",
    "verdict",
    "n_candidates",
    "reason",
)

MATCHING_RULE = (
    "Tokens are lower-cased runs of [a-z0-9]. A logged value is a candidate for a cell when a dataset "
    "token occurs in the log file's relative path or in its key and a metric token occurs in its key; "
    "if the cell names variant tokens and some candidates carry one, only those are kept. "
    "'backed' = a candidate rounds to the printed number at the printed precision; otherwise "
    "'differs' reports the nearest candidate (difference = found - reported, printed unit); "
    "otherwise 'unverifiable'. JSON keys are dotted paths (a.b.0.c); CSV keys are column[:row]."
)

AGREEMENT_RULE = (
    "agrees_with_card: card says unverifiable -> our verdict is unverifiable; backed -> backed and the "
    "card's file:key is among the backing values; differs by ~x -> differs and |difference|, rounded to "
    "x's decimals, is within one unit of x's last decimal of x. NA when the card makes no claim, when no "
    "logs were found, or when the card does not print the cell's value."
)

_REPORTED_RE = re.compile(r"^[+-]?\d+(\.\d+)?$")
_TOKEN_RE = re.compile(r"[a-z0-9]+")
_LOG_SUFFIXES = {".json", ".csv"}

_TOP_KEYS = {"schema_version", "table", "title", "source", "notes", "ambiguities", "datasets", "metrics", "cells"}
_CELL_KEYS = {"dataset", "metric", "variant", "variant_tokens", "reported", "unit", "printed_in", "card_fact"}
_FACT_KEYS = {"outcome", "file", "key", "value", "difference_approx", "quote", "applies_to"}


def tokens(text: str) -> frozenset[str]:
    """Lower-cased ``[a-z0-9]+`` runs of ``text`` (the unit of every name match)."""
    return frozenset(_TOKEN_RE.findall(str(text).lower()))


# --------------------------------------------------------------------------------------------------
# Spec


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
class AuditSpec:
    """A validated audit spec."""

    path: str
    table: str
    title: str
    source_seed: str
    source_section: str
    notes: tuple[str, ...]
    ambiguities: tuple[str, ...]
    dataset_tokens: dict[str, frozenset[str]]
    metric_tokens: dict[str, frozenset[str]]
    cells: tuple[AuditCell, ...]


def _str(src: str, data: Mapping[str, Any], key: str, where: str, required: bool = True) -> str | None:
    value = data.get(key)
    if value is None:
        if required:
            raise PipelineInputError(src, where, "is missing")
        return None
    if not isinstance(value, str) or not value.strip():
        raise PipelineInputError(src, where, f"must be a non-empty string, got {value!r}")
    return value


def _printed_number(src: str, value: Any, where: str) -> str:
    if not isinstance(value, str):
        # an unquoted YAML float has already lost its printed precision ("0.700" -> 0.7)
        raise PipelineInputError(src, where, f"must be a quoted string exactly as printed (e.g. \"0.700\"), got {value!r}")
    value = value.strip()
    if not _REPORTED_RE.match(value):
        raise PipelineInputError(src, where, f"is not a fixed-point number: {value!r}")
    return value


def _check_keys(src: str, raw: Mapping[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(map(str, raw)) - allowed)
    if unknown:
        prefix = f"{where}." if where else ""
        raise PipelineInputError(src, f"{prefix}{unknown[0]}", f"unknown key (allowed: {sorted(allowed)})")


def _token_table(src: str, data: Mapping[str, Any], key: str) -> dict[str, frozenset[str]]:
    raw = data.get(key)
    if not isinstance(raw, Mapping) or not raw:
        raise PipelineInputError(src, key, "must be a non-empty mapping NAME -> {tokens: [...]}")
    table: dict[str, frozenset[str]] = {}
    for name, entry in raw.items():
        where = f"{key}.{name}"
        if not isinstance(entry, Mapping):
            raise PipelineInputError(src, where, "must be a mapping with key tokens")
        _check_keys(src, entry, {"tokens"}, where)
        words = entry.get("tokens")
        if not isinstance(words, list) or not words or not all(isinstance(w, str) for w in words):
            raise PipelineInputError(src, f"{where}.tokens", "must be a non-empty list of strings")
        bad = [w for w in words if tokens(w) != {w}]
        if bad:
            raise PipelineInputError(src, f"{where}.tokens", f"{bad[0]!r} is not a single lower-case [a-z0-9] token")
        table[str(name)] = frozenset(words)
    return table


def _parse_fact(src: str, raw: Any, where: str) -> CardFact | None:
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise PipelineInputError(src, where, "must be a mapping or null")
    _check_keys(src, raw, _FACT_KEYS, where)
    outcome = raw.get("outcome")
    if outcome not in VERDICTS:
        raise PipelineInputError(src, f"{where}.outcome", f"must be one of {list(VERDICTS)}, got {outcome!r}")
    quote = _str(src, raw, "quote", f"{where}.quote")
    fact = CardFact(
        outcome=outcome,
        quote=quote,
        file=_str(src, raw, "file", f"{where}.file", required=False),
        key=_str(src, raw, "key", f"{where}.key", required=False),
        value=_printed_number(src, raw["value"], f"{where}.value") if raw.get("value") is not None else None,
        difference_approx=(
            _printed_number(src, raw["difference_approx"], f"{where}.difference_approx")
            if raw.get("difference_approx") is not None
            else None
        ),
        applies_to=_str(src, raw, "applies_to", f"{where}.applies_to", required=False),
    )
    if (fact.file is None) != (fact.key is None):
        raise PipelineInputError(src, f"{where}.file", "file and key must be given together")
    if outcome != "backed" and (fact.file or fact.value):
        raise PipelineInputError(src, f"{where}.file", f"file/key/value only apply to outcome 'backed', not {outcome!r}")
    if outcome != "differs" and fact.difference_approx:
        raise PipelineInputError(src, f"{where}.difference_approx", f"only applies to outcome 'differs', not {outcome!r}")
    if fact.difference_approx is not None and fact.difference_approx.startswith(("+", "-")):
        raise PipelineInputError(src, f"{where}.difference_approx", "is unsigned (the card's ~x)")
    return fact


def _parse_cell(src: str, index: int, raw: Any, datasets: Mapping[str, Any], metrics: Mapping[str, Any]) -> AuditCell:
    where = f"cells[{index}]"
    if not isinstance(raw, Mapping):
        raise PipelineInputError(src, where, f"must be a mapping, got {type(raw).__name__}")
    _check_keys(src, raw, _CELL_KEYS, where)
    for key in ("dataset", "metric", "printed_in"):
        _str(src, raw, key, f"{where}.{key}")
    if "reported" not in raw:
        raise PipelineInputError(src, f"{where}.reported", "is missing (use null when the card does not print it)")
    if raw["dataset"] not in datasets:
        raise PipelineInputError(src, f"{where}.dataset", f"{raw['dataset']!r} is not a key of datasets {sorted(datasets)}")
    if raw["metric"] not in metrics:
        raise PipelineInputError(src, f"{where}.metric", f"{raw['metric']!r} is not a key of metrics {sorted(metrics)}")
    unit = raw.get("unit", "as-logged")
    if unit not in UNITS:
        raise PipelineInputError(src, f"{where}.unit", f"must be one of {list(UNITS)}, got {unit!r}")
    variant_tokens = raw.get("variant_tokens") or []
    if not isinstance(variant_tokens, list) or any(not isinstance(t, str) or tokens(t) != {t} for t in variant_tokens):
        raise PipelineInputError(src, f"{where}.variant_tokens", "must be a list of lower-case [a-z0-9] tokens")
    reported = raw["reported"]
    return AuditCell(
        dataset=raw["dataset"],
        metric=raw["metric"],
        variant=_str(src, raw, "variant", f"{where}.variant", required=False),
        reported=None if reported is None else _printed_number(src, reported, f"{where}.reported"),
        unit=unit,
        printed_in=raw["printed_in"],
        variant_tokens=tuple(variant_tokens),
        card_fact=_parse_fact(src, raw.get("card_fact"), f"{where}.card_fact"),
    )


def _str_list(src: str, data: Mapping[str, Any], key: str) -> tuple[str, ...]:
    raw = data.get(key) or []
    if not isinstance(raw, list) or not all(isinstance(n, str) for n in raw):
        raise PipelineInputError(src, key, "must be a list of strings")
    return tuple(raw)


def load_audit_spec(path: str | Path) -> AuditSpec:
    """Load and validate an audit spec (schema in the header of ``scfate_table1.yaml``).

    Raises:
        PipelineInputError: naming the file and the offending field.
    """
    src = str(path)
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise PipelineInputError(src, "<file>", f"cannot be read: {exc}") from exc
    except yaml.YAMLError as exc:
        raise PipelineInputError(src, "<file>", f"is not valid YAML: {exc}") from exc
    if not isinstance(data, Mapping):
        raise PipelineInputError(src, "<file>", "top level must be a mapping")
    _check_keys(src, data, _TOP_KEYS, "")
    if data.get("schema_version") != SCHEMA_VERSION:
        raise PipelineInputError(src, "schema_version", f"must be {SCHEMA_VERSION}, got {data.get('schema_version')!r}")
    source = data.get("source")
    if not isinstance(source, Mapping):
        raise PipelineInputError(src, "source", "must be a mapping with keys seed and section")
    datasets = _token_table(src, data, "datasets")
    metrics = _token_table(src, data, "metrics")
    cells_raw = data.get("cells")
    if not isinstance(cells_raw, list) or not cells_raw:
        raise PipelineInputError(src, "cells", "must be a non-empty list")
    cells = tuple(_parse_cell(src, i, raw, datasets, metrics) for i, raw in enumerate(cells_raw))
    seen: dict[tuple[str, str, str | None], int] = {}
    for i, cell in enumerate(cells):
        key = (cell.dataset, cell.metric, cell.variant)
        if key in seen:
            raise PipelineInputError(src, f"cells[{i}]", f"duplicates cells[{seen[key]}] {key}")
        seen[key] = i
    return AuditSpec(
        path=src,
        table=_str(src, data, "table", "table"),
        title=_str(src, data, "title", "title"),
        source_seed=_str(src, source, "seed", "source.seed"),
        source_section=_str(src, source, "section", "source.section"),
        notes=_str_list(src, data, "notes"),
        ambiguities=_str_list(src, data, "ambiguities"),
        dataset_tokens=datasets,
        metric_tokens=metrics,
        cells=cells,
    )


# --------------------------------------------------------------------------------------------------
# Logs


@dataclass(frozen=True)
class LogValue:
    """One numeric value of a saved evaluation log.

    Attributes:
        file: Path relative to the logs dir, POSIX separators.
        key: Flattened key (JSON: dotted path; CSV: ``column[:row]``).
        value: The number as logged.
    """

    file: str
    key: str
    value: float

    @property
    def path_tokens(self) -> frozenset[str]:
        return tokens(str(Path(self.file).with_suffix("")))

    @property
    def key_tokens(self) -> frozenset[str]:
        return tokens(self.key)

    @property
    def ref(self) -> str:
        return f"{self.file}:{self.key}"


def _is_number(value: Any) -> bool:
    # numbers.Real covers numpy scalars (CSV cells); bool is an int subclass but never a metric value
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def flatten_json(obj: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """Flatten nested dicts/lists into ``(dotted.key, leaf)`` pairs, in document order.

    List items get their index as a key part (``runs.0.da``); a bare scalar document gets ``(root)``.
    """
    if isinstance(obj, Mapping):
        items: Iterable[tuple[Any, Any]] = obj.items()
    elif isinstance(obj, list):
        items = enumerate(obj)
    else:
        return [(prefix or "(root)", obj)]
    out: list[tuple[str, Any]] = []
    for key, value in items:
        out.extend(flatten_json(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def _add(out: dict[str, float], src: str, key: str, value: float) -> None:
    if key in out and out[key] != value:
        raise PipelineInputError(src, key, f"occurs twice with different values ({out[key]!r}, {value!r}); the key is ambiguous")
    out[key] = value


def read_json_log(path: str | Path) -> dict[str, float]:
    """Numeric leaves of a JSON log, keyed by dotted path.

    Raises:
        PipelineInputError: if the file is not valid JSON, or if flattening makes one key from two
            different values (e.g. ``{"a.b": 1, "a": {"b": 2}}``).
    """
    src = str(path)
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise PipelineInputError(src, "<file>", f"cannot be read: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise PipelineInputError(src, "<file>", f"is not valid JSON: {exc}") from exc
    out: dict[str, float] = {}
    for key, value in flatten_json(data):
        if _is_number(value):
            _add(out, src, key, float(value))
    return out


def read_csv_log(path: str | Path) -> dict[str, float]:
    """Numeric cells of a CSV log, keyed ``column[:row]`` (see the module docstring for the layouts)."""
    src = str(path)
    try:
        frame = pd.read_csv(path)
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise PipelineInputError(src, "<file>", f"cannot be parsed as CSV: {exc}") from exc
    columns = [str(c) for c in frame.columns]
    frame.columns = columns
    labelled = len(columns) > 1 and not pd.api.types.is_numeric_dtype(frame[columns[0]])
    value_columns = columns[1:] if labelled else columns
    out: dict[str, float] = {}
    for i in range(len(frame)):
        if labelled:
            suffix = f":{frame.iloc[i, 0]}"
        else:
            suffix = "" if len(frame) == 1 else f":{i}"
        for column in value_columns:
            value = pd.to_numeric(pd.Series([frame.at[i, column]]), errors="coerce").iloc[0]
            if _is_number(value):
                _add(out, src, f"{column}{suffix}", float(value))
    return out


def log_files(logs_dir: str | Path | None) -> list[Path]:
    """JSON/CSV files under ``logs_dir`` (recursive, sorted, dot-files/dirs skipped); [] if absent.

    Raises:
        PipelineInputError: if ``logs_dir`` exists but is not a directory.
    """
    if logs_dir is None or str(logs_dir) == "":
        return []
    root = Path(logs_dir)
    if not root.exists():
        return []
    if not root.is_dir():
        raise PipelineInputError(str(root), "<dir>", "is not a directory")
    files = []
    for path in root.rglob("*"):
        rel = path.relative_to(root)
        if path.is_file() and path.suffix.lower() in _LOG_SUFFIXES and not any(p.startswith(".") for p in rel.parts):
            files.append(path)
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def collect_log_values(logs_dir: str | Path | None) -> list[LogValue]:
    """Every numeric value of every log under ``logs_dir``, ordered by file then key order."""
    values: list[LogValue] = []
    for path in log_files(logs_dir):
        rel = path.relative_to(logs_dir).as_posix()
        reader = read_json_log if path.suffix.lower() == ".json" else read_csv_log
        values.extend(LogValue(rel, key, value) for key, value in reader(path).items())
    return values


# --------------------------------------------------------------------------------------------------
# Audit


def candidates_for(cell: AuditCell, spec: AuditSpec, values: Sequence[LogValue]) -> tuple[list[LogValue], bool]:
    """Candidate log values for ``cell`` (see the matching rule) and whether the variant filter applied."""
    ds = spec.dataset_tokens[cell.dataset]
    mt = spec.metric_tokens[cell.metric]
    found = [v for v in values if ds & (v.path_tokens | v.key_tokens) and mt & v.key_tokens]
    if cell.variant_tokens:
        wanted = set(cell.variant_tokens)
        narrowed = [v for v in found if wanted & (v.path_tokens | v.key_tokens)]
        if narrowed:
            return narrowed, True
    return found, False


def _approx_agrees(difference: float, approx: str) -> bool:
    decimals = len(approx.partition(".")[2])
    unit = Decimal(1).scaleb(-decimals)
    return abs(Decimal(f"{abs(difference):.{decimals}f}") - Decimal(approx)) <= unit


def _agreement(cell: AuditCell, verdict: str, backing: Sequence[LogValue], difference: float, have_logs: bool) -> Any:
    fact = cell.card_fact
    if fact is None or not have_logs or cell.reported is None:
        return pd.NA
    if verdict != fact.outcome:
        return False
    if fact.outcome == "backed" and fact.file:
        return any(
            v.key == fact.key and (v.file == fact.file or v.file.endswith("/" + fact.file)) for v in backing
        )
    if fact.outcome == "differs" and fact.difference_approx:
        return _approx_agrees(difference, fact.difference_approx)
    return True


def _short_list(items: Sequence[LogValue], factor: float, limit: int = 3) -> str:
    shown = "; ".join(f"{v.ref}={v.value * factor:.6g}" for v in items[:limit])
    return shown + (f"; +{len(items) - limit} more" if len(items) > limit else "")


def _check_cell(cell: AuditCell, spec: AuditSpec, values: Sequence[LogValue], row: dict[str, Any]) -> list[LogValue]:
    """Fill verdict/status/file/key/found_value/difference/reason of ``row``; return the backing values."""
    cands, narrowed = candidates_for(cell, spec, values)
    row["n_candidates"] = len(cands)
    variant_note = ""
    if cell.variant_tokens:
        variant_note = (
            f" (kept only candidates naming {'/'.join(cell.variant_tokens)})"
            if narrowed
            else f" (no candidate names {'/'.join(cell.variant_tokens)}; all {cell.dataset} candidates used)"
        )
    if cell.reported is None:
        row["reason"] = "value not printed on the card (reported: null), nothing to compare"
        if cands:
            row["reason"] += f"; candidates{variant_note}: {_short_list(cands, cell.factor)}"
        return []
    if not cands:
        row["reason"] = (
            f"no log value whose file path or key names {cell.dataset} "
            f"({'/'.join(sorted(spec.dataset_tokens[cell.dataset]))}) and whose key names {cell.metric} "
            f"({'/'.join(sorted(spec.metric_tokens[cell.metric]))})"
        )
        elsewhere = [v for v in values if is_match(v.value * cell.factor, cell.reported)]
        if elsewhere:
            row["reason"] += f"; the printed value does appear outside the candidates at {_short_list(elsewhere, cell.factor)}"
        return []

    reported = float(cell.reported)
    backing = [v for v in cands if is_match(v.value * cell.factor, cell.reported)]
    if backing:
        best = backing[0]
        row["verdict"] = "backed"
        row["status"] = f"backed ({best.ref})"
        row["reason"] = f"{len(backing)} of {len(cands)} candidate(s) back it{variant_note}"
        if len(backing) > 1:
            row["reason"] += f": {_short_list(backing, cell.factor)}"
    else:
        best = min(cands, key=lambda v: abs(v.value * cell.factor - reported))
        row["verdict"] = "differs"
        row["reason"] = f"nearest of {len(cands)} candidate(s){variant_note}"
    row["file"], row["key"] = best.file, best.key
    row["found_value"] = best.value * cell.factor
    row["difference"] = row["found_value"] - reported
    if row["verdict"] == "differs":
        row["status"] = f"differs by {format_value(row['difference'], cell.reported, signed=True)} ({best.ref})"
    return backing


def audit_table1(spec_path: str | Path, logs_dir: str | Path | None) -> pd.DataFrame:
    """Check every Table 1 cell of the spec against the logs under ``logs_dir``.

    Args:
        spec_path: Audit spec YAML (``resources/paper_tables/scfate_table1.yaml``).
        logs_dir: Directory of saved eval logs; absent, empty or None makes every cell unverifiable.

    Returns:
        One row per cell, columns :data:`OUTPUT_COLUMNS`. ``found_value``/``difference`` are floats in
        the printed unit (NaN when nothing was compared); ``agrees_with_card`` is a nullable boolean.
        ``frame.attrs`` holds ``spec`` (the :class:`AuditSpec`), ``logs_dir``, ``n_files``, ``n_values``.

    Raises:
        PipelineInputError: for a bad spec, a logs path that is not a directory, or an unreadable log
            (the message names the file).
    """
    spec = load_audit_spec(spec_path)
    files = log_files(logs_dir)
    values = collect_log_values(logs_dir) if files else []
    have_logs = bool(values)
    if logs_dir is None or str(logs_dir) == "" or not Path(logs_dir).exists():
        no_logs_reason = f"logs dir {logs_dir!s} does not exist" if logs_dir else "no logs dir configured"
    elif not files:
        no_logs_reason = f"no JSON/CSV logs in {logs_dir}"
    else:
        no_logs_reason = f"no numeric values in the {len(files)} log file(s) of {logs_dir}"

    rows = []
    for cell in spec.cells:
        row: dict[str, Any] = {
            "dataset": cell.dataset,
            "metric": cell.metric,
            "variant": cell.variant,
            "reported": cell.reported,
            "status": "unverifiable",
            "file": None,
            "key": None,
            "found_value": math.nan,
            "difference": math.nan,
            "expected": cell.card_fact.describe() if cell.card_fact else None,
            "agrees_with_card": pd.NA,
            "verdict": "unverifiable",
            "n_candidates": 0,
            "reason": no_logs_reason,
        }
        if have_logs:
            backing = _check_cell(cell, spec, values, row)
            row["agrees_with_card"] = _agreement(cell, row["verdict"], backing, row["difference"], have_logs)
        rows.append(row)

    frame = pd.DataFrame(rows, columns=list(OUTPUT_COLUMNS))
    frame["found_value"] = frame["found_value"].astype(float)
    frame["difference"] = frame["difference"].astype(float)
    frame["agrees_with_card"] = frame["agrees_with_card"].astype("boolean")
    frame["n_candidates"] = frame["n_candidates"].astype(int)
    frame.attrs.update(spec=spec, logs_dir=None if logs_dir is None else str(logs_dir), n_files=len(files), n_values=len(values))
    return frame


# --------------------------------------------------------------------------------------------------
# Output


def _md(text: Any) -> str:
    if text is None or (isinstance(text, float) and math.isnan(text)) or text is pd.NA:
        return ""
    return str(text).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def summary_counts(frame: pd.DataFrame) -> tuple[dict[str, int], dict[str, int]]:
    """(verdict counts in :data:`VERDICTS` order, agreement counts agrees/disagrees/not assessed)."""
    verdicts = Counter(frame["verdict"].astype(str))
    ordered = {v: verdicts.pop(v, 0) for v in VERDICTS}
    ordered.update(sorted(verdicts.items()))
    agrees = frame["agrees_with_card"].astype("boolean")
    agreement = {
        "agrees": int((agrees == True).sum()),  # noqa: E712 - nullable boolean comparison
        "disagrees": int((agrees == False).sum()),  # noqa: E712
        "not assessed": int(agrees.isna().sum()),
    }
    return ordered, agreement


def render_markdown(frame: pd.DataFrame, spec: AuditSpec | None = None) -> str:
    """Markdown report: header, notes, ambiguities, rules, one row per cell, summary."""
    spec = spec or frame.attrs.get("spec")
    lines: list[str] = []
    if spec is not None:
        lines += [
            f"# {_md(spec.title)}",
            "",
            f"Source: {_md(spec.source_seed)}, section \"{_md(spec.source_section)}\" (spec: {_md(Path(spec.path).name)})",
            "",
        ]
    else:
        lines += ["# Table 1 audit against saved evaluation logs", ""]
    if "logs_dir" in frame.attrs:
        lines += [
            f"Logs: `{_md(frame.attrs['logs_dir'])}` ({frame.attrs.get('n_files', 0)} JSON/CSV file(s), "
            f"{frame.attrs.get('n_values', 0)} numeric value(s))",
            "",
        ]
    if spec is not None and spec.notes:
        lines += ["Notes:", ""] + [f"- {_md(n)}" for n in spec.notes] + [""]
    if spec is not None and spec.ambiguities:
        lines += ["Ambiguities in the card:", ""] + [f"- {_md(a)}" for a in spec.ambiguities] + [""]
    lines += [f"Matching rule: {MATCHING_RULE}", "", f"Agreement rule: {AGREEMENT_RULE}", "", "Verdicts:", ""]
    lines += [f"- `{v}`: {VERDICT_DESCRIPTIONS[v]}" for v in VERDICTS]
    lines += [
        "",
        "Found values and differences are in the printed unit, at the printed precision + 2 digits; `n/a` means "
        "nothing was compared (never read it as 0).",
        "",
    ]
    header = ["dataset", "metric", "variant", "reported", "status", "found", "difference", "expected (card)", "agrees", "reason"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join(["---"] * 4 + ["---"] + ["---:"] * 2 + ["---"] * 3) + "|")
    for row in frame.itertuples(index=False):
        reported = row.reported if isinstance(row.reported, str) else None
        agrees = row.agrees_with_card
        cells = [
            row.dataset,
            row.metric,
            row.variant,
            reported or "(not printed)",
            row.status,
            format_value(row.found_value, reported or "0.000"),
            format_value(row.difference, reported or "0.000", signed=True),
            row.expected if isinstance(row.expected, str) else "(no card claim)",
            "n/a" if agrees is pd.NA or agrees is None else ("yes" if agrees else "no"),
            row.reason,
        ]
        lines.append("| " + " | ".join(_md(c) for c in cells) + " |")
    verdicts, agreement = summary_counts(frame)
    lines += [
        "",
        f"Summary ({len(frame)} cells): " + ", ".join(f"{v} {n}" for v, n in verdicts.items()) + ".",
        "Agreement with the card's own audit facts: " + ", ".join(f"{k} {n}" for k, n in agreement.items()) + ".",
        "",
    ]
    return "\n".join(lines)


def write_audit(frame: pd.DataFrame, csv_path: str | Path, md_path: str | Path, spec: AuditSpec | None = None) -> None:
    """Write the audit as CSV (raw values) and Markdown (formatted table + summary), atomically.

    ``spec`` defaults to ``frame.attrs["spec"]`` as set by :func:`audit_table1`.
    """
    missing = [c for c in OUTPUT_COLUMNS if c not in frame.columns]
    if missing:
        raise PipelineInputError("audit table", missing[0], "column is missing")
    write_csv(frame[list(OUTPUT_COLUMNS)], csv_path, index=False, encoding="utf-8")
    write_text(render_markdown(frame, spec), md_path)


# --------------------------------------------------------------------------------------------------
# CLI


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit code (2 on bad input, with the reason on stderr)."""
    parser = argparse.ArgumentParser(
        prog="python -m perturb_repro.tables.scfate_audit",
        description="Check scFATE Table 1 (audit spec) against a directory of saved eval logs (JSON/CSV).",
    )
    parser.add_argument("--spec", required=True, help="audit spec YAML (resources/paper_tables/scfate_table1.yaml)")
    parser.add_argument("--logs", default="", help="directory of saved eval logs; absent/empty -> every cell unverifiable")
    parser.add_argument("--csv", required=True, help="output CSV")
    parser.add_argument("--md", required=True, help="output Markdown")
    args = parser.parse_args(argv)
    try:
        frame = audit_table1(args.spec, args.logs or None)
        write_audit(frame, args.csv, args.md)
    except PipelineInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    verdicts, agreement = summary_counts(frame)
    print(
        f"{frame.attrs['spec'].table}: "
        + ", ".join(f"{v} {n}" for v, n in verdicts.items())
        + "; card agreement: "
        + ", ".join(f"{k} {n}" for k, n in agreement.items())
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

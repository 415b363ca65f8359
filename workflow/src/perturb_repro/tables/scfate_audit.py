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

Modules: :mod:`~perturb_repro.tables.scfate_spec` (the spec), :mod:`~perturb_repro.tables.scfate_logs`
(reading the logs), this one (matching, verdicts, output, CLI).

CLI::

    python -m perturb_repro.tables.scfate_audit --spec resources/paper_tables/scfate_table1.yaml \
        --logs path/to/table1_inputs --csv results/tables/scfate_table1.csv \
        --md results/tables/scfate_table1.md
"""

from __future__ import annotations

import argparse
import math
import sys
from decimal import Decimal
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from perturb_repro.errors import PipelineInputError
from perturb_repro.tables.markdown import md_bullets, md_cell, md_source_header, md_table, ordered_counts, write_csv_and_markdown
from perturb_repro.tables.printed import format_value, is_match
from perturb_repro.tables.scfate_fetch import FETCHED, read_fetch_status
from perturb_repro.tables.scfate_logs import (  # noqa: F401 - re-exported: callers import the log API from here
    LogValue,
    collect_log_values,
    flatten_json,
    log_files,
    read_csv_log,
    read_json_log,
)
from perturb_repro.tables.scfate_spec import (  # noqa: F401 - re-exported
    SCHEMA_VERSION,
    UNITS,
    VERDICTS,
    AuditCell,
    AuditSpec,
    CardFact,
    load_audit_spec,
    tokens,
)

VERDICT_DESCRIPTIONS: dict[str, str] = {
    "backed": "a candidate log value, rounded to the printed decimals, equals the printed number",
    "differs": "candidates exist but none prints as the published number; the nearest one is shown",
    "unverifiable": "no logs, no candidate value for this dataset/metric, or the value is not printed on the card",
}

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


def audit_table1(spec_path: str | Path, logs_dir: str | Path | None, fetch_status: str | Path | None = None) -> pd.DataFrame:
    """Check every Table 1 cell of the spec against the logs under ``logs_dir``.

    Args:
        spec_path: Audit spec YAML (``resources/paper_tables/scfate_table1.yaml``).
        logs_dir: Directory of saved eval logs; absent, empty or None makes every cell unverifiable.
        fetch_status: Status file of :func:`perturb_repro.tables.scfate_fetch.fetch_hub_folder`; when
            given it replaces ``logs_dir``: the fetched copy is audited (after its sha256 check), or,
            when the fetch was ``unavailable``, every cell is unverifiable with the fetch's reason.

    Returns:
        One row per cell, columns :data:`OUTPUT_COLUMNS`. ``found_value``/``difference`` are floats in
        the printed unit (NaN when nothing was compared); ``agrees_with_card`` is a nullable boolean.
        ``frame.attrs`` holds ``spec`` (the :class:`AuditSpec`), ``logs_dir``, ``n_files``, ``n_values``
        and ``fetch`` (the fetch status, or None).

    Raises:
        PipelineInputError: for a bad spec, a logs path that is not a directory, or an unreadable log
            (the message names the file).
    """
    spec = load_audit_spec(spec_path)
    fetch = read_fetch_status(fetch_status) if fetch_status else None
    if fetch is not None:
        logs_dir = fetch["logs_dir"] if fetch["status"] == FETCHED else None
    files = log_files(logs_dir)
    values = collect_log_values(logs_dir) if files else []
    have_logs = bool(values)
    if fetch is not None and fetch["status"] != FETCHED:
        no_logs_reason = (
            f"the authors' logs ({fetch['repo_id']}@{fetch['revision']}, {fetch['folder']}/) were not fetched: "
            f"{fetch['reason']}; with network: snakemake --forcerun fetch_scfate_logs results/tables/scfate_table1.md"
        )
    elif logs_dir is None or str(logs_dir) == "" or not Path(logs_dir).exists():
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
    frame.attrs.update(
        spec=spec, logs_dir=None if logs_dir is None else str(logs_dir), n_files=len(files), n_values=len(values), fetch=fetch
    )
    return frame


# --------------------------------------------------------------------------------------------------
# Output


def summary_counts(frame: pd.DataFrame) -> tuple[dict[str, int], dict[str, int]]:
    """(verdict counts in :data:`VERDICTS` order, agreement counts agrees/disagrees/not assessed)."""
    ordered = ordered_counts(frame["verdict"].astype(str), VERDICTS)
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
    if spec is not None:
        lines = md_source_header(spec.title, spec.source_seed, spec.source_section, spec.path)
    else:
        lines = ["# Table 1 audit against saved evaluation logs", ""]
    fetch = frame.attrs.get("fetch")
    if fetch is not None:
        where = f"{fetch['repo_id']} ({fetch.get('repo_type', 'model')} repo) at revision {fetch['revision']}"
        if fetch["status"] == FETCHED:
            lines += [f"Logs fetched from {md_cell(where)} (commit {md_cell(fetch.get('commit'))}), folder `{md_cell(fetch['folder'])}/`:", ""]
            lines += md_table(["file", "sha256", "bytes"], "llr", [[f["path"], f["sha256"], f["bytes"]] for f in fetch["files"]])
            lines += [""]
        else:
            lines += [f"**Logs not fetched** from {md_cell(where)}, folder `{md_cell(fetch['folder'])}/`: {md_cell(fetch['reason'])}", ""]
    if frame.attrs.get("logs_dir") is not None or (fetch is None and "logs_dir" in frame.attrs):
        lines += [
            f"Logs: `{md_cell(frame.attrs['logs_dir'])}` ({frame.attrs.get('n_files', 0)} JSON/CSV file(s), "
            f"{frame.attrs.get('n_values', 0)} numeric value(s))",
            "",
        ]
    if spec is not None:
        lines += md_bullets("Notes:", spec.notes) + md_bullets("Ambiguities in the card:", spec.ambiguities)
    lines += [f"Matching rule: {MATCHING_RULE}", "", f"Agreement rule: {AGREEMENT_RULE}", ""]
    lines += md_bullets("Verdicts:", [f"`{v}`: {VERDICT_DESCRIPTIONS[v]}" for v in VERDICTS])
    lines += [
        "Found values and differences are in the printed unit, at the printed precision + 2 digits; `n/a` means "
        "nothing was compared (never read it as 0).",
        "",
    ]
    header = ["dataset", "metric", "variant", "reported", "status", "found", "difference", "expected (card)", "agrees", "reason"]
    rows = []
    for row in frame.itertuples(index=False):
        reported = row.reported if isinstance(row.reported, str) else None
        agrees = row.agrees_with_card
        rows.append(
            [
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
        )
    lines += md_table(header, "lllllrrlll", rows)
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
    write_csv_and_markdown(frame, OUTPUT_COLUMNS, render_markdown(frame, spec), csv_path, md_path, "audit table")


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
    parser.add_argument("--fetch-status", default="", help="status file of the Hugging Face fetch (replaces --logs)")
    parser.add_argument("--csv", required=True, help="output CSV")
    parser.add_argument("--md", required=True, help="output Markdown")
    args = parser.parse_args(argv)
    try:
        frame = audit_table1(args.spec, args.logs or None, args.fetch_status or None)
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

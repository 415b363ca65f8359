"""Compare numbers a paper printed with the numbers our pipeline reproduced.

A table spec (YAML, :mod:`perturb_repro.tables.paper_spec`, schema
``workflow/schemas/paper_table.schema.yaml``) lists every printed number as a string, so its printed
precision survives. :func:`reproduce_table` looks each one up in the ``metrics.csv`` of the matching
run and gives it a status; :func:`write_table` writes CSV + Markdown. A blank cell (the source printed
no number) is ``not-comparable`` (or ``not-run``): our value is shown for information. A run over replicate
seeds (its metrics.csv the aggregate of :mod:`perturb_repro.scoring.replicates`) is shown as mean ± std over
seeds; a printed ``± std`` (``reported_std``) is the cell's within-noise tolerance unless it sets its own.

CLI::

    python -m perturb_repro.tables.paper_table --spec X.yaml \
        --metrics norman_demo:cellflow=results/norman_demo/cellflow/metrics.csv \
        --scale norman_demo=demo --map norman=norman_demo --csv out.csv --md out.md
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

import pandas as pd

from perturb_repro.errors import PipelineInputError
from perturb_repro.tables.markdown import md_bullets, md_cell, md_source_header, md_table, ordered_counts, write_csv_and_markdown
from perturb_repro.tables.paper_spec import (  # noqa: F401 - re-exported: callers import the spec API from here
    BLANK_EMPTY_LABEL,
    SCHEMA_VERSION,
    STATISTICS,
    Assumption,
    CellSpec,
    TableSpec,
    load_table_spec,
)
from perturb_repro.tables.printed import format_value, is_match  # noqa: F401 - re-exported
from perturb_repro.tables.seed_spread import STD_NOTE, format_reproduced, format_tolerance, seed_spread

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
    "within-noise": "|reproduced - reported| <= tolerance (column `tolerance`, from `tolerance_from`: the cell's own, "
                    "else the paper's printed ± std, else the table default)",
    "mismatch": "differs by more than the tolerance",
    "unverifiable": "a value was reported but ours cannot be computed (NaN, or metric absent from metrics.csv)",
    "not-run": "the run this cell needs was not built or not configured",
    "not-comparable": "run at demo scale, or the paper printed no number (blank cell): value shown for information, not compared",
}

SCALES: tuple[str, ...] = ("paper", "demo")

OUTPUT_COLUMNS: tuple[str, ...] = (
    "dataset",
    "run_dataset",
    "model",
    "metric",
    "statistic",
    "reported",
    "reproduced",
    "reproduced_std",
    "n_seeds",
    "difference",
    "tolerance",
    "tolerance_from",
    "status",
)

# Float noise guard for the tolerance comparison: 0.5830 - 0.5630 is 0.020000000000000018 in binary,
# which must still count as within a 0.02 tolerance.
_TOLERANCE_EPS = 1e-12

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
        One row per cell, columns :data:`OUTPUT_COLUMNS`: ``dataset, run_dataset, model, metric, statistic,
        reported, reproduced, reproduced_std, n_seeds, difference, tolerance, tolerance_from, status``
        (``reproduced`` is the mean over seeds for a replicated run, ``reproduced_std`` the std over seeds of
        that statistic, NaN for one run; ``n_seeds`` empty when not run; ``tolerance``/``tolerance_from`` the
        within-noise tolerance of a compared cell and its origin, :meth:`TableSpec.tolerance_used`, NaN/empty
        when not compared; ``reported`` is the printed string; ``reproduced`` and
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
            "reproduced_std": math.nan,
            "n_seeds": None,
            "difference": math.nan,
            "tolerance": math.nan,
            "tolerance_from": "",
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
        row["reproduced_std"], row["n_seeds"] = seed_spread(metrics, cell.metric, cell.statistic)
        if scale == "demo" or cell.blank:
            row["status"] = "not-comparable"
        else:
            tolerance, row["tolerance_from"] = spec.tolerance_used(cell)
            row["tolerance"] = tolerance
            row["status"] = _status_for(cell, reproduced, tolerance)
            if math.isfinite(reproduced):
                row["difference"] = reproduced - cell.reported_value
        rows.append(row)

    frame = pd.DataFrame(rows, columns=list(OUTPUT_COLUMNS))
    for column in ("reproduced", "reproduced_std", "difference", "tolerance"):
        frame[column] = frame[column].astype(float)
    frame["n_seeds"] = frame["n_seeds"].astype("Int64")  # empty when not run
    return frame


# --------------------------------------------------------------------------------------------------
# Output


def status_counts(statuses: Sequence[str] | pd.Series) -> dict[str, int]:
    """Count statuses in the canonical order, zeros included (unknown values are counted too)."""
    return ordered_counts(statuses, STATUSES)


def render_markdown(frame: pd.DataFrame, spec: TableSpec) -> str:
    """Render a reproduced table as Markdown (see :func:`write_table`)."""
    lines = md_source_header(spec.title, spec.source_seed, spec.source_section, spec.path)
    lines += [
        f"Tolerance for within-noise: {spec.default_tolerance:g} absolute unless a cell sets its own or the paper "
        f"printed a ± std for it (then that std); the `tolerance` column says which. {md_cell(spec.tolerance_source)}",
        "",
    ]
    lines += md_bullets("Notes:", spec.notes)
    lines += md_bullets(
        "Assumptions (readings of the source it does not state):", [f"{a.claim} Evidence: {a.evidence}" for a in spec.assumptions]
    )
    n_blank = len(spec.blank_cells)
    if n_blank:
        lines.append(
            f"{n_blank} of {len(spec.cells)} cells are blank in the source (no printed number): "
            "they are listed with our value for information and never compared."
        )
        lines.append("")
    lines += md_bullets("Status legend:", [f"`{status}`: {STATUS_DESCRIPTIONS[status]}" for status in STATUSES])
    lines.append(
        "Reproduced values and differences are shown at the printed precision + 2 digits; "
        "`n/a` means the value is undefined (never read it as 0). A run over two or more seeds shows "
        f"mean ± std over its seeds ({STD_NOTE}) and the seed count."
    )
    lines.append("")
    header = ["dataset", "run dataset", "model", "metric", "statistic", "reported", "reproduced", "difference",
              "tolerance", "status"]
    rows = (
        [
            row.dataset,
            row.run_dataset,
            row.model,
            row.metric,
            row.statistic,
            row.reported,
            format_reproduced(row.reproduced, row.reproduced_std, row.n_seeds, row.reported),
            format_value(row.difference, row.reported, signed=True),
            format_tolerance(row.tolerance, row.tolerance_from),
            row.status,
        ]
        for row in frame.itertuples(index=False)
    )
    lines += md_table(header, "lllllrrrrl", rows)
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
    # every column the frame has (not only OUTPUT_COLUMNS): extra columns are kept in the CSV
    columns = list(OUTPUT_COLUMNS) + [c for c in frame.columns if c not in OUTPUT_COLUMNS]
    write_csv_and_markdown(frame, columns, render_markdown(frame, spec), csv_path, md_path, "reproduced table")


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

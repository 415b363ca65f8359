"""Build the single, self-contained HTML reproduction report.

Self-contained means: figures are inline base64 PNG data URIs, CSS is inline, there is no
JavaScript, and the only links are in-page anchors. The file can be mailed or archived alone and
never shows a broken link or image.
"""

from __future__ import annotations

import base64
import html
import math
import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import anndata as ad
import pandas as pd

from perturb_repro.errors import PipelineInputError
from perturb_repro.io import atomic_path
from perturb_repro.report import figures
from perturb_repro.tables.paper_table import OUTPUT_COLUMNS, STATUS_DESCRIPTIONS, STATUSES, format_value, status_counts

PathLike = str | os.PathLike

# Metrics whose per-condition spread is shown for every dataset (one box per model).
DISTRIBUTION_METRICS: tuple[str, ...] = ("pearson_delta", "mse", "discrimination_score_l1")

# Tried in order when a run does not name its control label; these are the labels our datasets use.
CONTROL_CANDIDATES: tuple[str, ...] = ("control", "ctrl", "non-targeting", "non_targeting")

_METRICS_COLUMNS: tuple[str, ...] = ("metric", "count", "mean", "std", "min", "q25", "median", "q75", "max")

_STATUS_COLORS: dict[str, str] = {
    "match": "#a1d99b",
    "within-noise": "#e5f5c0",
    "mismatch": "#fc9272",
    "unverifiable": "#fdd0a2",
    "not-run": "#d9d9d9",
    "not-comparable": "#c6dbef",
}

_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; padding: 0 1em; }
h1, h2, h3, h4 { color: #111; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #f0f0f0; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.status { font-weight: 600; white-space: nowrap; }
.note { color: #7a4b00; background: #fff8e1; border-left: 4px solid #f0b400; padding: 0.3em 0.8em; margin: 0.5em 0; }
.muted { color: #666; }
img { max-width: 100%; height: auto; display: block; margin: 0.5em 0 1em 0; }
code { background: #f4f4f4; padding: 0 0.2em; }
nav ul { columns: 2; }
""" + "\n".join(f".status-{s} {{ background: {c}; }}" for s, c in _STATUS_COLORS.items())


def _e(value: Any) -> str:
    """Escape any value for HTML text or attribute context."""
    return html.escape(str(value), quote=True)


def _anchor(prefix: str, name: str, used: set[str]) -> str:
    base = f"{prefix}-" + (re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-") or "x")
    anchor, i = base, 2
    while anchor in used:  # two names that sanitise alike must not share an id
        anchor, i = f"{base}-{i}", i + 1
    used.add(anchor)
    return anchor


def _img(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{data}">'


def _note(text: str) -> str:
    return f'<p class="note">{_e(text)}</p>'


def _status_cell(status: str) -> str:
    return f'<td class="status status-{_e(status)}">{_e(status)}</td>'


def _status_badge(status: str) -> str:
    return f'<span class="status status-{_e(status)}">{_e(status)}</span>'


def _fmt_number(value: Any) -> str:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return "n/a"
    if not math.isfinite(number):
        return "n/a"  # an undefined metric must never read as 0
    return f"{number:.6g}"


def _present(path: PathLike | None) -> bool:
    return path is not None and str(path) != "" and Path(path).is_file()


# --------------------------------------------------------------------------------------------------
# Sections


def _render_value(value: Any) -> str:
    if isinstance(value, Mapping):
        if not value:
            return '<span class="muted">(none)</span>'
        rows = "".join(f"<tr><th>{_e(k)}</th><td>{_render_value(v)}</td></tr>" for k, v in value.items())
        return f"<table>{rows}</table>"
    if isinstance(value, (list, tuple)):
        if not value:
            return '<span class="muted">(none)</span>'
        return "<ul>" + "".join(f"<li>{_render_value(v)}</li>" for v in value) + "</ul>"
    return f"<code>{_e(value)}</code>"


def _provenance_section(provenance: Mapping[str, Any]) -> str:
    parts = ['<section id="provenance"><h2>Provenance</h2>']
    if provenance:
        parts.append(_render_value(provenance))
    else:
        parts.append(_note("No provenance was given to the report builder."))
    parts.append("</section>")
    return "\n".join(parts)


def _legend() -> str:
    rows = "".join(f"<tr>{_status_cell(s)}<td>{_e(STATUS_DESCRIPTIONS[s])}</td></tr>" for s in STATUSES)
    return f"<table class=\"legend\"><tr><th>status</th><th>meaning</th></tr>{rows}</table>"


def _summary_section(frames: Sequence[pd.DataFrame]) -> str:
    statuses = pd.concat([f["status"] for f in frames], ignore_index=True) if frames else pd.Series([], dtype=str)
    counts = status_counts(statuses)
    cells = "".join(f"<tr>{_status_cell(s)}<td class=\"num\">{n}</td></tr>" for s, n in counts.items())
    return (
        '<section id="summary"><h2>Status summary</h2>'
        f"<p>{len(statuses)} reported numbers across {len(frames)} table(s).</p>"
        f"<table><tr><th>status</th><th>count</th></tr>{cells}</table>"
        f"<h3>Legend</h3>{_legend()}"
        "<p class=\"muted\">Reproduced values and differences are shown at the printed precision + 2 digits; "
        "<code>n/a</code> marks an undefined value (never 0).</p></section>"
    )


def _read_table_csv(path: PathLike) -> pd.DataFrame:
    src = str(path)
    if not _present(path):
        # tables are the point of the report; a missing one is a wiring error, not an optional input
        raise PipelineInputError(src, "<file>", "table CSV does not exist")
    # reported must stay a string: "1.0000" carries the printed precision
    text_columns = {c: str for c in OUTPUT_COLUMNS if c not in ("reproduced", "difference")}
    try:
        frame = pd.read_csv(path, dtype=text_columns)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise PipelineInputError(src, "<file>", f"cannot be read as CSV: {exc}") from exc
    for column in OUTPUT_COLUMNS:
        if column not in frame.columns:
            raise PipelineInputError(src, column, "column is missing")
    unknown = sorted(set(frame["status"].astype(str)) - set(STATUSES))
    if unknown:
        raise PipelineInputError(src, "status", f"unknown status values {unknown}")
    return frame


def _table_heading(csv_path: PathLike, md_or_title: str) -> tuple[str, str | None]:
    """Title (and source line, if any) for a table: from its Markdown file, or the string itself."""
    candidate = Path(str(md_or_title))
    if candidate.suffix.lower() == ".md" and candidate.is_file():
        title, source = None, None
        for line in candidate.read_text(encoding="utf-8").splitlines():
            if title is None and line.startswith("# "):
                title = line[2:].strip()
            elif source is None and line.startswith("Source:"):
                source = line.strip()
        return title or Path(str(csv_path)).stem, source
    return str(md_or_title), None


def _table_section(frame: pd.DataFrame, title: str, source: str | None, anchor: str) -> str:
    header = ["dataset", "run dataset", "model", "metric", "statistic", "reported", "reproduced", "difference", "status"]
    rows = []
    for row in frame.itertuples(index=False):
        rows.append(
            "<tr>"
            + "".join(f"<td>{_e(v)}</td>" for v in (row.dataset, row.run_dataset, row.model, row.metric, row.statistic))
            + f'<td class="num">{_e(row.reported)}</td>'
            + f'<td class="num">{_e(format_value(row.reproduced, row.reported))}</td>'
            + f'<td class="num">{_e(format_value(row.difference, row.reported, signed=True))}</td>'
            + _status_cell(str(row.status))
            + "</tr>"
        )
    counts = ", ".join(f"{s} {n}" for s, n in status_counts(frame["status"]).items())
    return (
        f'<section id="{_e(anchor)}"><h3>{_e(title)}</h3>'
        + (f'<p class="muted">{_e(source)}</p>' if source else "")
        + "<table><tr>"
        + "".join(f"<th>{_e(h)}</th>" for h in header)
        + "</tr>"
        + "".join(rows)
        + f"</table><p>Status summary: {_e(counts)}</p></section>"
    )


# Audit verdicts coloured like the table statuses they correspond to.
_AUDIT_VERDICT_STATUS = {"backed": "match", "differs": "mismatch", "unverifiable": "unverifiable"}
_AUDIT_COLUMNS = ["dataset", "metric", "variant", "reported", "status", "expected", "agrees_with_card"]


def _audit_section(csv_path: PathLike, title: str, anchor: str) -> str:
    """A claim audit (e.g. scFATE Table 1): which saved log backs each printed number, if any."""
    src = str(csv_path)
    if not _present(csv_path):
        raise PipelineInputError(src, "<file>", "audit CSV does not exist")
    frame = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    missing = [c for c in _AUDIT_COLUMNS + ["verdict"] if c not in frame.columns]
    if missing:
        raise PipelineInputError(src, missing[0], "column is missing")
    rows = []
    for record in frame.to_dict("records"):
        css = "status status-" + _AUDIT_VERDICT_STATUS.get(record["verdict"], "unverifiable")
        cells = [f"<td>{_e(record[c] or 'n/a')}</td>" for c in _AUDIT_COLUMNS if c != "status"]
        cells.insert(4, f'<td class="{_e(css)}">{_e(record["status"])}</td>')
        rows.append("<tr>" + "".join(cells) + "</tr>")
    counts = frame["verdict"].value_counts().to_dict()
    return (
        f'<section id="{_e(anchor)}"><h3>{_e(title)}</h3>'
        + "<table><tr>" + "".join(f"<th>{_e(h.replace('_', ' '))}</th>" for h in _AUDIT_COLUMNS) + "</tr>"
        + "".join(rows)
        + f"</table><p>Audit summary: {_e(', '.join(f'{k} {v}' for k, v in sorted(counts.items())))}</p></section>"
    )


def _metrics_summary(metrics_csv: PathLike) -> str:
    src = str(metrics_csv)
    try:
        frame = pd.read_csv(metrics_csv)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise PipelineInputError(src, "<file>", f"cannot be read as CSV: {exc}") from exc
    if "metric" not in frame.columns:
        raise PipelineInputError(src, "metric", "column is missing")
    columns = [c for c in _METRICS_COLUMNS if c in frame.columns]
    rows = []
    for _, row in frame.iterrows():
        cells = [f"<td>{_e(row['metric'])}</td>"]
        cells += [f'<td class="num">{_e(_fmt_number(row[c]))}</td>' for c in columns[1:]]
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return (
        "<table><tr>" + "".join(f"<th>{_e(c)}</th>" for c in columns) + "</tr>" + "".join(rows) + "</table>"
    )


def _truth_conditions(truth_h5ad: PathLike) -> list[str]:
    src = str(truth_h5ad)
    try:
        adata = ad.read_h5ad(truth_h5ad, backed="r")
    except (OSError, ValueError, KeyError) as exc:
        raise PipelineInputError(src, "<file>", f"cannot be read as .h5ad: {exc}") from exc
    try:
        if "condition" not in adata.obs.columns:
            raise PipelineInputError(src, "obs.condition", "column is missing")
        return sorted(set(adata.obs["condition"].astype(str)))
    finally:
        adata.file.close()


def _run_section(run: Mapping[str, Any], anchor: str, n_pca_conditions: int) -> str:
    dataset, model = str(run["dataset"]), str(run["model"])
    parts = [f'<section id="{_e(anchor)}"><h3>{_e(dataset)} / {_e(model)}</h3>']

    metrics_csv = run.get("metrics_csv")
    parts.append("<h4>Metrics (aggregated over test conditions)</h4>")
    if _present(metrics_csv):
        parts.append(_metrics_summary(metrics_csv))
    else:
        parts.append(_note(f"No metrics.csv for this run ({metrics_csv or 'not given'}); summary skipped."))

    parts.append("<h4>Training loss</h4>")
    train_log = run.get("train_log_csv")
    if _present(train_log):
        parts.append(_img(figures.loss_curve(train_log, f"{dataset} / {model}: training loss"), f"loss curve {dataset} {model}"))
    else:
        # baselines (e.g. mean/control predictors) have no training log by design
        parts.append(_note(f"No training log for this run ({train_log or 'not given'}); loss curve skipped."))

    parts.append("<h4>PCA: predicted vs real cells</h4>")
    needed = {"predictions": run.get("predictions"), "truth": run.get("truth"), "pca": run.get("pca")}
    absent = [k for k, v in needed.items() if not _present(v)]
    if absent:
        detail = ", ".join(f"{k} ({needed[k] or 'not given'})" for k in absent)
        parts.append(_note(f"PCA panels skipped: missing {detail}."))
    else:
        conditions = _truth_conditions(needed["truth"])
        control = run.get("control_label")
        if control is None:
            control = next((c for c in CONTROL_CANDIDATES if c in conditions), None)
        perturbed = [c for c in conditions if c != control]
        shown = perturbed[: max(0, int(n_pca_conditions))]
        if control is None:
            parts.append(_note("No control label given or recognised; panels drawn without the control background."))
        if not shown:
            parts.append(_note("PCA panels skipped: the test truth has no perturbed conditions."))
        else:
            parts.append(
                f'<p class="muted">First {len(shown)} of {len(perturbed)} test conditions (sorted), projected with '
                "the PCA fitted on train cells; grey = control, green = real, red = predicted "
                f"(at most {figures.MAX_CELLS_PER_GROUP} cells per group).</p>"
            )
            png = figures.pca_predicted_vs_real(needed["predictions"], needed["truth"], needed["pca"], shown, control)
            parts.append(_img(png, f"PCA predicted vs real {dataset} {model}"))
    parts.append("</section>")
    return "\n".join(parts)


def _distribution_section(dataset: str, runs: Sequence[Mapping[str, Any]]) -> str:
    parts = [f"<h3>{_e(dataset)}: per-condition metric distributions</h3>"]
    available: dict[str, PathLike] = {}
    for run in runs:
        path = run.get("per_condition_csv")
        label = str(run["model"])
        if _present(path):
            available[label] = path
        else:
            parts.append(_note(f"No per-condition metrics for {label} ({path or 'not given'}); left out of the distributions."))
    if not available:
        parts.append(_note("Metric distributions skipped: no run of this dataset has per-condition metrics."))
        return "\n".join(parts)
    for metric in DISTRIBUTION_METRICS:
        parts.append(_img(figures.metric_distribution(available, metric), f"{metric} distribution {dataset}"))
    return "\n".join(parts)


# --------------------------------------------------------------------------------------------------
# Entry point


def _group_runs(runs: Iterable[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    grouped: dict[str, list[Mapping[str, Any]]] = {}
    for i, run in enumerate(runs):
        for key in ("dataset", "model"):
            if not run.get(key):
                raise PipelineInputError("report runs", f"runs[{i}].{key}", "is missing")
        grouped.setdefault(str(run["dataset"]), []).append(run)
    return grouped


def build_report(
    out_html: PathLike,
    tables: Sequence[tuple[PathLike, str]],
    runs: Sequence[Mapping[str, Any]],
    provenance: Mapping[str, Any],
    n_pca_conditions: int = 3,
    audits: Sequence[tuple[PathLike, str]] = (),
) -> None:
    """Write the self-contained HTML reproduction report, atomically.

    Args:
        out_html: Destination file.
        tables: ``(csv_path, md_or_title)`` per paper table; ``csv_path`` is the output of
            :func:`perturb_repro.tables.paper_table.write_table`, ``md_or_title`` either its Markdown
            file (title and source are taken from it) or a title string.
        runs: One mapping per (dataset, model) run with keys ``dataset``, ``model`` and optional paths
            ``metrics_csv``, ``per_condition_csv``, ``train_log_csv``, ``predictions``, ``truth``,
            ``pca``, plus optional ``control_label`` (else inferred from the truth's conditions).
            Missing or absent optional files are skipped with a visible note.
        provenance: Shown verbatim in the header (e.g. config file name, config sha256, data
            checksums, package versions); nested mappings and lists are rendered as tables/lists.
        n_pca_conditions: Number of test conditions (first in sorted order) drawn per run.
        audits: ``(csv_path, title)`` per claim audit (scFATE Table 1), shown after the tables.

    Raises:
        PipelineInputError: If a table CSV is missing or malformed, a run lacks dataset/model, or a
            present input file breaks its contract.
    """
    used_ids: set[str] = {"provenance", "summary", "tables", "runs"}
    loaded = []
    for csv_path, md_or_title in tables:
        frame = _read_table_csv(csv_path)
        title, source = _table_heading(csv_path, md_or_title)
        loaded.append((frame, title, source, _anchor("table", title, used_ids)))
    grouped = _group_runs(runs)

    toc = ['<nav><h2>Contents</h2><ul>', '<li><a href="#provenance">Provenance</a></li>',
           '<li><a href="#summary">Status summary</a></li>']
    toc += [f'<li><a href="#{_e(a)}">{_e(t)}</a></li>' for _, t, _, a in loaded]

    body = [_provenance_section(provenance), _summary_section([f for f, *_ in loaded])]
    body.append('<section id="tables"><h2>Paper tables</h2>')
    if not loaded:
        body.append(_note("No paper tables were given."))
    body += [_table_section(frame, title, source, anchor) for frame, title, source, anchor in loaded]
    for csv_path, title in audits:
        anchor = _anchor("audit", title, used_ids)
        toc.append(f'<li><a href="#{_e(anchor)}">{_e(title)}</a></li>')
        body.append(_audit_section(csv_path, title, anchor))
    body.append("</section>")

    body.append('<section id="runs"><h2>Runs</h2>')
    if not grouped:
        body.append(_note("No runs were given."))
    for dataset in sorted(grouped):
        anchor = _anchor("dataset", dataset, used_ids)
        toc.append(f'<li><a href="#{_e(anchor)}">Dataset {_e(dataset)}</a></li>')
        body.append(f'<section id="{_e(anchor)}"><h2>Dataset {_e(dataset)}</h2>')
        for run in sorted(grouped[dataset], key=lambda r: str(r["model"])):
            body.append(_run_section(run, _anchor("run", f"{dataset}-{run['model']}", used_ids), n_pca_conditions))
        body.append(_distribution_section(dataset, grouped[dataset]))
        body.append("</section>")
    body.append("</section>")
    toc.append("</ul></nav>")

    document = "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            "<title>Reproduction report</title>",
            f"<style>{_CSS}</style></head><body>",
            "<h1>Reproduction report</h1>",
            *toc,
            *body,
            "</body></html>",
            "",
        ]
    )
    with atomic_path(out_html) as tmp:
        tmp.write_text(document, encoding="utf-8")


__all__ = ["DISTRIBUTION_METRICS", "build_report"]

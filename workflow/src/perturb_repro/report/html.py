"""Build the single, self-contained HTML reproduction report.

Self-contained means: figures are inline base64 PNG data URIs, CSS is inline, there is no
JavaScript, and the only links are in-page anchors. The file can be mailed or archived alone and
never shows a broken link or image.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import anndata as ad
import pandas as pd

from perturb_repro.errors import PipelineInputError
from perturb_repro.io import atomic_path, read_csv_checked
from perturb_repro.report import comparison, figures
from perturb_repro.report.comparison import leaderboard_section, subgroup_section
from perturb_repro.report.leaderboard import HIGHER, SUBGROUP_COLUMNS, leaderboard, metric_direction, subgroup_means
from perturb_repro.report.markup import anchor as _anchor
from perturb_repro.report.markup import esc as _e
from perturb_repro.report.markup import fmt_number as _fmt_number
from perturb_repro.report.markup import img as _img
from perturb_repro.report.markup import note as _note
from perturb_repro.report.markup import present as _present
from perturb_repro.report.markup import status_cell as _status_cell
from perturb_repro.tables.paper_table import OUTPUT_COLUMNS, STATUS_DESCRIPTIONS, STATUSES, format_value, status_counts
from perturb_repro.tables.seed_spread import SEED_COLUMNS, format_reproduced, format_tolerance

PathLike = str | os.PathLike

# Metrics whose per-condition spread is shown for every dataset (one box per model).
DISTRIBUTION_METRICS: tuple[str, ...] = ("pearson_delta", "mse", "discrimination_score_l1")

# Defaults of the config's report.leaderboard_metrics / subgroup_metrics / simple_baselines (the schema
# holds the same defaults for the pipeline; these serve direct callers and tests).
LEADERBOARD_METRICS: tuple[str, ...] = (
    "pearson_delta", "mse", "discrimination_score_l1", "mmd_gex", "cosine_logfc_rank", "rmse_average_rank", "mmd_gex_rank",
)
SUBGROUP_METRICS: tuple[str, ...] = ("pearson_delta", "mse")
SIMPLE_BASELINES: tuple[str, ...] = ("control_mean", "additive", "linear")

# Paper tables with more cells than this start collapsed.
OPEN_TABLE_MAX_ROWS = 40

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
nav.contents { position: sticky; top: 0; background: #fff; border-bottom: 1px solid #ddd; padding: 0.2em 0; z-index: 1; }
""" + "\n".join(f".status-{s} {{ background: {c}; }}" for s, c in _STATUS_COLORS.items())


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
    parts = ['<section id="provenance"><h2>Provenance</h2><details><summary>Config and data checksums, code version, packages</summary>']
    if provenance:
        parts.append(_render_value(provenance))
    else:
        parts.append(_note("No provenance was given to the report builder."))
    parts.append("</details></section>")
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
    text_columns = {c: str for c in OUTPUT_COLUMNS if c not in ("reproduced", "reproduced_std", "n_seeds", "difference", "tolerance")}
    frame = read_csv_checked(path, dtype=text_columns)
    for column in OUTPUT_COLUMNS:
        if column in SEED_COLUMNS and column not in frame.columns:  # a table written before replicate seeds
            frame[column] = math.nan
        elif column not in frame.columns:
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
    header = ["dataset", "run dataset", "model", "metric", "statistic", "reported", "reproduced", "difference", "tolerance",
              "status"]
    rows = []
    for row in frame.itertuples(index=False):
        rows.append(
            "<tr>"
            + "".join(f"<td>{_e(v)}</td>" for v in (row.dataset, row.run_dataset, row.model, row.metric, row.statistic))
            + f'<td class="num">{_e(row.reported)}</td>'
            + f'<td class="num">{_e(format_reproduced(row.reproduced, row.reproduced_std, row.n_seeds, row.reported))}</td>'
            + f'<td class="num">{_e(format_value(row.difference, row.reported, signed=True))}</td>'
            + f'<td class="num">{_e(format_tolerance(row.tolerance, row.tolerance_from))}</td>'
            + _status_cell(str(row.status))
            + "</tr>"
        )
    counts = ", ".join(f"{s} {n}" for s, n in status_counts(frame["status"]).items())
    # a long table (PRiMeFlow's run to 120 cells) would push everything after it off screen
    open_attr = " open" if len(frame) <= OPEN_TABLE_MAX_ROWS else ""
    return (
        f'<section id="{_e(anchor)}"><h3>{_e(title)}</h3>'
        + (f'<p class="muted">{_e(source)}</p>' if source else "")
        + f"<p>Status summary: {_e(counts)}</p>"
        + f"<details{open_attr}><summary>{len(frame)} cells</summary><table><tr>"
        + "".join(f"<th>{_e(h)}</th>" for h in header)
        + "</tr>"
        + "".join(rows)
        + "</table></details></section>"
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
    frame = read_csv_checked(metrics_csv, ("metric",))
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
    parts = [f'<section id="{_e(anchor)}"><details><summary>{_e(dataset)} / {_e(model)}</summary>']

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
    parts.append("</details></section>")
    return "\n".join(parts)


def _distribution_section(dataset: str, runs: Sequence[Mapping[str, Any]], baselines: Sequence[str]) -> str:
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
    pngs = []
    for metric in DISTRIBUTION_METRICS:
        higher = None if metric_direction(metric) is None else metric_direction(metric) == HIGHER
        png = figures.metric_distribution(available, metric, baselines=baselines, higher_is_better=higher)
        pngs.append(_img(png, f"{metric} distribution {dataset}"))
    parts.append('<div class="figgrid">' + "".join(pngs) + "</div>")
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


def _leaderboard_runs(runs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    return [
        {**run, "summaries": [run.get("metrics_csv"), run.get("perturbench_csv")]}
        for run in runs
    ]


def _nav(links: Sequence[tuple[str, str]]) -> str:
    items = " · ".join(f'<a href="#{_e(a)}">{_e(t)}</a>' for a, t in links)
    return f'<nav class="contents"><p><b>Contents:</b> {items}</p></nav>'


def build_report(
    out_html: PathLike,
    tables: Sequence[tuple[PathLike, str]],
    runs: Sequence[Mapping[str, Any]],
    provenance: Mapping[str, Any],
    n_pca_conditions: int = 3,
    audits: Sequence[tuple[PathLike, str]] = (),
    splits: Mapping[str, PathLike] | None = None,
    leaderboard_metrics: Sequence[str] = LEADERBOARD_METRICS,
    subgroup_metrics: Sequence[str] = SUBGROUP_METRICS,
    simple_baselines: Sequence[str] = SIMPLE_BASELINES,
) -> None:
    """Write the self-contained HTML reproduction report, atomically.

    Read top-down: per-dataset leaderboards (models x headline metrics, simple baselines marked, and
    whether each model beats the best of them), per-subgroup means, the paper tables with their
    statuses, per-condition distributions; then, collapsed, the per-run details and the provenance.

    Args:
        out_html: Destination file.
        tables: ``(csv_path, md_or_title)`` per paper table; ``csv_path`` is the output of
            :func:`perturb_repro.tables.paper_table.write_table`, ``md_or_title`` either its Markdown
            file (title and source are taken from it) or a title string.
        runs: One mapping per (dataset, model) run with keys ``dataset``, ``model`` and optional paths
            ``metrics_csv``, ``perturbench_csv``, ``per_condition_csv``, ``perturbench_per_condition_csv``,
            ``train_log_csv``, ``predictions``, ``truth``, ``pca``, plus optional ``model_type`` (the
            config entry's ``type``; default the model key) and ``control_label`` (else inferred from
            the truth's conditions). Missing or absent optional files are skipped with a visible note.
        provenance: Shown verbatim at the end (e.g. config file name, config sha256, data
            checksums, package versions); nested mappings and lists are rendered as tables/lists.
        n_pca_conditions: Number of test conditions (first in sorted order) drawn per run.
        audits: ``(csv_path, title)`` per claim audit (scFATE Table 1), shown after the tables.
        splits: Dataset -> its split.csv (test subgroups); a dataset without one has no subgroup table.
        leaderboard_metrics: Leaderboard columns (cell-eval and PerturBench metric names).
        subgroup_metrics: Metrics averaged per (model, subgroup).
        simple_baselines: Model types marked as simple baselines (the bar to beat).

    Raises:
        PipelineInputError: If a table CSV is missing or malformed, a run lacks dataset/model, or a
            present input file breaks its contract.
    """
    used_ids: set[str] = {"provenance", "summary", "tables", "runs", "comparison", "distributions"}
    loaded = []
    for csv_path, md_or_title in tables:
        frame = _read_table_csv(csv_path)
        title, source = _table_heading(csv_path, md_or_title)
        loaded.append((frame, title, source, _anchor("table", title, used_ids)))
    grouped = _group_runs(runs)
    splits = dict(splits or {})
    nav: list[tuple[str, str]] = []

    body = ['<section id="comparison"><h2>Model comparison</h2>']
    if not grouped:
        body.append(_note("No runs were given."))
    for dataset in sorted(grouped):
        dataset_runs = sorted(grouped[dataset], key=lambda r: str(r["model"]))
        baselines = [str(r["model"]) for r in dataset_runs if str(r.get("model_type") or r["model"]) in simple_baselines]
        board = leaderboard(_leaderboard_runs(dataset_runs), leaderboard_metrics, simple_baselines)
        anchor = _anchor("leaderboard", dataset, used_ids)
        nav.append((anchor, f"{dataset} leaderboard"))
        body.append(leaderboard_section(dataset, board, leaderboard_metrics, anchor))
        anchor = _anchor("subgroups", dataset, used_ids)
        nav.append((anchor, f"{dataset} subgroups"))
        if _present(splits.get(dataset)):
            per_condition = {
                str(r["model"]): [r.get("per_condition_csv"), r.get("perturbench_per_condition_csv")] for r in dataset_runs
            }
            means = subgroup_means(dataset, splits[dataset], per_condition, subgroup_metrics)
        else:
            means = pd.DataFrame(columns=list(SUBGROUP_COLUMNS))
        body.append(subgroup_section(dataset, means, baselines, anchor))
    body.append("</section>")

    nav += [("summary", "Paper tables")]
    body.append(_summary_section([f for f, *_ in loaded]))
    body.append('<section id="tables"><h2>Paper tables</h2>')
    if not loaded:
        body.append(_note("No paper tables were given."))
    body += [_table_section(frame, title, source, anchor) for frame, title, source, anchor in loaded]
    for csv_path, title in audits:
        anchor = _anchor("audit", title, used_ids)
        nav.append((anchor, "Claim audit"))
        body.append(_audit_section(csv_path, title, anchor))
    body.append("</section>")

    nav.append(("distributions", "Per-condition distributions"))
    body.append('<section id="distributions"><h2>Per-condition metric distributions</h2>')
    for dataset in sorted(grouped):
        baselines = [str(r["model"]) for r in grouped[dataset] if str(r.get("model_type") or r["model"]) in simple_baselines]
        body.append(_distribution_section(dataset, sorted(grouped[dataset], key=lambda r: str(r["model"])), baselines))
    body.append("</section>")

    nav.append(("runs", "Runs (details)"))
    body.append('<section id="runs"><h2>Runs: metrics, loss curves, PCA (collapsed)</h2>')
    if not grouped:
        body.append(_note("No runs were given."))
    for dataset in sorted(grouped):
        anchor = _anchor("dataset", dataset, used_ids)
        body.append(f'<section id="{_e(anchor)}"><h3>Dataset {_e(dataset)}</h3>')
        for run in sorted(grouped[dataset], key=lambda r: str(r["model"])):
            body.append(_run_section(run, _anchor("run", f"{dataset}-{run['model']}", used_ids), n_pca_conditions))
        body.append("</section>")
    body.append("</section>")
    nav.append(("provenance", "Provenance"))
    body.append(_provenance_section(provenance))

    document = "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            "<title>Reproduction report</title>",
            f"<style>{_CSS}{comparison.CSS}</style></head><body>",
            "<h1>Reproduction report</h1>",
            _nav(nav),
            *body,
            "</body></html>",
            "",
        ]
    )
    with atomic_path(out_html) as tmp:
        tmp.write_text(document, encoding="utf-8")


__all__ = ["DISTRIBUTION_METRICS", "LEADERBOARD_METRICS", "SIMPLE_BASELINES", "SUBGROUP_METRICS", "build_report"]

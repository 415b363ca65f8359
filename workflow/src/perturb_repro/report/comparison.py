"""The report's first sections: per-dataset leaderboards and per-subgroup means (HTML).

Data comes from :mod:`perturb_repro.report.leaderboard`; this module only lays it out. A leaderboard
cell reads ``0.512 ± 0.013 (5 seeds)`` where a run has seeds, ``0.512`` otherwise, and is coloured by
whether the model beats the best simple baseline of its dataset on that metric.
"""

from __future__ import annotations

import math
from typing import Sequence

import pandas as pd

from perturb_repro.report import figures
from perturb_repro.report.leaderboard import BEATS, HIGHER, LOSES, NOT_ASSESSED, TIE, WITHIN_NOISE, metric_direction
from perturb_repro.report.markup import esc, img, note

_VERDICT_CLASS = {BEATS: "beats", LOSES: "loses", WITHIN_NOISE: "noise", TIE: "noise", NOT_ASSESSED: "na"}

CSS = """
.figgrid { display: grid; grid-template-columns: repeat(auto-fill, minmax(560px, 1fr)); gap: 0.5em 1em; align-items: start; }
.figgrid img { margin: 0; }
tr.baseline td { background: #f3f3f3; font-style: italic; }
td.beats { background: #c7e9c0; } td.loses { background: #fcbba1; } td.noise { background: #fff3b0; } td.na { color: #555; }
.tag { white-space: nowrap; font-size: 0.75em; font-style: normal; border: 1px solid #999; border-radius: 3px; padding: 0 0.3em; margin-left: 0.4em; color: #444; }
td.best { font-weight: 700; }
details > summary { cursor: pointer; font-weight: 600; margin: 0.4em 0; }
"""


def _number(value: float) -> str:
    return "n/a" if not math.isfinite(value) else f"{value:.4g}"


def value_label(value: float, seed_std: float, n_seeds: int) -> str:
    """``mean ± std (n seeds)`` for a replicated run, the value alone for one run; ``n/a`` if undefined."""
    if not math.isfinite(value):
        return "n/a"
    if n_seeds >= 2 and math.isfinite(seed_std):
        return f"{value:.4g} ± {seed_std:.2g} ({n_seeds} seeds)"
    return _number(value)


def _row(tds: Sequence[str], is_baseline: bool) -> str:
    return ('<tr class="baseline">' if is_baseline else "<tr>") + "".join(tds) + "</tr>"


def _arrow(direction: str | None) -> str:
    return "" if direction is None else (" ↑" if direction == HIGHER else " ↓")


def _model_order(board: pd.DataFrame, metrics: Sequence[str]) -> list[str]:
    """Models best first on the first metric that has a direction; the rest after, by name."""
    for metric in metrics:
        rows = board[board["metric"] == metric]
        direction = rows["direction"].iloc[0] if len(rows) else None
        if direction is not None:
            ranked = rows.assign(key=rows["value"] * (-1 if direction == HIGHER else 1)).sort_values("key", na_position="last")
            order = list(ranked["model"])
            return order + sorted(set(board["model"]) - set(order))
    return sorted(set(board["model"]))


def leaderboard_section(dataset: str, board: pd.DataFrame, metrics: Sequence[str], anchor: str) -> str:
    """One dataset's leaderboard table and one bar figure per metric."""
    parts = [f'<section id="{esc(anchor)}"><h3>{esc(dataset)}: leaderboard</h3>']
    if board.empty:
        parts.append(note(f"No metrics for any run of {dataset}: leaderboard skipped."))
        return "\n".join(parts + ["</section>"])
    shown = [m for m in metrics if m in set(board["metric"])]
    absent = [m for m in metrics if m not in shown]
    order = _model_order(board, shown)
    cells = board.set_index(["model", "metric"])
    baselines = set(board.loc[board["baseline"], "model"])
    header = ["<th>model</th>"]
    for metric in shown:
        direction = cells.xs(metric, level="metric").iloc[0]["direction"]
        header.append(f"<th>{esc(metric)}{esc(_arrow(direction))}</th>")
    header.append("<th>beats best baseline on</th>")
    rows = []
    for model in order:
        is_baseline = model in baselines
        tds = [f"<td>{esc(model)}" + ('<span class="tag">simple baseline</span>' if is_baseline else "") + "</td>"]
        wins = assessed = 0
        for metric in shown:
            if (model, metric) not in cells.index:
                tds.append('<td class="na">—</td>')
                continue
            r = cells.loc[(model, metric)]
            verdict = r["beats_baseline"]
            wins += verdict == BEATS
            assessed += verdict != NOT_ASSESSED
            title = f"{verdict}: margin {r['margin']:+.3g} vs {r['best_baseline']}" if verdict != NOT_ASSESSED else verdict
            css = _VERDICT_CLASS[verdict] + (" best" if model == r["best_baseline"] else "")  # the bar to beat
            tds.append(
                f'<td class="num {css}" title="{esc(title)}">'
                f"{esc(value_label(r['value'], r['seed_std'], int(r['n_seeds'])))}</td>"
            )
        tds.append(f'<td class="num">{"—" if is_baseline else f"{wins} of {assessed}"}</td>')
        rows.append(_row(tds, is_baseline))
    parts.append("<table><tr>" + "".join(header) + "</tr>" + "".join(rows) + "</table>")
    parts.append(
        '<p class="muted">Cell colour: green = better than the best simple baseline (control mean, additive, '
        "linear; grey italic rows; its value in bold) on that metric, red = worse, yellow = within the model's std "
        "over seeds or a tie. "
        "↑/↓: higher/lower is better. Values are means over test conditions (and over seeds where there are "
        "seeds, ± their std).</p>"
    )
    if absent:
        parts.append(note(f"Not computed for any run of {dataset}: {', '.join(absent)}."))
    figs = []
    for metric in shown:
        rows_m = board[board["metric"] == metric]
        direction = rows_m["direction"].iloc[0]
        png = figures.leaderboard_bars(
            list(rows_m["model"]), list(rows_m["value"]), list(rows_m["seed_std"]), list(rows_m["baseline"]), metric,
            None if direction is None else direction == HIGHER, rows_m["best_baseline_value"].iloc[0],
        )
        figs.append(img(png, f"{metric} leaderboard {dataset}"))
    parts.append('<div class="figgrid">' + "".join(figs) + "</div></section>")
    return "\n".join(parts)


def subgroup_section(dataset: str, means: pd.DataFrame, baselines: Sequence[str], anchor: str) -> str:
    """One table per metric: models x test subgroups, the metric's mean over the subgroup's conditions."""
    parts = [f'<section id="{esc(anchor)}"><h3>{esc(dataset)}: per subgroup</h3>']
    if means.empty:
        parts.append(note(f"No per-condition metrics or no test subgroups for {dataset}: per-subgroup table skipped."))
        return "\n".join(parts + ["</section>"])
    for metric, frame in means.groupby("metric", sort=False):
        table = frame.pivot(index="model", columns="subgroup", values="mean")
        counts = frame.groupby("subgroup")["n_conditions"].max()
        direction = metric_direction(str(metric))
        best = table.max() if direction == HIGHER else table.min()
        header = "<th>model</th>" + "".join(f'<th>{esc(sg)}<br><span class="muted">n={int(counts[sg])}</span></th>' for sg in table.columns)
        rows = []
        for model, values in table.iterrows():
            is_baseline = model in baselines
            tds = [f"<td>{esc(model)}" + ('<span class="tag">simple baseline</span>' if is_baseline else "") + "</td>"]
            for sg, v in values.items():
                cls = "num best" if direction is not None and math.isfinite(v) and v == best[sg] else "num"
                tds.append(f'<td class="{cls}">{esc(_number(float(v)))}</td>')
            rows.append(_row(tds, is_baseline))
        parts.append(f"<h4>{esc(metric)}{esc(_arrow(direction))}: mean per subgroup</h4>")
        parts.append("<table><tr>" + header + "</tr>" + "".join(rows) + "</table>")
    parts.append(
        '<p class="muted">Subgroups from the dataset\'s split.csv (test rows): GEARS combo_seen0/1/2 and '
        "unseen_single; covariate transfer per held-out covariate value. n = test conditions with a value; "
        "bold = best per subgroup. The overall mean mixes these groups.</p></section>"
    )
    return "\n".join(parts)


__all__ = ["CSS", "leaderboard_section", "subgroup_section", "value_label"]


"""Replicate seeds: the aggregate over seeds recomputed from the per-seed files without our code (csv module +
statistics), its refusals, and the paper table's mean ± std and within-noise tolerance."""

import csv
import math
import statistics
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from perturb_repro.errors import PipelineInputError
from perturb_repro.scoring.replicates import aggregate_seed_files
from perturb_repro.tables.paper_table import load_table_spec, reproduce_table, write_table

STATS = ("mean", "std", "min", "q25", "median", "q75", "max")
METRICS = ("pearson_delta", "mse", "discrimination_score_l1")


def _write_seed(directory: Path, seed: int, rng, nan_metric: str | None = None, settings: str | None = None):
    """A per-seed summary (metrics.csv layout) and per-condition table (cell-eval layout, with a group column)."""
    directory.mkdir(parents=True)
    summary = pd.DataFrame({"metric": METRICS, "count": 4.0, "null_count": 0.0, "nan_count": 0.0})
    for stat in STATS:
        summary[stat] = rng.normal(size=len(METRICS))
    if nan_metric:
        summary.loc[summary["metric"] == nan_metric, "mean"] = np.nan
    if settings is not None:
        summary["settings"] = settings
    summary.to_csv(directory / "metrics.csv", index=False)
    per_condition = pd.DataFrame({"perturbation": ["A", "A", "NA", "B+C"], "cell_type": ["x", "y", "x", "y"]})
    for metric in METRICS:
        per_condition[metric] = rng.normal(size=4)
    per_condition.to_csv(directory / "per_condition.csv", index=False)
    return directory / "metrics.csv", directory / "per_condition.csv"


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _num(text: str) -> float:
    return float("nan") if text in ("", "NaN", "nan") else float(text)


def _same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-15)


@pytest.fixture()
def three_seeds(tmp_path):
    rng = np.random.default_rng(7)
    seeds = [0, 3, 11]
    files = [_write_seed(tmp_path / "seeds" / str(s), s, rng, nan_metric="mse" if s == 3 else None) for s in seeds]
    out = {k: tmp_path / f"{k}.csv" for k in ("summary", "per_condition", "by_seed")}
    aggregate_seed_files("celleval", seeds, [str(f[0]) for f in files], [str(f[1]) for f in files], ["cell_type"],
                         str(out["summary"]), str(out["per_condition"]), str(out["by_seed"]))
    return seeds, files, out


def test_aggregate_is_the_mean_and_std_over_seeds_of_each_statistic(three_seeds):
    seeds, files, out = three_seeds
    per_seed = [{row["metric"]: row for row in _rows(summary)} for summary, _ in files]
    aggregate = {row["metric"]: row for row in _rows(out["summary"])}
    assert list(aggregate) == list(METRICS)
    for metric in METRICS:
        row = aggregate[metric]
        assert int(row["n_seeds"]) == 3
        for stat in STATS:
            values = [_num(seed[metric][stat]) for seed in per_seed]
            if any(math.isnan(v) for v in values):  # one seed undefined -> the aggregate is undefined, never skipped
                expected_mean = expected_std = float("nan")
            else:
                expected_mean, expected_std = statistics.fmean(values), statistics.stdev(values)
            assert _same(_num(row[stat]), expected_mean), (metric, stat)
            assert _same(_num(row[f"{stat}_seed_std"]), expected_std), (metric, stat)
        assert _num(row["count"]) == 4.0
    assert math.isnan(_num(aggregate["mse"]["mean"])) and not math.isnan(_num(aggregate["mse"]["median"]))


def test_per_condition_is_the_mean_over_seeds_and_by_seed_keeps_every_value(three_seeds):
    seeds, files, out = three_seeds
    tables = [_rows(per_condition) for _, per_condition in files]
    merged = _rows(out["per_condition"])
    assert [(r["perturbation"], r["cell_type"]) for r in merged] == [("A", "x"), ("A", "y"), ("NA", "x"), ("B+C", "y")]
    for i, row in enumerate(merged):
        for metric in METRICS:
            assert _same(_num(row[metric]), statistics.fmean(_num(t[i][metric]) for t in tables))
    long = _rows(out["by_seed"])
    assert len(long) == 3 * len(METRICS)
    for seed, (summary, _) in zip(seeds, files):
        mine = [r for r in long if int(r["seed"]) == seed]
        original = _rows(summary)
        assert [r["metric"] for r in mine] == [r["metric"] for r in original]
        assert all(r["source"] == str(summary) for r in mine)
        for got, want in zip(mine, original):
            assert all(_same(_num(got[s]), _num(want[s])) for s in STATS)


def _aggregate(tmp_path, files, seeds):
    out = [str(tmp_path / n) for n in ("s.csv", "p.csv", "l.csv")]
    aggregate_seed_files("celleval", seeds, [str(f[0]) for f in files], [str(f[1]) for f in files], ["cell_type"], *out)
    return out


def test_seeds_that_do_not_line_up_are_refused_naming_the_file(tmp_path):
    rng = np.random.default_rng(0)
    a = _write_seed(tmp_path / "a", 0, rng)
    b = _write_seed(tmp_path / "b", 1, rng)
    pd.read_csv(b[0]).iloc[:-1].to_csv(b[0], index=False)  # a metric missing in one seed
    with pytest.raises(PipelineInputError, match=r"b/metrics\.csv.*metric"):
        _aggregate(tmp_path, [a, b], [0, 1])
    assert not list(tmp_path.glob("?.csv"))
    c = _write_seed(tmp_path / "c", 2, rng)
    pd.read_csv(c[1]).iloc[::-1].to_csv(c[1], index=False)  # conditions in another order
    with pytest.raises(PipelineInputError, match=r"c/per_condition\.csv.*perturbation"):
        _aggregate(tmp_path, [a, c], [0, 2])
    with pytest.raises(PipelineInputError, match="seeds"):
        _aggregate(tmp_path, [a, a], [0, 0])
    d = _write_seed(tmp_path / "d", 3, rng, settings='{"n_deg": 50, "seed": 0}')
    e = _write_seed(tmp_path / "e", 4, rng, settings='{"n_deg": 20, "seed": 0}')
    with pytest.raises(PipelineInputError, match=r"e/metrics\.csv.*settings"):
        _aggregate(tmp_path, [d, e], [3, 4])
    assert not list(tmp_path.glob("?.csv"))


def test_settings_may_differ_only_in_the_scorers_seed_which_the_aggregate_lists(tmp_path):
    """Each replicate's PerturBench ranks break ties with its own seed (scoring seed + run seed): the aggregate
    keeps the shared settings and lists the seeds; any other difference is refused (test above)."""
    import json

    rng = np.random.default_rng(1)
    files = [_write_seed(tmp_path / str(s), s, rng, settings=json.dumps({"n_deg": 50, "seed": 10 + s})) for s in (0, 1, 2)]
    summary, _, by_seed = _aggregate(tmp_path, files, [0, 1, 2])
    assert {json.loads(r["settings"])["seed"] == [10, 11, 12] for r in _rows(Path(summary))} == {True}
    assert {json.loads(r["settings"])["n_deg"] for r in _rows(Path(summary))} == {50}
    assert [json.loads(r["settings"])["seed"] for r in _rows(Path(by_seed))] == [10] * 3 + [11] * 3 + [12] * 3


# -- paper tables ---------------------------------------------------------------------------------------------

SPEC = """schema_version: 1
table: t
title: "T"
source: {seed: s.txt, section: "4"}
default_tolerance: 0.02
tolerance_source: "project tolerance for tests"
cells:
  - {dataset: d, model: rep, metric: mse, statistic: mean, reported: "0.500", reported_std: "0.080"}
  - {dataset: d, model: rep, metric: mse, statistic: median, reported: "0.500", reported_std: "0.080", tolerance: 0.01}
  - {dataset: d, model: rep, metric: pearson_delta, statistic: mean, reported: "0.500"}
  - {dataset: d, model: one, metric: mse, statistic: mean, reported: "0.500", reported_std: "0.001"}
"""


def _metrics_file(path: Path, rows: dict[str, dict[str, float]]) -> str:
    frame = pd.DataFrame([{"metric": m, **v} for m, v in rows.items()])
    frame.to_csv(path, index=False)
    return str(path)


def test_paper_table_prints_mean_std_and_says_which_tolerance_it_used(tmp_path):
    spec_path = tmp_path / "t.yaml"
    spec_path.write_text(SPEC)
    spec = load_table_spec(spec_path)
    base = {"count": 4, "std": 0.1, "min": 0.0, "q25": 0.0, "q75": 1.0, "max": 1.0}
    replicated = _metrics_file(tmp_path / "rep.csv", {
        "mse": {**base, "mean": 0.55, "median": 0.55, "n_seeds": 5, "mean_seed_std": 0.03, "median_seed_std": 0.02},
        "pearson_delta": {**base, "mean": 0.55, "median": 0.5, "n_seeds": 5, "mean_seed_std": 0.01, "median_seed_std": 0.0},
    })
    one_run = _metrics_file(tmp_path / "one.csv", {"mse": {**base, "mean": 0.5004, "median": 0.5}})
    frame = reproduce_table(spec, {("d", "rep"): replicated, ("d", "one"): one_run}, {"d": "paper"})
    # 0.05 off: within the paper's ± 0.080, though far outside the table's 0.02
    assert frame.loc[0, ["status", "tolerance", "tolerance_from"]].tolist() == ["within-noise", 0.08, "reported_std"]
    assert frame.loc[0, "reproduced_std"] == 0.03 and frame.loc[0, "n_seeds"] == 5
    # a cell's own tolerance wins over the printed std
    assert frame.loc[1, ["status", "tolerance", "tolerance_from"]].tolist() == ["mismatch", 0.01, "cell"]
    # no printed std: the table default
    assert frame.loc[2, ["status", "tolerance", "tolerance_from"]].tolist() == ["mismatch", 0.02, "table_default"]
    # one run: no spread, one seed
    assert math.isnan(frame.loc[3, "reproduced_std"]) and frame.loc[3, "n_seeds"] == 1
    assert frame.loc[3, "status"] == "match"
    csv_path, md_path = tmp_path / "t.csv", tmp_path / "t.md"
    write_table(frame, csv_path, md_path, spec)
    md = md_path.read_text()
    assert "| 0.55000 ± 0.03000 (5 seeds) | +0.05000 | 0.08 (paper ± std) | within-noise |" in md
    assert "| 0.50040 | +0.00040 | 0.001 (paper ± std) | match |" in md  # one seed: no ±
    assert "0.02 (table default)" in md and "0.01 (cell)" in md
    back = pd.read_csv(csv_path)
    assert back["tolerance_from"].tolist() == ["reported_std", "cell", "table_default", "reported_std"]
    from perturb_repro.report.html import _read_table_csv, _table_section  # the HTML report's table shows the same

    html = _table_section(_read_table_csv(csv_path), "T", None, "t")
    assert "0.55000 ± 0.03000 (5 seeds)" in html and "0.08 (paper ± std)" in html


def test_a_not_run_cell_has_no_seed_count_or_tolerance(tmp_path):
    spec_path = tmp_path / "t.yaml"
    spec_path.write_text(SPEC)
    frame = reproduce_table(load_table_spec(spec_path), {}, {})
    assert set(frame["status"]) == {"not-run"}
    assert frame["n_seeds"].isna().all() and frame["tolerance"].isna().all() and set(frame["tolerance_from"]) == {""}


def test_provenance_times_every_stage_of_a_replicate(tmp_path):
    from perturb_repro.provenance import _benchmark_seconds

    paths = []
    for stage, seconds in (("train", 5.0), ("sample", 2.0), ("score_celleval", 3.0)):
        for run, extra in (("fm_pca_ot_cfg1/seeds/1", 0.0), ("cellflow", 0.5)):
            path = tmp_path / "benchmarks" / stage / "norman_demo" / f"{run}.tsv"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(f"s\th:m:s\n{seconds + extra}\t0:00:05\n")
            paths.append(str(path))
    times = _benchmark_seconds(paths)
    assert times["train/fm_pca_ot_cfg1/seeds/1"] == 5.0 and times["sample/fm_pca_ot_cfg1/seeds/1"] == 2.0
    assert times["score_celleval/fm_pca_ot_cfg1/seeds/1"] == 3.0
    assert times["train/cellflow"] == 5.5  # one-run keys as before
    assert len(times) == 6

"""Tests for perturb_repro.tables.paper_table: spec loading, statuses, outputs, CLI."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pandas as pd
import pytest

from perturb_repro.errors import PipelineInputError
from seeds import needs_seeds, seed_path
from perturb_repro.tables.paper_table import (
    OUTPUT_COLUMNS,
    STATUSES,
    load_table_spec,
    main,
    reproduce_table,
    write_table,
)

REPO = Path(__file__).resolve().parents[1]
SPEC_PATH = REPO / "resources" / "paper_tables" / "cellflow_norman.yaml"
CARD_PATH = seed_path("cellflow_norman_card.txt")

METRIC_COLUMNS = ["metric", "count", "mean", "std", "min", "q25", "median", "q75", "max"]

SPEC_HEADER = """\
schema_version: 1
table: demo_table
title: "Demo table"
source: {seed: demo_card.txt, section: "Metrics"}
notes: ["a note"]
default_tolerance: 0.02
tolerance_source: "project tolerance for tests"
"""


def _write_spec(tmp_path: Path, cells: str, header: str = SPEC_HEADER) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(header + "cells:\n" + cells)
    return path


def _write_metrics(path: Path, rows: dict[str, dict[str, float]]) -> Path:
    frame = pd.DataFrame(
        [{"metric": metric, "count": 10, **stats} for metric, stats in rows.items()], columns=METRIC_COLUMNS
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(path, index=False)  # NaN -> empty field, as the metrics.csv contract says
    return path


# Six cells, one per status. Datasets: "paper_ds" runs at paper scale, "demo_ds" at demo scale,
# "missing_ds" was not run.
STATUS_CELLS = """\
  - {dataset: paper_ds, model: m, metric: pearson_delta, statistic: mean, reported: "0.5630"}
  - {dataset: paper_ds, model: m, metric: mse, statistic: median, reported: "0.0022"}
  - {dataset: paper_ds, model: m, metric: mae, statistic: max, reported: "0.0350"}
  - {dataset: paper_ds, model: m, metric: clustering_agreement, statistic: mean, reported: "0.3252"}
  - {dataset: paper_ds, model: m, metric: overlap_at_N, statistic: mean, reported: "0.0264"}
  - {dataset: missing_ds, model: m, metric: pearson_delta, statistic: mean, reported: "0.5630"}
  - {dataset: demo_ds, model: m, metric: pearson_delta, statistic: mean, reported: "0.5630"}
"""


@pytest.fixture()
def status_setup(tmp_path: Path):
    spec = load_table_spec(_write_spec(tmp_path, STATUS_CELLS))
    paper_metrics = _write_metrics(
        tmp_path / "paper" / "metrics.csv",
        {
            # 0.56304 prints as 0.5630 -> match at the printed precision
            "pearson_delta": {"mean": 0.56304, "median": 0.6, "max": 0.9},
            # 0.0122 vs 0.0022: off by 0.01 <= 0.02 -> within-noise
            "mse": {"mean": 0.01, "median": 0.0122, "max": 0.02},
            # 0.0950 vs 0.0350: off by 0.06 -> mismatch
            "mae": {"mean": 0.01, "median": 0.01, "max": 0.0950},
            # undefined metric stays NaN -> unverifiable
            "clustering_agreement": {"mean": math.nan, "median": math.nan, "max": math.nan},
            # overlap_at_N deliberately absent -> unverifiable
        },
    )
    demo_metrics = _write_metrics(
        tmp_path / "demo" / "metrics.csv", {"pearson_delta": {"mean": 0.1234, "median": 0.2, "max": 0.3}}
    )
    metrics_by_run = {
        ("run_paper", "m"): str(paper_metrics),
        ("run_demo", "m"): str(demo_metrics),
        ("run_missing", "m"): None,
    }
    scale = {"run_paper": "paper", "run_demo": "demo"}
    mapping = {"paper_ds": "run_paper", "demo_ds": "run_demo", "missing_ds": "run_missing"}
    return spec, metrics_by_run, scale, mapping


def test_every_status_is_produced(status_setup) -> None:
    spec, metrics_by_run, scale, mapping = status_setup
    frame = reproduce_table(spec, metrics_by_run, scale, mapping)
    assert list(frame.columns) == list(OUTPUT_COLUMNS)
    assert frame["status"].tolist() == [
        "match",
        "within-noise",
        "mismatch",
        "unverifiable",
        "unverifiable",
        "not-run",
        "not-comparable",
    ]
    assert set(frame["status"]) == set(STATUSES)
    assert frame["run_dataset"].tolist()[:1] == ["run_paper"]
    assert frame.loc[0, "reproduced"] == pytest.approx(0.56304)
    assert frame.loc[0, "difference"] == pytest.approx(0.00004)
    assert frame.loc[1, "difference"] == pytest.approx(0.01)
    # undefined stays NaN, never 0
    assert math.isnan(frame.loc[3, "reproduced"]) and math.isnan(frame.loc[3, "difference"])
    # demo scale: value shown, not compared
    assert frame.loc[6, "reproduced"] == pytest.approx(0.1234)
    assert math.isnan(frame.loc[6, "difference"])
    # reported keeps its printed form
    assert frame["reported"].tolist()[0] == "0.5630"


def test_match_uses_printed_precision(tmp_path: Path) -> None:
    cells = """\
  - {dataset: d, model: m, metric: a, statistic: mean, reported: "1.0000"}
  - {dataset: d, model: m, metric: b, statistic: mean, reported: "0.5630"}
  - {dataset: d, model: m, metric: c, statistic: mean, reported: "0.5630", tolerance: 0.0}
"""
    spec = load_table_spec(_write_spec(tmp_path, cells))
    metrics = _write_metrics(
        tmp_path / "metrics.csv",
        {"a": {"mean": 0.99996}, "b": {"mean": 0.56305000001}, "c": {"mean": 0.5636}},
    )
    frame = reproduce_table(spec, {("d", "m"): str(metrics)}, {"d": "paper"})
    # 0.99996 prints as 1.0000; 0.56305000001 prints as 0.5631 (not a match, but within noise);
    # 0.5636 with a per-cell tolerance of 0 is a mismatch
    assert frame["status"].tolist() == ["match", "within-noise", "mismatch"]


def test_perturbench_metrics_are_looked_up_beside_cell_eval_metrics(tmp_path: Path) -> None:
    """PRiMeFlow's tables print PerturBench metrics (perturbench.csv), the CellFlow card cell-eval's (metrics.csv)."""
    cells = """\
  - {dataset: d, model: m, metric: pearson_delta, statistic: mean, reported: "0.5630"}
  - {dataset: d, model: m, metric: mmd_gex, statistic: mean, reported: "0.0120"}
"""
    spec = load_table_spec(_write_spec(tmp_path, cells))
    cell_eval = _write_metrics(tmp_path / "metrics.csv", {"pearson_delta": {"mean": 0.5630}})
    perturbench = _write_metrics(tmp_path / "perturbench.csv", {"mmd_gex": {"mean": 0.0120}})
    frame = reproduce_table(spec, {("d", "m"): [str(cell_eval), str(perturbench)]}, {"d": "paper"})
    assert frame["reproduced"].tolist() == [0.5630, 0.0120]
    assert frame["status"].tolist() == ["match", "match"]
    clash = _write_metrics(tmp_path / "clash.csv", {"mmd_gex": {"mean": 0.5}})
    with pytest.raises(PipelineInputError, match="mmd_gex"):
        reproduce_table(spec, {("d", "m"): [str(perturbench), str(clash)]}, {"d": "paper"})


def test_tolerance_boundary_is_inclusive(tmp_path: Path) -> None:
    spec = load_table_spec(
        _write_spec(tmp_path, '  - {dataset: d, model: m, metric: a, statistic: mean, reported: "0.5630"}\n')
    )
    metrics = _write_metrics(tmp_path / "metrics.csv", {"a": {"mean": 0.5830}})
    frame = reproduce_table(spec, {("d", "m"): str(metrics)}, {"d": "paper"})
    assert frame["status"].tolist() == ["within-noise"]


def test_missing_scale_and_missing_file_are_errors(status_setup, tmp_path: Path) -> None:
    spec, metrics_by_run, scale, mapping = status_setup
    with pytest.raises(PipelineInputError, match="run_paper"):
        reproduce_table(spec, metrics_by_run, {"run_demo": "demo"}, mapping)
    broken = dict(metrics_by_run)
    broken[("run_paper", "m")] = str(tmp_path / "nope.csv")
    with pytest.raises(PipelineInputError, match="does not exist"):
        reproduce_table(spec, broken, scale, mapping)


def test_markdown_shows_na_and_summary(status_setup, tmp_path: Path) -> None:
    spec, metrics_by_run, scale, mapping = status_setup
    frame = reproduce_table(spec, metrics_by_run, scale, mapping)
    csv_path, md_path = tmp_path / "out" / "t.csv", tmp_path / "out" / "t.md"
    write_table(frame, csv_path, md_path, spec)
    md = md_path.read_text()
    assert md.startswith("# Demo table")
    assert "demo_card.txt" in md
    rows = [line for line in md.splitlines() if line.startswith("| ") and "clustering_agreement" in line]
    assert len(rows) == 1 and "| n/a |" in rows[0] and "unverifiable" in rows[0]
    assert "| 0.563040 |" in md  # printed precision (4) + 2 digits
    for status in STATUSES:
        assert f"`{status}`" in md  # legend
    summary = [line for line in md.splitlines() if line.startswith("Status summary")]
    assert summary == [
        "Status summary (7 cells): match 1, within-noise 1, mismatch 1, unverifiable 2, not-run 1, not-comparable 1"
    ]
    back = pd.read_csv(csv_path, dtype={"reported": str})
    assert back["reported"].tolist()[0] == "0.5630"
    assert back["status"].tolist() == frame["status"].tolist()
    assert math.isnan(back.loc[3, "reproduced"])


@pytest.mark.parametrize(
    ("cell", "field"),
    [
        ('{dataset: d, model: m, metric: a, statistic: mean}', "cells[0].reported"),
        ('{dataset: d, model: m, metric: a, statistic: mode, reported: "0.1"}', "cells[0].statistic"),
        ('{dataset: d, model: m, metric: a, statistic: mean, reported: 0.5630}', "cells[0].reported"),
        ('{dataset: d, model: m, metric: a, statistic: mean, reported: "abc"}', "cells[0].reported"),
        ('{dataset: d, model: m, metric: a, statistic: mean, reported: "0.1", tolerance: -1}', "cells[0].tolerance"),
        ('{dataset: d, model: m, metric: a, statistic: mean, reported: "0.1", colour: red}', "cells[0].colour"),
        ('{model: m, metric: a, statistic: mean, reported: "0.1"}', "cells[0].dataset"),
    ],
)
def test_bad_cell_names_file_and_field(tmp_path: Path, cell: str, field: str) -> None:
    path = _write_spec(tmp_path, f"  - {cell}\n")
    with pytest.raises(PipelineInputError) as info:
        load_table_spec(path)
    assert info.value.field == field
    assert str(path) in str(info.value)


def test_bad_top_level(tmp_path: Path) -> None:
    header = SPEC_HEADER.replace("default_tolerance: 0.02\n", "")
    with pytest.raises(PipelineInputError) as info:
        load_table_spec(_write_spec(tmp_path, '  - {dataset: d, model: m, metric: a, statistic: mean, reported: "1"}\n', header))
    assert info.value.field == "default_tolerance"
    dup = '  - {dataset: d, model: m, metric: a, statistic: mean, reported: "1"}\n' * 2
    with pytest.raises(PipelineInputError, match="duplicates"):
        load_table_spec(_write_spec(tmp_path, dup))
    (tmp_path / "broken.yaml").write_text("cells: [\n")
    with pytest.raises(PipelineInputError, match="not valid YAML"):
        load_table_spec(tmp_path / "broken.yaml")


def test_shipped_spec_has_all_30_cells() -> None:
    spec = load_table_spec(SPEC_PATH)
    # the card's run (its embedding), the same checkpoint with the card's solver, the correct-embedding run: same numbers
    assert len(spec.cells) == 3 * 30
    models = ("cellflow", "cellflow_tsit5", "cellflow_fixed_esm2")
    assert {(c.dataset, c.model) for c in spec.cells} == {("norman", m) for m in models}
    by_model = {m: [(c.metric, c.statistic, c.reported) for c in spec.cells if c.model == m] for m in models}
    assert by_model["cellflow"] == by_model["cellflow_tsit5"] == by_model["cellflow_fixed_esm2"]
    assert {c.statistic for c in spec.cells} == {"mean", "median", "max"}
    assert len({c.metric for c in spec.cells}) == 10
    assert all(c.decimals == 4 for c in spec.cells)
    assert spec.default_tolerance == 0.02


def _parse_card_table(text: str) -> dict[tuple[str, str], str]:
    """Parse the card's 'Test set metrics (cell-eval)' table independently of the spec loader."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "Test set metrics (cell-eval)")
    header_at = next(i for i in range(start + 1, len(lines)) if lines[i].split())
    header = lines[header_at].split()
    assert header == ["metric", "mean", "median", "max"]
    values: dict[tuple[str, str], str] = {}
    number = re.compile(r"^-?\d+\.\d+$")
    for line in lines[header_at + 1 :]:
        tokens = line.split()
        if not tokens:
            if values:
                break
            continue
        if len(tokens) != 4 or not all(number.match(t) for t in tokens[1:]):
            break
        for stat, value in zip(header[1:], tokens[1:]):
            values[(tokens[0], stat)] = value
    return values


@needs_seeds
def test_spec_matches_card_verbatim() -> None:
    card = _parse_card_table(CARD_PATH.read_text(encoding="utf-8"))
    assert len(card) == 30
    spec = load_table_spec(SPEC_PATH)
    for model in ("cellflow", "cellflow_tsit5", "cellflow_fixed_esm2"):
        ours = {(c.metric, c.statistic): c.reported for c in spec.cells if c.model == model}
        assert ours == card, model
    assert spec.source_seed == CARD_PATH.name


def test_cli_writes_outputs_and_rejects_bad_input(status_setup, tmp_path: Path, capsys) -> None:
    spec, metrics_by_run, scale, mapping = status_setup
    argv = ["--spec", spec.path, "--csv", str(tmp_path / "c.csv"), "--md", str(tmp_path / "c.md")]
    for (run, model), path in metrics_by_run.items():
        argv += ["--metrics", f"{run}:{model}={path or ''}"]
    for run, s in scale.items():
        argv += ["--scale", f"{run}={s}"]
    for paper, run in mapping.items():
        argv += ["--map", f"{paper}={run}"]
    assert main(argv) == 0
    assert (tmp_path / "c.csv").exists() and (tmp_path / "c.md").exists()
    assert pd.read_csv(tmp_path / "c.csv")["status"].nunique() == len(STATUSES)

    bad = argv + ["--scale", "run_paper=huge"]
    assert main(bad) == 2
    assert "--scale" in capsys.readouterr().err
    bad_metrics = argv + ["--metrics", "no_colon=path"]
    assert main(bad_metrics) == 2
    assert "RUN_DATASET:MODEL" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# Schema additions: blank cells, reported_std, assumptions (all optional, backwards compatible)

BLANK_CELLS = """\
  - {dataset: paper_ds, model: m, metric: pearson_delta, statistic: mean, reported: "0.5630", reported_std: "0.012"}
  - {dataset: paper_ds, model: m, metric: mse, statistic: mean, reported: "", blank: true}
  - {dataset: paper_ds, model: m, metric: mae, statistic: mean, reported: "N/A", blank: true}
  - {dataset: paper_ds, model: m, metric: overlap_at_N, statistic: mean, reported: "", blank: true}
  - {dataset: missing_ds, model: m, metric: mse, statistic: mean, reported: "", blank: true}
"""

ASSUMPTIONS = """\
assumptions:
  - claim: "This is Table 7."
    evidence: "Seventh in document order; columns MMD GEX | DEG recall."
"""


def test_blank_cells_are_recorded_not_compared(tmp_path: Path) -> None:
    spec = load_table_spec(_write_spec(tmp_path, BLANK_CELLS, SPEC_HEADER + ASSUMPTIONS))
    assert [c.blank for c in spec.cells] == [False, True, True, True, True]
    assert [c.reported for c in spec.cells] == ["0.5630", "", "N/A", "", ""]  # printed text verbatim
    assert spec.cells[0].reported_std == "0.012" and spec.cells[1].reported_std is None
    assert math.isnan(spec.cells[1].reported_value) and spec.cells[1].decimals == 0
    assert len(spec.blank_cells) == 4
    assert [(a.claim, a.evidence) for a in spec.assumptions] == [
        ("This is Table 7.", "Seventh in document order; columns MMD GEX | DEG recall.")
    ]

    metrics = _write_metrics(
        tmp_path / "paper" / "metrics.csv",
        {"pearson_delta": {"mean": 0.56304}, "mse": {"mean": 0.0123456789}, "mae": {"mean": 0.5}},
    )
    frame = reproduce_table(
        spec, {("run_paper", "m"): str(metrics)}, {"run_paper": "paper"}, {"paper_ds": "run_paper", "missing_ds": "run_missing"}
    )
    assert frame["status"].tolist() == ["match", "not-comparable", "not-comparable", "not-comparable", "not-run"]
    assert frame["reported"].tolist() == ["0.5630", "(blank)", "(N/A)", "(blank)", "(blank)"]
    # our value is shown for information; no difference is computed against a blank
    assert frame.loc[1, "reproduced"] == pytest.approx(0.0123456789)
    assert frame["difference"].iloc[1:].isna().all()
    assert math.isnan(frame.loc[3, "reproduced"])  # metric absent: still NaN, never 0

    csv_path, md_path = tmp_path / "out" / "t.csv", tmp_path / "out" / "t.md"
    write_table(frame, csv_path, md_path, spec)
    # the labels survive pandas' NA parsing ("" and "N/A" would come back as NaN)
    back = pd.read_csv(csv_path, dtype={"reported": str})
    assert back["reported"].tolist() == frame["reported"].tolist()
    md = md_path.read_text()
    assert "4 of 5 cells are blank in the source" in md
    assert "This is Table 7. Evidence: Seventh in document order; columns MMD GEX \\| DEG recall." in md
    blank_row = next(line for line in md.splitlines() if line.startswith("| paper_ds") and "| mse |" in line)
    assert "| (blank) | 0.0123457 | n/a |  | not-comparable |" in blank_row  # 6 significant digits, no printed precision


def test_format_value_for_blank_cells() -> None:
    from perturb_repro.tables.paper_table import format_value

    assert format_value(0.0123456789, "(blank)") == "0.0123457"
    assert format_value(0.0123456789, "(N/A)", signed=True) == "+0.0123457"
    assert format_value(float("nan"), "(blank)") == "n/a"
    assert format_value(0.56304, "0.5630") == "0.563040"  # numeric cells unchanged


@pytest.mark.parametrize(
    ("cell", "field", "message"),
    [
        ('{dataset: d, model: m, metric: a, statistic: mean, reported: ""}', "cells[0].reported", "blank: true"),
        ('{dataset: d, model: m, metric: a, statistic: mean, reported: "0.5", blank: true}', "cells[0].reported", "is a number"),
        ('{dataset: d, model: m, metric: a, statistic: mean, reported: "", blank: yes_please}', "cells[0].blank", "true or false"),
        ('{dataset: d, model: m, metric: a, statistic: mean, reported: "", blank: true, tolerance: 0.1}', "cells[0].tolerance", "blank"),
        ('{dataset: d, model: m, metric: a, statistic: mean, reported: "", blank: true, reported_std: "0.1"}', "cells[0].reported_std", "blank"),
        ('{dataset: d, model: m, metric: a, statistic: mean, reported: "0.5", reported_std: 0.1}', "cells[0].reported_std", "quoted"),
        ('{dataset: d, model: m, metric: a, statistic: mean, reported: "0.5", reported_std: "-0.1"}', "cells[0].reported_std", "non-negative"),
        ('{dataset: d, model: m, metric: a, statistic: mean, reported: "N/A"}', "cells[0].reported", "fixed-point"),
    ],
)
def test_bad_blank_and_std_cells(tmp_path: Path, cell: str, field: str, message: str) -> None:
    path = _write_spec(tmp_path, f"  - {cell}\n")
    with pytest.raises(PipelineInputError, match=message) as info:
        load_table_spec(path)
    assert info.value.field == field


@pytest.mark.parametrize(
    ("block", "field"),
    [
        ("assumptions: just a string\n", "assumptions"),
        ("assumptions:\n  - a bare string\n", "assumptions[0]"),
        ('assumptions:\n  - {claim: "c"}\n', "assumptions[0].evidence"),
        ('assumptions:\n  - {claim: "c", evidence: "e", source: "x"}\n', "assumptions[0].source"),
    ],
)
def test_bad_assumptions(tmp_path: Path, block: str, field: str) -> None:
    path = _write_spec(tmp_path, '  - {dataset: d, model: m, metric: a, statistic: mean, reported: "1"}\n', SPEC_HEADER + block)
    with pytest.raises(PipelineInputError) as info:
        load_table_spec(path)
    assert info.value.field == field


def test_spec_without_additions_is_unchanged() -> None:
    spec = load_table_spec(SPEC_PATH)
    assert spec.assumptions == () and spec.blank_cells == ()
    assert all(not c.blank and c.reported_std is None and c.reported_label == c.reported for c in spec.cells)


# --------------------------------------------------------------------------------------------------
# The key checks are a JSON schema (workflow/schemas/paper_table.schema.yaml), not code


PAPER_SCHEMA = REPO / "workflow" / "schemas" / "paper_table.schema.yaml"


def _schema_validator():
    import jsonschema
    import yaml

    schema = yaml.safe_load(PAPER_SCHEMA.read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def test_every_shipped_paper_spec_is_valid_under_the_schema_file() -> None:
    # plain jsonschema against the schema file, independent of our loader
    import yaml

    validator = _schema_validator()
    specs = [p for p in sorted((REPO / "resources" / "paper_tables").glob("*.yaml")) if p.stem not in ("scfate_table1", "primeflow_hparams")]
    assert len(specs) >= 10
    for path in specs:
        errors = list(validator.iter_errors(yaml.safe_load(path.read_text(encoding="utf-8"))))
        assert not errors, (path.name, errors[0].message)


@pytest.mark.parametrize(
    "cell",
    [
        '{dataset: d, model: m, metric: a, statistic: mode, reported: "0.1"}',
        '{dataset: d, model: m, metric: a, statistic: mean, reported: 0.5630}',
        '{dataset: d, model: m, metric: a, statistic: mean, reported: "N/A"}',
        '{dataset: d, model: m, metric: a, statistic: mean, reported: "0.5", blank: true}',
        '{dataset: d, model: m, metric: a, statistic: mean, reported: "", blank: true, tolerance: 0.1}',
        '{dataset: d, model: m, metric: a, statistic: mean, reported: "0.5", reported_std: "-0.1"}',
    ],
)
def test_schema_file_itself_rejects_bad_cells(tmp_path: Path, cell: str) -> None:
    # the rule lives in the schema: jsonschema alone (no perturb_repro code) rejects the cell
    import yaml

    doc = yaml.safe_load(_write_spec(tmp_path, f"  - {cell}\n").read_text())
    assert not _schema_validator().is_valid(doc)


def test_statistics_and_cell_fields_come_from_the_schema() -> None:
    import dataclasses

    import yaml

    from perturb_repro.tables.paper_spec import STATISTICS, CellSpec

    cell = yaml.safe_load(PAPER_SCHEMA.read_text(encoding="utf-8"))["$defs"]["cell"]
    assert list(STATISTICS) == cell["properties"]["statistic"]["enum"]
    assert {f.name for f in dataclasses.fields(CellSpec)} == set(cell["properties"])


def test_non_finite_tolerance_is_rejected(tmp_path: Path) -> None:
    # JSON Schema's minimum lets .nan through; the loader must not
    path = _write_spec(tmp_path, '  - {dataset: d, model: m, metric: a, statistic: mean, reported: "0.1", tolerance: .nan}\n')
    with pytest.raises(PipelineInputError, match="finite") as info:
        load_table_spec(path)
    assert info.value.field == "cells[0].tolerance"


def test_markdown_table_helper_escapes_and_aligns() -> None:
    from perturb_repro.tables.markdown import md_table, ordered_counts

    lines = md_table(["a", "b"], "lr", [["x|y", float("nan")], [None, 1.5]])
    assert lines == ["| a | b |", "|---|---:|", "| x\\|y |  |", "|  | 1.5 |"]
    with pytest.raises(ValueError):
        md_table(["a"], "lr", [])
    assert ordered_counts(["b", "z", "b"], ["a", "b"]) == {"a": 0, "b": 2, "z": 1}

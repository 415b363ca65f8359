"""Tests for perturb_repro.report: figures as PNG bytes and the self-contained HTML report."""

from __future__ import annotations

import base64
import math
from html.parser import HTMLParser
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from perturb_repro.errors import PipelineInputError
from perturb_repro.report import build_report, loss_curve, metric_distribution, pca_predicted_vs_real
from perturb_repro.tables.paper_table import STATUSES

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
N_GENES = 12
CONDITIONS = ["GENE_C", "GENE_A", "GENE_B+GENE_D", "GENE_E"]  # unsorted on purpose


def _adata(rng: np.random.Generator, control: str, n_per: int, shift: float, sparse: bool = False) -> ad.AnnData:
    labels = [control] * n_per + [c for c in CONDITIONS for _ in range(n_per)]
    x = rng.normal(size=(len(labels), N_GENES)).astype(np.float32)
    x[n_per:] += shift
    adata = ad.AnnData(
        X=sp.csr_matrix(x) if sparse else x,
        obs=pd.DataFrame({"condition": pd.Categorical(labels)}, index=[f"c{i}" for i in range(len(labels))]),
        var=pd.DataFrame(index=[f"g{j}" for j in range(N_GENES)]),
    )
    return adata


@pytest.fixture()
def fixture_files(tmp_path: Path) -> dict[str, Path]:
    rng = np.random.default_rng(1)
    files: dict[str, Path] = {}

    truth = _adata(rng, "ctrl", 15, 1.0)
    truth.write_h5ad(files.setdefault("truth", tmp_path / "test_truth.h5ad"))
    _adata(rng, "ctrl", 10, 0.8, sparse=True).write_h5ad(files.setdefault("pred", tmp_path / "predictions.h5ad"))

    components = np.linalg.qr(rng.normal(size=(N_GENES, 3)))[0].T  # orthonormal rows
    np.savez(files.setdefault("pca", tmp_path / "pca.npz"), components=components, mean=np.zeros(N_GENES),
             explained_variance=np.array([3.0, 2.0, 1.0]))

    steps = np.arange(0, 500, 5)
    pd.DataFrame({"step": steps, "loss": 1.0 / (1 + steps / 50) + rng.normal(0, 0.02, len(steps)),
                  "lr": 1e-4}).to_csv(files.setdefault("train_log", tmp_path / "train_log.csv"), index=False)

    pd.DataFrame(
        [
            {"metric": "pearson_delta", "count": 4, "mean": 0.5, "std": 0.1, "min": 0.3, "q25": 0.4,
             "median": 0.5, "q75": 0.6, "max": 0.7},
            {"metric": "clustering_agreement", "count": 0, "mean": math.nan, "std": math.nan, "min": math.nan,
             "q25": math.nan, "median": math.nan, "q75": math.nan, "max": math.nan},
        ]
    ).to_csv(files.setdefault("metrics", tmp_path / "metrics.csv"), index=False)

    for name, offset in (("per_cond_a", 0.0), ("per_cond_b", 0.1)):
        pd.DataFrame(
            {
                "perturbation": CONDITIONS,
                "pearson_delta": [0.5 + offset, 0.6, math.nan, 0.7],
                "mse": [0.01, 0.02, 0.03, math.nan],
                "discrimination_score_l1": [0.8, 0.9, 1.0, 0.7],
            }
        ).to_csv(files.setdefault(name, tmp_path / f"{name}.csv"), index=False)

    # a paper table with every status, NaN reproduced values included
    pd.DataFrame(
        {
            "dataset": ["norman"] * 6,
            "run_dataset": ["norman_demo"] * 6,
            "model": ["cellflow"] * 6,
            "metric": ["pearson_delta", "mse", "mae", "clustering_agreement", "overlap_at_N", "precision_at_N"],
            "statistic": ["mean"] * 6,
            "reported": ["0.5630", "0.0032", "0.0156", "0.3252", "0.0264", "0.0936"],
            "reproduced": [0.56304, 0.0132, 0.2, math.nan, math.nan, 0.05],
            "difference": [0.00004, 0.01, 0.1844, math.nan, math.nan, math.nan],
            "status": list(STATUSES),
        }
    ).to_csv(files.setdefault("table", tmp_path / "table.csv"), index=False)
    (tmp_path / "table.md").write_text("# CellFlow <Norman> table\n\nSource: card.txt, section \"x\"\n")
    files["table_md"] = tmp_path / "table.md"
    return files


class _Collector(HTMLParser):
    """Collect the tags and texts the assertions need."""

    def __init__(self) -> None:
        super().__init__()
        self.imgs: list[dict[str, str | None]] = []
        self.hrefs: list[str] = []
        self.ids: set[str] = set()
        self.external: list[str] = []
        self.status_cells: list[tuple[str, str]] = []  # (class, text)
        self.td_texts: list[str] = []
        self._td_class: str | None = None
        self._in_td = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if "id" in a and a["id"]:
            self.ids.add(a["id"])
        if tag == "img":
            self.imgs.append(a)
        if "href" in a and a["href"] is not None:
            self.hrefs.append(a["href"])
        if tag in ("script", "link", "iframe") or (tag != "img" and "src" in a):
            self.external.append(tag)
        if tag == "td":
            self._in_td, self._td_class = True, a.get("class")

    def handle_endtag(self, tag: str) -> None:
        if tag == "td":
            self._in_td = False

    def handle_data(self, data: str) -> None:
        if self._in_td:
            self.td_texts.append(data)
            if self._td_class and "status" in self._td_class.split():
                self.status_cells.append((self._td_class, data))


def _runs(files: dict[str, Path], tmp_path: Path) -> list[dict]:
    return [
        {
            "dataset": "norman_demo", "model": "cellflow", "metrics_csv": files["metrics"],
            "per_condition_csv": files["per_cond_a"], "train_log_csv": files["train_log"],
            "predictions": files["pred"], "truth": files["truth"], "pca": files["pca"],
        },
        {
            # a baseline: no training log, and a per-condition file that was never produced
            "dataset": "norman_demo", "model": "mean_baseline", "metrics_csv": files["metrics"],
            "per_condition_csv": files["per_cond_b"], "train_log_csv": None,
            "predictions": files["pred"], "truth": files["truth"], "pca": tmp_path / "missing_pca.npz",
        },
        {"dataset": "other <ds>", "model": "scgpt", "per_condition_csv": tmp_path / "absent.csv"},
    ]


def test_report_is_self_contained_and_complete(fixture_files: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "report" / "report.html"
    provenance = {
        "config_file": "config/config.yaml",
        "config_sha256": "ab" * 32,
        "data_checksums": {"norman.h5ad": "cd" * 32},
        "package_versions": {"cell-eval": "0.8.2", "anndata": "0.12.19"},
    }
    build_report(
        out,
        [(fixture_files["table"], str(fixture_files["table_md"])), (fixture_files["table"], "Same table, by title")],
        _runs(fixture_files, tmp_path),
        provenance,
        n_pca_conditions=2,
    )
    text = out.read_text(encoding="utf-8")
    parser = _Collector()
    parser.feed(text)

    # images: all inline PNGs (1 leaderboard bar chart: the fixture's metrics.csv has one headline metric,
    # loss curve, one PCA figure, 3 distributions)
    assert len(parser.imgs) == 6
    for img in parser.imgs:
        src = img["src"] or ""
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1], validate=True).startswith(PNG_MAGIC)
        assert img.get("alt")

    # nothing external, and every link is an in-page anchor that exists
    assert parser.external == []
    assert parser.hrefs
    for href in parser.hrefs:
        assert href.startswith("#"), href
        assert href[1:] in parser.ids, href
    assert "<script" not in text.lower()

    # every status is rendered in a cell carrying its own CSS class
    seen = {(cls, data) for cls, data in parser.status_cells}
    for status in STATUSES:
        assert (f"status status-{status}", status) in seen
        assert f".status-{status} {{" in text  # the class is styled

    # NaN reproduced values render as n/a, never 0; printed precision + 2 digits
    assert parser.td_texts.count("n/a") >= 2 * 2  # 2 NaN reproduced x 2 tables (+ differences)
    assert "0.563040" in parser.td_texts
    assert "0.000000" not in parser.td_texts

    # provenance, escaping and skip notes
    assert "ab" * 32 in text and "cell-eval" in text and "config/config.yaml" in text
    assert "CellFlow &lt;Norman&gt; table" in text and "<Norman>" not in text
    assert "other &lt;ds&gt;" in text
    assert "No training log" in text
    assert "PCA panels skipped: missing pca" in text
    assert "No per-condition metrics for scgpt" in text
    # status summary across both tables: each status twice
    assert "12 reported numbers across 2 table(s)" in text


def test_report_rejects_missing_table(tmp_path: Path) -> None:
    with pytest.raises(PipelineInputError, match="table CSV does not exist"):
        build_report(tmp_path / "r.html", [(tmp_path / "nope.csv", "t")], [], {})
    assert not (tmp_path / "r.html").exists()


def test_figures_return_png(fixture_files: dict[str, Path]) -> None:
    assert loss_curve(fixture_files["train_log"], "t").startswith(PNG_MAGIC)
    png = pca_predicted_vs_real(fixture_files["pred"], fixture_files["truth"], fixture_files["pca"],
                                ["GENE_A", "not_in_data"], "ctrl")
    assert png.startswith(PNG_MAGIC)
    png = metric_distribution({"a": fixture_files["per_cond_a"], "b": fixture_files["per_cond_b"]}, "pearson_delta")
    assert png.startswith(PNG_MAGIC)
    # a metric nobody has still yields a figure, not a crash
    assert metric_distribution({"a": fixture_files["per_cond_a"]}, "no_such_metric").startswith(PNG_MAGIC)


def test_loss_curve_requires_columns(tmp_path: Path) -> None:
    bad = tmp_path / "log.csv"
    pd.DataFrame({"step": [1, 2], "value": [0.1, 0.2]}).to_csv(bad, index=False)
    with pytest.raises(PipelineInputError) as info:
        loss_curve(bad, "t")
    assert info.value.field == "loss"


def test_pca_rejects_gene_mismatch(fixture_files: dict[str, Path], tmp_path: Path) -> None:
    other = ad.read_h5ad(fixture_files["pred"])
    other.var_names = [f"x{j}" for j in range(N_GENES)]
    other.write_h5ad(tmp_path / "other.h5ad")
    with pytest.raises(PipelineInputError) as info:
        pca_predicted_vs_real(tmp_path / "other.h5ad", fixture_files["truth"], fixture_files["pca"], ["GENE_A"], "ctrl")
    assert info.value.field == "var_names"


def test_report_shows_claim_audit_with_coloured_verdicts(tmp_path: Path) -> None:
    audit = tmp_path / "audit.csv"
    pd.DataFrame(
        {
            "dataset": ["sciplex3", "norman"], "metric": ["DA", "cos"], "variant": ["Path B", ""],
            "reported": ["0.700", "0.512"], "status": ["backed (a.json:metric_da.x)", "differs by +0.002 (b.json:cos)"],
            "verdict": ["backed", "differs"], "expected": ["backed", "differs by ~0.002"], "agrees_with_card": ["True", "True"],
        }
    ).to_csv(audit, index=False)
    out = tmp_path / "report.html"
    build_report(out, [], [], {"config": "x"}, audits=[(audit, "scFATE Table 1 audit")])
    html = out.read_text()
    assert "scFATE Table 1 audit" in html
    assert '<td class="status status-match">backed (a.json:metric_da.x)</td>' in html
    assert '<td class="status status-mismatch">differs by +0.002 (b.json:cos)</td>' in html
    assert "Audit summary: backed 1, differs 1" in html
    bad = tmp_path / "bad.csv"
    pd.DataFrame({"dataset": ["x"]}).to_csv(bad, index=False)
    with pytest.raises(PipelineInputError, match="bad.csv"):
        build_report(tmp_path / "r2.html", [], [], {}, audits=[(bad, "t")])


# --------------------------------------------------------------------------------------------------
# Model comparison: leaderboards, simple baselines, seeds, subgroups


def _summary_csv(path: Path, rows: dict[str, float], seeds: dict[str, tuple[float, int]] | None = None) -> Path:
    """A metrics.csv; with ``seeds`` (metric -> (std over seeds, n_seeds)) in the replicate aggregate's layout."""
    records = []
    for metric, mean in rows.items():
        record = {"metric": metric, "count": 5, "mean": mean, "std": 0.1, "median": mean}
        if seeds is not None:
            std, n = seeds[metric]
            record.update({"mean_seed_std": std, "median_seed_std": std, "n_seeds": n})
        records.append(record)
    pd.DataFrame(records).to_csv(path, index=False)
    return path


@pytest.fixture()
def board_runs(tmp_path: Path) -> list[dict]:
    values = {
        # model: (type, pearson_delta, mse, seeds)
        "control_mean": ("control_mean", 0.10, 0.050, None),
        "linear": ("linear", 0.40, 0.020, None),
        "additive": ("additive", 0.30, 0.010, None),
        "deep": ("cellflow", 0.45, 0.030, {"pearson_delta": (0.02, 5), "mse": (0.001, 5)}),  # +0.05 > std 0.02
        "close": ("primeflow", 0.41, 0.012, {"pearson_delta": (0.03, 2), "mse": (0.0001, 2)}),  # +0.01 < std 0.03
        "weak": ("scgpt", 0.20, 0.005, None),
        "twin": ("decoder_only", 0.40, 0.010, None),  # equal to the best baselines: a tie, not a loss
    }
    runs = []
    for model, (mtype, pd_value, mse, seeds) in values.items():
        path = _summary_csv(tmp_path / f"{model}_metrics.csv", {"pearson_delta": pd_value, "mse": mse}, seeds)
        pb = _summary_csv(tmp_path / f"{model}_pb.csv", {"mmd_gex": 1.0 + pd_value, "cosine_logfc_rank": 0.5 - pd_value})
        runs.append({"dataset": "d", "model": model, "model_type": mtype, "metrics_csv": path, "perturbench_csv": pb,
                     "summaries": [path, pb]})
    return runs


def test_metric_directions_follow_the_metric_owners() -> None:
    from perturb_repro.report.leaderboard import metric_direction

    # cell-eval: pearson_delta / discrimination_score best 1, mse best 0; PerturBench: MMD and RMSE are
    # distances, cosine and DEG recall similarities, every rank 0 = best
    expected = {"pearson_delta": "higher", "discrimination_score_l1": "higher", "mse": "lower", "mmd_gex": "lower",
                "rmse_average": "lower", "cosine_logfc": "higher", "deg_recall": "higher", "cosine_logfc_rank": "lower",
                "deg_recall_rank_transpose": "lower", "not_a_metric": None}
    assert {m: metric_direction(m) for m in expected} == expected


def test_leaderboard_best_baseline_seeds_and_verdicts(board_runs: list[dict]) -> None:
    from perturb_repro.report.leaderboard import leaderboard

    board = leaderboard(board_runs, ["pearson_delta", "mse", "mmd_gex", "absent_metric"], ["control_mean", "additive", "linear"])
    cell = board.set_index(["model", "metric"])
    # the best baseline per metric, by direction: pearson_delta max (linear 0.40), mse min (additive 0.010)
    assert set(board.loc[board["metric"] == "pearson_delta", "best_baseline"]) == {"linear"}
    assert set(board.loc[board["metric"] == "mse", "best_baseline"]) == {"additive"}
    assert cell.loc[("deep", "pearson_delta"), "margin"] == pytest.approx(0.05)
    assert cell.loc[("deep", "mse"), "margin"] == pytest.approx(0.010 - 0.030)  # positive = better; deep is worse
    # seeds: mean/std/n read from the aggregate's columns; one value and n_seeds 1 for a one-run file
    assert cell.loc[("deep", "pearson_delta"), "seed_std"] == pytest.approx(0.02)
    assert cell.loc[("deep", "pearson_delta"), "n_seeds"] == 5
    assert cell.loc[("weak", "pearson_delta"), "n_seeds"] == 1 and math.isnan(cell.loc[("weak", "pearson_delta"), "seed_std"])
    verdicts = {k: v for k, v in cell["beats_baseline"].items()}
    assert verdicts[("deep", "pearson_delta")] == "yes"
    assert verdicts[("deep", "mse")] == "no"
    assert verdicts[("close", "pearson_delta")] == "within seed noise"  # +0.01 within its std over seeds 0.03
    assert verdicts[("close", "mse")] == "no"  # 0.012 vs 0.010: worse by more than its std 0.0001
    assert verdicts[("weak", "mse")] == "yes" and verdicts[("weak", "pearson_delta")] == "no"
    assert verdicts[("twin", "pearson_delta")] == "tie" and verdicts[("twin", "mse")] == "tie"
    assert verdicts[("linear", "pearson_delta")] == "n/a"  # a baseline is not judged against itself
    assert "absent_metric" not in set(board["metric"])
    # PerturBench's summary is read beside cell-eval's
    assert cell.loc[("linear", "mmd_gex"), "value"] == pytest.approx(1.40)
    assert set(board.loc[board["metric"] == "mmd_gex", "best_baseline"]) == {"control_mean"}  # lowest MMD


def _split_csv(path: Path, rows: list[tuple]) -> Path:
    columns = ["condition", "cell_type", "split", "subgroup"] if len(rows[0]) == 4 else ["condition", "split", "subgroup"]
    pd.DataFrame(rows, columns=columns).to_csv(path, index=False)
    return path


def test_subgroup_means_gears_and_covariate_transfer(tmp_path: Path) -> None:
    from perturb_repro.report.leaderboard import subgroup_means

    split = _split_csv(tmp_path / "split.csv", [
        ("ctrl", "train", "control"), ("A+ctrl", "train", ""), ("B+C", "test", "combo_seen0"), ("A+C", "test", "combo_seen1"),
        ("A+D", "test", "combo_seen1"), ("A+B", "test", "combo_seen2"), ("E+ctrl", "test", "unseen_single"), ("F+ctrl", "val", "unseen_single"),
    ])
    per_cond = tmp_path / "pc.csv"
    pd.DataFrame({"perturbation": ["A+B", "A+C", "A+D", "B+C", "E+ctrl"], "pearson_delta": [0.9, 0.5, 0.3, 0.1, math.nan]}).to_csv(per_cond, index=False)
    pb = tmp_path / "pb.csv"
    pd.DataFrame({"condition": ["A+B", "A+C", "A+D", "B+C", "E+ctrl"], "mmd_gex": [1.0, 2.0, 4.0, 8.0, 16.0]}).to_csv(pb, index=False)
    means = subgroup_means("d", split, {"m": [per_cond, pb]}, ["pearson_delta", "mmd_gex"])
    got = {(r.metric, r.subgroup): (r.mean, r.n_conditions) for r in means.itertuples()}
    assert got[("pearson_delta", "combo_seen1")] == (pytest.approx(0.4), 2)
    assert got[("pearson_delta", "combo_seen2")] == (pytest.approx(0.9), 1)
    assert math.isnan(got[("pearson_delta", "unseen_single")][0]) and got[("pearson_delta", "unseen_single")][1] == 0
    assert got[("mmd_gex", "combo_seen1")] == (pytest.approx(3.0), 2)
    assert got[("mmd_gex", "unseen_single")] == (pytest.approx(16.0), 1)

    # covariate transfer: the same gene held out in two lines is two subgroups
    split2 = _split_csv(tmp_path / "split2.csv", [
        ("G1", "A172", "test", "heldout"), ("G1", "U87", "test", "heldout"), ("G2", "A172", "test", "heldout"), ("G2", "U87", "train", ""),
    ])
    pc2 = tmp_path / "pc2.csv"
    pd.DataFrame({"perturbation": ["G1", "G2", "G1"], "cell_type": ["A172", "A172", "U87"], "mse": [1.0, 3.0, 5.0]}).to_csv(pc2, index=False)
    means2 = subgroup_means("c", split2, {"m": [pc2]}, ["mse"])
    assert dict(zip(means2["subgroup"], means2["mean"])) == {"heldout · cell_type=A172": 2.0, "heldout · cell_type=U87": 5.0}

    # a scored condition that is not a test row of split.csv is broken wiring
    pd.DataFrame({"perturbation": ["A+ctrl"], "pearson_delta": [0.1]}).to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(PipelineInputError, match="bad.csv"):
        subgroup_means("d", split, {"m": [tmp_path / "bad.csv"]}, ["pearson_delta"])


def test_report_opens_with_leaderboard_and_ends_with_collapsed_provenance(board_runs: list[dict], tmp_path: Path) -> None:
    split = _split_csv(tmp_path / "split.csv", [("A+B", "test", "combo_seen2"), ("C+ctrl", "test", "unseen_single")])
    per_cond = tmp_path / "pc.csv"
    pd.DataFrame({"perturbation": ["A+B", "C+ctrl"], "pearson_delta": [0.7, 0.2], "mse": [0.1, 0.2]}).to_csv(per_cond, index=False)
    runs = [{**r, "per_condition_csv": per_cond} for r in board_runs]
    out = tmp_path / "report.html"
    build_report(out, [], runs, {"config files (sha256)": {"c.yaml": "ab" * 32}}, splits={"d": split})
    text = out.read_text(encoding="utf-8")
    # top-down order: leaderboard, subgroups, paper tables, distributions, runs, provenance
    positions = [text.index(marker) for marker in (
        'id="leaderboard-d"', 'id="subgroups-d"', 'id="summary"', 'id="distributions"', 'id="runs"', 'id="provenance"')]
    assert positions == sorted(positions)
    first_table = text[text.index("<table"):text.index("</table>")]
    assert "pearson_delta" in first_table and "simple baseline" in first_table
    assert "0.45 ± 0.02 (5 seeds)" in first_table and "0.41 ± 0.03 (2 seeds)" in first_table
    assert 'class="num beats"' in first_table and 'class="num noise"' in first_table and 'class="num loses"' in first_table
    # collapsed: provenance and every run's dump are inside <details> without `open`
    provenance = text[text.index('id="provenance"'):]
    assert provenance.index("<details>") < provenance.index("ab" * 32)
    run_part = text[text.index('id="run-d-deep"'):]
    assert run_part.startswith('id="run-d-deep"><details><summary>')
    subgroups = text[text.index('id="subgroups-d"'):text.index('id="summary"')]
    assert "combo_seen2" in subgroups and "unseen_single" in subgroups


def test_figures_are_sized_for_26_models_at_1400px(tmp_path: Path) -> None:
    from PIL import Image
    import io

    from perturb_repro.report import figures

    models = [f"primeflow_mlp_cfg{i}" for i in range(26)]
    rng = np.random.default_rng(0)
    bars = figures.leaderboard_bars(models, rng.uniform(0, 1, 26), [math.nan] * 26, [i < 3 for i in range(26)], "mse", False, 0.3)
    paths = {}
    for m in models:
        paths[m] = tmp_path / f"{m}.csv"
        pd.DataFrame({"perturbation": list("abcd"), "mse": rng.uniform(0, 1, 4)}).to_csv(paths[m], index=False)
    boxes = figures.metric_distribution(paths, "mse", baselines=models[:3], higher_is_better=False)
    for png in (bars, boxes):
        width, height = Image.open(io.BytesIO(png)).size
        # two figures side by side fit the report's 1200 px column at a 1400 px window, so they are shown
        # at their own pixel size (9 pt labels = 12.5 px), and every model row keeps >= 24 px of height
        assert width <= 580
        assert (height - 90) / 26 >= 24


def test_browser_check_writes_a_1400px_screenshot_of_the_top(board_runs: list[dict], tmp_path: Path) -> None:
    import json
    import shutil
    import subprocess
    import sys

    if not (shutil.which("chromium") or shutil.which("chromium-browser")):
        pytest.skip("Chromium not installed (.ci/run installs Debian's chromium)")
    out = tmp_path / "report.html"
    build_report(out, [], board_runs, {"config": "x"})
    tool = Path(__file__).resolve().parents[1] / "workflow" / "tools" / "check_report_in_browser.py"
    result = subprocess.run([sys.executable, str(tool), str(out)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    found = json.loads(result.stdout.strip().splitlines()[-1])
    shot = Path(found["screenshot"])
    assert shot == tmp_path / "report.top.png"  # default: beside the report
    head = shot.read_bytes()[:24]
    assert head[:8] == PNG_MAGIC
    assert (int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")) == (1400, 900)
    assert found["broken"] == [] and found["dangling"] == [] and found["images"] >= 2

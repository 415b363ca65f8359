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

    # images: all inline PNGs (loss curve, one PCA figure, 3 distributions)
    assert len(parser.imgs) == 5
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

"""Tests for perturb_repro.scoring: the prediction contract and the cell-eval scoring step.

Expected metric values are computed here with numpy, from cell-eval's documented definitions
(cell_eval/metrics/_anndata.py): per condition, pseudobulk = mean expression over that
condition's cells;
  mse           = mean over genes of (pred_pseudobulk - truth_pseudobulk)^2
  pearson_delta = Pearson r between (pred_pseudobulk - pred_control_mean) and
                  (truth_pseudobulk - truth_control_mean)
cell-eval runs three times (once per prediction; `full` for the noisy one, the cheaper `minimal`
profile for the other two), concurrently, in one module-scoped fixture because each run pays
~10 s of numba compilation in its own process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import perturb_repro
from perturb_repro.errors import PipelineInputError
from perturb_repro.scoring import check_prediction, check_truth
from perturb_repro.scoring.celleval import main, metric_value, read_metrics, score

PERT_COL = "condition"
CONTROL = "ctrl"
CONDITIONS = ["pA", "pB", "pC"]
N_GENES = 60
N_CELLS = 30

# What cell-eval 0.8.2's `full` profile writes (DE metrics, then AnnData-pair metrics);
# de_nsig_counts returns a dict per condition and is split into _real and _pred.
FULL_METRICS = [
    "overlap_at_N", "overlap_at_50", "overlap_at_100", "overlap_at_200", "overlap_at_500",
    "precision_at_N", "precision_at_50", "precision_at_100", "precision_at_200", "precision_at_500",
    "de_spearman_sig", "de_direction_match", "de_spearman_lfc_sig", "de_sig_genes_recall",
    "de_nsig_counts_real", "de_nsig_counts_pred", "pr_auc", "roc_auc",
    "pearson_delta", "mse", "mae", "mse_delta", "mae_delta",
    "discrimination_score_l1", "discrimination_score_l2", "discrimination_score_cosine",
    "pearson_edistance", "clustering_agreement",
]  # fmt: skip
MINIMAL_METRICS = {
    "overlap_at_N", "precision_at_N", "de_nsig_counts_real", "de_nsig_counts_pred",
    "pearson_delta", "mse", "mae", "discrimination_score_l1",
}  # fmt: skip
METRICS_HEADER = ["metric", "count", "null_count", "nan_count", "mean", "std", "min", "q25", "median", "q75", "max"]


# --------------------------------------------------------------------------- synthetic data


def _log1p_poisson(rng: np.random.Generator, rates: np.ndarray, n_cells: int) -> np.ndarray:
    return np.log1p(rng.poisson(rates, size=(n_cells, rates.size))).astype(np.float32)


def make_truth(seed: int = 0) -> ad.AnnData:
    """3 conditions x 30 cells + 30 controls over 60 genes, log1p of Poisson counts."""
    rng = np.random.default_rng(seed)
    base = rng.gamma(2.0, 1.5, size=N_GENES)
    blocks, labels = [], []
    for cond in CONDITIONS:
        # each condition scales every gene's rate differently, so deltas are not flat
        blocks.append(_log1p_poisson(rng, base * rng.lognormal(0.0, 0.6, size=N_GENES), N_CELLS))
        labels += [cond] * N_CELLS
    blocks.append(_log1p_poisson(rng, base, N_CELLS))
    labels += [CONTROL] * N_CELLS
    obs = pd.DataFrame({PERT_COL: pd.Categorical(labels)}, index=[f"cell{i}" for i in range(len(labels))])
    var = pd.DataFrame(index=[f"gene{i}" for i in range(N_GENES)])
    return ad.AnnData(X=np.vstack(blocks), obs=obs, var=var)


def control_x(truth: ad.AnnData) -> np.ndarray:
    return np.asarray(truth.X[(truth.obs[PERT_COL] == CONTROL).to_numpy()])


def assemble_prediction(truth: ad.AnnData, x: np.ndarray, labels: list[str]) -> ad.AnnData:
    """Predicted cells plus the truth's real control cells appended, as the pipeline writes them."""
    ctrl = control_x(truth)
    obs = pd.DataFrame(
        {PERT_COL: pd.Categorical(list(labels) + [CONTROL] * ctrl.shape[0])},
        index=[f"pred{i}" for i in range(len(labels) + ctrl.shape[0])],
    )
    pred = ad.AnnData(X=np.vstack([x, ctrl]).astype(np.float32), obs=obs, var=truth.var.copy())
    pred.uns.update({"model": "test", "dataset": "synthetic", "seed": 0})
    return pred


def noisy_prediction(truth: ad.AnnData, seed: int = 1) -> ad.AnnData:
    """A non-trivial prediction: fresh draws at perturbed rates, 20 cells per condition, rows shuffled."""
    rng = np.random.default_rng(seed)
    xs, labels = [], []
    for cond in CONDITIONS:
        mean = np.asarray(truth.X[(truth.obs[PERT_COL] == cond).to_numpy()]).mean(axis=0)
        rates = np.expm1(mean) * rng.lognormal(0.0, 0.4, size=N_GENES) + 0.05
        xs.append(_log1p_poisson(rng, rates, 20))
        labels += [cond] * 20
    x = np.vstack(xs)
    order = rng.permutation(len(labels))  # grouping must follow labels, not row position
    return assemble_prediction(truth, x[order], [labels[i] for i in order])


def perfect_prediction(truth: ad.AnnData) -> ad.AnnData:
    is_ctrl = (truth.obs[PERT_COL] == CONTROL).to_numpy()
    return assemble_prediction(truth, np.asarray(truth.X[~is_ctrl]), list(truth.obs[PERT_COL][~is_ctrl].astype(str)))


def control_mean_prediction(truth: ad.AnnData) -> ad.AnnData:
    """Every condition predicted as the control mean: the predicted delta is 0 for every gene."""
    mean = control_x(truth).mean(axis=0, dtype=np.float64).astype(np.float32)
    labels = [c for c in CONDITIONS for _ in range(N_CELLS)]
    return assemble_prediction(truth, np.tile(mean, (len(labels), 1)), labels)


# --------------------------------------------------------------------------- independent metrics


def pseudobulk(adata: ad.AnnData, label: str) -> np.ndarray:
    rows = np.asarray(adata.X[(adata.obs[PERT_COL].astype(str) == label).to_numpy()], dtype=np.float64)
    return rows.mean(axis=0)


def expected_mse(pred: ad.AnnData, truth: ad.AnnData) -> dict[str, float]:
    return {c: float(np.mean((pseudobulk(pred, c) - pseudobulk(truth, c)) ** 2)) for c in CONDITIONS}


def expected_pearson_delta(pred: ad.AnnData, truth: ad.AnnData) -> dict[str, float]:
    out = {}
    for c in CONDITIONS:
        d_pred = pseudobulk(pred, c) - pseudobulk(pred, CONTROL)
        d_true = pseudobulk(truth, c) - pseudobulk(truth, CONTROL)
        out[c] = float(np.corrcoef(d_pred, d_true)[0, 1])
    return out


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def scored(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """Score the noisy, perfect and control-mean predictions once each (concurrently)."""
    root = tmp_path_factory.mktemp("scored")
    truth = make_truth()
    truth_path = root / "test_truth.h5ad"
    truth.write_h5ad(truth_path)
    preds = {"noisy": noisy_prediction(truth), "perfect": perfect_prediction(truth), "ctrlmean": control_mean_prediction(truth)}
    # `minimal` skips the clustering metric (and its umap/numba compile) but keeps mse/pearson_delta
    profiles = {"noisy": "full", "perfect": "minimal", "ctrlmean": "minimal"}
    runs = {}
    for name, pred in preds.items():
        pred_path = root / f"{name}_predictions.h5ad"
        pred.write_h5ad(pred_path)
        runs[name] = {
            "pred": pred,
            "pred_path": pred_path,
            "metrics": root / f"{name}_metrics.csv",
            "per_condition": root / f"{name}_per_condition.csv",
        }

    def run(name: str) -> None:
        r = runs[name]
        score(r["pred_path"], truth_path, PERT_COL, CONTROL, r["metrics"], r["per_condition"], profile=profiles[name], num_threads=1, workdir=root / "work")

    # each run is a separate process with one thread, so two cores take two at once
    with ThreadPoolExecutor(max_workers=3) as pool:
        list(pool.map(run, runs))
    for r in runs.values():
        r["metrics_df"] = pd.read_csv(r["metrics"])
        r["per_condition_df"] = pd.read_csv(r["per_condition"]).set_index("perturbation")
    return {"truth": truth, "truth_path": truth_path, "root": root, **runs}


@pytest.fixture()
def files(tmp_path: Path) -> dict:
    """Valid truth and noisy prediction on disk, plus stale outputs that a failed run must remove."""
    truth = make_truth()
    paths = {
        "truth": truth,
        "pred": noisy_prediction(truth),
        "truth_path": tmp_path / "test_truth.h5ad",
        "pred_path": tmp_path / "predictions.h5ad",
        "metrics": tmp_path / "out" / "metrics.csv",
        "per_condition": tmp_path / "out" / "per_condition.csv",
    }
    truth.write_h5ad(paths["truth_path"])
    paths["metrics"].parent.mkdir()
    paths["metrics"].write_text("stale\n")
    paths["per_condition"].write_text("stale\n")
    return paths


def _score_expecting_error(files: dict, pred: ad.AnnData, bad_file: str, field: str, *, truth: ad.AnnData | None = None, control: str = CONTROL) -> PipelineInputError:
    pred.write_h5ad(files["pred_path"])
    if truth is not None:
        truth.write_h5ad(files["truth_path"])
    with pytest.raises(PipelineInputError) as info:
        score(files["pred_path"], files["truth_path"], PERT_COL, control, files["metrics"], files["per_condition"])
    message = str(info.value)
    assert str(files[bad_file]) in message, message
    assert field in info.value.field, (info.value.field, message)
    assert not files["metrics"].exists() and not files["per_condition"].exists()
    return info.value


# --------------------------------------------------------------------------- scoring results


def test_output_layout_and_full_profile_metrics(scored: dict) -> None:
    r = scored["noisy"]
    assert list(r["metrics_df"].columns) == METRICS_HEADER
    assert list(r["metrics_df"]["metric"]) == FULL_METRICS
    header = pd.read_csv(r["per_condition"], nrows=0).columns.tolist()
    assert header == ["perturbation"] + FULL_METRICS
    assert list(r["per_condition_df"].index) == sorted(CONDITIONS)
    assert (r["metrics_df"]["count"] == len(CONDITIONS)).all()
    for name in ("perfect", "ctrlmean"):
        assert set(scored[name]["metrics_df"]["metric"]) == MINIMAL_METRICS


def test_perfect_prediction_scores_perfectly(scored: dict) -> None:
    m = read_metrics(scored["perfect"]["metrics"])
    assert metric_value(m, "mse", "mean") == 0.0
    assert metric_value(m, "mse", "max") == 0.0
    assert metric_value(m, "pearson_delta", "min") == pytest.approx(1.0, abs=1e-6)
    assert metric_value(m, "discrimination_score_l1", "mean") == 1.0


def test_mse_matches_independent_computation(scored: dict) -> None:
    r = scored["noisy"]
    expected = expected_mse(r["pred"], scored["truth"])
    assert min(expected.values()) > 0.01  # the prediction really is imperfect
    got = r["per_condition_df"]["mse"]
    for cond, value in expected.items():
        assert got[cond] == pytest.approx(value, rel=1e-5)
    m = read_metrics(r["metrics"])
    values = np.array(list(expected.values()))
    assert metric_value(m, "mse", "mean") == pytest.approx(values.mean(), rel=1e-5)
    assert metric_value(m, "mse", "median") == pytest.approx(np.median(values), rel=1e-5)
    assert metric_value(m, "mse", "max") == pytest.approx(values.max(), rel=1e-5)
    assert metric_value(m, "mse", "std") == pytest.approx(values.std(ddof=1), rel=1e-4)


def test_pearson_delta_matches_independent_computation(scored: dict) -> None:
    r = scored["noisy"]
    expected = expected_pearson_delta(r["pred"], scored["truth"])
    assert max(expected.values()) < 0.999  # not trivially perfect
    got = r["per_condition_df"]["pearson_delta"]
    for cond, value in expected.items():
        assert got[cond] == pytest.approx(value, rel=1e-5, abs=1e-6)
    m = read_metrics(r["metrics"])
    assert metric_value(m, "pearson_delta", "mean") == pytest.approx(np.mean(list(expected.values())), rel=1e-5)


def test_constant_delta_gives_nan_pearson_delta_not_zero(scored: dict) -> None:
    r = scored["ctrlmean"]
    # the metrics.csv cell is empty (NaN), not 0
    row = r["metrics_df"].set_index("metric").loc["pearson_delta"]
    assert np.isnan(row["mean"]) and np.isnan(row["median"])
    assert row["nan_count"] == len(CONDITIONS)
    raw = Path(r["metrics"]).read_text().splitlines()
    line = next(line for line in raw if line.startswith("pearson_delta,"))
    # metric,count,null_count,nan_count, then every statistic cell empty
    assert line.split(",")[4:] == [""] * 7, line
    assert r["per_condition_df"]["pearson_delta"].isna().all()
    m = read_metrics(r["metrics"])
    assert np.isnan(metric_value(m, "pearson_delta", "mean"))
    # the other metrics are still real numbers: mse equals the independent value
    expected = expected_mse(r["pred"], scored["truth"])
    for cond, value in expected.items():
        assert r["per_condition_df"].loc[cond, "mse"] == pytest.approx(value, rel=1e-5)


def test_metric_value_errors(scored: dict, tmp_path: Path) -> None:
    m = read_metrics(scored["noisy"]["metrics"])
    assert metric_value(m, "mse", "50%") == metric_value(m, "mse", "median")
    with pytest.raises(PipelineInputError, match="no_such_metric"):
        metric_value(m, "no_such_metric", "mean")
    with pytest.raises(PipelineInputError, match="statistic"):
        metric_value(m, "mse", "mode")
    broken = tmp_path / "metrics.csv"
    pd.read_csv(scored["noisy"]["metrics"]).drop(columns=["median"]).to_csv(broken, index=False)
    with pytest.raises(PipelineInputError, match="median") as info:
        read_metrics(broken)
    assert str(broken) in str(info.value)


def test_conversion_keeps_labels_and_nan(tmp_path: Path) -> None:
    """The results/agg CSV conversion on hand-written polars-style files (NaN as "NaN", null empty)."""
    from perturb_repro.scoring.celleval import _metrics_table, _per_condition_table, _read_celleval_csv

    results = tmp_path / "results.csv"
    results.write_text("perturbation,mse,pearson_delta\n01,0.5,NaN\nNA,1.5,\n")
    agg = tmp_path / "agg_results.csv"
    agg.write_text(
        "statistic,mse,pearson_delta\ncount,2.0,1.0\nnull_count,0.0,1.0\nmean,1.0,NaN\nstd,0.7,NaN\n"
        "min,0.5,NaN\n25%,0.5,NaN\n50%,1.5,NaN\n75%,1.5,NaN\nmax,1.5,NaN\n"
    )
    per_condition = _per_condition_table(_read_celleval_csv(results, "perturbation"), {"01", "NA"})
    assert list(per_condition["perturbation"]) == ["01", "NA"]  # not 1 / NaN
    assert per_condition["pearson_delta"].isna().all()
    table = _metrics_table(_read_celleval_csv(agg, "statistic"), per_condition).set_index("metric")
    assert list(table.columns) == METRICS_HEADER[1:]
    assert table.loc["mse", ["count", "mean", "q25", "median", "q75", "max"]].tolist() == [2.0, 1.0, 0.5, 1.5, 1.5, 1.5]
    assert table.loc["pearson_delta", "null_count"] == 1.0 and table.loc["pearson_delta", "nan_count"] == 1.0
    assert np.isnan(table.loc["pearson_delta", "mean"])
    with pytest.raises(RuntimeError, match="conditions"):
        _per_condition_table(_read_celleval_csv(results, "perturbation"), {"01", "NA", "extra"})


# --------------------------------------------------------------------------- contract violations


def test_missing_genes(files: dict) -> None:
    err = _score_expecting_error(files, files["pred"][:, 7:].copy(), "pred_path", "var_names")
    assert "7 gene(s)" in err.problem and "'gene0'" in err.problem


def test_reordered_genes(files: dict) -> None:
    err = _score_expecting_error(files, files["pred"][:, ::-1].copy(), "pred_path", "var_names")
    assert "order" in err.problem


def test_missing_condition(files: dict) -> None:
    pred = files["pred"]
    pred = pred[(pred.obs[PERT_COL] != "pC").to_numpy()].copy()
    err = _score_expecting_error(files, pred, "pred_path", PERT_COL)
    assert "'pC'" in err.problem


def test_nan_value(files: dict) -> None:
    files["pred"].X[3, 4] = np.nan
    err = _score_expecting_error(files, files["pred"], "pred_path", "X")
    assert "non-finite" in err.problem


def test_raw_counts(files: dict) -> None:
    pred = files["pred"]
    pred.X = np.round(np.expm1(pred.X) * 40).astype(np.float32)  # integer counts, max > 50
    err = _score_expecting_error(files, pred, "pred_path", "X")
    assert "raw counts" in err.problem


def test_missing_pert_column(files: dict) -> None:
    pred = files["pred"]
    pred.obs = pred.obs.rename(columns={PERT_COL: "target"})
    _score_expecting_error(files, pred, "pred_path", PERT_COL)


def test_wrong_control_label(files: dict) -> None:
    err = _score_expecting_error(files, files["pred"], "truth_path", PERT_COL, control="non-targeting")
    assert "'non-targeting'" in err.problem


def test_truth_with_negative_values(files: dict) -> None:
    truth = files["truth"].copy()
    truth.X = truth.X - 1.0
    _score_expecting_error(files, files["pred"], "truth_path", "X", truth=truth)


def test_prediction_with_other_control_cells(files: dict) -> None:
    pred = files["pred"]
    pred.X[(pred.obs[PERT_COL] == CONTROL).to_numpy()] += np.float32(0.5)
    err = _score_expecting_error(files, pred, "pred_path", "X")
    assert "control cells" in err.problem


def test_zero_cell_condition_in_memory() -> None:
    truth = make_truth()
    pred = noisy_prediction(truth)
    pred.obs[PERT_COL] = pred.obs[PERT_COL].cat.add_categories(["pD"])
    with pytest.raises(PipelineInputError, match="zero cells.*'pD'"):
        check_prediction(pred, truth, PERT_COL, CONTROL, "predictions.h5ad", "test_truth.h5ad")


def test_check_truth_accepts_sparse_and_rejects_integer_data() -> None:
    truth = make_truth()
    truth.X = sp.csr_matrix(truth.X)
    check_truth(truth, PERT_COL, CONTROL, "test_truth.h5ad")  # valid sparse log1p passes
    check_prediction(noisy_prediction(make_truth()), truth, PERT_COL, CONTROL, "p.h5ad", "test_truth.h5ad")
    counts = np.minimum(np.round(np.expm1(truth.X.toarray())), 12)  # integer counts below both max limits
    truth.X = sp.csr_matrix(counts)
    with pytest.raises(PipelineInputError, match="integers") as info:
        check_truth(truth, PERT_COL, CONTROL, "test_truth.h5ad")
    assert info.value.source == "test_truth.h5ad" and info.value.field == "X"


# --------------------------------------------------------------------------- failures and the CLI


def test_worker_crash_is_runtime_error_without_outputs(files: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files["pred"].write_h5ad(files["pred_path"])
    fake_python = tmp_path / "fake_python"
    fake_python.write_text("#!/bin/sh\necho 'simulated numba crash' >&2\nexit 7\n")
    fake_python.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(fake_python))
    with pytest.raises(RuntimeError, match="(?s)exit code 7.*simulated numba crash"):
        score(files["pred_path"], files["truth_path"], PERT_COL, CONTROL, files["metrics"], files["per_condition"], workdir=tmp_path / "work")
    assert not files["metrics"].exists() and not files["per_condition"].exists()
    assert list((tmp_path / "work").iterdir()) == []  # scratch removed


def test_cli_rejects_bad_prediction(files: dict) -> None:
    files["pred"].X[0, 0] = np.inf
    files["pred"].write_h5ad(files["pred_path"])
    env = dict(os.environ)
    src = str(Path(perturb_repro.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH", "")) if p)
    argv = [
        "--pred", str(files["pred_path"]), "--truth", str(files["truth_path"]),
        "--pert-col", PERT_COL, "--control", CONTROL,
        "--metrics-out", str(files["metrics"]), "--per-condition-out", str(files["per_condition"]),
    ]  # fmt: skip
    proc = subprocess.run([sys.executable, "-m", "perturb_repro.scoring.celleval", *argv], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert str(files["pred_path"]) in proc.stderr and "non-finite" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not files["metrics"].exists() and not files["per_condition"].exists()
    # the in-process entry point agrees
    assert main(argv) == 2

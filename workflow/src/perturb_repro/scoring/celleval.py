"""Score one prediction file against its truth file with cell-eval.

cell-eval (``MetricsEvaluator(...).compute(profile=...)``) runs in a separate Python process so
its numba/polars thread pools and its memory are isolated from the caller and a crash surfaces as
a clean ``RuntimeError``. Outputs:

* ``per_condition.csv``: cell-eval's ``results.csv`` -- one row per non-control condition (first
  column ``perturbation``), one column per metric, sorted by condition. When the truth file names
  ``group_by`` columns (``uns['group_by']``, covariate-aware datasets), cell-eval runs once per group
  on that group's cells against that group's controls, and the rows are (condition, group) pairs:
  the group columns follow ``perturbation``; rows are sorted by group, then condition.
* ``metrics.csv``: cell-eval's ``agg_results.csv`` (a polars ``describe()``) transposed to one
  row per metric with columns :data:`METRICS_COLUMNS`, plus ``nan_count`` counted from
  ``results.csv`` because polars counts NaN as a present value.

NaN is never filled: e.g. cell-eval's ``pearson_delta`` is NaN when the predicted delta is constant
(a control-mean baseline), and that must stay visible, not become 0.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

import perturb_repro
from perturb_repro.errors import PipelineInputError
from perturb_repro.io import remove_outputs, write_csvs
from perturb_repro.scoring.contract import check_prediction, group_columns

logger = logging.getLogger(__name__)

PROFILES = ("full", "minimal", "vcc", "de", "anndata", "pds")
# polars describe() row label -> our column name
_DESCRIBE_ROWS = {
    "count": "count",
    "null_count": "null_count",
    "mean": "mean",
    "std": "std",
    "min": "min",
    "25%": "q25",
    "50%": "median",
    "75%": "q75",
    "max": "max",
}
METRICS_COLUMNS = ("metric", "count", "null_count", "nan_count", "mean", "std", "min", "q25", "median", "q75", "max")
REQUIRED_METRICS_COLUMNS = ("metric", "count", "mean", "std", "min", "q25", "median", "q75", "max")
CONDITION_COLUMN = "perturbation"  # cell-eval's name for the condition column of results.csv
# cell-eval metrics whose value for one condition depends on the other conditions scored with it
# (cell_eval/metrics/_anndata.py): discrimination_score_* ranks a prediction among all real effects,
# pearson_edistance correlates the e-distances of all conditions, clustering_agreement clusters all
# centroids (these three are computed by a whole-set pass without DE), and de_spearman_sig is one Spearman
# correlation over all conditions of their significant-gene counts (recomputed at the merge from the
# per-condition de_nsig_counts_real/_pred, exactly as cell_eval/metrics/_de.py:DESpearmanSignificant
# does). Every other metric (DE metrics from pdex's per-target test and per-target FDR; the pseudobulk
# mse/mae/pearson_delta family) uses only that condition's cells and the controls.
CROSS_CONDITION_PREFIXES = ("discrimination_score", "pearson_edistance", "clustering_agreement", "de_spearman_sig")


def is_cross_condition(metric: str) -> bool:
    """Whether a cell-eval metric (column of results.csv) needs all conditions at once."""
    return metric.startswith(CROSS_CONDITION_PREFIXES)
_STAT_ALIASES = {"25%": "q25", "50%": "median", "75%": "q75", "q50": "median", "p50": "median"}
_STDERR_TAIL_LINES = 40
_SRC_DIR = str(Path(perturb_repro.__file__).resolve().parent.parent)  # .../workflow/src


# --------------------------------------------------------------------------- worker (subprocess)


class _MetricErrorCollector(logging.Handler):
    """Collect cell-eval's per-metric failures, which it logs and then skips (break_on_error=False)."""

    def __init__(self) -> None:
        super().__init__(level=logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _worker_main(argv: list[str]) -> int:
    """Run cell-eval on two h5ad files; meant to run in its own process (see :func:`score`).

    Writes cell-eval's ``results.csv`` / ``agg_results.csv`` into ``--outdir`` and a
    ``worker.json`` with the wall time and any metrics cell-eval failed to compute.
    """
    parser = argparse.ArgumentParser(prog="celleval-worker")
    for flag in ("--pred", "--truth", "--pert-col", "--control", "--profile", "--outdir"):
        parser.add_argument(flag, required=True)
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--group-by", default="", help="comma-separated obs columns: score each group separately")
    parser.add_argument("--summary-out", default="", help="a shard: skip the summary-based cross-condition metrics "
                        "and write the summary they are computed from (scoring/celleval_cross.py)")
    args = parser.parse_args(argv)
    group_by = [c for c in args.group_by.split(",") if c]

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    collector = _MetricErrorCollector()
    logging.getLogger("cell_eval").addHandler(collector)

    from cell_eval import MetricsEvaluator  # heavy import (numba, scanpy) only in the worker

    _cache_numba_kernels()
    compute_kwargs = {}
    summaries = None
    if args.summary_out:
        from perturb_repro.scoring.celleval_cross import from_summary

        summaries = []
        compute_kwargs["skip_metrics"] = [m for m in profile_metrics(args.profile) if from_summary(m)]

    start = time.perf_counter()
    # per group, only that group's cells are brought into memory (backed files); without groups, both whole
    from perturb_repro.data.backed import LazyH5ad

    pred, truth = (LazyH5ad(args.pred), LazyH5ad(args.truth)) if group_by else (ad.read_h5ad(args.pred), ad.read_h5ad(args.truth))
    if not group_by:
        evaluator = MetricsEvaluator(
            adata_pred=pred,
            adata_real=truth,
            control_pert=args.control,
            pert_col=args.pert_col,
            num_threads=args.threads,
            outdir=args.outdir,
        )
        evaluator.compute(profile=args.profile, **compute_kwargs)  # writes results.csv and agg_results.csv
        if summaries is not None:
            summaries.append(_summary(evaluator, {}, args.profile))
    else:
        _score_groups(pred, truth, args, group_by, MetricsEvaluator, compute_kwargs, summaries)
    if summaries is not None:
        from perturb_repro.scoring.celleval_cross import write_summaries

        write_summaries(summaries, args.summary_out, group_by)
    elapsed = time.perf_counter() - start
    with open(os.path.join(args.outdir, "worker.json"), "w") as fh:
        json.dump({"seconds": elapsed, "metric_errors": collector.messages}, fh)
    return 0


# Packages whose numba kernels cell-eval's full profile compiles: pdex / numba_mwu (differential expression)
# and umap / pynndescent (scanpy's neighbour graph behind clustering_agreement). umap is imported lazily by
# scanpy, so it is imported here first to reach its kernels.
_NUMBA_PACKAGES = ("pdex", "numba_mwu", "cell_eval", "umap", "pynndescent", "scanpy")


def _cache_numba_kernels() -> None:
    """Keep the numba kernels cell-eval compiles in numba's on-disk cache.

    Most of them are declared without ``cache=True``, so every scoring process re-compiled them: ~10-25 s
    of a ~17 s job on 2 cores, paid once per (dataset, model). Caching changes no result (the cache holds
    the same machine code, keyed by source file, signature and CPU) and numba invalidates it when a
    package's source changes; where site-packages is read-only numba falls back to its user-wide cache dir.
    """
    import importlib

    from numba.core.dispatcher import Dispatcher

    for name in ("umap.umap_", "pynndescent"):
        with contextlib.suppress(ImportError):
            importlib.import_module(name)
    for name, module in list(sys.modules.items()):
        if module is None or name.split(".")[0] not in _NUMBA_PACKAGES:
            continue
        for value in list(vars(module).values()):
            if isinstance(value, Dispatcher):
                with contextlib.suppress(Exception):  # a kernel numba cannot cache just stays uncached
                    value.enable_caching()


def profile_metrics(profile: str) -> list[str]:
    """The metric names of a cell-eval profile, in its pipeline's order."""
    from cell_eval._pipeline import MetricPipeline

    return list(MetricPipeline(profile=profile)._metrics)


def _summary(evaluator, group: dict[str, str], profile: str) -> ad.AnnData:
    """The cross-condition summary of one evaluator's pair (cell-eval's own data, after its normlog check)."""
    from perturb_repro.scoring.celleval_cross import from_summary, summarise

    return summarise(evaluator.anndata_pair, group, [m for m in profile_metrics(profile) if from_summary(m)])


def _group_key_array(adata: ad.AnnData, group_by: list[str]) -> np.ndarray:
    return adata.obs[group_by].astype(str).agg("\t".join, axis=1).to_numpy()


def _open_lazy(path):
    """obs/var/uns of an h5ad; X and layers stay on disk (anndata's backed mode reads every layer)."""
    from perturb_repro.data.backed import LazyH5ad

    return LazyH5ad(path)


def _take(adata, mask: np.ndarray) -> ad.AnnData:
    """The masked cells in memory: read from disk for a lazily opened file (X, obs, var, uns), else copied."""
    from perturb_repro.data.backed import rows_in_memory

    return rows_in_memory(adata, np.flatnonzero(mask)) if adata.isbacked else adata[mask].copy()


def _score_groups(
    pred: ad.AnnData, truth: ad.AnnData, args, group_by: list[str], evaluator_cls, compute_kwargs=None,
    summaries: list | None = None,
) -> None:
    """cell-eval once per group (that group's cells and controls); results concatenated with group columns
    (and, with ``summaries``, each group's cross-condition summary appended to it).

    ``agg_results.csv`` is polars' ``describe()`` over all (condition, group) rows, which is what
    cell-eval itself writes for one call (``results.drop('perturbation').describe()``).
    """
    import polars as pl

    t_keys, p_keys = _group_key_array(truth, group_by), _group_key_array(pred, group_by)
    is_test = truth.obs[args.pert_col].astype(str).to_numpy() != args.control
    frames = []
    for i, key in enumerate(sorted(set(t_keys[is_test]))):
        evaluator = evaluator_cls(
            adata_pred=_take(pred, p_keys == key),
            adata_real=_take(truth, t_keys == key),
            control_pert=args.control,
            pert_col=args.pert_col,
            num_threads=args.threads,
            outdir=os.path.join(args.outdir, f"group_{i}"),
        )
        results, _ = evaluator.compute(profile=args.profile, **(compute_kwargs or {}))
        values = key.split("\t")
        if summaries is not None:
            summaries.append(_summary(evaluator, dict(zip(group_by, values)), args.profile))
        frames.append(results.with_columns([pl.lit(v).alias(c) for c, v in zip(group_by, values)]))
    combined = pl.concat(frames, how="diagonal_relaxed")
    metrics = [c for c in combined.columns if c not in ("perturbation", *group_by)]
    combined = combined.select(["perturbation", *group_by, *metrics])
    combined.write_csv(os.path.join(args.outdir, "results.csv"))
    combined.drop(["perturbation", *group_by]).describe().write_csv(os.path.join(args.outdir, "agg_results.csv"))


def _tail(path: Path, n_lines: int = _STDERR_TAIL_LINES) -> str:
    if not path.exists():
        return "(no stderr)"
    lines = path.read_text(errors="replace").splitlines()
    return "\n".join(lines[-n_lines:]) or "(empty stderr)"


def _worker_env(num_threads: int, workdir: Path) -> dict[str, str]:
    """Environment for the worker: package importable, thread pools capped, progress bars off."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_SRC_DIR, env.get("PYTHONPATH", "")) if p)
    threads = str(num_threads)
    # pdex's numba kernels are parallel=True and polars starts one thread per core by default;
    # both read these at import, which is why they are set here and not in the worker
    for var in ("NUMBA_NUM_THREADS", "POLARS_MAX_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = threads
    env["TQDM_DISABLE"] = "1"  # tqdm bars would bury the error in the stderr tail
    env.setdefault("MPLCONFIGDIR", str(workdir / "mpl"))  # scanpy imports matplotlib; HOME may be read-only
    return env


def _run_worker(
    pred_path: Path, truth_path: Path, pert_col: str, control_label: str, profile: str, num_threads: int, workdir: Path,
    group_by: list[str] | None = None,
    summary_out: Path | None = None,
) -> tuple[Path, dict]:
    """Run :func:`_worker_main` in a fresh interpreter; return its output dir and ``worker.json``."""
    outdir = workdir / "celleval"
    stderr_path = workdir / "worker.stderr"
    cmd = [
        sys.executable,
        "-c",
        "import sys; from perturb_repro.scoring.celleval import _worker_main; sys.exit(_worker_main(sys.argv[1:]))",
        # "--flag=value" so a label that starts with "-" is not mistaken for an option
        f"--pred={pred_path}",
        f"--truth={truth_path}",
        f"--pert-col={pert_col}",
        f"--control={control_label}",
        f"--profile={profile}",
        f"--threads={num_threads}",
        f"--outdir={outdir}",
        f"--group-by={','.join(group_by or [])}",
    ] + ([f"--summary-out={summary_out}"] if summary_out else [])
    with open(stderr_path, "wb") as err:
        proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=err, env=_worker_env(num_threads, workdir), check=False)
    if proc.returncode != 0:
        raise RuntimeError(
            f"cell-eval worker failed (exit code {proc.returncode}) scoring {pred_path} against {truth_path}; "
            f"stderr tail:\n{_tail(stderr_path)}"
        )
    info_path = outdir / "worker.json"
    if not info_path.exists():
        raise RuntimeError(f"cell-eval worker exited 0 without writing {info_path}; stderr tail:\n{_tail(stderr_path)}")
    return outdir, json.loads(info_path.read_text())


# --------------------------------------------------------------------------- result conversion


def _read_celleval_csv(path: Path, label_column: str, text_columns: tuple[str, ...] = ()) -> pd.DataFrame:
    """Read a CSV cell-eval wrote with polars: labels verbatim, metric NaN and null both as NaN.

    Condition labels are kept as strings exactly (pandas would turn "01" into 1 and "NA" into
    NaN); in metric columns polars writes NaN as "NaN" and null as an empty field.
    """
    if not path.exists():
        raise RuntimeError(f"cell-eval did not write {path.name}")
    header = pd.read_csv(path, nrows=0).columns
    if label_column not in header:
        raise RuntimeError(f"cell-eval {path.name} has no '{label_column}' column: {list(header)}")
    labels = (label_column, *text_columns)
    na_values = {c: ["", "NaN", "nan", "null"] for c in header if c not in labels}
    frame = pd.read_csv(path, dtype={c: str for c in labels}, keep_default_na=False, na_values=na_values)
    metric_columns = [c for c in frame.columns if c not in labels]
    try:
        frame[metric_columns] = frame[metric_columns].astype(float)
    except ValueError as err:
        raise RuntimeError(f"cell-eval {path.name} has a non-numeric metric value: {err}") from err
    return frame


def _per_condition_table(results: pd.DataFrame, expected_conditions: set, group_by: tuple[str, ...] = ()) -> pd.DataFrame:
    """Check cell-eval's results.csv covers exactly the expected conditions (or (condition, *group) rows) and sort it."""
    keys = [CONDITION_COLUMN, *group_by]
    missing = [c for c in keys if c not in results.columns]
    if missing:
        raise RuntimeError(f"cell-eval results.csv lacks column(s) {missing}")
    rows = list(results[CONDITION_COLUMN]) if not group_by else list(map(tuple, results[keys].to_numpy().tolist()))
    got = set(rows)
    if got != expected_conditions or len(rows) != len(got):
        raise RuntimeError(
            f"cell-eval results.csv conditions {sorted(got)[:10]} do not match the predicted conditions "
            f"{sorted(expected_conditions)[:10]}"
        )
    if results.shape[1] < len(keys) + 1:
        raise RuntimeError("cell-eval results.csv holds no metric column")
    return results.sort_values([*group_by, CONDITION_COLUMN], kind="stable").reset_index(drop=True)


def _metrics_table(agg: pd.DataFrame, per_condition: pd.DataFrame, group_by: tuple[str, ...] = ()) -> pd.DataFrame:
    """Transpose cell-eval's agg_results.csv (describe() rows x metric columns) to one row per metric."""
    stats = agg.set_index("statistic")
    missing = [s for s in _DESCRIBE_ROWS if s != "null_count" and s not in stats.index]
    if missing:
        raise RuntimeError(f"cell-eval agg_results.csv lacks statistic row(s) {missing}; got {list(stats.index)}")
    metric_names = [c for c in per_condition.columns if c != CONDITION_COLUMN and c not in group_by]
    if set(stats.columns) != set(metric_names):
        raise RuntimeError(
            f"cell-eval agg_results.csv metrics {sorted(stats.columns)} differ from results.csv {sorted(metric_names)}"
        )
    table = stats.loc[[s for s in _DESCRIBE_ROWS if s in stats.index], metric_names].T
    table = table.rename(columns=_DESCRIBE_ROWS)
    if "null_count" not in table.columns:
        table["null_count"] = np.nan  # older cell-eval/polars: unknown, not zero
    # polars' describe() counts NaN as present (only nulls are absent), so record the NaN count:
    # pandas reads both NaN and null as NaN, hence missing-per-column minus cell-eval's null_count
    table["nan_count"] = per_condition[metric_names].isna().sum().astype(float) - table["null_count"].fillna(0.0)
    table.index.name = "metric"
    return table.reset_index()[list(METRICS_COLUMNS)]


# --------------------------------------------------------------------------- public API


def score(
    pred_path: str | os.PathLike,
    truth_path: str | os.PathLike,
    pert_col: str,
    control_label: str,
    metrics_out: str | os.PathLike,
    per_condition_out: str | os.PathLike,
    profile: str = "full",
    num_threads: int = 1,
    workdir: str | os.PathLike | None = None,
) -> None:
    """Check a prediction against its truth file and score it with cell-eval.

    Both outputs are written atomically; after any failure neither exists (stale copies from an
    earlier run are removed first, so a failed run cannot leave old scores behind).

    Args:
        pred_path: ``predictions.h5ad`` (dense float32 ``.X``, conditions plus real controls).
        truth_path: ``test_truth.h5ad`` (real test cells plus real control cells).
        pert_col: ``obs`` column holding the condition label in both files.
        control_label: Label of the control cells.
        metrics_out: Path of ``metrics.csv`` (one row per metric, see :data:`METRICS_COLUMNS`).
        per_condition_out: Path of ``per_condition.csv`` (one row per condition, one column per metric).
        profile: cell-eval metric profile (``full``, ``minimal``, ``vcc``, ``de``, ``anndata``, ``pds``).
        num_threads: Threads for cell-eval (pdex DE, numba, polars); must be >= 1.
        workdir: Directory for cell-eval's scratch output; a fresh temporary directory inside it
            (or in the system temp dir when ``None``) is used and removed afterwards.

    Raises:
        PipelineInputError: If an input file or argument breaks the contract.
        RuntimeError: If the cell-eval worker fails (message holds its stderr tail) or its
            output is not what this module expects.
    """
    pred_path, truth_path = Path(pred_path), Path(truth_path)
    metrics_out, per_condition_out = Path(metrics_out), Path(per_condition_out)
    remove_outputs(metrics_out, per_condition_out)
    if profile not in PROFILES:
        raise PipelineInputError("score()", "profile", f"unknown cell-eval profile {profile!r}; expected one of {PROFILES}")
    if isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 1:
        raise PipelineInputError("score()", "num_threads", f"must be an integer >= 1, got {num_threads!r}")
    for path in (pred_path, truth_path):
        if not path.is_file():
            raise PipelineInputError(str(path), "file", "does not exist")

    pred, truth = ad.read_h5ad(pred_path), ad.read_h5ad(truth_path)
    group_by = tuple(group_columns(truth))
    check_prediction(pred, truth, pert_col, control_label, str(pred_path), str(truth_path), list(group_by))
    labels = truth.obs[pert_col].astype(str)
    if group_by:  # one row per (condition, group), cell-eval run per group against that group's controls
        keys = truth.obs[list(group_by)].astype(str).to_numpy().tolist()
        conditions = {(c, *k) for c, k in zip(labels, keys) if c != control_label}
    else:
        conditions = set(labels) - {control_label}
    # free both matrices before the worker loads its own copies, so peak memory is not doubled
    del pred, truth

    if workdir is not None:
        Path(workdir).mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="celleval.", dir=workdir))
    try:
        start = time.perf_counter()
        outdir, info = _run_worker(
            pred_path.resolve(), truth_path.resolve(), pert_col, control_label, profile, num_threads, scratch,
            list(group_by),
        )
        logger.info(
            "cell-eval (%s) scored %s in %.1f s (%.1f s with process start-up)",
            profile, pred_path, info.get("seconds", math.nan), time.perf_counter() - start,
        )  # fmt: skip
        if info.get("metric_errors"):
            # cell-eval skips a metric that raises; it is then absent from the outputs, never 0
            logger.warning("cell-eval could not compute some metrics for %s: %s", pred_path, info["metric_errors"])
        per_condition = _per_condition_table(
            _read_celleval_csv(outdir / "results.csv", CONDITION_COLUMN, group_by), conditions, group_by
        )
        metrics = _metrics_table(_read_celleval_csv(outdir / "agg_results.csv", "statistic"), per_condition, group_by)
        write_csvs((metrics, metrics_out), (per_condition, per_condition_out), index=False)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def read_metrics(path: str | os.PathLike) -> pd.DataFrame:
    """Read a ``metrics.csv`` written by :func:`score`.

    Args:
        path: The CSV file.

    Returns:
        DataFrame indexed by metric name with the statistic columns (``count``, ``mean``, ``std``,
        ``min``, ``q25``, ``median``, ``q75``, ``max``, and ``null_count``/``nan_count`` when present);
        empty cells are NaN. ``attrs["source"]`` holds the path for error messages.

    Raises:
        PipelineInputError: If the file is missing, lacks a required column, or repeats a metric.
    """
    path = Path(path)
    if not path.is_file():
        raise PipelineInputError(str(path), "file", "does not exist")
    frame = pd.read_csv(path)
    missing = [c for c in REQUIRED_METRICS_COLUMNS if c not in frame.columns]
    if missing:
        raise PipelineInputError(str(path), "columns", f"missing required column(s) {missing}; has {list(frame.columns)}")
    frame["metric"] = frame["metric"].astype(str)
    dup = frame["metric"][frame["metric"].duplicated()]
    if len(dup):
        raise PipelineInputError(str(path), "metric", f"repeated metric(s): {sorted(set(dup))}")
    frame = frame.set_index("metric")
    frame = frame.apply(pd.to_numeric, errors="coerce")  # a stray string must not pass as a number
    frame.attrs["source"] = str(path)
    return frame


def metric_value(frame: pd.DataFrame, metric: str, statistic: str = "mean") -> float:
    """Look up one statistic of one metric in a :func:`read_metrics` frame.

    Args:
        frame: Frame from :func:`read_metrics`.
        metric: Metric name, e.g. ``"pearson_delta"``.
        statistic: Column, e.g. ``mean``, ``median``, ``std``, ``min``, ``max``, ``q25``, ``q75``,
            ``count`` (``25%``/``50%``/``75%`` are accepted as aliases).

    Returns:
        The value as a float; NaN is returned as NaN (never replaced).

    Raises:
        PipelineInputError: If the metric or the statistic is not in the frame.
    """
    source = frame.attrs.get("source", "metrics table")
    column = _STAT_ALIASES.get(statistic, statistic)
    if column not in frame.columns:
        raise PipelineInputError(source, "statistic", f"unknown statistic {statistic!r}; available: {list(frame.columns)}")
    if metric not in frame.index:
        raise PipelineInputError(source, "metric", f"unknown metric {metric!r}; available: {sorted(frame.index)}")
    return float(frame.at[metric, column])


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the process exit code.

    Exit codes: 0 success, 2 contract violation (message on stderr, no traceback),
    1 cell-eval failure.
    """
    parser = argparse.ArgumentParser(
        prog="python -m perturb_repro.scoring.celleval", description="Score predictions with cell-eval."
    )
    parser.add_argument("--pred", required=True, help="predictions.h5ad")
    parser.add_argument("--truth", required=True, help="test_truth.h5ad")
    parser.add_argument("--pert-col", required=True, help="obs column with the condition label")
    parser.add_argument("--control", required=True, help="control label in --pert-col")
    parser.add_argument("--metrics-out", required=True, help="output metrics.csv")
    parser.add_argument("--per-condition-out", required=True, help="output per_condition.csv")
    parser.add_argument("--profile", default="full", choices=PROFILES)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--workdir", default=None, help="scratch directory (default: system temp)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        score(
            args.pred, args.truth, args.pert_col, args.control, args.metrics_out, args.per_condition_out,
            profile=args.profile, num_threads=args.threads, workdir=args.workdir,
        )  # fmt: skip
    except PipelineInputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

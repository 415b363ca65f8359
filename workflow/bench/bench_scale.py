#!/usr/bin/env python
"""Scaling benchmark: time and peak memory of the data and scoring steps, fitted and projected to paper size.

Run from the repository root with the project's venv:

    .venv/bin/python workflow/bench/bench_scale.py --quick [--jobs 2] [--out results/bench/scale.json]   # ~1.5 min
    .venv/bin/python workflow/bench/bench_scale.py          # more and larger sizes (~15 min on 2 cores)

Synthetic inputs shaped like the pipeline's own files are written into a temporary directory: sparse raw
counts (CSR float32, ``--density`` non-zeros) for the data steps, dense float32 log1p values for the truth
and prediction files the scorers read. Every step runs as its own process (this script with ``--worker``),
calling the function its Snakemake rule calls; the worker records its work's CPU seconds and peak RSS above
the RSS when the work began (imports excluded) and the whole process's peak (VmHWM: ru_maxrss would include this
driver's memory, which Linux carries into a child at exec); ``os.wait4`` gives the process's CPU and wall time. A run at a tiny size gives
each step's fixed cost; the rest is fitted as a power law in the sizes (least squares on logs: the log-log
slope per size variable), and the projection is the tiny process + fitted growth at each paper dataset's
size. Steps projected over the job budget (``--budget-gb``, ``--budget-h``: 64 GB, 24 h) are flagged.

Size variables: data steps (split, preprocess, preprocess_chunked, fit_pca, test_truth) -- cells N and genes G
(conditions grow with N at a fixed number of cells per condition); scorers (cell-eval, PerturBench) -- test
conditions C, predicted cells per condition n_pred, true cells per condition n_truth, genes G (control cells grow
with n_truth). ``preprocess_chunked`` is the cd4 entry's path (``source.reader: backed_chunked``, streamed to the
file); CD4 is projected with it, Norman and Replogle with the in-memory ``preprocess``. Chunk-bounded steps run
with small chunks (``CHUNKS``) and get the production chunk added (``PRODUCTION_CHUNK_MB``). PerturBench time and
memory and cell-eval memory are fitted as non-negative sums of the terms their code implies (``TERM_MODELS``:
the energy cross sums grow as C^2 n_pred n_truth G), the rest as power laws. Scoring is projected per job (CD4:
per shard of its 12 covariate groups, plus the whole-truth PCA each PerturBench shard fits) and as wall time =
CPU / ``--threads`` (scoring.threads = 8 in config.yaml; linear thread scaling is assumed, not measured).
Projections are extrapolations far outside the measured range: read them as orders of magnitude.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "workflow" / "src"))

CONTROL = "ctrl"
DATA_STEPS = ("split", "preprocess", "preprocess_chunked", "fit_pca", "test_truth")
SCORE_STEPS = ("celleval", "celleval_cross", "perturbench")
DATA_VARS = ("N", "G")
SCORE_VARS = ("C", "n_pred", "n_truth", "G")
CELLS_PER_CONDITION = 100

# Paper datasets (config/config.yaml and the cards). Data steps: N cells read, G genes kept. Scoring: C test
# conditions (a cell-eval shard scores C / shards of them; a PerturBench shard C / min(shards, groups): it splits
# covariate groups; shards = datasets.<d>.scoring.shards in config.yaml), n_pred predicted cells
# per condition (sampling.n_cells_per_condition), n_truth real test cells per condition (test cells / C), G genes;
# truth_cells = every truth cell (the PCA of mmd_pca is fitted on all of them, in every PerturBench shard).
PAPER = {
    "norman": {  # GEARS perturb_processed.h5ad; GEARS simulation split: ~130 test conditions
        "data": {"N": 91_205, "G": 5_045},
        "score": {"C": 130, "n_pred": 1_000, "n_truth": 300, "G": 5_045},
        "truth_cells": 45_000, "preprocess": "preprocess", "shards": 1, "groups": 1,
    },
    "replogle": {  # State-Replogle-Filtered; RPE1 test: 1,047 conditions, ~105k test cells + 10,691 controls
        "data": {"N": 643_413, "G": 6_546},
        "score": {"C": 1_047, "n_pred": 1_000, "n_truth": 100, "G": 6_546},
        "truth_cells": 116_000, "preprocess": "preprocess", "shards": 4, "groups": 1,
    },
    "cd4": {  # ~22M cells read onto the 3,699-gene panel (chunked reader); ~2.4M test cells over ~10k test targets
        "data": {"N": 22_000_000, "G": 3_699},
        "score": {"C": 10_000, "n_pred": 1_000, "n_truth": 240, "G": 3_699},
        "truth_cells": 3_400_000, "preprocess": "preprocess_chunked", "shards": 16, "groups": 12,
    },
}
# Steps whose memory is bounded by a chunk are measured with small chunks (CHUNKS), so the per-cell part of their
# memory is what grows in the fit; the projection adds the production chunk's memory (PRODUCTION_CHUNK_MB: fit_pca
# 32 MB float64 chunk + its centred copy; test_truth 16 MB float32 chunk + the backed read; the chunked reader's
# window: 50,000 rows x ~36,000 raw genes x 5 % non-zeros x 12 B, read, row-selected and panel-cut = 3 copies).
CHUNKS = {"pca_bytes": 4 * 2**20, "truth_bytes": 2**20, "reader_rows": 500}
PRODUCTION_CHUNK_MB = {"fit_pca": 100, "test_truth": 50, "preprocess_chunked": 3_100}

# Sizes: a tiny point (its cost is the step's fixed cost: imports, process and worker start-up, compilation),
# a base point, then each size variable alone multiplied by each factor.
QUICK = {
    "data": {"tiny": {"N": 500, "G": 50}, "base": {"N": 10_000, "G": 1_000}, "factors": (4,)},
    "score": {"tiny": {"C": 2, "n_pred": 10, "n_truth": 10, "G": 50},
              "base": {"C": 24, "n_pred": 200, "n_truth": 100, "G": 500}, "factors": (3,)},
}
FULL = {
    "data": {"tiny": {"N": 500, "G": 50}, "base": {"N": 10_000, "G": 1_000}, "factors": (2, 4, 8)},
    "score": {"tiny": {"C": 2, "n_pred": 10, "n_truth": 10, "G": 50},
              "base": {"C": 16, "n_pred": 100, "n_truth": 100, "G": 500}, "factors": (2, 4)},
}


# ------------------------------------------------------------------------------------------ inputs


def dataset_cfg(raw: Path) -> dict:
    """A dataset entry like config.yaml's: raw counts normalised here, fixed panel, context-holdout split."""
    return {
        "name": "bench",
        "source": {"path": str(raw), "sha256": None},
        "perturbation_column": "gene",
        "control_label": CONTROL,
        "covariates": ["cell_line"],
        "group_by": ["cell_line"],
        "preprocess": {"normalize": True, "target_sum": 10_000, "n_top_genes": None},
        "split": {"recipe": "cd4_context_holdout", "seed": 0, "val_fraction": 0.1, "test_fraction": 0.2},
        "pca": {"n_components": 50},
    }


def chunked_cfg(raw: Path, panel: Path) -> dict:
    """The cd4 entry's shape: backed_chunked reader onto a fixed panel (here: every gene), counts kept."""
    cfg = dataset_cfg(raw)
    cfg["source"] = {"path": str(raw), "sha256": None, "reader": "backed_chunked", "gene_panel": str(panel),
                     "chunk_size": CHUNKS["reader_rows"]}
    cfg["preprocess"] = {"normalize": False, "target_sum": 10_000, "n_top_genes": None, "keep_counts": True}
    return cfg


def write_raw(path: Path, n_cells: int, n_genes: int, density: float, seed: int = 0) -> None:
    """Sparse integer counts, ``n_cells / CELLS_PER_CONDITION`` conditions (10 % controls), 2 cell lines."""
    import anndata as ad
    import numpy as np
    import pandas as pd
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    nnz_per_row = max(1, int(round(density * n_genes)))
    indptr = np.arange(n_cells + 1, dtype=np.int64) * nnz_per_row
    stride = n_genes // nnz_per_row  # distinct sorted columns per row: a random offset, then every stride-th gene
    indices = rng.integers(0, stride, (n_cells, 1)) + np.arange(nnz_per_row)[None, :] * stride
    data = rng.integers(1, 20, indptr[-1]).astype(np.float32)
    counts = sp.csr_matrix((data, indices.ravel().astype(np.int32), indptr), shape=(n_cells, n_genes))
    n_cond = max(4, n_cells // CELLS_PER_CONDITION)
    conditions = np.array([CONTROL] + [f"G{i}" for i in range(n_cond - 1)])
    labels = conditions[rng.integers(0, n_cond, n_cells)]
    labels[rng.random(n_cells) < 0.1] = CONTROL
    obs = pd.DataFrame({"gene": labels, "cell_line": rng.choice(["a", "b"], n_cells)},
                       index=[f"c{i}" for i in range(n_cells)])
    var = pd.DataFrame(index=[f"g{i}" for i in range(n_genes)])
    ad.AnnData(X=counts, obs=obs, var=var).write_h5ad(path)


def write_scoring_pair(directory: Path, C: int, n_pred: int, n_truth: int, G: int, seed: int = 0) -> None:
    """truth.h5ad and pred.h5ad: dense float32 log1p values, C conditions + 3 x n_truth control cells."""
    import anndata as ad
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(seed)
    n_ctrl = max(50, 3 * n_truth)
    base = rng.gamma(2.0, 1.0, G).astype(np.float32)
    shift = rng.normal(0, 0.3, (C, G)).astype(np.float32)

    def cells(mean, n):
        return np.log1p(rng.poisson(np.clip(mean, 0.05, None), (n, G)).astype(np.float32) * 0.7 + 0.01).astype(np.float32)

    control = cells(base, n_ctrl)
    names = [f"P{i}" for i in range(C)]

    def make(n_per, salt):
        blocks = [cells(base * np.exp(shift[i] + salt), n_per) for i in range(C)] + [control]
        labels = [n for n in names for _ in range(n_per)] + [CONTROL] * n_ctrl
        obs = pd.DataFrame({"condition": labels, "is_control": [lab == CONTROL for lab in labels]},
                           index=[f"c{i}" for i in range(len(labels))])
        out = ad.AnnData(X=np.vstack(blocks), obs=obs, var=pd.DataFrame(index=[f"g{i}" for i in range(G)]))
        out.uns = {"control_label": CONTROL, "dataset": "bench"}
        return out

    make(n_truth, 0.0).write_h5ad(directory / "truth.h5ad")
    make(n_pred, 0.05).write_h5ad(directory / "pred.h5ad")


# ------------------------------------------------------------------------------------------ worker


def _call_first(candidates):
    """The first (module, function) that exists: the newer entry point a rule script calls, else the older one."""
    import importlib

    for module, name in candidates:
        fn = getattr(importlib.import_module(module), name, None)
        if fn is not None:
            return fn
    raise ImportError(f"none of {candidates}")


def _rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _hwm_mb() -> float:
    """This process's peak RSS since its exec (VmHWM). Not ru_maxrss: Linux carries the forking parent's peak into
    a child's ru_maxrss at exec, so a worker started by this (large) driver would report the driver's memory."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource_maxrss_mb()


def resource_maxrss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(step: str, d: Path, noop: bool) -> None:
    """Run ``step`` on the inputs in ``d``; write its own cost (imports excluded) to ``d/<step>.usage.json``."""
    import resource

    before = {"self": resource.getrusage(resource.RUSAGE_SELF), "children": resource.getrusage(resource.RUSAGE_CHILDREN)}
    rss_before, wall_before = _rss_mb(), time.perf_counter()
    # imports happen inside _run_step's branches; their cost is measured apart from the work
    _run_step(step, d, noop, mark=lambda: marks.append((_rss_mb(), time.perf_counter(),
                                                         resource.getrusage(resource.RUSAGE_SELF),
                                                         resource.getrusage(resource.RUSAGE_CHILDREN))))
    after_self, after_children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    rss0, wall0, self0, children0 = marks[0] if marks else (rss_before, wall_before, before["self"], before["children"])
    cpu = (after_self.ru_utime + after_self.ru_stime - self0.ru_utime - self0.ru_stime
           + after_children.ru_utime + after_children.ru_stime - children0.ru_utime - children0.ru_stime)
    # children (cell-eval's worker) report ru_maxrss, which includes this worker's RSS at their fork: an upper bound
    peak = max(_hwm_mb(), after_children.ru_maxrss / 1024)
    (d / f"{step}.usage.json").write_text(json.dumps({
        "work_cpu_seconds": cpu, "work_wall_seconds": time.perf_counter() - wall0,
        "rss_before_work_mb": rss0, "work_peak_mb": max(peak - rss0, 0.0), "process_peak_mb": peak,
    }))


marks: list = []


def _run_step(step: str, d: Path, noop: bool, mark) -> None:
    cfg = json.loads((d / "cfg.json").read_text()) if (d / "cfg.json").exists() else {}
    if step in DATA_STEPS:
        from perturb_repro import steps
        if step == "preprocess":
            import scanpy  # noqa: F401  (imported lazily by preprocessing: an import, not work)
        mark()
        if noop:
            return
        if step == "split":
            steps.split_step(str(d / "raw.h5ad"), cfg, str(d / "split.csv"))
        elif step == "preprocess":
            steps.preprocess_step(str(d / "raw.h5ad"), str(d / "split.csv"), cfg, str(d / "processed.h5ad"),
                                  str(d / "summary.json"))
        elif step == "preprocess_chunked":  # the cd4 entry's path: the same rule function, chunked reader
            chunked = json.loads((d / "cfg_chunked.json").read_text())
            steps.preprocess_step(str(d / "raw.h5ad"), str(d / "split.csv"), chunked, str(d / "processed_chunked.h5ad"),
                                  str(d / "summary_chunked.json"))
        elif step == "fit_pca":
            # what workflow/scripts/fit_pca.py calls (small chunks: see CHUNKS)
            from perturb_repro.data import pca
            pca.CHUNK_BYTES = CHUNKS["pca_bytes"]
            fn = _call_first([("perturb_repro.data.pca", "fit_pca_file"), ("perturb_repro.steps", "pca_step")])
            fn(str(d / "processed.h5ad"), cfg, str(d / "pca.npz"))
        elif step == "test_truth":
            # what workflow/scripts/extract_test_truth.py calls (small chunks: see CHUNKS)
            from perturb_repro.data import truth
            truth.CHUNK_BYTES = CHUNKS["truth_bytes"]
            fn = _call_first([("perturb_repro.data.truth", "write_test_truth"), ("perturb_repro.steps", "truth_step")])
            fn(str(d / "processed.h5ad"), str(d / "test_truth.h5ad"))
    elif step == "celleval":
        from perturb_repro.scoring.celleval import score
        mark()
        if noop:
            return
        score(d / "pred.h5ad", d / "truth.h5ad", "condition", CONTROL, d / "metrics.csv", d / "per_condition.csv",
              profile="full", num_threads=1, workdir=d)
    elif step == "celleval_cross":  # the cross-condition pass of a sharded run, from a summary of all conditions
        from perturb_repro.scoring.celleval_shards import score_cross
        mark()
        if noop:
            return
        score_cross([d / "summary.h5ad"], d / "truth.h5ad", "condition", CONTROL, d / "cross.csv", profile="full")
    elif step == "perturbench":
        from perturb_repro.scoring.perturbench import score_perturbench
        mark()
        if noop:
            return
        score_perturbench(d / "pred.h5ad", d / "truth.h5ad", CONTROL, d / "pb_per_condition.csv", d / "pb_summary.csv",
                          pert_col="condition", seed=0, n_deg=50, pca_components=30)
    else:
        raise SystemExit(f"unknown step {step}")


# ------------------------------------------------------------------------------------------ driver


def _popen_wait4(step: str, d: Path, noop: bool = False) -> dict:
    """Run one step in its own process, reaped with ``os.wait4``: CPU and wall seconds, peak RSS (MB)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", step, "--dir", str(d)] + (["--noop"] if noop else [])
    with tempfile.TemporaryFile() as log:
        started = time.perf_counter()
        env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
               "NUMBA_NUM_THREADS": "1", "POLARS_MAX_THREADS": "1"}
        pid = subprocess.Popen(cmd, stdout=log, stderr=log, cwd=ROOT, env=env).pid
        _, status, usage = os.wait4(pid, 0)
        seconds = time.perf_counter() - started
        if os.waitstatus_to_exitcode(status) != 0:
            log.seek(0)
            raise RuntimeError(f"{step} failed:\n{log.read().decode(errors='replace')[-3000:]}")
    work = json.loads((d / f"{step}.usage.json").read_text())
    # fitted: the work's CPU seconds (one thread per process; steadier than wall time on a shared machine) and
    # its peak RSS above the process's RSS when the work began (imports excluded); the whole process too
    return {"seconds": work["work_cpu_seconds"], "peak_mb": work["work_peak_mb"],
            "process_cpu_seconds": usage.ru_utime + usage.ru_stime, "process_wall_seconds": seconds,
            "process_peak_mb": work["process_peak_mb"], "imports_mb": work["rss_before_work_mb"],
            "work_wall_seconds": work["work_wall_seconds"]}


def design(grid: dict, names: tuple) -> list[dict]:
    points = [dict(grid["base"])]
    for factor in grid["factors"]:
        for name in names:
            points.append({**grid["base"], name: grid["base"][name] * factor})
    return points


def fit(rows: list[dict], names: tuple, key: str, fixed: float) -> dict:
    """log(y - fixed) = a + sum_i b_i log(x_i): exponents b_i (clipped to [0, 3]) and the intercept."""
    import numpy as np

    X = np.array([[1.0] + [np.log(r["size"][n]) for n in names] for r in rows])
    excess = np.array([max(r[key] - fixed, 1e-3 * max(fixed, 1e-3)) for r in rows])
    y = np.log(excess)
    coef, *_ = np.linalg.lstsq(X, y, rcond=None)
    slopes = np.clip(coef[1:], 0.0, 3.0)
    # refit the intercept with the clipped slopes
    intercept = float(np.mean(y - X[:, 1:] @ slopes))
    return {"fixed": fixed, "intercept": intercept, "slopes": dict(zip(names, map(float, slopes)))}


def project(model: dict, size: dict) -> float:
    import math

    return model["fixed"] + math.exp(model["intercept"] + sum(b * math.log(size[n]) for n, b in model["slopes"].items()))


def _inputs(kind: str, d: Path, size: dict, density: float) -> None:
    d.mkdir()
    if kind == "data":
        write_raw(d / "raw.h5ad", size["N"], size["G"], density)
        (d / "cfg.json").write_text(json.dumps(dataset_cfg(d / "raw.h5ad")))
        (d / "panel.txt").write_text("\n".join(f"g{i}" for i in range(size["G"])) + "\n")
        (d / "cfg_chunked.json").write_text(json.dumps(chunked_cfg(d / "raw.h5ad", d / "panel.txt")))
    else:
        write_scoring_pair(d, size["C"], size["n_pred"], size["n_truth"], size["G"])
        _write_cross_summary(d)


def _write_cross_summary(d: Path) -> None:
    """The summary the cell-eval shards write, here of all conditions at once (celleval_cross's input; made in
    the driver, so its cost is not the cross pass's: the shards' work is what "celleval" measures)."""
    import anndata as ad
    from cell_eval._types import PerturbationAnndataPair

    from perturb_repro.scoring.celleval import profile_metrics
    from perturb_repro.scoring.celleval_cross import from_summary, summarise, write_summaries

    pair = PerturbationAnndataPair(real=ad.read_h5ad(d / "truth.h5ad"), pred=ad.read_h5ad(d / "pred.h5ad"),
                                   control_pert=CONTROL, pert_col="condition")
    metrics = [m for m in profile_metrics("full") if from_summary(m)]
    write_summaries([summarise(pair, {}, metrics)], d / "summary.h5ad", [])


def _show(step: str, size: dict, r: dict, tag: str = "") -> None:
    sizes = " ".join(f"{k}={v:>6}" for k, v in size.items())
    print(f"  {step:18s} {sizes:44s} work {r['seconds']:7.2f} s cpu {r['peak_mb']:7.0f} MB | process "
          f"{r['process_wall_seconds']:6.1f} s wall {r['process_peak_mb']:6.0f} MB {tag}", flush=True)


def bench(quick: bool, density: float, keep: Path | None, jobs: int = 1) -> dict:
    """Measure every step at every size. Each size is a chain (its inputs, then its steps in order: a data step
    reads the one before); ``jobs`` chains run side by side. What is fitted is each process's own CPU seconds and
    peak RSS, which do not add up across processes, so side-by-side runs change them little (shared caches and
    memory bandwidth aside) and cut the wall time by about ``jobs``."""
    from concurrent.futures import ThreadPoolExecutor

    grids = QUICK if quick else FULL
    chains = []  # (kind, index or None for the tiny run, size, steps)
    for kind, names, steps in (("data", DATA_VARS, DATA_STEPS), ("score", SCORE_VARS, SCORE_STEPS)):
        chains.append((kind, None, grids[kind]["tiny"], steps))
        chains += [(kind, i, size, steps) for i, size in enumerate(design(grids[kind], names))]
    with tempfile.TemporaryDirectory(prefix="bench_scale_", dir=keep) as tmp:
        def run(chain):
            kind, i, size, steps = chain
            d = Path(tmp) / f"{kind}{'_tiny' if i is None else i}"
            _inputs(kind, d, size, density)
            out = {}
            for step in steps:
                out[step] = {"size": size, **_popen_wait4(step, d)}
                _show(step, size, out[step], "(fixed cost)" if i is None else "")
            return out

        with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            measured = list(pool.map(run, chains))  # in chain order, whatever order they finish in
    results: dict = {"data": {s: [] for s in DATA_STEPS}, "score": {s: [] for s in SCORE_STEPS}, "fixed": {}}
    for (kind, i, _, steps), out in zip(chains, measured):
        for step in steps:
            if i is None:
                results["fixed"][step] = out[step]
            else:
                results[kind][step].append(out[step])
    return results


# Scoring costs whose structure the code fixes, fitted as non-negative sums of these terms (the power law of
# ``fit`` underestimates a quadratic term when the fixed and linear parts still matter at the measured sizes).
# PerturBench: energy cross sums over (predicted cell, true cell) pairs of one group x genes, the self terms
# within each condition, and the per-cell passes (means, variances, projection); memory = the two matrices it
# holds. cell-eval memory = its copies of the two matrices; its time keeps the power law.
def _pb_time_terms(z: dict) -> list[float]:
    c, p, t, g = z["C"], z["n_pred"], z["n_truth"], z["G"]
    return [c * p * c * t * g, c * (p * p + t * t) * g, c * (p + t) * g]


def _bytes_terms(z: dict) -> list[float]:
    c, p, t, g = z["C"], z["n_pred"], z["n_truth"], z["G"]
    return [c * p * g, c * t * g]


def _data_bytes_terms(z: dict) -> list[float]:
    """Data steps hold at most the cells x genes matrix (sparse or a chunk of it), per-cell obs, per-gene
    vectors and fit_pca's G x G products: a non-negative sum of these cannot explode when a noisy small run
    measures below the tiny one (a power law fitted to the excess did: preprocess at N^3 G^3)."""
    n, g = z["N"], z["G"]
    return [n * g, n, g * g]


TERM_MODELS = {("perturbench", "seconds"): _pb_time_terms, ("perturbench", "peak_mb"): _bytes_terms,
               ("celleval", "peak_mb"): _bytes_terms,
               **{(step, "peak_mb"): _data_bytes_terms for step in DATA_STEPS}}


def fit_terms(rows: list[dict], terms, key: str, fixed: float) -> dict:
    """y - fixed = sum_k a_k * term_k(size), a_k >= 0 (scipy nnls on terms scaled to unit size)."""
    import numpy as np
    from scipy.optimize import nnls

    a = np.array([terms(r["size"]) for r in rows], dtype=float)
    scale = a.max(axis=0)
    scale[scale == 0] = 1.0
    y = np.array([max(r[key] - fixed, 0.0) for r in rows])
    coef, _ = nnls(a / scale, y)
    return {"fixed": fixed, "terms": terms.__name__, "coef": list(map(float, coef / scale))}


def project_model(model: dict, size: dict) -> float:
    if "terms" in model:
        terms = {f.__name__: f for f in TERM_MODELS.values()}[model["terms"]]
        return model["fixed"] + sum(c * t for c, t in zip(model["coef"], terms(size)))
    return project(model, size)


def projections(results: dict, budget_gb: float, budget_h: float, threads: int) -> dict:
    out: dict = {"models": {}, "datasets": {}, "threads": threads}
    for kind, names, steps in (("data", DATA_VARS, DATA_STEPS), ("score", SCORE_VARS, SCORE_STEPS)):
        for step in steps:
            tiny = results["fixed"][step]
            models = {}
            for what, key in (("time", "seconds"), ("memory", "peak_mb")):
                terms = TERM_MODELS.get((step, key))
                models[what] = (fit_terms(results[kind][step], terms, key, tiny[key]) if terms
                                else fit(results[kind][step], names, key, tiny[key]))
            # projected = the whole tiny process (imports, start-up, tiny work) + the fitted growth of the work
            models["time"]["fixed"] = tiny["process_cpu_seconds"]
            models["memory"]["fixed"] = tiny["process_peak_mb"] + PRODUCTION_CHUNK_MB.get(step, 0)
            out["models"][step] = models
    for dataset, sizes in PAPER.items():
        rows = {}
        for step, models in out["models"].items():
            if step in ("preprocess", "preprocess_chunked") and step != sizes["preprocess"]:
                continue  # each dataset's reader takes one of the two paths
            size = dict(sizes["data" if step in DATA_STEPS else "score"])
            if step == "celleval_cross" and sizes["shards"] == 1:
                continue  # an unsharded dataset has no cross pass: score() computes everything in one job
            if step in SCORE_STEPS:  # one scoring job: a shard of conditions (cell-eval) or of groups (PerturBench);
                # the cross pass sees every condition (as summaries)
                split = {"celleval": sizes["shards"], "celleval_cross": 1}.get(step, min(sizes["shards"], sizes["groups"]))
                size["C"] = max(1, size["C"] // split)
            cpu_h = project_model(models["time"], size) / 3600
            gb = project_model(models["memory"], size) / 1024
            if step == "perturbench" and sizes["shards"] > 1:  # each shard fits the PCA on every truth cell
                pca = {"N": sizes["truth_cells"], "G": size["G"]}
                cpu_h += (project_model(out["models"]["fit_pca"]["time"], pca) - out["models"]["fit_pca"]["time"]["fixed"]) / 3600
            wall_h = cpu_h / threads if step in SCORE_STEPS else cpu_h
            rows[step] = {"cpu_hours": cpu_h, "hours": wall_h, "gb": gb,
                          "over_budget": wall_h > budget_h or gb > budget_gb}
        out["datasets"][dataset] = rows
    return out


def print_report(proj: dict, budget_gb: float, budget_h: float) -> None:
    print("\nfitted growth (work's CPU time / peak memory above the tiny run's): log-log slope per size variable,")
    print("or for structured terms the fitted coefficient per term")
    for step, models in proj["models"].items():
        parts = []
        for what in ("time", "memory"):
            m = models[what]
            parts.append(f"{m['terms']}: " + ", ".join(f"{c:.3g}" for c in m["coef"]) if "terms" in m
                         else ", ".join(f"{k}^{v:.2f}" for k, v in m["slopes"].items()))
        print(f"  {step:18s} time ~ {parts[0]:44s} memory ~ {parts[1]}")
    print(f"\nprojection against a {budget_gb:g} GB / {budget_h:g} h job (!! = over budget); data steps: single-thread CPU "
          f"time; scoring: CPU time / {proj['threads']} threads (scoring.threads), per shard for CD4")
    header = "  step               " + "".join(f"{d:>28s}" for d in proj["datasets"])
    print(header)
    for step in proj["models"]:
        cells = []
        for dataset in proj["datasets"]:
            r = proj["datasets"][dataset].get(step)
            if r is None:
                cells.append("(unsharded: no cross pass)" if step == "celleval_cross" else "(other reader)")
                continue
            hours = f"{r['hours'] * 60:.1f} min" if r["hours"] < 1 else f"{r['hours']:.1f} h"
            cells.append(f"{hours:>11s} {r['gb']:8.1f} GB{' !!' if r['over_budget'] else '   '}")
        print(f"  {step:18s} " + "".join(f"{c:>28s}" for c in cells))
    for dataset, sizes in PAPER.items():
        print(f"  {dataset}: data {sizes['data']}, scoring {sizes['score']}, {sizes['shards']} scoring shard(s), "
              f"{sizes['groups']} covariate group(s)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: 96 s on 2 quiet cores with --jobs 2")
    parser.add_argument("--density", type=float, default=0.1, help="non-zero share of the synthetic raw counts")
    parser.add_argument("--budget-gb", type=float, default=64.0)
    parser.add_argument("--budget-h", type=float, default=24.0)
    parser.add_argument("--threads", type=int, default=8, help="threads of a scoring job (config.yaml scoring.threads); "
                        "projected wall = CPU / threads, assuming BLAS/numba scale linearly (not measured here)")
    parser.add_argument("--out", type=Path, default=None, help="write measurements + projections as JSON")
    parser.add_argument("--keep", type=Path, default=None, help="directory for the temporary inputs")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="sizes measured side by side (default: one per core); each step stays one process")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--noop", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--from-json", type=Path, default=None, help="re-project the measurements of an earlier --out")
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker, args.dir, args.noop)
        return 0
    started = time.perf_counter()
    results = json.loads(args.from_json.read_text())["measured"] if args.from_json else bench(args.quick, args.density, args.keep, args.jobs)
    proj = projections(results, args.budget_gb, args.budget_h, args.threads)
    print_report(proj, args.budget_gb, args.budget_h)
    total = time.perf_counter() - started
    print(f"\nbenchmark wall time {total:.0f} s")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({
            "quick": args.quick, "density": args.density, "jobs": args.jobs, "budget": {"gb": args.budget_gb, "h": args.budget_h},
            "machine": {"python": sys.version, "platform": platform.platform(), "cpus": os.cpu_count()},
            "paper_sizes": PAPER, "measured": results, "projection": proj, "wall_seconds": total,
        }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Time and peak memory of ``score_perturbench`` on one synthetic input (issue 15, "Scoring at scale").

    .venv/bin/python workflow/bench/bench_scoring.py [--conditions 200] [--cells 200] [--genes 500]
        [--src workflow/src] [--workdir DIR] [--option key=value ...]

Writes a synthetic ``test_truth.h5ad`` / ``predictions.h5ad`` pair (C conditions x n cells each, plus n
control cells, dense float32 log1p-like values, the demo's obs/uns layout) into ``--workdir`` (reused when
already there), then runs ``score_perturbench`` in a fresh interpreter with ``--src`` first on its
``PYTHONPATH`` and reports wall time and the child's peak RSS (``resource.getrusage(RUSAGE_CHILDREN)``).
To measure an older version of the scorer, export its tree (``git archive <commit> workflow/src | tar -x
-C /tmp/old``) and pass ``--src /tmp/old/workflow/src``. Not a test; numbers are wall-clock on a shared
machine.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

_CHILD = r"""
import json, sys, time
from perturb_repro.scoring.perturbench import score_perturbench
pred, truth, out, options = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
start = time.perf_counter()
score_perturbench(pred, truth, "ctrl", out + "/per_condition.csv", out + "/summary.csv", **options)
print(json.dumps({"seconds_in_call": time.perf_counter() - start}))
"""


def make_inputs(workdir: Path, n_cond: int, n_cells: int, n_genes: int, seed: int = 0) -> tuple[Path, Path]:
    import anndata as ad
    import pandas as pd

    truth_path, pred_path = workdir / "test_truth.h5ad", workdir / "predictions.h5ad"
    if truth_path.exists() and pred_path.exists():
        return pred_path, truth_path
    rng = np.random.default_rng(seed)
    genes = [f"G{i:05d}" for i in range(n_genes)]
    conds = [f"P{i:04d}+ctrl" for i in range(n_cond)]
    effects = rng.normal(0.0, 0.3, size=(n_cond, n_genes)).astype(np.float32)

    def cells(n, shift):
        return np.log1p(rng.gamma(1.5, 1.0, size=(n, n_genes)).astype(np.float32)) + np.maximum(shift, -0.5)

    ctrl = cells(n_cells, 0.0)
    labels = [c for c in conds for _ in range(n_cells)] + ["ctrl"] * n_cells
    for path, scale in ((truth_path, 1.0), (pred_path, 0.8)):
        x = np.vstack([cells(n_cells, scale * effects[i]) for i in range(n_cond)] + [ctrl]).astype(np.float32)
        x = np.maximum(x, 0.0)
        obs = pd.DataFrame({"condition": pd.Categorical(labels)}, index=[f"{path.stem}_{i}" for i in range(len(labels))])
        adata = ad.AnnData(X=x, obs=obs, var=pd.DataFrame(index=genes))
        adata.uns["group_by"] = []
        adata.write_h5ad(path)
    return pred_path, truth_path


def run(src: str, pred: Path, truth: Path, options: dict) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(src).resolve()), env.get("PYTHONPATH", "")])
    with tempfile.TemporaryDirectory() as out:
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        start = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-c", _CHILD, str(pred), str(truth), out, json.dumps(options)],
            env=env, capture_output=True, text=True, check=False,
        )
        wall = time.perf_counter() - start
        peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if proc.returncode != 0:
        raise RuntimeError(f"score_perturbench failed:\n{proc.stderr[-3000:]}")
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    if peak_kb <= before:
        peak_kb = float("nan")  # an earlier child had a larger peak: run one measurement per process
    return {"wall_seconds": wall, "seconds_in_call": info["seconds_in_call"], "peak_rss_mb": peak_kb / 1024}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conditions", type=int, default=200)
    parser.add_argument("--cells", type=int, default=200)
    parser.add_argument("--genes", type=int, default=500)
    parser.add_argument("--src", default="workflow/src", help="directory holding the perturb_repro package to time")
    parser.add_argument("--workdir", default=None, help="where the synthetic inputs are written (default: a temp dir)")
    parser.add_argument("--option", action="append", default=[], help="score_perturbench keyword, key=json_value")
    args = parser.parse_args(argv)
    options = {}
    for item in args.option:
        key, _, value = item.partition("=")
        options[key] = json.loads(value)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench_scoring."))
    workdir.mkdir(parents=True, exist_ok=True)
    pred, truth = make_inputs(workdir, args.conditions, args.cells, args.genes)
    size_mb = (pred.stat().st_size + truth.stat().st_size) / 2**20
    result = run(args.src, pred, truth, options)
    result.update(
        conditions=args.conditions, cells_per_condition=args.cells, genes=args.genes, src=args.src,
        options=options, input_files_mb=size_mb,
    )
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

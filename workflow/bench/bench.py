#!/usr/bin/env python
"""Benchmark: demo DAG wall time, CellFlow train steps/s (tiny and paper presets), Euler sampling cost.

Run from the repository root with the project's venv:

    .venv/bin/python workflow/bench/bench.py [--skip-dag] [--out results/bench/bench.json]

Needs results/norman_demo/{processed.h5ad,pca.npz,embeddings/one_hot.npz,test_truth.h5ad} (see README.md beside this
file). Thread settings are left as they are: JAX/XLA uses every visible core unless XLA_FLAGS says
otherwise, so record the machine (the JSON does) when comparing numbers.
"""

from __future__ import annotations

import argparse
import csv
import gc
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "workflow" / "src"))

DATASET = "norman_demo"
# envs/ too: every rule's `conda:` directive names envs/pipeline.yaml and Snakemake records it in the job
# metadata even without --use-conda (a copy without it fails after the first job).
DAG_PARTS = ("Snakefile", "workflow", "config", "resources", "envs")
DAG_IGNORE = shutil.ignore_patterns("results", ".venv", ".git", ".snakemake", "__pycache__", "*.pyc")


# --------------------------------------------------------------------------------------------- DAG
def bench_dag(keep: bool) -> dict:
    """Run the whole demo DAG in a fresh copy of the repo; wall time plus per-rule benchmark sums."""
    snakemake = Path(sys.executable).parent / "snakemake"
    tmp = Path(tempfile.mkdtemp(prefix="bench_dag_"))
    try:
        for part in DAG_PARTS:
            src = ROOT / part
            if src.is_dir():
                shutil.copytree(src, tmp / part, ignore=DAG_IGNORE)
            else:
                shutil.copy2(src, tmp / part)
        cmd = [str(snakemake), "-c2", "all", "--configfile", "config/demo.yaml", "--directory", str(tmp),
               "-s", str(tmp / "Snakefile")]
        env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
        print(f"[dag] {' '.join(cmd)}  (cwd {tmp})", flush=True)
        log = tmp / "snakemake_bench.log"
        t0 = time.perf_counter()
        with open(log, "w") as handle:
            proc = subprocess.run(cmd, cwd=tmp, env=env, stdout=handle, stderr=subprocess.STDOUT)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            tail = log.read_text().splitlines()[-40:]
            raise RuntimeError(f"snakemake exited {proc.returncode} after {wall:.1f}s; log tail:\n" + "\n".join(tail))
        jobs = {}
        for tsv in sorted((tmp / "benchmarks").rglob("*.tsv")):
            with open(tsv) as handle:
                rows = list(csv.reader(handle, delimiter="\t"))
            header, values = rows[0], [float(r[0]) for r in rows[1:] if r and r[0] not in ("", "NA")]
            if header[0] != "s" or not values:
                continue
            jobs[str(tsv.relative_to(tmp / "benchmarks").with_suffix(""))] = sum(values) / len(values)
        rules: dict[str, float] = defaultdict(float)
        for job, seconds in jobs.items():
            rules[job.split("/")[0]] += seconds
        return {
            "command": " ".join(cmd),
            "wall_seconds": wall,
            "sum_job_seconds": sum(jobs.values()),
            "rules_seconds": dict(sorted(rules.items(), key=lambda kv: -kv[1])),
            "jobs_seconds": dict(sorted(jobs.items(), key=lambda kv: -kv[1])),
            "n_jobs_benchmarked": len(jobs),
        }
    finally:
        if keep:
            print(f"[dag] kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------------------------------ CellFlow
def load_inputs():
    import anndata as ad

    from perturb_repro.data.pca import PCABasis
    from perturb_repro.data.preprocess import SPLIT
    from perturb_repro.embed.esm2 import load_embeddings
    from perturb_repro.models.base import ModelContext

    results = ROOT / "results" / DATASET
    needed = [results / f for f in ("processed.h5ad", "pca.npz", "embeddings/one_hot.npz", "test_truth.h5ad")]
    missing = [str(p) for p in needed if not p.exists()]
    if missing:
        raise SystemExit(
            f"missing {missing}; run: .venv/bin/snakemake -c2 results/{DATASET}/embeddings/one_hot.npz "
            f"results/{DATASET}/test_truth.h5ad results/{DATASET}/pca.npz --configfile config/demo.yaml"
        )
    adata = ad.read_h5ad(results / "processed.h5ad")
    train = adata[adata.obs[SPLIT] == "train"].copy()
    truth = ad.read_h5ad(results / "test_truth.h5ad")
    context = ModelContext(DATASET, adata.uns["control_label"], PCABasis.load(results / "pca.npz"),
                           load_embeddings(results / "embeddings" / "one_hot.npz"), 0)
    return train, truth, context


def bench_train(train, context, preset: str, warmup: int, steps: int, batch_size: int | None, tmpdir: Path):
    """Steps/s of cellflow's step function through the project's build_cellflow + train_steps.

    ``train_steps`` builds a new cellflow ``TrainSampler`` per call, whose ``jax.jit`` sampler re-traces
    and re-compiles on the call's first step, so the warm-up call does not warm it for the timed call.
    The steady rate therefore comes from per-step timestamps (taken when ``train_steps`` logs each loss,
    i.e. after ``float(loss)`` has synchronised): intervals between the timed call's steps 1..n.
    """
    import jax

    from perturb_repro.config import model_params
    from perturb_repro.models.cellflow import build_cellflow, train_steps
    from perturb_repro.training import TrainLog

    class TimedLog(TrainLog):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.stamps: list[float] = []

        def add(self, step: int, loss: float) -> None:
            self.stamps.append(time.perf_counter())
            super().add(step, loss)

    params = model_params({"type": "cellflow", "preset": preset})
    batch = int(batch_size or params["training"]["batch_size"])
    t0 = time.perf_counter()
    cf = build_cellflow(train, context, params)
    build_s = time.perf_counter() - t0
    n_params = int(sum(leaf.size for leaf in jax.tree_util.tree_leaves(cf.solver.vf_state.params)))
    log = TimedLog(tmpdir / f"train_log_{preset}.csv", 0)
    try:
        t0 = time.perf_counter()
        step = train_steps(cf, 0, warmup, batch, context.seed, log, None)
        warm_s = time.perf_counter() - t0
        log.stamps.clear()
        t0 = time.perf_counter()
        step = train_steps(cf, step, step + steps, batch, context.seed, log, None)
        call_s = time.perf_counter() - t0
        stamps = [t0] + log.stamps
    finally:
        log.close()
    first_step_s = stamps[1] - stamps[0]  # includes the TrainSampler re-compile
    steady = (stamps[-1] - stamps[1]) / (steps - 1) if steps > 1 else first_step_s
    return cf, {
        "preset": preset, "batch_size": batch, "n_params_vf": n_params, "build_seconds": build_s,
        "warmup_steps": warmup, "warmup_seconds_incl_compile": warm_s,
        "timed_steps": steps, "timed_call_seconds": call_s,
        "timed_call_steps_per_second": steps / call_s,
        "timed_first_step_seconds": first_step_s,
        "steady_seconds_per_step": steady, "steps_per_second": 1.0 / steady,
        "steady_intervals": max(steps - 1, 1), "train_cells": int(train.n_obs),
    }


def covariate_frame(conditions: list[str], control_label: str):
    """The covariate table EulerSampler.batches builds: condition id plus one column per gene slot."""
    import pandas as pd

    from perturb_repro.data.conditions import genes_of
    from perturb_repro.data.source import CONDITION
    from perturb_repro.models.cellflow import GENE_COLUMNS

    covariates = pd.DataFrame({CONDITION: conditions})
    for i, column in enumerate(GENE_COLUMNS):
        covariates[column] = pd.Categorical(
            [(genes_of(c, control_label) + [control_label] * 2)[i] for c in conditions]
        )
    return covariates


def bench_sampling(cf, truth, context, n_cells: int, steps: int, seed: int, cf_predict_repeats: int) -> dict:
    import diffrax
    import numpy as np

    from perturb_repro.data.source import CONDITION, IS_CONTROL
    from perturb_repro.models.cellflow import EulerSampler, _cellflow_view

    control_label = context.control_label
    conditions = sorted(set(truth.obs[CONDITION]) - {control_label})
    control = truth[truth.obs[IS_CONTROL].to_numpy()].copy()
    rng = np.random.default_rng(seed)
    pick = rng.choice(control.n_obs, size=n_cells, replace=True)  # as CellFlowModel.sample, with replacement
    with warnings.catch_warnings():  # duplicated obs names from sampling with replacement; made unique below
        warnings.simplefilter("ignore", UserWarning)
        source = control[pick].copy()
    source.obs_names_make_unique()
    view = _cellflow_view(source, context)

    sampler = EulerSampler(cf, steps)
    t0 = time.perf_counter()
    z_first = sampler.predict(view, conditions, context)  # also fills view.uns (control label, ESM2 table)
    euler_first = time.perf_counter() - t0
    t0 = time.perf_counter()
    z_euler = sampler.predict(view, conditions, context)
    euler_second = time.perf_counter() - t0
    first_vs_second = max(float(np.max(np.abs(z_first[c] - z_euler[c]))) for c in conditions)

    covariates = covariate_frame(conditions, control_label)
    cf_times, z_cf = [], None
    for _ in range(cf_predict_repeats):
        t0 = time.perf_counter()
        z_cf = cf.predict(
            view, covariate_data=covariates, sample_rep="X_pca", condition_id_key=CONDITION,
            solver=diffrax.Euler(), dt0=1.0 / steps, stepsize_controller=diffrax.ConstantStepSize(),
        )
        cf_times.append(time.perf_counter() - t0)
    z_cf = {(k if isinstance(k, str) else k[0]): v for k, v in z_cf.items()}
    if sorted(z_cf) != conditions:
        raise RuntimeError(f"cf.predict returned keys {sorted(z_cf)[:5]}..., expected the test conditions")

    one = conditions[0]
    diff_one = float(np.max(np.abs(np.asarray(z_cf[one]) - z_euler[one])))
    diff_all = max(float(np.max(np.abs(np.asarray(z_cf[c]) - z_euler[c]))) for c in conditions)
    scale = float(max(np.max(np.abs(z_euler[c])) for c in conditions))
    units = len(conditions) * (n_cells / 1000.0) * (steps / 100.0)  # "1,000 cells x 100 steps" units
    return {
        "n_conditions": len(conditions), "n_cells_per_condition": n_cells, "euler_steps": steps,
        "units_1k_cells_x_100_steps": units,
        "euler_sampler_first_seconds_incl_compile": euler_first,
        "euler_sampler_second_seconds": euler_second,
        "cellflow_predict_seconds": cf_times,
        "s_per_unit": {
            "euler_sampler_first": euler_first / units,
            "euler_sampler_second": euler_second / units,
            "cellflow_predict": cf_times[0] / units,
            **({"cellflow_predict_repeat": cf_times[-1] / units} if len(cf_times) > 1 else {}),
        },
        "ratio_cellflow_predict_over_euler_first": cf_times[0] / euler_first,
        "ratio_cellflow_predict_over_euler_second": cf_times[0] / euler_second,
        "max_abs_diff_one_condition": {"condition": one, "value": diff_one},
        "max_abs_diff_all_conditions": diff_all,
        "max_abs_value_pca_space": scale,
        "euler_first_vs_second_call_max_abs_diff": first_vs_second,
    }


# ------------------------------------------------------------------------------------------- report
def row(label: str, value: str) -> str:
    return f"  {label:<58} {value}"


def print_report(res: dict, top: int) -> None:
    print("\n" + "=" * 80)
    print(f"Benchmark  ({res['machine']['cpu_count']} CPUs, jax {res['machine']['jax']} on "
          f"{res['machine']['jax_backend']}, {res['machine']['platform']})")
    print("=" * 80)
    dag = res.get("dag")
    if dag:
        print("1. Demo DAG  (snakemake -c2 all --configfile config/demo.yaml, fresh copy)")
        print(row("wall time", f"{dag['wall_seconds']:.1f} s"))
        print(row(f"sum of {dag['n_jobs_benchmarked']} job benchmarks (s column)", f"{dag['sum_job_seconds']:.1f} s"))
        print(row("top rules (summed over jobs):", ""))
        for rule, s in list(dag["rules_seconds"].items())[:top]:
            print(row(f"    {rule}", f"{s:8.1f} s"))
        print(row("top jobs:", ""))
        for job, s in list(dag["jobs_seconds"].items())[:top]:
            print(row(f"    {job}", f"{s:8.1f} s"))
    elif "dag_skipped" in res:
        print("1. Demo DAG: skipped (--skip-dag)")
    print("2. CellFlow training (build_cellflow + train_steps, time after warm-up)")
    for key in ("train_tiny", "train_paper"):
        t = res.get(key)
        if not t:
            continue
        print(row(f"{t['preset']}: batch {t['batch_size']}, {t['timed_steps']} steps after {t['warmup_steps']} warm-up",
                  f"{t['steps_per_second']:.3f} steps/s  ({t['steady_seconds_per_step']:.4f} s/step)"))
        print(row(f"{t['preset']}:   whole timed call (incl. sampler re-jit)",
                  f"{t['timed_call_steps_per_second']:.3f} steps/s  (1st step {t['timed_first_step_seconds']:.2f} s)"))
        print(row(f"{t['preset']}: warm-up incl. compile / build", f"{t['warmup_seconds_incl_compile']:.1f} s / "
                  f"{t['build_seconds']:.1f} s"))
        print(row(f"{t['preset']}: velocity-field parameters", f"{t['n_params_vf']:,}"))
    s = res.get("sampling")
    if s:
        u = s["s_per_unit"]
        print(f"3. Euler sampling, tiny model: {s['n_conditions']} conditions x {s['n_cells_per_condition']} cells x "
              f"{s['euler_steps']} steps = {s['units_1k_cells_x_100_steps']:g} units of 1,000 cells x 100 steps")
        print(row("EulerSampler, 1st call (incl. compile)",
                  f"{s['euler_sampler_first_seconds_incl_compile']:.2f} s  = {u['euler_sampler_first']:.4f} s/unit"))
        print(row("EulerSampler, 2nd call (compiled)",
                  f"{s['euler_sampler_second_seconds']:.2f} s  = {u['euler_sampler_second']:.4f} s/unit"))
        for i, t in enumerate(s["cellflow_predict_seconds"]):
            print(row(f"cf.predict(Euler, dt0=1/{s['euler_steps']}), call {i + 1}", f"{t:.2f} s  = "
                      f"{t / s['units_1k_cells_x_100_steps']:.4f} s/unit"))
        print(row("ratio cf.predict / EulerSampler 1st call", f"{s['ratio_cellflow_predict_over_euler_first']:.1f}x"))
        print(row("ratio cf.predict / EulerSampler 2nd call", f"{s['ratio_cellflow_predict_over_euler_second']:.1f}x"))
        d = s["max_abs_diff_one_condition"]
        print(row(f"max |cf.predict - EulerSampler|, '{d['condition']}'", f"{d['value']:.3g}"))
        print(row("max |cf.predict - EulerSampler|, all conditions",
                  f"{s['max_abs_diff_all_conditions']:.3g}  (max |z| {s['max_abs_value_pca_space']:.3g})"))
    print(row("total benchmark time", f"{res['total_seconds']:.1f} s"))
    print("=" * 80)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--skip-dag", action="store_true", help="skip the demo-DAG wall-time run")
    ap.add_argument("--keep-dag-dir", action="store_true", help="keep the temporary DAG copy for inspection")
    ap.add_argument("--out", default="results/bench/bench.json", help="JSON output (default: %(default)s)")
    ap.add_argument("--tiny-steps", type=int, default=200)
    ap.add_argument("--tiny-warmup", type=int, default=5)
    ap.add_argument("--paper-steps", type=int, default=3)
    ap.add_argument("--paper-warmup", type=int, default=1)
    ap.add_argument("--skip-paper", action="store_true", help="skip the paper-preset training benchmark")
    ap.add_argument("--n-cells", type=int, default=1000, help="source cells per condition for sampling")
    ap.add_argument("--euler-steps", type=int, default=100)
    ap.add_argument("--cf-predict-repeats", type=int, default=1)
    ap.add_argument("--top", type=int, default=8, help="rules/jobs to list")
    args = ap.parse_args(argv)

    import jax

    started = time.perf_counter()
    res: dict = {
        "machine": {
            "cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "jax": jax.__version__, "jax_backend": jax.default_backend(),
            "XLA_FLAGS": os.environ.get("XLA_FLAGS"),
        },
        "args": vars(args),
    }
    if args.skip_dag:
        res["dag_skipped"] = True
    else:
        res["dag"] = bench_dag(args.keep_dag_dir)
        print(f"[dag] wall {res['dag']['wall_seconds']:.1f} s", flush=True)

    train, truth, context = load_inputs()
    with tempfile.TemporaryDirectory(prefix="bench_cf_") as tmp:
        cf, res["train_tiny"] = bench_train(train, context, "tiny", args.tiny_warmup, args.tiny_steps, None, Path(tmp))
        print(f"[train] tiny {res['train_tiny']['steps_per_second']:.2f} steps/s", flush=True)
        res["sampling"] = bench_sampling(cf, truth, context, args.n_cells, args.euler_steps, 0, args.cf_predict_repeats)
        print(f"[sample] ratio {res['sampling']['ratio_cellflow_predict_over_euler_first']:.1f}x", flush=True)
        del cf
        gc.collect()
        if not args.skip_paper:
            cf, res["train_paper"] = bench_train(train, context, "paper", args.paper_warmup, args.paper_steps, None,
                                                 Path(tmp))
            print(f"[train] paper {res['train_paper']['steady_seconds_per_step']:.2f} s/step", flush=True)
            del cf
            gc.collect()
    res["total_seconds"] = time.perf_counter() - started

    print_report(res, args.top)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Wall time of one demo sampling job (``steps.predict_step``, what the sample_model rule runs) per model.

Builds the norman_demo inputs from the bundled demo h5ad in a temporary directory (split, preprocess, PCA,
truth, and a random 16-d gene embedding standing in for ESM2), trains each model briefly with the demo preset
(the number of steps does not change sampling cost), then times ``predict_step`` ``--repeats`` times in this
process. Each job is timed whole (reading the truth, loading the checkpoint, compiling, sampling every test
condition, writing predictions.h5ad); ``sample_seconds`` (the models' calls only) is read back from the file.

    .venv/bin/python workflow/bench/bench_sampling_job.py [--models cellflow primeflow] [--out results/bench/sampling_job.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import anndata as ad
import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "workflow" / "src"))

from perturb_repro import steps  # noqa: E402
from perturb_repro.config import deep_merge, model_params  # noqa: E402
from perturb_repro.embed.esm2 import write_embeddings  # noqa: E402

DATASET = "norman_demo"
MODELS = {
    "cellflow": ({"type": "cellflow", "preset": "tiny"}, {"training": {"num_iterations": 5, "checkpoint_every": 5}}),
    "primeflow": ({"type": "primeflow", "preset": "tiny_mlp"}, {"training": {"num_steps": 2}}),
}


def build_inputs(out: Path) -> dict[str, str]:
    demo = yaml.safe_load((REPO / "config" / "demo.yaml").read_text())
    cfg = dict(demo["datasets"][DATASET], name=DATASET)
    raw = str(REPO / cfg["source"]["path"])
    paths = {k: str(out / v) for k, v in {"split": "split.csv", "processed": "processed.h5ad", "summary": "s.json",
                                          "pca": "pca.npz", "truth": "test_truth.h5ad", "esm2": "emb.npz"}.items()}
    steps.split_step(raw, cfg, paths["split"])
    steps.preprocess_step(raw, paths["split"], cfg, paths["processed"], paths["summary"])
    steps.pca_step(paths["processed"], cfg, paths["pca"])
    steps.truth_step(paths["processed"], paths["truth"])
    obs = ad.read_h5ad(paths["processed"], backed="r").obs
    genes = sorted({g for c in obs["condition"].astype(str) for g in c.split("+")} - {cfg["control_label"]})
    rng = np.random.default_rng(0)
    write_embeddings(paths["esm2"], {g: rng.normal(size=16).astype(np.float32) for g in genes},
                     cfg["control_label"], "random-16d", [])
    return paths


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20, help="sampling.steps (Euler)")
    ap.add_argument("--n-cells", type=int, default=200, help="sampling.n_cells_per_condition")
    ap.add_argument("--out", default="results/bench/sampling_job.json")
    args = ap.parse_args(argv)
    sampling = {"steps": args.steps, "n_cells_per_condition": args.n_cells, "seed": 0}
    result = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": sys.version.split()[0]},
              "sampling": sampling, "jobs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        paths = build_inputs(Path(tmp))
        n_conditions = len(steps.sampling_plan(ad.read_h5ad(paths["truth"], backed="r").obs, "control", []))
        result["conditions"] = n_conditions
        for name in args.models:
            cfg, overrides = MODELS[name]
            params = deep_merge(model_params(cfg), overrides)
            ckpt = str(Path(tmp) / name / "checkpoint")
            steps.train_step(DATASET, paths["processed"], paths["pca"], paths["esm2"], cfg, params, ckpt, 0)
            runs = []
            for k in range(args.repeats):
                out = str(Path(tmp) / name / f"pred{k}.h5ad")
                started = time.perf_counter()
                steps.predict_step(DATASET, name, paths["truth"], paths["processed"], paths["pca"], paths["esm2"],
                                   cfg, params, sampling, ckpt, out)
                wall = time.perf_counter() - started
                runs.append({"wall_s": round(wall, 2),
                             "sample_s": round(float(ad.read_h5ad(out, backed="r").uns["sample_seconds"]), 2)})
                print(f"{name} job {k}: {runs[-1]['wall_s']} s wall, {runs[-1]['sample_s']} s in sample() "
                      f"({n_conditions} conditions)", flush=True)
            result["jobs"][name] = runs
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

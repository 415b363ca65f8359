"""A real training process for tests/test_kill_resume.py: one model on the demo's train cells into a directory.

    python tests/kill_resume_job.py MODEL CHECKPOINT_DIR [pause:FILE:N:before|after]

MODEL is ``cellflow`` (JAX, its own loop in models/cellflow.py) or ``linear`` (PerturBench linear, PyTorch
through the shared trainer). ``pause:FILE:N:when`` stops the process at the N-th atomic write of FILE -- with
the temp file written but not yet renamed (``before``) or just after the rename (``after``) -- and writes
``CHECKPOINT_DIR/../paused`` so the test can SIGKILL it exactly there. Each fit prints ``RESUMED_FROM <step>``
(the step its train log restarts at), so the test can tell a resume from a fresh start.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "workflow" / "src"))
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")

# steps: CellFlow 240 updates, a checkpoint every 40; linear 20 epochs of 22 updates, a checkpoint every 20
CELLFLOW_STEPS, CELLFLOW_EVERY = 240, 40
LINEAR_EPOCHS, LINEAR_EVERY = 20, 20


def demo_inputs(model: str):
    """(train, val, context) from the bundled demo file, as the pipeline's data steps make them."""
    import numpy as np
    import yaml

    from perturb_repro.data.pca import fit_pca
    from perturb_repro.data.preprocess import preprocess
    from perturb_repro.data.source import load_source
    from perturb_repro.data.split import gears_split_table
    from perturb_repro.models.base import ModelContext

    config = yaml.safe_load((REPO / "config" / "demo.yaml").read_text())
    cfg = dict(config["datasets"]["norman_demo"], name="norman_demo")
    raw = load_source(REPO / cfg["source"]["path"], cfg, verify=False)
    split = gears_split_table(list(raw.obs["condition"].unique()), "control", seed=42)
    data = preprocess(raw, split, cfg, "split.csv")
    train = data[data.obs["split"] == "train"].copy()
    val = data[data.obs["split"] == "val"].copy()
    embeddings = {}
    if model == "cellflow":
        genes = sorted({g for c in data.obs["condition"] for g in c.split("+")} - {"control"})
        rng = np.random.default_rng(0)
        embeddings = {g: rng.normal(size=16).astype(np.float32) for g in genes}
    return train, val, ModelContext("norman_demo", "control", fit_pca(data, 10, seed=0), embeddings, seed=0)


def model_params(model: str) -> dict:
    from perturb_repro.config import deep_merge, model_params as preset

    if model == "cellflow":
        over = {"training": {"num_iterations": CELLFLOW_STEPS, "checkpoint_every": CELLFLOW_EVERY, "batch_size": 64}}
    else:  # early stopping off: the run's length is the epoch budget
        over = {"trainer": {"max_epochs": LINEAR_EPOCHS}, "data": {"batch_size": 64},
                "early_stopping": {"patience": 100}, "training": {"checkpoint_every": LINEAR_EVERY}}
    return deep_merge(preset({"type": model, "preset": "tiny"}), over)


def model_class(model: str):
    from perturb_repro.models.base import get_model

    return type(get_model(model))


def weights(model: str, checkpoint_dir: Path) -> dict:
    """The trained weights as numpy arrays, by name."""
    import numpy as np

    if model == "cellflow":
        import jax

        from perturb_repro.models.cellflow import load_cellflow

        leaves = jax.tree_util.tree_leaves_with_path(load_cellflow(checkpoint_dir).solver.vf_state.params)
        return {jax.tree_util.keystr(k): np.asarray(v) for k, v in leaves}
    from perturb_repro.models.perturbench_baselines import _PerturBenchModel

    return {k: v.numpy() for k, v in _PerturBenchModel.load(checkpoint_dir)["weights"].items()}


def _report_resume() -> None:
    """Print the step each train log restarts at (both loops open their log with it)."""
    import perturb_repro.models.cellflow as cellflow
    import perturb_repro.trainer as trainer
    from perturb_repro.training import TrainLog

    class ReportingLog(TrainLog):
        def __init__(self, path, resume_from_step, *extra):
            print(f"RESUMED_FROM {resume_from_step}", flush=True)
            super().__init__(path, resume_from_step, *extra)

    cellflow.TrainLog = ReportingLog
    trainer.TrainLog = ReportingLog


def _pause_at(spec: str, flag_file: Path) -> None:
    """Hold the process at the N-th rename of a temp file onto FILE (see the module docstring)."""
    _, name, n, when = spec.split(":")
    real_replace, seen = os.replace, [0]

    def replace(src, dst, *args, **kwargs):
        hit = Path(dst).name == name and Path(src).name.startswith(".")
        if hit:
            seen[0] += 1
        hit = hit and seen[0] == int(n)
        if hit and when == "before":
            flag_file.write_text("paused")
            time.sleep(600)
        real_replace(src, dst, *args, **kwargs)
        if hit and when == "after":
            flag_file.write_text("paused")
            time.sleep(600)

    os.replace = replace


def main(argv: list[str]) -> None:
    model, out = argv[0], Path(argv[1])
    _report_resume()
    if len(argv) > 2:
        _pause_at(argv[2], out.parent / "paused")
    train, val, context = demo_inputs(model)
    print("TRAINING", flush=True)
    model_class(model)().fit(train, val, context, model_params(model), out)
    print("DONE", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])

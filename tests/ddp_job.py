"""A training job for tests/test_ddp.py, importable by ``perturb_repro.distributed``'s worker processes
(the test puts this directory on PYTHONPATH): both scLDM stages, tiny preset, on a small synthetic count
matrix built the same way in every process, trained into ``out_dir/ae`` and ``out_dir/fm``."""

from __future__ import annotations

import signal
from pathlib import Path

import numpy as np


def synthetic_cells(n_cells: int = 96, n_genes: int = 24, seed: int = 0):
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    labels = np.array(["control", "G1", "G2", "G1+G2"])[rng.integers(0, 4, n_cells)]
    counts = rng.negative_binomial(2, 0.4, size=(n_cells, n_genes)).astype(np.float64)
    counts[:, 0] += 1  # every cell expresses something
    total = counts.sum(1) + rng.integers(50, 200, n_cells)  # whole-transcriptome totals: genes outside the panel
    x = np.log1p(counts / total[:, None] * 1e4).astype(np.float32)
    obs = pd.DataFrame({"condition": labels, "is_control": labels == "control",
                        "cell_type": rng.choice(["a", "b"], n_cells)}, index=[f"c{i}" for i in range(n_cells)])
    a = ad.AnnData(sp.csr_matrix(x), obs=obs, var=pd.DataFrame(index=[f"g{j}" for j in range(n_genes)]))
    a.layers["counts"] = sp.csr_matrix(counts.astype(np.float32))
    return a


def params(ae_steps: int, fm_steps: int, batch: int, every: int):
    from perturb_repro.config import deep_merge, model_params

    tr = {"checkpoint_every": every, "batch_size": batch, "progress": False}
    over = {"counts": {"source": "layer", "layer": "counts"},
            "autoencoder": {"training": {**tr, "num_steps": ae_steps}},
            # EMA on, so the resumed state includes the shadow
            "flow": {"training": {**tr, "num_steps": fm_steps, "ema_decay": 0.9, "ema_update_every": 1,
                                  "ema_update_after_step": 1}}}
    p = deep_merge(model_params({"type": "scldm", "preset": "tiny"}), over)
    assert p["autoencoder"]["network"]["dropout"] == 0 and p["flow"]["network"]["dropout"] == 0
    return p


class _SignalAt:
    """A StopFlag whose SIGTERM arrives on rank 0 only, at its ``n``-th poll (one poll per update): the
    trainer must spread it to the other ranks, save and raise Preempted everywhere."""

    def __init__(self, n: int, rank: int):
        self.n, self.rank = n, rank

    @property
    def raised(self):
        self.n -= 1
        return signal.SIGTERM if (self.rank == 0 and self.n < 0) else None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


def train(out_dir: str, ae_steps: int = 4, fm_steps: int = 4, batch: int = 16, every: int = 2,
          stop_stage: str | None = None, stop_after: int = 0) -> None:
    """Train both stages into ``out_dir``; with ``stop_stage`` ("ae" or "fm") SIGTERM reaches rank 0 after
    ``stop_after`` updates of that stage (the job then fails with Preempted, its state saved)."""
    import torch

    import perturb_repro.trainer as trainer_mod
    from perturb_repro.distributed import current_world
    from perturb_repro.models import scldm as S
    from perturb_repro.models.base import ModelContext

    torch.set_num_threads(1)
    out = Path(out_dir)
    cells = synthetic_cells()
    context = ModelContext("ddp_test", "control", None, {}, seed=0)
    p = params(ae_steps, fm_steps, batch, every)
    real_flag = trainer_mod.StopFlag
    rank = current_world().rank

    def flag(stage):
        return (lambda: _SignalAt(stop_after, rank)) if stage == stop_stage else real_flag

    model = S.ScLDMModel()
    trainer_mod.StopFlag = flag("ae")
    try:
        model.fit_autoencoder(cells, None, context, p, out / "ae")
        trainer_mod.StopFlag = flag("fm")
        model.fit(cells, None, context, {**p, "_autoencoder_dir": str(out / "ae")}, out / "fm")
    finally:
        trainer_mod.StopFlag = real_flag


def train_runs(runs: list[dict]) -> None:
    """Several :func:`train` calls in one job (saves a process start-up per run); a preempted run fails the job."""
    for kwargs in runs:
        train(**kwargs)

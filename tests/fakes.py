"""Test doubles shared by the tests: the training loop's stop flag, a block-size spy, synthetic perturbation data."""

import signal
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the annotations only; tests import anndata where they build cells
    import anndata as ad


class SignalAfter:
    """Stands in for ``perturb_repro.training.StopFlag``: reports SIGTERM once the training loop has
    polled it ``n`` times, so a test can preempt a run at a chosen step without real signals."""

    def __init__(self, n):
        self.n = n

    @property
    def raised(self):
        self.n -= 1
        return signal.SIGTERM if self.n < 0 else None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


def record_block_rows(monkeypatch, module, name, block=lambda item: item):
    """Replace the block generator ``module.<name>`` by one that yields the same items and records each
    block's row count in the returned list (``block`` picks the block out of an item, e.g. an (offset, block) pair),
    so a test can check that a chunked reader never holds more than a window of rows."""
    original = getattr(module, name)
    rows = []

    def spy(*args, **kwargs):
        for item in original(*args, **kwargs):
            rows.append(block(item).shape[0])
            yield item

    monkeypatch.setattr(module, name, spy)
    return rows


# --------------------------------------------------------------------------- synthetic perturbation data
# The PerturBench-style models' tests (CPA/Biolord, linear/latent/decoder, SAMS-VAE) fit on the same design:
# six genes, their singles and four combinations in train, two unseen combinations of seen genes in val.

GENES = list("ABCDEF")
TRAIN_CONDITIONS = GENES + ["A+B", "C+D", "E+F", "A+C"]
VAL_CONDITIONS = ["B+E", "D+F"]  # unseen combinations of seen genes


def perturbation_adata(blocks, obs) -> "ad.AnnData":
    """Cells x genes from per-block matrices and their (condition, is_control, split, cell_type) rows."""
    import anndata as ad
    import numpy as np
    import pandas as pd

    frame = pd.DataFrame(obs, columns=["condition", "is_control", "split", "cell_type"])
    frame.index = [f"c{i}" for i in range(len(frame))]
    adata = ad.AnnData(np.vstack(blocks).astype(np.float32), obs=frame)
    adata.var_names = [f"g{i}" for i in range(adata.n_vars)]
    return adata


def additive_cells(seed=0, n_cells=40, n_genes=30, effect_sd=0.8) -> "ad.AnnData":
    """Two cell types with their own baselines; each gene adds a fixed sparse shift; combos add both."""
    import numpy as np

    rng = np.random.default_rng(seed)
    base = {"t1": rng.uniform(1.0, 2.0, n_genes), "t2": rng.uniform(1.5, 2.5, n_genes)}
    delta = {g: rng.normal(0, effect_sd, n_genes) * (rng.random(n_genes) < 0.5) for g in GENES}
    blocks, obs = [], []
    for split, conditions in [("train", ["control"] + TRAIN_CONDITIONS), ("val", VAL_CONDITIONS)]:
        for condition in conditions:
            for cell_type, mu in base.items():
                k = n_cells * (2 if condition == "control" else 1)
                shift = sum((delta[g] for g in condition.split("+") if g != "control"), np.zeros(n_genes))
                blocks.append(np.clip(mu + shift + rng.normal(0, 0.1, (k, n_genes)), 0, None))
                obs += [(condition, condition == "control", split, cell_type)] * k
    return perturbation_adata(blocks, obs)


def train_val(adata):
    """(train cells, val cells) as separate AnnData objects."""
    return adata[adata.obs["split"] == "train"].copy(), adata[adata.obs["split"] == "val"].copy()

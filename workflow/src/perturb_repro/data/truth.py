"""The scoring truth: real test cells plus the real control cells, dense, in processed gene order."""

from __future__ import annotations

import anndata as ad

from .pca import dense
from .preprocess import SPLIT
from .source import IS_CONTROL


def build_test_truth(processed: ad.AnnData) -> ad.AnnData:
    keep = (processed.obs[SPLIT] == "test") | processed.obs[IS_CONTROL]
    truth = processed[keep].copy()
    truth.X = dense(truth.X)
    return truth

"""The scoring truth: real test cells plus the real control cells, dense, in processed gene order."""

from __future__ import annotations

import anndata as ad

from .pca import dense
from .preprocess import SPLIT
from .source import IS_CONTROL


def build_test_truth(processed: ad.AnnData) -> ad.AnnData:
    """Test cells plus the control cells; obs keeps the group_by columns and uns['group_by'], so
    prediction and scoring can work per group (each group's test conditions against its own controls).

    When control cells were split (PerturBench's ``train_control_fraction``) only the test controls
    are kept, as PerturBench evaluates against them; otherwise (GEARS: every control in train) all.
    """
    is_test = (processed.obs[SPLIT] == "test").to_numpy()
    is_control = processed.obs[IS_CONTROL].to_numpy(dtype=bool)
    controls = is_control & is_test if (is_control & is_test).any() else is_control
    keep = (is_test & ~is_control) | controls
    truth = processed[keep].copy()
    truth.X = dense(truth.X)
    return truth

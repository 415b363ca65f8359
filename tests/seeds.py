"""The one way tests find the seed texts (papers and cards): ``../shared/seeds`` beside the checkout, as in CI
and on the team's machines, or the folder named by ``$PERTURB_REPRO_SEEDS``. Tests that read a seed are marked
``needs_seeds``: they skip, with the path looked at, only where the folder is really absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SEEDS_DIR = Path(os.environ.get("PERTURB_REPRO_SEEDS", REPO.parent / "shared" / "seeds"))
needs_seeds = pytest.mark.skipif(
    not SEEDS_DIR.is_dir(), reason=f"seed texts not found at {SEEDS_DIR} (set PERTURB_REPRO_SEEDS)"
)


def seed_path(name: str) -> Path:
    """Path of one seed text; a test using it is marked ``needs_seeds``."""
    return SEEDS_DIR / name

"""Make the pipeline package importable from the repository checkout and share small fixtures."""

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "workflow" / "src"))
# JAX/torch on 2 CI cores: one thread each keeps timings steady
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")

import pytest  # noqa: E402 -- after the sys.path / thread settings above

DEMO_H5AD = REPO / "resources" / "demo" / "perturbench_devel.h5ad"


@pytest.fixture(scope="session")
def demo_cfg():
    """The demo dataset's config entry, as the Snakefile passes it to jobs."""
    import yaml

    config = yaml.safe_load((REPO / "config" / "demo.yaml").read_text())
    return dict(config["datasets"]["norman_demo"], name="norman_demo")


@pytest.fixture(scope="session")
def demo_raw(demo_cfg):
    from perturb_repro.data.source import load_source

    return load_source(DEMO_H5AD, demo_cfg)


@pytest.fixture(scope="session")
def demo_split(demo_raw, demo_cfg):
    from perturb_repro.data.split import gears_split_table

    return gears_split_table(list(demo_raw.obs["condition"].unique()), "control", seed=42)


@pytest.fixture(scope="session")
def demo_processed(demo_raw, demo_split, demo_cfg):
    from perturb_repro.data.preprocess import preprocess

    return preprocess(demo_raw.copy(), demo_split, demo_cfg, "split.csv")

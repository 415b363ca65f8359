"""Bad input through the real DAG: a clear message naming file and field, non-zero exit, no output."""

import anndata as ad
import numpy as np
import pytest
import yaml

from perturb_repro.data.source import load_source
from perturb_repro.errors import PipelineInputError
from workflow_helpers import REPO, copy_repo, snakemake

SPLIT = "results/norman_demo/split.csv"


@pytest.fixture
def scratch(tmp_path):
    return copy_repo(tmp_path)


def _demo_config(scratch, **dataset_changes):
    config = yaml.safe_load((REPO / "config" / "demo.yaml").read_text())
    config["datasets"]["norman_demo"].update(dataset_changes)
    (scratch / "config" / "bad.yaml").write_text(yaml.safe_dump(config))
    return "config/bad.yaml"


def _assert_refused(scratch, result, *expected):
    output = result.stdout + result.stderr
    assert result.returncode != 0
    for text in expected:
        assert text in output, output[-3000:]
    assert not (scratch / SPLIT).exists()
    assert not list((scratch / "results").rglob("*.tmp*")) if (scratch / "results").exists() else True


def test_corrupted_bundled_file(scratch):
    path = scratch / "resources" / "demo" / "perturbench_devel.h5ad"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    result = snakemake(scratch, "-c1", SPLIT, "--configfile", "config/demo.yaml")
    _assert_refused(scratch, result, "perturbench_devel.h5ad", "sha256", "checksum mismatch")


def test_missing_perturbation_column(scratch):
    result = snakemake(scratch, "-c1", SPLIT, "--configfile", _demo_config(scratch, perturbation_column="guide_id"))
    _assert_refused(scratch, result, "perturbench_devel.h5ad", "obs['guide_id']", "perturbation column missing")


def test_wrong_control_label(scratch):
    result = snakemake(scratch, "-c1", SPLIT, "--configfile", _demo_config(scratch, control_label="ctrl"))
    _assert_refused(scratch, result, "perturbench_devel.h5ad", "control label 'ctrl' not found")


def test_h5ad_without_perturbation_column(tmp_path, demo_cfg):
    """The loader names the file and the column when the file itself lacks it."""
    adata = ad.AnnData(np.ones((4, 3), dtype=np.float32))
    adata.obs["dataset"] = "norman19"
    path = tmp_path / "no_condition.h5ad"
    adata.write_h5ad(path)
    with pytest.raises(PipelineInputError, match=r"no_condition\.h5ad: field 'obs\['condition'\]'"):
        load_source(path, demo_cfg, verify=False)


def test_unreadable_h5ad(tmp_path, demo_cfg):
    path = tmp_path / "broken.h5ad"
    path.write_bytes(b"not an hdf5 file")
    with pytest.raises(PipelineInputError, match="broken.h5ad"):
        load_source(path, demo_cfg, verify=False)

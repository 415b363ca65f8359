"""The provenance manifest's fields: every one is checked against a value computed here."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess

import pytest

from perturb_repro.provenance import code_version, run_manifest
from workflow_helpers import REPO


def _tree(tmp_path):
    root = tmp_path / "tree"
    (root / "workflow" / "src").mkdir(parents=True)
    (root / "Snakefile").write_text("include: 'x'\n")
    (root / "workflow" / "src" / "m.py").write_text("A = 1\n")
    (root / "results").mkdir()
    (root / "results" / "metrics.csv").write_text("a\n")
    return root


def test_copied_tree_gets_a_content_version_that_follows_the_code(tmp_path):
    root = _tree(tmp_path)
    first = code_version(root)
    assert first.startswith("tree-sha256:") and len(first) == len("tree-sha256:") + 64
    (root / "results" / "metrics.csv").write_text("b\n")  # outputs are not code
    assert code_version(root) == first
    (root / "workflow" / "src" / "m.py").write_text("A = 2\n")
    assert code_version(root) != first


def test_git_checkout_gets_its_describe(tmp_path):
    if not shutil.which("git"):
        pytest.skip("git not installed")
    root = _tree(tmp_path)
    git = ["git", "-C", str(root), "-c", "user.email=t@t", "-c", "user.name=t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "Snakefile", "workflow"], check=True)
    subprocess.run([*git, "commit", "-qm", "x"], check=True)
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert code_version(root) == head
    (root / "Snakefile").write_text("changed\n")
    assert code_version(root) == head + "-dirty"


def test_run_manifest_fields(tmp_path):
    data = tmp_path / "x.h5ad"
    data.write_bytes(b"cells")
    settings = {"params": {"b": 2, "a": 1}, "sampling": {"steps": 10}}
    manifest = run_manifest({"processed": str(data)}, settings, seed=7, benchmarks=[])
    assert manifest["inputs_sha256"] == {str(data): hashlib.sha256(b"cells").hexdigest()}
    expected_settings = json.dumps(settings, sort_keys=True)
    assert manifest["settings_sha256"] == hashlib.sha256(expected_settings.encode()).hexdigest()
    assert manifest["seed"] == 7
    assert manifest["code_version"] == code_version(REPO) != "unknown"
    assert manifest["packages"]["anndata"] not in ("", "not installed")

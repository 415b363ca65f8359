"""Bad input through the real DAG: a clear message naming file and field, non-zero exit, no output of the step.

One Snakemake run (``-k``) builds ``processed.h5ad`` of many datasets at once, each reading its own spoiled copy
of the bundled demo file (or the real one with a spoiled config entry), so every case costs one job, not one
Snakemake start. Each test then reads its job's log and checks that the failing step left no output while the
step before it did run (a results directory that was never written is a failure, not a pass).
"""


import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import yaml

from perturb_repro.data.source import load_source
from perturb_repro.errors import PipelineInputError
from workflow_helpers import REPO, copy_repo, snakemake

DEMO = "resources/demo/perturbench_devel.h5ad"
NORMAN = "norman19"


def _norman_rows(adata):
    return np.flatnonzero((adata.obs["dataset"] == NORMAN).to_numpy())


def _as_counts(adata):
    """Integer counts behind the log-normalised demo cells (X = log1p(counts / ncounts * 1e4), rounded)."""
    x = adata.X.toarray()
    counts = np.rint(np.expm1(x) * adata.obs["ncounts"].to_numpy()[:, None] / 1e4).astype(np.float32)
    out = adata.copy()
    out.X = sp.csr_matrix(counts)
    return out


def _set_value(adata, value):
    """Put ``value`` at one stored entry of a Norman cell; return (cell, gene) where it went."""
    x = adata.X.tocsr()
    row = _norman_rows(adata)[7]
    k = x.indptr[row] + 3
    x.data[k] = value
    adata.X = x
    return str(adata.obs_names[row]), str(adata.var_names[x.indices[k]])


def _spoiled_files(root):
    """Spoiled copies of the demo file, each with the (cell, gene) or property a message must name."""
    demo = ad.read_h5ad(REPO / DEMO)
    demo.obs_names_make_unique()
    counts = _as_counts(demo)
    files, where = {}, {}

    def write(name, adata):
        path = root / "resources" / "bad" / f"{name}.h5ad"
        path.parent.mkdir(parents=True, exist_ok=True)
        adata.write_h5ad(path)
        files[name] = f"resources/bad/{name}.h5ad"

    for name, base, value in [("nan", demo, np.nan), ("inf", demo, np.inf), ("negcount", counts, -3.0)]:
        spoiled = base.copy()
        where[name] = _set_value(spoiled, value)
        write(name, spoiled)
    write("counts", counts)
    keep = demo.obs["condition"].isin(["control", "FOXO4"]).to_numpy() | (demo.obs["dataset"] != NORMAN).to_numpy()
    write("one_pert", demo[keep].copy())
    unlabelled = demo.copy()
    unlabelled.obs["condition"] = unlabelled.obs["condition"].astype(str)
    row = _norman_rows(unlabelled)[11]
    unlabelled.obs.iloc[row, unlabelled.obs.columns.get_loc("condition")] = ""
    where["empty_label"] = (str(unlabelled.obs_names[row]), "")
    write("empty_label", unlabelled)
    mcf = demo.obs["dataset"] == "mcfaline23"
    no_ctrl = ~(mcf & (demo.obs["cell_type"] == "U87MG") & (demo.obs["condition"] == "control")).to_numpy()
    write("no_controls", demo[no_ctrl].copy())
    corrupt = root / "resources" / "bad" / "corrupt.h5ad"
    data = bytearray((REPO / DEMO).read_bytes())
    data[len(data) // 2] ^= 0xFF
    corrupt.write_bytes(bytes(data))
    files["corrupt"] = "resources/bad/corrupt.h5ad"
    return files, where


# dataset key -> (file, changes to the norman_demo entry, failing step, what the message must contain)
def _cases(files):
    return {
        "nan_x": (files["nan"], {}, "preprocess", ["nan.h5ad", "field 'X'", "1 non-finite value(s)"]),
        "inf_x": (files["inf"], {}, "preprocess", ["inf.h5ad", "field 'X'", "1 non-finite value(s)"]),
        "negative_counts": (files["negcount"], {"preprocess": {"normalize": True}}, "preprocess",
                            ["negcount.h5ad", "field 'X'", "1 negative value(s)", "log1p would turn them into NaN"]),
        "counts_as_log": (files["counts"], {}, "preprocess",
                          ["counts.h5ad", "field 'X'", "looks like raw counts",
                           "datasets.counts_as_log.preprocess.normalize: false"]),
        "log_as_counts": (DEMO, {"preprocess": {"normalize": True}}, "preprocess",
                          ["perturbench_devel.h5ad", "field 'X'", "looks log-normalised, not raw counts",
                           "datasets.log_as_counts.preprocess.normalize: true"]),
        "hvg_loess": (files["counts"], {"preprocess": {"normalize": True, "n_top_genes": 200}}, "preprocess",
                      ["field 'datasets.hvg_loess.preprocess.n_top_genes'", "HVG selection (seurat_v3, 200 genes)",
                       "near singularities", "n_top_genes: null"]),
        "one_perturbation": (files["one_pert"], {}, "split",
                             ["one_pert.h5ad", "field 'datasets.one_perturbation.split'",
                              "no perturbed condition in train"]),
        "empty_label": (files["empty_label"], {}, "split",
                        ["empty_label.h5ad", "field 'obs['condition']'", "1 cell(s) have an empty or missing condition"]),
        "too_many_pcs": (DEMO, {"pca": {"n_components": 600}}, "split",
                         ["perturbench_devel.h5ad", "field 'datasets.too_many_pcs.pca.n_components'",
                          "600 components requested", "x 500 gene(s) has at most 500"]),
        "too_many_hvgs": (DEMO, {"preprocess": {"n_top_genes": 800}}, "split",
                          ["perturbench_devel.h5ad", "field 'datasets.too_many_hvgs.preprocess.n_top_genes'",
                           "800 highly variable genes requested, but the file has 500 gene(s)"]),
        "corrupted": (files["corrupt"], {}, "split", ["corrupt.h5ad", "field 'sha256'", "checksum mismatch"]),
        "missing_column": (DEMO, {"perturbation_column": "guide_id"}, "split",
                           ["perturbench_devel.h5ad", "field 'obs['guide_id']'", "perturbation column missing"]),
        "wrong_control": (DEMO, {"control_label": "ctrl"}, "split",
                          ["perturbench_devel.h5ad", "field 'obs['condition']'", "control label 'ctrl' not found"]),
    }


NO_CONTROLS = ("no_controls", "split", ["no_controls.h5ad", "field 'obs['condition']'",
                                       "group(s) of ['cell_type'] have test conditions but no 'control' cells",
                                       "('U87MG',)"])


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return copy_repo(tmp_path_factory.mktemp("bad"))


@pytest.fixture(scope="module")
def bad_run(scratch):
    """One `snakemake -k` over every spoiled dataset's processed.h5ad, in a scratch copy of the repository; a
    good target rides along (the unknown_* rules must not catch it)."""
    files, where = _spoiled_files(scratch)
    config = yaml.safe_load((REPO / "config" / "demo.yaml").read_text())
    norman = config["datasets"]["norman_demo"]
    cases = _cases(files)
    for name, (path, changes, _, _) in cases.items():
        entry = {**yaml.safe_load(yaml.safe_dump(norman)), "models": [], **changes}
        entry["source"] = {"path": path, "sha256": norman["source"]["sha256"] if name == "corrupted" else None}
        entry["preprocess"] = {**norman["preprocess"], **changes.get("preprocess", {})}
        config["datasets"][name] = entry
    mcf = config["datasets"]["mcfaline_demo"]
    config["datasets"][NO_CONTROLS[0]] = {**mcf, "models": [], "source": {"path": files["no_controls"], "sha256": None}}
    (scratch / "config" / "bad.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    names = [*cases, NO_CONTROLS[0]]
    result = snakemake(scratch, *[f"results/{d}/processed.h5ad" for d in names], GOOD_TARGET, "-c2", "-k",
                       "--configfile", "config/bad.yaml")
    expected = {name: (step, texts) for name, (_, _, step, texts) in cases.items()}
    expected[NO_CONTROLS[0]] = NO_CONTROLS[1:]
    return scratch, result, expected, where


CASES = ["nan_x", "inf_x", "negative_counts", "counts_as_log", "log_as_counts", "hvg_loess", "one_perturbation",
         "empty_label", "too_many_pcs", "too_many_hvgs", "corrupted", "missing_column", "wrong_control", "no_controls"]
LOGS = {"split": "logs/split/{}.log", "preprocess": "logs/preprocess/{}.log"}
OUTPUTS = {"split": ["split.csv", "processed.h5ad", "summary.json"], "preprocess": ["processed.h5ad", "summary.json"]}


GOOD_TARGET = "results/norman_demo/split.csv"


def test_every_case_is_covered(bad_run):
    scratch, result, expected, _ = bad_run
    assert sorted(expected) == sorted(CASES)
    assert result.returncode != 0
    assert (scratch / GOOD_TARGET).is_file(), result.stderr[-3000:]  # -k: the good dataset's job still ran


@pytest.mark.parametrize("name", CASES)
def test_bad_input_refused(bad_run, name):
    scratch, result, expected, where = bad_run
    step, texts = expected[name]
    log = scratch / LOGS[step].format(name)
    assert log.is_file(), f"the {step} job of {name} never ran: {result.stderr[-2000:]}"
    message = log.read_text()
    assert "ERROR:" in message and "Traceback" not in message, message[-2000:]
    for text in texts:
        assert text in message, message[-2000:]
    if name in where:  # the first offending (cell, gene) is named
        cell, gene = where[name]
        assert f"cell '{cell}'" in message and (not gene or f"gene '{gene}'" in message), message
    # the step's own line on Snakemake's stderr (joblog) carries the same message
    assert f"ERROR in rule {'split_conditions' if step == 'split' else 'preprocess_dataset'}: " in result.stderr
    results = scratch / "results" / name
    for output in OUTPUTS[step]:
        assert not (results / output).exists(), f"{name}: {output} left behind"
    if step == "preprocess":  # the step before it ran and wrote its output: the DAG really reached the check
        assert (results / "split.csv").is_file()
    assert not list((scratch / "results").rglob("*.tmp*"))


def test_good_datasets_of_the_same_file_still_pass(bad_run):
    """The value checks look at the selected cells: mcfaline's cells of the spoiled files are not refused."""
    scratch, _, _, _ = bad_run
    frame = load_source(scratch / "resources" / "bad" / "nan.h5ad",
                        {**_mcfaline_cfg(), "source": {"path": "x", "sha256": None}}, verify=False)
    assert frame.n_obs == 2586


def _mcfaline_cfg():
    config = yaml.safe_load((REPO / "config" / "demo.yaml").read_text())
    return dict(config["datasets"]["mcfaline_demo"], name="mcfaline_demo")


@pytest.mark.parametrize("profile", [False, True])
def test_unknown_dataset_or_model_in_target(scratch, profile):
    args = ["-n", "--configfile", "config/demo.yaml"]
    if profile:  # the same check when the target comes with a profile
        args = ["results/norman_demo/nosuch/metrics.csv", "--profile", "workflow/profiles/local", *args]
        expected = ["unknown model 'nosuch'", "datasets.norman_demo.models", "'cellflow'", "'scgpt'"]
    else:
        args = ["results/nosuch/cellflow/metrics.csv", *args]
        expected = ["unknown dataset 'nosuch'", "config key datasets", "['mcfaline_demo', 'norman_demo']"]
    result = snakemake(scratch, *args)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    for text in expected:
        assert text in output, output[-3000:]
    assert "No rule to produce" not in output
    assert not (scratch / "results" / "nosuch").exists()


def test_known_targets_are_not_caught(scratch):
    """The unknown_* rules match nothing a configured run asks for: a dry run of real targets plans their jobs
    (a table ends its key with '.', a dataset or model with '/')."""
    result = snakemake(scratch, "results/mcfaline_demo/linear/metrics.csv", "results/tables/primeflow_table2.csv",
                       "-n", "--configfile", "config/demo.yaml")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "unknown_" not in result.stdout


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


# --------------------------------------------------------------------------- the CD4 chunked reader and ValueScan


def _cd4_file(tmp_path, spoil, dense=False):
    """A small CD4-shaped counts file (read in 4 windows) with one spoiled value in the third window."""
    import pandas as pd

    rng = np.random.default_rng(0)
    counts = rng.poisson(0.5, size=(400, 30)).astype(np.float32)
    row, col = 250, 17
    counts[row, col] = spoil
    obs = pd.DataFrame({"target": rng.choice(["NTC", "G1", "G2"], 400), "donor": rng.choice(["D1", "D2"], 400)},
                       index=[f"cell{i}" for i in range(400)])
    var = pd.DataFrame(index=[f"ENSG{i}" for i in range(30)])
    raw = tmp_path / "cd4_spoiled.h5ad"
    ad.AnnData(counts if dense else sp.csr_matrix(counts), obs=obs, var=var).write_h5ad(raw)
    panel = tmp_path / "panel.txt"
    panel.write_text("\n".join(var.index[:10]) + "\n")  # the spoiled gene is outside the panel: still checked
    cfg = {"name": "cd4", "source": {"path": str(raw), "reader": "backed_chunked", "gene_panel": str(panel),
                                     "chunk_size": 100},
           "perturbation_column": "target", "control_label": "NTC", "group_by": ["donor"]}
    return raw, cfg, f"cell{row}", f"ENSG{col}"


@pytest.mark.parametrize("dense", [False, True])
@pytest.mark.parametrize("spoil, expected", [(np.nan, "1 non-finite value(s)"), (np.inf, "1 non-finite value(s)"),
                                             (-2.0, "1 negative value(s)"), (0.37, "looks log-normalised")])
def test_chunked_reader_checks_every_window(tmp_path, spoil, expected, dense):
    raw, cfg, cell, gene = _cd4_file(tmp_path, spoil, dense)
    with pytest.raises(PipelineInputError) as err:
        load_source(raw, cfg, verify=False)
    message = str(err.value)
    assert message.startswith(f"{raw}: field 'X'") and expected in message
    assert f"first at cell '{cell}', gene '{gene}'" in message  # a gene outside the panel, in the third window
    assert load_source(raw, cfg, verify=False, obs_only=True).n_obs == 400  # the split step reads obs only


def test_chunked_reader_accepts_clean_counts(tmp_path):
    raw, cfg, _, _ = _cd4_file(tmp_path, 3.0)
    assert load_source(raw, cfg, verify=False).n_obs == 400


def test_value_scan_first_offender_and_counts_match_a_direct_count():
    """Blocks of a sparse and a dense matrix give the count and the row-major first (cell, gene) numpy finds."""
    from perturb_repro.data.checks import scan_matrix

    rng = np.random.default_rng(3)
    x = rng.poisson(1.0, size=(300, 40)).astype(np.float64)
    bad = rng.random(x.shape) < 0.01
    x[bad] = np.nan
    first = np.argwhere(bad)[0]
    cells, genes = [f"c{i}" for i in range(300)], [f"g{j}" for j in range(40)]
    for matrix in (x, sp.csr_matrix(np.where(np.isnan(x), np.nan, x))):
        scan = scan_matrix(matrix, "f.h5ad", "X", cells, genes, block_rows=64)
        assert scan.nonfinite.count == int(bad.sum())
        assert scan.nonfinite.where[:2] == (cells[first[0]], genes[first[1]])
        assert scan.n_cells == 300

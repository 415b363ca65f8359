# Reproduce published single-cell perturbation-prediction results: data -> split -> train -> sample -> score -> tables.
# Thin entry point: all logic lives in workflow/rules/*.smk and the perturb_repro package (workflow/src).
import sys
from pathlib import Path

from snakemake.utils import min_version

min_version("9.20")

sys.path.insert(0, str(Path(workflow.basedir) / "workflow" / "src"))


# The paper configuration is the default; a --configfile (e.g. config/demo.yaml) replaces it rather than
# being merged into it, so the demo never inherits the paper's datasets.
if not workflow.config_settings.configfiles:

    configfile: "config/config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/embed.smk"
include: "workflow/rules/model.smk"
include: "workflow/rules/score.smk"
include: "workflow/rules/replicates.smk"
include: "workflow/rules/report.smk"


# Small table jobs read a few CSV/YAML files: not worth an sbatch submission each. Downloads run where
# Snakemake runs too: cluster compute nodes often have no internet access.
localrules:
    all,
    paper_table,
    scfate_table1_audit,
    download_source,
    download_sequences,
    fetch_pretrained,
    aggregate_celleval_seeds,
    aggregate_perturbench_seeds,


rule all:
    input:
        all_targets(),


# Paths with a dataset, model or table the config does not know: these rules match nothing else, and their
# input function stops the run naming the unknown key and the configured ones.
rule unknown_dataset:
    input:
        unknown_target,
    output:
        "results/{unknown_dataset}/{rest}",
    wildcard_constraints:
        unknown_dataset=unknown_constraint([*DATASETS, *NON_DATASET_DIRS]),
        rest=".+",


rule unknown_model:
    input:
        unknown_target,
    output:
        "results/{dataset}/{unknown_model}/{rest}",
    wildcard_constraints:
        unknown_model=unknown_constraint([*MODELS, *NON_MODEL_DIRS]),
        rest=".+",


rule unknown_table:
    input:
        unknown_target,
    output:
        "results/tables/{unknown_table}.{ext}",
    wildcard_constraints:
        unknown_table=unknown_constraint([*TABLES, "scfate_table1"]),
        ext="csv|md",

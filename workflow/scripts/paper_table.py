from perturb_repro.joblog import logged
from perturb_repro.tables.paper_table import load_table_spec, reproduce_table, write_table

with logged(snakemake):
    spec = load_table_spec(snakemake.input.spec)
    # cell-eval's metrics and PerturBench's (PRiMeFlow's tables use the latter) are looked up together
    metrics = {
        tuple(run): [cell_eval, perturbench]
        for run, cell_eval, perturbench in zip(snakemake.params.runs, snakemake.input.metrics, snakemake.input.perturbench)
    }
    frame = reproduce_table(spec, metrics, snakemake.params.scale, snakemake.params.dataset_map)
    write_table(frame, snakemake.output.csv, snakemake.output.md, spec)

from perturb_repro.joblog import logged
from perturb_repro.tables.scfate_audit import audit_table1, write_audit

with logged(snakemake):
    fetch_status = snakemake.input.fetch[0] if snakemake.input.fetch else None
    frame = audit_table1(snakemake.input.spec, snakemake.params.logs_dir or None, fetch_status)
    write_audit(frame, snakemake.output.csv, snakemake.output.md)

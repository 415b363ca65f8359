from pathlib import Path

from perturb_repro.joblog import logged
from perturb_repro.tables.scfate_fetch import HubFolder, fetch_hub_folder

with logged(snakemake):
    where = HubFolder.from_config(snakemake.params.hub)
    # the copy lives beside its status file: resources/audit/scfate_hub/results/table1_inputs/...
    status = fetch_hub_folder(where, Path(snakemake.output.status).parent, snakemake.output.status)
    # the log carries what was fetched and why not: each file's sha256, or the reason
    print(f"{where.describe()}: {status['status']} ({status['reason']}); commit {status['commit']}")
    for entry in status["files"]:
        print(f"{entry['sha256']}  {entry['path']}  ({entry['bytes']} bytes)")

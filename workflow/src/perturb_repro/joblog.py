"""Used by every rule script: send stdout/stderr to the rule's log, and turn bad input into one clear line."""

import logging
import sys
from contextlib import contextmanager


@contextmanager
def logged(snakemake):
    """Redirect output to the rule's log; a PipelineInputError ends the job with its message, no traceback."""
    from perturb_repro.errors import PipelineInputError

    log_path = snakemake.log[0] if snakemake.log else None
    handle = open(log_path, "w") if log_path else sys.stderr
    sys.stderr = sys.stdout = handle
    logging.basicConfig(stream=handle, level=logging.INFO, format="%(asctime)s %(name)s %(message)s", force=True)
    try:
        yield
    except PipelineInputError as err:
        print(f"ERROR: {err}", file=handle, flush=True)
        sys.__stderr__.write(f"ERROR in rule {snakemake.rule}: {err}\n")
        sys.exit(1)
    finally:
        handle.flush()

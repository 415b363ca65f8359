"""One error type for bad input, so every rule fails with the file and the field that are wrong."""

from __future__ import annotations


class PipelineInputError(ValueError):
    """Raised when an input file or config value breaks a contract.

    The message always names the offending file (or config key) and field, so a user can fix it
    without reading a traceback.
    """

    def __init__(self, source: str, field: str, problem: str):
        self.source = str(source)
        self.field = field
        self.problem = problem
        super().__init__(f"{self.source}: field '{field}': {problem}")

"""Paper tables: printed numbers (YAML specs) compared with reproduced metrics.

The public names live in :mod:`perturb_repro.tables.paper_table`; they are re-exported lazily so
that ``python -m perturb_repro.tables.paper_table`` does not import the module twice (runpy warns
when a package eagerly imports the module it is asked to run).
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "STATUSES",
    "STATUS_DESCRIPTIONS",
    "CellSpec",
    "TableSpec",
    "format_value",
    "load_table_spec",
    "reproduce_table",
    "status_counts",
    "write_table",
]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from perturb_repro.tables import paper_table

        return getattr(paper_table, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

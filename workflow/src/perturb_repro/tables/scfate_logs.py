"""The authors' saved evaluation logs, read as ``(file, key, value)`` triples.

Log formats: ``*.json`` - nested dicts/lists flattened with dots (``a.b.0.c``), numeric leaves only
(bools, strings, NaN/inf skipped). ``*.csv`` - if the first column is non-numeric it labels the rows
and every other numeric cell gives ``column:label``; otherwise a single-row CSV gives ``column`` and a
multi-row CSV gives ``column:row_index``. Files and directories starting with ``.`` are ignored.
"""

from __future__ import annotations

import json
import math
import numbers
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import pandas as pd

from perturb_repro.errors import PipelineInputError
from perturb_repro.tables.scfate_spec import tokens

_LOG_SUFFIXES = {".json", ".csv"}

@dataclass(frozen=True)
class LogValue:
    """One numeric value of a saved evaluation log.

    Attributes:
        file: Path relative to the logs dir, POSIX separators.
        key: Flattened key (JSON: dotted path; CSV: ``column[:row]``).
        value: The number as logged.
    """

    file: str
    key: str
    value: float

    @property
    def path_tokens(self) -> frozenset[str]:
        return tokens(str(Path(self.file).with_suffix("")))

    @property
    def key_tokens(self) -> frozenset[str]:
        return tokens(self.key)

    @property
    def ref(self) -> str:
        return f"{self.file}:{self.key}"


def _is_number(value: Any) -> bool:
    # numbers.Real covers numpy scalars (CSV cells); bool is an int subclass but never a metric value
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def flatten_json(obj: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """Flatten nested dicts/lists into ``(dotted.key, leaf)`` pairs, in document order.

    List items get their index as a key part (``runs.0.da``); a bare scalar document gets ``(root)``.
    """
    if isinstance(obj, Mapping):
        items: Iterable[tuple[Any, Any]] = obj.items()
    elif isinstance(obj, list):
        items = enumerate(obj)
    else:
        return [(prefix or "(root)", obj)]
    out: list[tuple[str, Any]] = []
    for key, value in items:
        out.extend(flatten_json(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def _add(out: dict[str, float], src: str, key: str, value: float) -> None:
    if key in out and out[key] != value:
        raise PipelineInputError(src, key, f"occurs twice with different values ({out[key]!r}, {value!r}); the key is ambiguous")
    out[key] = value


def read_json_log(path: str | Path) -> dict[str, float]:
    """Numeric leaves of a JSON log, keyed by dotted path.

    Raises:
        PipelineInputError: if the file is not valid JSON, or if flattening makes one key from two
            different values (e.g. ``{"a.b": 1, "a": {"b": 2}}``).
    """
    src = str(path)
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise PipelineInputError(src, "<file>", f"cannot be read: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise PipelineInputError(src, "<file>", f"is not valid JSON: {exc}") from exc
    out: dict[str, float] = {}
    for key, value in flatten_json(data):
        if _is_number(value):
            _add(out, src, key, float(value))
    return out


def read_csv_log(path: str | Path) -> dict[str, float]:
    """Numeric cells of a CSV log, keyed ``column[:row]`` (see the module docstring for the layouts)."""
    src = str(path)
    try:
        frame = pd.read_csv(path)
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise PipelineInputError(src, "<file>", f"cannot be parsed as CSV: {exc}") from exc
    columns = [str(c) for c in frame.columns]
    frame.columns = columns
    labelled = len(columns) > 1 and not pd.api.types.is_numeric_dtype(frame[columns[0]])
    value_columns = columns[1:] if labelled else columns
    out: dict[str, float] = {}
    for i in range(len(frame)):
        if labelled:
            suffix = f":{frame.iloc[i, 0]}"
        else:
            suffix = "" if len(frame) == 1 else f":{i}"
        for column in value_columns:
            value = pd.to_numeric(pd.Series([frame.at[i, column]]), errors="coerce").iloc[0]
            if _is_number(value):
                _add(out, src, f"{column}{suffix}", float(value))
    return out


def log_files(logs_dir: str | Path | None) -> list[Path]:
    """JSON/CSV files under ``logs_dir`` (recursive, sorted, dot-files/dirs skipped); [] if absent.

    Raises:
        PipelineInputError: if ``logs_dir`` exists but is not a directory.
    """
    if logs_dir is None or str(logs_dir) == "":
        return []
    root = Path(logs_dir)
    if not root.exists():
        return []
    if not root.is_dir():
        raise PipelineInputError(str(root), "<dir>", "is not a directory")
    files = []
    for path in root.rglob("*"):
        rel = path.relative_to(root)
        if path.is_file() and path.suffix.lower() in _LOG_SUFFIXES and not any(p.startswith(".") for p in rel.parts):
            files.append(path)
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def collect_log_values(logs_dir: str | Path | None) -> list[LogValue]:
    """Every numeric value of every log under ``logs_dir``, ordered by file then key order."""
    values: list[LogValue] = []
    for path in log_files(logs_dir):
        rel = path.relative_to(logs_dir).as_posix()
        reader = read_json_log if path.suffix.lower() == ".json" else read_csv_log
        values.extend(LogValue(rel, key, value) for key, value in reader(path).items())
    return values



"""Load a table spec (YAML) and validate it against its JSON schema in ``workflow/schemas/``.

The specs' key checks are data, like the config's: each schema lists the keys, types, printed-number
patterns and conditional rules of one spec family, and :func:`load_spec_document` turns the first
violation into a :class:`PipelineInputError` naming the file and the field (``cells[3].reported``).
A subschema may carry ``x-message`` (a ``str.format`` template receiving ``value``) so the error
says what to write instead of what JSON Schema saw. Checks a schema cannot express (duplicate
cells, cross-references between sections) stay in the loaders.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Hashable, Mapping, Sequence

import jsonschema
import yaml

from perturb_repro.errors import PipelineInputError

SCHEMA_DIR = Path(__file__).resolve().parents[3] / "schemas"


@lru_cache(maxsize=None)
def load_schema(name: str) -> dict[str, Any]:
    """The schema ``workflow/schemas/<name>.schema.yaml`` (checked against its meta-schema once)."""
    schema = yaml.safe_load((SCHEMA_DIR / f"{name}.schema.yaml").read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator.check_schema(schema)
    return schema


def _field(path: Any) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _join(parent: str, key: str) -> str:
    return f"{parent}.{key}" if parent else key


def _message(error: jsonschema.ValidationError) -> str | None:
    """The schema's ``x-message`` for this error: one template, or one per failing keyword."""
    template = error.schema.get("x-message") if isinstance(error.schema, Mapping) else None
    if isinstance(template, Mapping):
        template = template.get(error.validator)
    return None if template is None else template.format(value=error.instance)


def _branch_error(error: jsonschema.ValidationError) -> jsonschema.ValidationError | None:
    """For a failed ``anyOf`` such as ``[{type: null}, {$ref: ...}]``: the first error of the branch
    the value was meant for (the one that fails on more than its type)."""
    branches: dict[Any, list[jsonschema.ValidationError]] = {}
    for sub in error.context or []:
        branches.setdefault(sub.schema_path[0] if sub.schema_path else None, []).append(sub)
    meant = [errs for errs in branches.values() if not (len(errs) == 1 and errs[0].validator == "type" and not errs[0].path)]
    return meant[0][0] if len(meant) == 1 else None


def _as_input_error(src: str, error: jsonschema.ValidationError) -> PipelineInputError:
    where = _field(error.absolute_path)
    message = _message(error)
    if error.validator == "required":
        missing = next(k for k in error.validator_value if k not in error.instance)
        return PipelineInputError(src, _join(where, missing), "is missing")
    if error.validator == "dependentRequired":
        present = next(k for k in error.validator_value if k in error.instance)
        together = " and ".join([present, *error.validator_value[present]])
        return PipelineInputError(src, _join(where, present), f"{together} must be given together")
    if error.validator == "additionalProperties" and isinstance(error.instance, Mapping) and "properties" in error.schema:
        allowed = sorted(error.schema["properties"])
        unknown = sorted(str(k) for k in error.instance if k not in allowed)
        return PipelineInputError(src, _join(where, unknown[0]), f"unknown key (allowed: {allowed})")
    if error.validator in ("anyOf", "oneOf") and message is None:
        branch = _branch_error(error)
        if branch is not None:
            return _as_input_error(src, branch)
    return PipelineInputError(src, where or "<file>", message or error.message)


def _resolve(schema: Mapping[str, Any], root: Mapping[str, Any]) -> Mapping[str, Any]:
    """``schema`` with a local ``$ref`` (``#/$defs/name``) merged in; the referring keys win."""
    if "$ref" not in schema:
        return schema
    target = _resolve(root["$defs"][schema["$ref"].rsplit("/", 1)[-1]], root)
    return {**target, **{k: v for k, v in schema.items() if k != "$ref"}}


def _fill_defaults(instance: Any, schema: Mapping[str, Any], root: Mapping[str, Any]) -> None:
    """Write each ``default`` of ``schema.properties`` into ``instance`` where the key is absent."""
    schema = _resolve(schema, root)
    if isinstance(instance, dict):
        for key, sub in schema.get("properties", {}).items():
            sub = _resolve(sub, root)
            if key not in instance and "default" in sub:
                instance[key] = copy.deepcopy(sub["default"])
            if key in instance:
                _fill_defaults(instance[key], sub, root)
        for branch in schema.get("anyOf", []):
            # a nullable object (`anyOf: [{type: null}, {$ref: ...}]`) gets its object defaults
            if isinstance(instance, dict) and _resolve(branch, root).get("type") == "object":
                _fill_defaults(instance, branch, root)
    elif isinstance(instance, list) and isinstance(schema.get("items"), Mapping):
        for item in instance:
            _fill_defaults(item, schema["items"], root)


def load_spec_document(path: str | Path, schema_name: str) -> dict[str, Any]:
    """Read the YAML spec at ``path``, validate it against ``schema_name`` and fill its defaults.

    Raises:
        PipelineInputError: if the file cannot be read, is not YAML, or breaks the schema (the first
            violation in document order, named by file and field).
    """
    src = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise PipelineInputError(src, "<file>", f"cannot be read: {exc}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise PipelineInputError(src, "<file>", f"is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise PipelineInputError(src, "<file>", "top level must be a mapping")
    schema = load_schema(schema_name)
    validator = jsonschema.Draft202012Validator(schema)
    # errors in document order (cells[2] before cells[10]); within one place, schema order
    top = {key: i for i, key in enumerate(data)}

    def document_order(error: jsonschema.ValidationError) -> list[tuple[int, str]]:
        path = list(error.absolute_path)
        head = [(top.get(path[0], -1), "")] if path else []
        return head + [(p if isinstance(p, int) else -1, str(p)) for p in path[1:]]

    errors = sorted(validator.iter_errors(data), key=document_order)
    if errors:
        raise _as_input_error(src, errors[0])
    _fill_defaults(data, schema, schema)
    return data


def reject_duplicate_cells(src: str, keys: Sequence[Hashable]) -> None:
    """Raise naming ``cells[i]`` when a cell's identifying key repeats an earlier cell's."""
    seen: dict[Hashable, int] = {}
    for i, key in enumerate(keys):
        if key in seen:
            raise PipelineInputError(src, f"cells[{i}]", f"duplicates cells[{seen[key]}] {key}")
        seen[key] = i


@dataclass(frozen=True)
class SpecHeader:
    """The fields every spec family's dataclass opens with (filled by :func:`spec_header`).

    Attributes:
        path: File the spec was loaded from (for error messages and provenance).
        table: Short identifier.
        title: Human-readable title.
        source_seed: Seed file the numbers were transcribed from.
        source_section: Section of the seed holding the table.
        notes: Assumptions and caveats.
    """

    path: str
    table: str
    title: str
    source_seed: str
    source_section: str
    notes: tuple[str, ...]


def spec_header(src: str, data: Mapping[str, Any]) -> dict[str, Any]:
    """The :class:`SpecHeader` fields, as keywords, of a document :func:`load_spec_document` has validated."""
    return {
        "path": src,
        "table": data["table"],
        "title": data["title"],
        "source_seed": data["source"]["seed"],
        "source_section": data["source"]["section"],
        "notes": tuple(data["notes"]),
    }

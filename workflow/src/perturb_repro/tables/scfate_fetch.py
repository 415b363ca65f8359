"""Fetch the scFATE authors' saved evaluation logs from their Hugging Face model repo.

The card points to ``results/table1_inputs/`` of ``Angione-Lab/scFATE``. :func:`fetch_hub_folder`
resolves the configured (pinned) revision to its commit, lists the folder's files from the repo
itself (the list is never ours), downloads each through ``huggingface_hub``, records its sha256 and
writes a **status file** either way: ``fetched`` with the files, or ``unavailable`` with the precise
reason (offline, repo/revision/folder not found, a download that failed). The audit reads the status
file, so an offline run completes and says why its cells are unverifiable.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import importlib
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Protocol, Sequence

from perturb_repro.errors import PipelineInputError
from perturb_repro.io import atomic_path

FETCHED, UNAVAILABLE = "fetched", "unavailable"
STATUS_SCHEMA = 1


@dataclass(frozen=True)
class HubFolder:
    """Where the logs live: ``repo_id`` (``repo_type``) at ``revision``, files under ``folder``."""

    repo_id: str
    revision: str
    folder: str
    repo_type: str = "model"

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "HubFolder":
        return cls(str(cfg["repo_id"]), str(cfg["revision"]), str(cfg["folder"]).strip("/"), str(cfg.get("repo_type", "model")))

    def describe(self) -> str:
        return f"{self.repo_type} repo {self.repo_id}@{self.revision}, folder {self.folder}/"


class Hub(Protocol):
    """What the fetch needs from a hub (``huggingface_hub`` here; a local folder in tests)."""

    def resolve(self, where: HubFolder) -> str: ...
    def list_files(self, where: HubFolder, commit: str) -> list[str]: ...
    def download(self, where: HubFolder, commit: str, path: str, dest: Path) -> Path: ...


class HuggingFaceHub:
    """:class:`Hub` through ``huggingface_hub`` (honours ``HF_HUB_OFFLINE``, ``HF_ENDPOINT``, ``HF_TOKEN``)."""

    def __init__(self) -> None:
        from huggingface_hub import HfApi

        self.api = HfApi()

    def resolve(self, where: HubFolder) -> str:
        return str(self.api.repo_info(where.repo_id, revision=where.revision, repo_type=where.repo_type).sha)

    def list_files(self, where: HubFolder, commit: str) -> list[str]:
        return list(self.api.list_repo_files(where.repo_id, revision=commit, repo_type=where.repo_type))

    def download(self, where: HubFolder, commit: str, path: str, dest: Path) -> Path:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(where.repo_id, path, revision=commit, repo_type=where.repo_type, local_dir=dest))


def _hub_errors() -> tuple[type[BaseException], ...]:
    """Failures that mean "the logs cannot be had here", not a bug: offline, HTTP, not found, I/O."""
    from huggingface_hub import errors

    found: list[type[BaseException]] = [OSError, errors.OfflineModeIsEnabled, errors.HfHubHTTPError, errors.HFValidationError,
                                         errors.LocalEntryNotFoundError, errors.EntryNotFoundError]
    # connection refused / DNS failure before any HTTP status comes from the HTTP client huggingface_hub uses,
    # which has changed across releases (requests, httpx, httpx2)
    for module, name in (("httpx2", "HTTPError"), ("httpx", "HTTPError"), ("requests", "RequestException")):
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            continue
    return tuple(found)


def sha256_of(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_status(status: Mapping[str, Any], status_path: str | Path) -> None:
    with atomic_path(status_path) as tmp:
        tmp.write_text(json.dumps(status, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def fetch_hub_folder(where: HubFolder, dest_dir: str | Path, status_path: str | Path, hub: Hub | None = None) -> dict[str, Any]:
    """Download every file of ``where.folder`` into ``dest_dir`` and write the status file.

    Never raises for an unreachable or wrong hub location: the status file then says ``unavailable``
    and why. Files are downloaded into a temporary folder and moved into ``dest_dir`` only when all
    of them arrived, so a half-fetched folder is never audited.

    Args:
        where: Repo, pinned revision and folder.
        dest_dir: Local copy (the repo layout below it: ``dest_dir/results/table1_inputs/...``).
        status_path: JSON status file (the rule's output).
        hub: Hub client; default :class:`HuggingFaceHub`.

    Returns:
        The status written: ``status``, ``reason``, the location, ``commit`` (resolved revision),
        ``logs_dir`` and ``files`` (``path``, ``sha256``, ``bytes`` each).
    """
    status: dict[str, Any] = {
        "schema": STATUS_SCHEMA, "status": UNAVAILABLE, "reason": "", "repo_id": where.repo_id, "repo_type": where.repo_type,
        "revision": where.revision, "folder": where.folder, "commit": None,
        "local_dir": str(dest_dir), "logs_dir": str(Path(dest_dir) / where.folder), "files": [],
        "checked_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        import huggingface_hub

        status["huggingface_hub"] = huggingface_hub.__version__
        from huggingface_hub import constants

        status["endpoint"] = constants.ENDPOINT
        hub = hub or HuggingFaceHub()
        errors = _hub_errors()
    except ImportError as exc:
        status["reason"] = f"huggingface_hub is not installed ({exc})"
        _write_status(status, status_path)
        return status
    step = f"resolving revision {where.revision}"
    try:
        commit = hub.resolve(where)
        status["commit"] = commit
        step = f"listing files at {commit}"
        prefix = where.folder + "/"
        wanted = sorted(p for p in hub.list_files(where, commit) if p.startswith(prefix))
        if not wanted:
            status["reason"] = f"the repo has no files under {prefix} at {commit}"
            _write_status(status, status_path)
            return status
        dest = Path(dest_dir)
        dest.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".fetch.", dir=dest) as tmp:
            for path in wanted:
                step = f"downloading {path}"
                hub.download(where, commit, path, Path(tmp))
            files = [
                {"path": p, "sha256": sha256_of(Path(tmp) / p), "bytes": (Path(tmp) / p).stat().st_size} for p in wanted
            ]
            target = dest / where.folder
            if target.exists():
                shutil.rmtree(target)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(Path(tmp) / where.folder), target)
    except errors as exc:
        detail = str(exc).splitlines()[0] if str(exc) else ""
        status["reason"] = f"{step} failed for {where.describe()} on {status['endpoint']}: {type(exc).__name__}: {detail}"
        _write_status(status, status_path)
        return status
    status.update(status=FETCHED, reason=f"{len(files)} file(s) fetched", files=files)
    _write_status(status, status_path)
    return status


def read_fetch_status(path: str | Path) -> dict[str, Any]:
    """Read a status file and, when ``fetched``, check every listed file's sha256 against the copy.

    Raises:
        PipelineInputError: naming the status file (unreadable, wrong shape) or the file whose
            content no longer matches the sha256 recorded at download.
    """
    src = str(path)
    try:
        status = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise PipelineInputError(src, "<file>", f"cannot be read as JSON: {exc}") from exc
    for key in ("status", "reason", "repo_id", "revision", "folder", "local_dir", "logs_dir", "files"):
        if key not in status:
            raise PipelineInputError(src, key, "is missing")
    if status["status"] not in (FETCHED, UNAVAILABLE):
        raise PipelineInputError(src, "status", f"must be {FETCHED!r} or {UNAVAILABLE!r}, got {status['status']!r}")
    if status["status"] == FETCHED:
        for i, entry in enumerate(status["files"]):
            local = Path(status["local_dir"]) / entry["path"]
            if not local.is_file():
                raise PipelineInputError(src, f"files[{i}]", f"{local} is missing (re-run the fetch)")
            if sha256_of(local) != entry["sha256"]:
                raise PipelineInputError(str(local), "sha256", f"differs from {entry['sha256']} recorded in {src} at download")
    return status


def files_summary(status: Mapping[str, Any]) -> dict[str, str]:
    """``path -> sha256`` of the fetched files (for provenance)."""
    return {entry["path"]: entry["sha256"] for entry in status.get("files", [])}


__all__: Sequence[str] = ["FETCHED", "UNAVAILABLE", "HubFolder", "HuggingFaceHub", "fetch_hub_folder", "files_summary",
                          "read_fetch_status", "sha256_of"]

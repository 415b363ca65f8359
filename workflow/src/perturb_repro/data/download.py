"""Fetch a configured source URL to resources/raw/, verified and written atomically."""

from __future__ import annotations

import shutil
import urllib.request
import zipfile
from pathlib import Path
from typing import Any, Mapping

from ..errors import PipelineInputError
from ..io import atomic_path
from .source import verify_sha256


def fetch_source(source: Mapping[str, Any], out: str | Path, timeout: float = 60.0) -> None:
    """Download ``source['url']`` (extracting ``archive_member`` from a zip) to ``out``.

    The file only appears at ``out`` once complete and, when ``sha256`` is configured, verified,
    so an interrupted or corrupted download never looks finished.
    """
    url = source.get("url")
    if not url:
        raise PipelineInputError("config", "source.url", "dataset has neither a bundled path nor a URL")
    with atomic_path(Path(out).with_suffix(Path(out).suffix + ".download")) as raw:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response, open(raw, "wb") as handle:
                shutil.copyfileobj(response, handle, length=1 << 20)
        except OSError as err:
            raise PipelineInputError(url, "source.url", f"not yet available here: download failed ({err})") from err
        member = source.get("archive_member")
        with atomic_path(out) as tmp:
            if member:
                with zipfile.ZipFile(raw) as archive, archive.open(member) as src, open(tmp, "wb") as dst:
                    shutil.copyfileobj(src, dst, length=1 << 20)
                verify_sha256(tmp, source.get("sha256"))
            else:
                verify_sha256(raw, source.get("sha256"))
                shutil.copyfile(raw, tmp)

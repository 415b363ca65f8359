"""Fetch one file of a pretrained checkpoint (scGPT's args.json / vocab.json / best_model.pt) named in config.

The official scGPT whole-human checkpoint is published as a Google Drive folder (scGPT README), which has no
stable per-file URLs: a user either gives a URL (a lab mirror, an object store) per file under
``pretrained.<checkpoint>.<file>`` in the config, or places the files under ``resources/pretrained/<checkpoint>/``
themselves, which Snakemake then takes as present. Either way the download is the resumable, checksummed,
atomic one the datasets use.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from ..data.download import fetch_source
from ..errors import PipelineInputError


def fetch_pretrained_file(source: Mapping[str, Any], hint: str, out: str | Path) -> Path:
    out = Path(out)
    if not source or not source.get("url"):
        checkpoint = out.parent.name
        how = f" {hint}" if hint else ""
        raise PipelineInputError(
            out,
            f"config pretrained.{checkpoint}.{out.name}.url",
            f"pretrained file missing and no URL configured: place it at {out} or set the URL.{how}",
        )
    return fetch_source(source, out)

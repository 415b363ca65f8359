"""Small HTML pieces every report section uses (escaping, anchors, inline images, notes, status cells)."""

from __future__ import annotations

import base64
import html
import math
import os
import re
from pathlib import Path
from typing import Any

PathLike = str | os.PathLike


def esc(value: Any) -> str:
    """Escape any value for HTML text or attribute context."""
    return html.escape(str(value), quote=True)


def anchor(prefix: str, name: str, used: set[str]) -> str:
    base = f"{prefix}-" + (re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-") or "x")
    anchor, i = base, 2
    while anchor in used:  # two names that sanitise alike must not share an id
        anchor, i = f"{base}-{i}", i + 1
    used.add(anchor)
    return anchor


def img(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img alt="{esc(alt)}" src="data:image/png;base64,{data}">'


def note(text: str) -> str:
    return f'<p class="note">{esc(text)}</p>'


def status_cell(status: str) -> str:
    return f'<td class="status status-{esc(status)}">{esc(status)}</td>'


def status_badge(status: str) -> str:
    return f'<span class="status status-{esc(status)}">{esc(status)}</span>'


def fmt_number(value: Any) -> str:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return "n/a"
    if not math.isfinite(number):
        return "n/a"  # an undefined metric must never read as 0
    return f"{number:.6g}"


def present(path: PathLike | None) -> bool:
    return path is not None and str(path) != "" and Path(path).is_file()

"""Fetch a configured source URL to resources/raw/: resumable, retried, verified, written atomically.

The bytes stream into ``<out>.part``. An interrupted transfer leaves them there, and the next attempt (in
the same call or a later run) resumes them with an HTTP ``Range`` request. Connection errors, timeouts,
5xx answers and truncated bodies are retried with exponential backoff. Once the file is complete it is
checked against ``sha256`` (for a zip with ``archive_member``, the digest of the extracted member). Only
then does it reach ``out``, through ``os.replace``, so ``out`` never holds half a file. A checksum
mismatch deletes ``.part``, because resuming the wrong bytes cannot fix it.

Only the standard library is used (urllib).
"""

from __future__ import annotations

import http.client
import logging
import os
import re
import shutil
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path
from typing import Any, Mapping

from ..errors import PipelineInputError
from ..io import atomic_path
from .source import sha256_of

logger = logging.getLogger(__name__)

CHUNK_SIZE = 1 << 20  # 1 MiB
PROGRESS_STEP = 0.05  # log every ~5 % when the size is known
PROGRESS_BYTES = 64 << 20  # ... and every 64 MiB when it is not
USER_AGENT = "perturb-repro-downloader (python urllib)"

_CONTENT_RANGE = re.compile(r"^\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$", re.IGNORECASE)
_UNSATISFIED_RANGE = re.compile(r"^\s*bytes\s+\*/(\d+)\s*$", re.IGNORECASE)


class _Transient(Exception):
    """A failure worth retrying (network, timeout, 5xx, truncated body)."""


def part_path(out: str | Path) -> Path:
    """Where the partial download for ``out`` lives between attempts and runs."""
    out = Path(out)
    return out.with_name(out.name + ".part")


def fetch_source(
    source: Mapping[str, Any],
    out: str | Path,
    timeout: float = 60.0,
    *,
    attempts: int = 5,
    backoff: float = 1.0,
    max_backoff: float = 60.0,
    chunk_size: int = CHUNK_SIZE,
) -> Path:
    """Download ``source['url']`` to ``out``, extracting ``source['archive_member']`` from a zip if set.

    Args:
        source: The dataset's ``source`` config entry: ``url``, optional ``archive_member`` and
            ``sha256`` (``None`` or missing means the digest is not pinned yet. The file is still
            fetched, and its digest is logged as a warning so that it can be pinned).
        out: The final path. It appears only once the file is complete and verified.
        timeout: Socket timeout in seconds, for connecting and for each read.
        attempts: Total tries per call. A later run resumes from whatever ``<out>.part`` holds.
        backoff: Delay before the first retry. It doubles on each later retry, up to ``max_backoff``.
        chunk_size: Bytes per read and write.

    Returns:
        ``Path(out)``.

    Raises:
        PipelineInputError: The URL is missing or refused (4xx), the tries are used up (``.part`` is
            kept so that a rerun resumes), the checksum differs (``.part`` is deleted) or the zip
            member is missing.
    """
    url = source.get("url")
    if not url:
        hint = source.get("how_to_get")
        raise PipelineInputError(
            "config", "source.url",
            f"no download URL for {out}" + (f"; how to get it: {hint}" if hint else "; the dataset has neither a bundled path nor a URL"),
        )  # fmt: skip
    if attempts < 1:
        raise ValueError(f"attempts must be >= 1, got {attempts}")
    out = Path(out)
    part = part_path(out)
    out.parent.mkdir(parents=True, exist_ok=True)

    _download(url, part, timeout=timeout, attempts=attempts, backoff=backoff, max_backoff=max_backoff,
              chunk_size=chunk_size)

    expected = source.get("sha256")
    member = source.get("archive_member")
    if member:
        logger.info("%s: archive sha256 %s", url, sha256_of(part))
        with atomic_path(out) as tmp:
            _extract(url, part, member, tmp)
            _verify(url, tmp, expected, part, what=f"archive member '{member}'")
        part.unlink(missing_ok=True)
    else:
        _verify(url, part, expected, part, what="download")
        _fsync(part)
        os.replace(part, out)
    logger.info("%s: wrote %s", url, out)
    return out


def _download(url: str, part: Path, *, timeout: float, attempts: int, backoff: float, max_backoff: float,
              chunk_size: int) -> int:
    """Bring ``part`` to the complete remote file, resuming and retrying; return its size."""
    last: Exception | None = None
    for attempt in range(1, attempts + 1):
        try:
            return _attempt(url, part, timeout=timeout, chunk_size=chunk_size)
        except _Transient as err:
            last = err
        if attempt < attempts:
            delay = min(max_backoff, backoff * 2 ** (attempt - 1))
            logger.warning("%s: attempt %d/%d failed (%s); %d bytes kept in %s; retrying in %.3g s",
                           url, attempt, attempts, last, _size(part), part, delay)
            time.sleep(delay)
    raise PipelineInputError(
        url, "source.url",
        f"download failed after {attempts} attempts (last error: {last}); {_size(part)} bytes are kept in "
        f"{part}, so a rerun resumes from there",
    )


def _attempt(url: str, part: Path, *, timeout: float, chunk_size: int) -> int:
    """One request: resume or restart ``part``, stream the body into it; raise _Transient to retry."""
    offset = _size(part)
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    if offset:
        request.add_header("Range", f"bytes={offset}-")  # add_header: kept across redirects
        logger.info("%s: resuming at byte %d (%s)", url, offset, part)
    else:
        logger.info("%s: downloading to %s", url, part)
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as err:
        try:
            return _http_error(url, part, offset, err)
        finally:
            if getattr(err, "fp", None) is not None:
                err.close()
    except ValueError as err:  # unknown scheme, malformed URL
        raise PipelineInputError(url, "source.url", f"not a usable URL ({err})") from err
    except (OSError, http.client.HTTPException) as err:  # URLError, refused, reset, timeout, DNS
        raise _Transient(f"{type(err).__name__}: {getattr(err, 'reason', err)}") from err

    with response:
        if response.status == 206:
            match = _CONTENT_RANGE.match(response.headers.get("Content-Range") or "")
            if not match or int(match.group(1)) != offset:
                part.unlink(missing_ok=True)
                raise _Transient(
                    f"206 with Content-Range {response.headers.get('Content-Range')!r} does not continue at "
                    f"byte {offset}; restarting from zero"
                )
            total = None if match.group(3) == "*" else int(match.group(3))
            if total is None and response.headers.get("Content-Length"):
                total = offset + int(response.headers["Content-Length"])
            mode = "ab"
        else:
            if offset:
                logger.warning("%s: server ignored the Range request (HTTP %d); restarting from zero",
                               url, response.status)
            offset = 0
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            mode = "wb"
        return _stream(url, response, part, mode, offset, total, chunk_size)


def _http_error(url: str, part: Path, offset: int, err: urllib.error.HTTPError) -> int:
    if err.code == 416 and offset:
        match = _UNSATISFIED_RANGE.match(err.headers.get("Content-Range") or "")
        total = int(match.group(1)) if match else None
        if total is None or total == offset:
            logger.info("%s: %s already holds all %d bytes (HTTP 416%s)", url, part, offset,
                        "" if total is not None else "; size not reported, so the checksum decides")
            return offset
        part.unlink(missing_ok=True)
        raise _Transient(f"HTTP 416: {part} has {offset} bytes but the server has {total}; restarting from zero")
    if err.code >= 500 or err.code in (408, 429):
        raise _Transient(f"HTTP {err.code} {err.reason}")
    raise PipelineInputError(url, "source.url", f"server refused the download: HTTP {err.code} {err.reason}")


def _stream(url: str, response, part: Path, mode: str, offset: int, total: int | None, chunk_size: int) -> int:
    done = offset
    next_mark = _next_mark(done, total)
    try:
        with open(part, mode) as handle:
            while True:
                block = response.read(chunk_size)
                if not block:
                    break
                handle.write(block)
                done += len(block)
                if done >= next_mark:
                    _log_progress(url, done, total)
                    next_mark = _next_mark(done, total)
            handle.flush()
    except (OSError, http.client.HTTPException) as err:  # reset, timeout, IncompleteRead (chunked)
        raise _Transient(f"transfer interrupted at byte {done} ({type(err).__name__}: {err})") from err
    if total is not None and done < total:
        # http.client returns b"" rather than raising when the body ends short of Content-Length
        raise _Transient(f"body truncated: got {done} of {total} bytes")
    if total is not None and done > total:
        part.unlink(missing_ok=True)
        raise _Transient(f"got {done} bytes, more than the {total} announced; restarting from zero")
    return done


def _next_mark(done: int, total: int | None) -> float:
    if total:
        step = max(1, int(total * PROGRESS_STEP))
        return (done // step + 1) * step
    return (done // PROGRESS_BYTES + 1) * PROGRESS_BYTES


def _log_progress(url: str, done: int, total: int | None) -> None:
    if total:
        logger.info("%s: %3.0f%% (%.1f of %.1f MiB)", url, 100 * done / total, done / 2**20, total / 2**20)
    else:
        logger.info("%s: %.1f MiB (size unknown)", url, done / 2**20)


def _extract(url: str, archive: Path, member: str, dest: Path) -> None:
    with open(archive, "rb") as head:
        gzipped = head.read(2) == b"\x1f\x8b"
    if gzipped:  # a single gzipped file (e.g. PerturBench's *.h5ad.gz): ``member`` names the decompressed file
        import gzip

        try:
            with gzip.open(archive, "rb") as src, open(dest, "wb") as dst:
                shutil.copyfileobj(src, dst, length=CHUNK_SIZE)
                dst.flush()
                os.fsync(dst.fileno())
        except (OSError, EOFError) as err:
            archive.unlink(missing_ok=True)  # complete but corrupt: resuming cannot fix it
            raise PipelineInputError(url, "source.archive_member", f"download is not a valid gzip file ({err})") from err
        return
    try:
        with zipfile.ZipFile(archive) as zf:
            try:
                src = zf.open(member)
            except KeyError:
                names = zf.namelist()
                raise PipelineInputError(
                    url, "source.archive_member", f"'{member}' is not in the archive; it holds {names[:10]}"
                ) from None
            with src, open(dest, "wb") as dst:
                shutil.copyfileobj(src, dst, length=CHUNK_SIZE)
                dst.flush()
                os.fsync(dst.fileno())
    except zipfile.BadZipFile as err:
        archive.unlink(missing_ok=True)  # complete but not a zip: resuming cannot fix it
        raise PipelineInputError(url, "source.archive_member", f"download is not a valid zip ({err})") from err


def _verify(url: str, path: Path, expected: str | None, part: Path, what: str) -> str:
    actual = sha256_of(path)
    if not expected:
        logger.warning(
            "%s: sha256 not pinned; the %s has sha256 %s. Set `sha256: %s` in the source config to pin it.",
            url, what, actual, actual,
        )
        return actual
    if actual != expected.strip().lower():
        part.unlink(missing_ok=True)
        raise PipelineInputError(
            url, "source.sha256",
            f"checksum mismatch for the {what}: expected {expected}, got {actual} (corrupted or wrong file; "
            f"the partial download was deleted, so a rerun starts from zero)",
        )
    logger.info("%s: sha256 verified (%s)", url, actual)
    return actual


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _fsync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())

"""The downloader against a local HTTP server (127.0.0.1, ephemeral port; no external network).

The server supports Range requests and has knobs to misbehave: drop the connection after K bytes on the
first N requests, answer 503 to the first N requests, or ignore Range and send 200. It records every
request, so each test can check what the client asked for as well as what ended up on disk.
"""

from __future__ import annotations

import hashlib
import io
import logging
import re
import signal
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from perturb_repro.data import download
from perturb_repro.data.download import fetch_source, part_path
from perturb_repro.errors import PipelineInputError

MiB = 1 << 20
PAYLOAD = bytes(range(256)) * (3 * MiB // 256) + b"tail"  # 3 MiB + 4 bytes: several 1 MiB chunks
FAST = dict(timeout=2.0, backoff=0.001, max_backoff=0.01)  # tiny retry delays; every socket op bounded


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class ServerState:
    """What the server serves and how it misbehaves; ``requests`` logs what it saw."""

    def __init__(self, port: int):
        self.port = port
        self.files: dict[str, bytes] = {"/data.bin": PAYLOAD}
        self.drop_first = 0  # requests whose body is cut ...
        self.drop_after = 0  # ... after this many bytes (the headers promise the whole range)
        self.fail_first = 0  # requests answered with fail_status
        self.fail_status = 503
        self.ignore_range = False  # answer Range requests with 200 and the whole file
        self.watch: Path | None = None  # a path whose existence is recorded at each request
        self.requests: list[dict] = []
        self.lock = threading.Lock()

    def url(self, path: str = "/data.bin") -> str:
        return f"http://127.0.0.1:{self.port}{path}"


class Handler(BaseHTTPRequestHandler):
    timeout = 3  # a stuck client cannot hold a server thread for long

    def log_message(self, *args):  # keep pytest output clean
        pass

    def do_GET(self):
        state: ServerState = self.server.state
        with state.lock:
            n = len(state.requests)
            record = {"range": self.headers.get("Range"), "status": None, "sent": 0,
                      "final_exists": state.watch.exists() if state.watch else None}
            state.requests.append(record)
        body = state.files.get(self.path)
        if body is None:
            record["status"] = 404
            self.send_error(404)
            return
        if n < state.fail_first:
            record["status"] = state.fail_status
            self.send_error(state.fail_status)
            return
        start = 0
        match = re.fullmatch(r"bytes=(\d+)-", record["range"] or "")
        if match and not state.ignore_range:
            start = int(match.group(1))
            if start >= len(body):
                record["status"] = 416
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            record["status"] = 206
        else:
            self.send_response(200)
            record["status"] = 200
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        chunk = body[start:]
        if n < state.drop_first:
            chunk = chunk[: state.drop_after]  # then close: the body ends short of Content-Length
            self.close_connection = True
        self.wfile.write(chunk)
        record["sent"] = len(chunk)


@pytest.fixture(autouse=True)
def bounded(monkeypatch):
    """Fail any test that runs over 5 s, and keep urllib away from any configured proxy."""
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "*")
    monkeypatch.setenv("NO_PROXY", "*")

    def overtime(signum, frame):
        raise TimeoutError("test exceeded 5 s")

    previous = signal.signal(signal.SIGALRM, overtime)
    signal.alarm(5)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    httpd.state = ServerState(httpd.server_address[1])
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield httpd.state
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=2)
        assert not thread.is_alive()


def leftovers(directory: Path, keep: Path) -> list[str]:
    """Files in ``directory`` other than ``keep``: stray temp files or partials."""
    return sorted(p.name for p in directory.iterdir() if p != keep)


def test_resume_after_interrupted_transfer(server, tmp_path):
    out = tmp_path / "raw" / "data.bin"
    cut = MiB + 12345
    server.drop_first, server.drop_after = 1, cut
    source = {"url": server.url(), "sha256": sha(PAYLOAD)}

    with pytest.raises(PipelineInputError, match="truncated"):
        fetch_source(source, out, attempts=1, **FAST)  # first run: connection drops mid-body
    assert not out.exists()  # atomic: nothing at the final name
    assert part_path(out).read_bytes() == PAYLOAD[:cut]  # the partial bytes are kept, under .part

    assert fetch_source(source, out, attempts=1, **FAST) == out  # rerun
    assert [r["range"] for r in server.requests] == [None, f"bytes={cut}-"]
    assert [r["status"] for r in server.requests] == [200, 206]
    assert server.requests[1]["sent"] == len(PAYLOAD) - cut  # only the missing bytes were fetched
    assert out.read_bytes() == PAYLOAD
    assert leftovers(out.parent, out) == []


def test_retries_resume_within_one_call(server, tmp_path):
    out = tmp_path / "data.bin"
    server.drop_first, server.drop_after = 2, MiB
    server.watch = out
    fetch_source({"url": server.url(), "sha256": sha(PAYLOAD)}, out, attempts=3, **FAST)
    assert [r["range"] for r in server.requests] == [None, f"bytes={MiB}-", f"bytes={2 * MiB}-"]
    assert [r["final_exists"] for r in server.requests] == [False, False, False]  # never a half file
    assert out.read_bytes() == PAYLOAD
    assert leftovers(tmp_path, out) == []


def test_retry_after_503_with_exponential_backoff(server, tmp_path, monkeypatch):
    delays = []
    monkeypatch.setattr(download.time, "sleep", delays.append)
    server.fail_first = 3
    out = tmp_path / "data.bin"
    fetch_source({"url": server.url(), "sha256": sha(PAYLOAD)}, out, attempts=4, timeout=2.0,
                 backoff=0.01, max_backoff=0.03)
    assert [r["status"] for r in server.requests] == [503, 503, 503, 200]
    assert delays == [0.01, 0.02, 0.03]  # doubling, capped at max_backoff
    assert out.read_bytes() == PAYLOAD


def test_gives_up_after_the_configured_attempts(server, tmp_path):
    server.fail_first = 99
    out = tmp_path / "data.bin"
    with pytest.raises(PipelineInputError, match=r"after 3 attempts.*HTTP 503"):
        fetch_source({"url": server.url(), "sha256": sha(PAYLOAD)}, out, attempts=3, **FAST)
    assert len(server.requests) == 3
    assert not out.exists()


def test_client_error_is_not_retried(server, tmp_path):
    out = tmp_path / "missing.bin"
    with pytest.raises(PipelineInputError, match="HTTP 404") as info:
        fetch_source({"url": server.url("/missing.bin")}, out, attempts=5, **FAST)
    assert server.url("/missing.bin") in str(info.value)
    assert len(server.requests) == 1
    assert not out.exists() and not part_path(out).exists()


def test_server_ignoring_range_restarts_from_zero(server, tmp_path):
    out = tmp_path / "data.bin"
    part_path(out).write_bytes(b"stale bytes that must not survive" * 1000)
    server.ignore_range = True
    fetch_source({"url": server.url(), "sha256": sha(PAYLOAD)}, out, attempts=1, **FAST)
    assert server.requests[0]["range"] == f"bytes={33 * 1000}-"
    assert server.requests[0]["status"] == 200
    assert out.read_bytes() == PAYLOAD  # not appended to the stale prefix
    assert leftovers(tmp_path, out) == []


def test_416_with_a_complete_part_finishes_without_refetching(server, tmp_path):
    out = tmp_path / "data.bin"
    part_path(out).write_bytes(PAYLOAD)  # e.g. killed after the transfer, before the rename
    fetch_source({"url": server.url(), "sha256": sha(PAYLOAD)}, out, attempts=1, **FAST)
    assert [(r["range"], r["status"]) for r in server.requests] == [(f"bytes={len(PAYLOAD)}-", 416)]
    assert out.read_bytes() == PAYLOAD
    assert leftovers(tmp_path, out) == []


def test_checksum_mismatch_names_url_and_both_digests_and_cleans_up(server, tmp_path):
    out = tmp_path / "data.bin"
    wrong = "0" * 64
    with pytest.raises(PipelineInputError, match="checksum mismatch") as info:
        fetch_source({"url": server.url(), "sha256": wrong}, out, attempts=1, **FAST)
    message = str(info.value)
    assert server.url() in message
    assert wrong in message
    assert sha(PAYLOAD) in message
    assert not out.exists()
    assert not part_path(out).exists()  # the next run starts clean
    assert list(tmp_path.iterdir()) == []


def test_zip_member_extraction(server, tmp_path):
    member = b"the member's bytes\n" * 50000
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("norman/README", b"not this one")
        zf.writestr("norman/perturb_processed.h5ad", member)
    server.files["/norman.zip"] = buffer.getvalue()
    out = tmp_path / "perturb_processed.h5ad"
    source = {"url": server.url("/norman.zip"), "archive_member": "norman/perturb_processed.h5ad",
              "sha256": sha(member)}  # the pin is the member's digest, as load_source re-checks it
    fetch_source(source, out, attempts=1, **FAST)
    assert out.read_bytes() == member
    assert leftovers(tmp_path, out) == []  # no archive .part, no extraction temp file


def test_zip_member_checksum_mismatch_leaves_nothing(server, tmp_path):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr("a/member.bin", b"payload")
    server.files["/a.zip"] = buffer.getvalue()
    out = tmp_path / "member.bin"
    source = {"url": server.url("/a.zip"), "archive_member": "a/member.bin", "sha256": "1" * 64}
    with pytest.raises(PipelineInputError, match="checksum mismatch") as info:
        fetch_source(source, out, attempts=1, **FAST)
    assert sha(b"payload") in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_missing_zip_member_is_named(server, tmp_path):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr("a/other.bin", b"payload")
    server.files["/a.zip"] = buffer.getvalue()
    out = tmp_path / "member.bin"
    with pytest.raises(PipelineInputError, match=r"archive_member.*'a/member.bin' is not in the archive"):
        fetch_source({"url": server.url("/a.zip"), "archive_member": "a/member.bin"}, out, attempts=1, **FAST)
    assert not out.exists()


def test_null_sha256_downloads_and_logs_the_digest(server, tmp_path, caplog):
    out = tmp_path / "data.bin"
    with caplog.at_level(logging.INFO, logger=download.logger.name):
        fetch_source({"url": server.url(), "sha256": None}, out, attempts=1, **FAST)
    assert out.read_bytes() == PAYLOAD
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(sha(PAYLOAD) in m and "not pinned" in m for m in warnings), warnings


def test_progress_is_logged_about_every_5_percent(server, tmp_path, caplog):
    out = tmp_path / "data.bin"
    with caplog.at_level(logging.INFO, logger=download.logger.name):
        fetch_source({"url": server.url(), "sha256": sha(PAYLOAD)}, out, attempts=1, chunk_size=MiB // 16,
                     **FAST)
    percents = [int(m.group(1)) for r in caplog.records if (m := re.search(r"(\d+)% \(", r.getMessage()))]
    assert 18 <= len(percents) <= 21, percents
    assert percents == sorted(percents) and percents[-1] == 100

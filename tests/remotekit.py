"""Real servers on 127.0.0.1 for the remote tests, started and stopped by the tests.

- `FileServer`: a threaded HTTP server of a folder with Range support (the standard library's
  `http.server` has none), where a test plants faults: statuses to answer first (503 twice), a
  connection cut after N bytes of a body, a pause between body chunks (a slow server); every
  request is logged (method, path, Range header).
- `s3_server`: moto's standalone S3 server (as s3fs's own tests use), with a bucket holding a pack.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

from handpose.remote import Retry

FAST = Retry(attempts=4, backoff_s=0.01, max_backoff_s=0.05, timeout_s=10.0)  # tests: short backoffs


@dataclass
class Faults:
    """What the server does to requests for a path (relative to the served folder)."""

    statuses: dict[str, list[int]] = field(default_factory=dict)  # answered first, one per request
    cut_after: dict[str, int] = field(default_factory=dict)  # body bytes sent before the cut (once)
    pause_s: float = 0.0  # between body chunks
    chunk: int = 64 << 10
    log: list[tuple[str, str, str]] = field(default_factory=list)  # (method, path, Range or "")
    lock: threading.Lock = field(default_factory=threading.Lock)

    def gets(self, path: str) -> list[str]:
        """The Range headers of the GETs of `path`, in order ("" for a whole file)."""
        with self.lock:
            return [r for m, p, r in self.log if m == "GET" and p == path]


def _handler(root: Path, faults: Faults) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:  # quiet
            pass

        def do_GET(self) -> None:
            rel = unquote(urlsplit(self.path).path).lstrip("/")
            with faults.lock:
                faults.log.append(("GET", rel, self.headers.get("Range", "")))
                planned = faults.statuses.get(rel)
                status = planned.pop(0) if planned else None
                cut = faults.cut_after.pop(rel, None)
            if status is not None:
                return self._empty(status)
            path = root / rel
            if not path.is_file():
                return self._empty(404)
            data = path.read_bytes()
            start, stop = 0, len(data)
            got = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
            if got:
                start = int(got.group(1))
                stop = min(int(got.group(2)) + 1, len(data)) if got.group(2) else len(data)
                if start >= len(data):
                    return self._empty(416)
            self.send_response(206 if got else 200)
            if got:
                self.send_header("Content-Range", f"bytes {start}-{stop - 1}/{len(data)}")
            self.send_header("Content-Length", str(stop - start))
            self.end_headers()
            body = data[start:stop] if cut is None else data[start : start + cut]
            for i in range(0, len(body), faults.chunk):
                self.wfile.write(body[i : i + faults.chunk])
                self.wfile.flush()
                if faults.pause_s:
                    time.sleep(faults.pause_s)
            if cut is not None:  # the connection drops mid-body
                self.close_connection = True
                with contextlib.suppress(OSError):
                    self.connection.shutdown(socket.SHUT_RDWR)

        def _empty(self, status: int) -> None:
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

    return Handler


class FileServer:
    """Serves `root` on 127.0.0.1 (a free port) until `stop()`; `url(rel)` is a file's URL."""

    def __init__(self, root: Path):
        self.root, self.faults = root, Faults()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(root, self.faults))
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def url(self, rel: str = "") -> str:
        return f"{self.base}/{rel}".rstrip("/")

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


@contextlib.contextmanager
def serving(root: Path) -> Iterator[FileServer]:
    server = FileServer(root)
    try:
        yield server
    finally:
        server.stop()


S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@contextlib.contextmanager
def s3_server(packs: dict[str, Path]) -> Iterator[dict[str, str]]:
    """moto's S3 server on 127.0.0.1 with bucket `packs` holding each pack under its prefix;
    yields the environment a client needs (credentials and AWS_ENDPOINT_URL), also set in
    os.environ for the duration."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {**S3_ENV, "AWS_ENDPOINT_URL": f"http://{host}:{port}"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        s3 = boto3.client("s3")
        s3.create_bucket(Bucket="packs")
        for prefix, folder in packs.items():
            for f in sorted(folder.iterdir()):
                if f.is_file():
                    s3.upload_file(str(f), "packs", f"{prefix}/{f.name}")
        yield env
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()

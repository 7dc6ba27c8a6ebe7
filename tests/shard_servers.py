"""Servers that hold shards, on 127.0.0.1 only, started and stopped by the test (or benchmark) that uses them:
an HTTP server that can be told to fail (404, cut a response short, stall, fail the first tries) and moto's
S3 server. `tests/` is on sys.path for the tests and the benchmarks."""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


@dataclass
class Faults:
    """What the HTTP server does wrong, by file name."""

    missing: set[str] = field(default_factory=set)  # 404
    cut: set[str] = field(default_factory=set)  # half the body, then the connection closes
    stall: dict[str, float] = field(default_factory=dict)  # seconds of silence after the first half
    fail_first: dict[str, int] = field(default_factory=dict)  # 503 for the first N requests
    # silence after the first half until all these files were answered, or for at most that many seconds
    hold: dict[str, tuple[frozenset[str], float]] = field(default_factory=dict)


class _QuietServer(ThreadingHTTPServer):
    """A client that stops reading early (a lane that reached its quota mid-shard) closes its connection: not an
    error worth a traceback on the console."""

    def handle_error(self, request, client_address) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class ShardServer:
    """A folder served over HTTP on 127.0.0.1, with `faults`; `requests` counts the GETs of each file, `log`
    holds (file, when it was asked for, when its response ended) in monotonic seconds."""

    def __init__(self, folder: str | os.PathLike, faults: Faults | None = None) -> None:
        self.folder = Path(folder)
        self.faults = faults or Faults()
        self.requests: Counter[str] = Counter()
        self.log: list[tuple[str, float, float]] = []
        self._answered = threading.Condition()
        server = self

        class Handler(SimpleHTTPRequestHandler):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, directory=str(server.folder), **kwargs)

            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):  # noqa: N802 - http.server's name
                name, asked = self.path.lstrip("/").split("?")[0], time.monotonic()
                try:
                    self._answer(name)
                finally:
                    with server._answered:
                        server.log.append((name, asked, time.monotonic()))
                        server._answered.notify_all()

            def _answer(self, name: str) -> None:
                server.requests[name] += 1
                faults = server.faults
                if name in faults.missing:
                    self.send_error(404)
                    return
                if server.requests[name] <= faults.fail_first.get(name, 0):
                    self.send_error(503)
                    return
                delayed = name in faults.stall or name in faults.hold
                if name not in faults.cut and not delayed:
                    super().do_GET()
                    return
                data = (server.folder / name).read_bytes()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data[: len(data) // 2])
                self.wfile.flush()
                if delayed:
                    time.sleep(faults.stall.get(name, 0.0))
                    if name in faults.hold:
                        server.wait_for(*faults.hold[name])
                    with contextlib.suppress(OSError):
                        self.wfile.write(data[len(data) // 2:])
                self.close_connection = True

        self.httpd = _QuietServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def wait_for(self, names: frozenset[str], seconds: float) -> None:
        """Wait until every file in `names` was answered, at most `seconds`."""
        with self._answered:
            self._answered.wait_for(lambda: names <= {name for name, _, _ in self.log}, seconds)

    def __enter__(self) -> ShardServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                  "AWS_DEFAULT_REGION": "us-east-1"}


@contextlib.contextmanager
def s3_server(folder: str | os.PathLike, bucket: str = "shards") -> Iterator[dict[str, str]]:
    """moto's S3 server on 127.0.0.1 holding FOLDER's files in BUCKET; yields the environment a client needs
    (credentials and AWS_ENDPOINT_URL, which botocore, and so s3fs, reads)."""
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # a line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        env = {**S3_CREDENTIALS, "AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_EC2_METADATA_DISABLED": "true"}
        client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id="testing",
                              aws_secret_access_key="testing", region_name="us-east-1")
        client.create_bucket(Bucket=bucket)
        for path in sorted(Path(folder).iterdir()):
            client.upload_file(str(path), bucket, path.name)
        yield env
    finally:
        server.stop()

"""The service under load, against 127.0.0.1 only: clients mixing text, image and id queries for 30 s while
`clipengine index` commits to the same index, a `kill -9` of the service mid-load and a restart. No 5xx, no
wrong result, and nothing lost from the index."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
import uuid
from pathlib import Path

import pytest
from conftest import jpeg_bytes, write_photos
from serving import start_service

from clipengine.index.info import index_info
from clipengine.index.pipeline import index_folder
from clipengine.scenes import photo_like
from clipengine.serve.discovery import SERVICE_FILE

pytestmark = pytest.mark.slow
SECONDS = 30.0
CLIENTS = 4


class Tally:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.statuses: dict[int, int] = {}
        self.wrong: list[str] = []
        self.refused_connections = 0

    def status(self, code: int) -> None:
        with self.lock:
            self.statuses[code] = self.statuses.get(code, 0) + 1

    def wrong_result(self, what: str) -> None:
        with self.lock:
            self.wrong.append(what)


def ask(url: str, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    parsed = urllib.parse.urlparse(url)
    connection = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=30)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def client(index: Path, photos: dict[str, bytes], stop: float, seed: int, tally: Tally) -> None:
    """Queries until `stop`; checks what each answer must be, whatever the index holds at that moment."""
    i = 0
    names = sorted(photos)
    while time.monotonic() < stop:
        i += 1
        try:
            url = json.loads((index / SERVICE_FILE).read_text())["url"]
            kind = (seed + i) % 3
            if kind == 0:
                status, body = ask(url, "GET", "/api/search?" + urllib.parse.urlencode({"q": f"a photo {i}", "k": 8}))
            elif kind == 1:
                path = names[(seed * 7 + i) % len(names)]
                boundary = uuid.uuid4().hex
                form = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"q.jpg\"\r\n"
                        f"Content-Type: image/jpeg\r\n\r\n").encode() + photos[path] + f"\r\n--{boundary}--\r\n".encode()
                status, body = ask(url, "POST", "/api/search/image?k=5", form,
                                   {"Content-Type": f"multipart/form-data; boundary={boundary}"})
            else:
                status, body = ask(url, "GET", f"/api/similar/{1 + (seed + i) % 12}?k=5")
        except (OSError, ValueError, KeyError, http.client.HTTPException):  # the service is down, or restarting
            with tally.lock:
                tally.refused_connections += 1
            time.sleep(0.05)
            continue
        tally.status(status)
        if status != 200:
            tally.wrong_result(f"{status}: {body[:200]!r}")
            continue
        hits = json.loads(body)
        scores = [h["score"] for h in hits]
        if not hits or scores != sorted(scores, reverse=True) or [h["rank"] for h in hits] != list(
                range(1, len(hits) + 1)) or len({h["id"] for h in hits}) != len(hits):
            tally.wrong_result(f"malformed hits {hits}")
        elif kind == 1 and (hits[0]["path"] != path or abs(hits[0]["score"] - 1) > 1e-4):
            tally.wrong_result(f"an indexed image did not find itself first: {hits[0]} for {path}")
        elif kind == 2 and (hits[0]["id"] != 1 + (seed + i) % 12 or abs(hits[0]["score"] - 1) > 1e-4):
            tally.wrong_result(f"more-like-this did not start with the image itself: {hits[0]}")


def test_clients_while_indexing_with_a_kill_9_and_a_restart(tmp_path, tiny_model):
    folder = tmp_path / "photos"
    write_photos(folder)
    index = tmp_path / "idx"
    index_folder(folder, index, model=tiny_model, workers=0)  # ids 1..12: the id queries' targets
    photos = {str(p): p.read_bytes() for p in sorted(folder.rglob("*.jpg"))}

    service, _ = start_service(index)
    tally = Tally()
    started = time.monotonic()
    stop = started + SECONDS
    threads = [threading.Thread(target=client, args=(index, photos, stop, c, tally)) for c in range(CLIENTS)]
    for t in threads:
        t.start()
    added = 0
    killed = False
    try:
        while time.monotonic() < stop - 2:  # the index grows, a batch at a time, committing every 2 files
            batch = folder / f"more-{added:03d}"
            batch.mkdir()
            for j in range(4):
                (batch / f"{j}.jpg").write_bytes(jpeg_bytes(photo_like(160, 120, seed=10_000 + added * 4 + j)))
            run = subprocess.run([sys.executable, "-m", "clipengine", "index", str(folder), "--index", str(index),
                                  "--workers", "0", "--commit-every", "2"], capture_output=True, text=True)
            assert run.returncode == 0, run.stderr[-2000:]
            added += 1
            if not killed and time.monotonic() > started + SECONDS / 2:  # mid-load: kill -9, then start again
                os.kill(service.pid, signal.SIGKILL)
                service.wait(timeout=30)
                killed = True
                service, _ = start_service(index)
    finally:
        for t in threads:
            t.join(timeout=120)
        service.send_signal(signal.SIGINT)
        service.wait(timeout=30)

    served = sum(tally.statuses.values())
    assert killed and added >= 2 and served > 50, (killed, added, tally.statuses)
    assert not [code for code in tally.statuses if code >= 500], tally.statuses  # zero 5xx
    assert not tally.wrong, tally.wrong[:5]  # zero wrong results
    info = index_info(index)
    assert info.count == 12 + 4 * added and not info.skipped_files  # nothing lost from the index
    assert not (index / SERVICE_FILE).exists()

"""The service under load, against 127.0.0.1 only: clients mixing text, image and id queries while
`clipengine index` commits to the same index four times, with a `kill -9` of the service after the second
and a restart. No 5xx, no wrong result, every kind of query answered by the restarted service, the photos
added after the restart found by it, and nothing lost from the index. The phases follow the runs, not the
clock, so a slow machine runs the same test."""

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
from clipengine.index.location import SERVICE_FILE
from clipengine.index.pipeline import index_folder
from clipengine.scenes import photo_like
from clipengine.serve.state import REFRESH_EVERY

pytestmark = pytest.mark.slow
RUNS = 2  # `clipengine index` runs while the clients query; the service is killed after the first
CLIENTS = 4
KINDS = 3  # text, uploaded image, indexed id


class Tally:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.statuses: dict[int, int] = {}
        self.wrong: list[str] = []
        self.refused_connections = 0
        self.restarted = False
        self.right_after_restart = [0] * KINDS  # right answers from the restarted service, by kind of query

    def status(self, code: int) -> None:
        with self.lock:
            self.statuses[code] = self.statuses.get(code, 0) + 1

    def right(self, kind: int, restarted: bool) -> None:
        with self.lock:
            self.right_after_restart[kind] += restarted

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


def upload(url: str, data: bytes, k: int) -> tuple[int, bytes]:
    boundary = uuid.uuid4().hex
    form = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"q.jpg\"\r\n"
            f"Content-Type: image/jpeg\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return ask(url, "POST", f"/api/search/image?k={k}", form, {"Content-Type": f"multipart/form-data; boundary={boundary}"})


def client(index: Path, photos: dict[str, bytes], stop: threading.Event, seed: int, tally: Tally) -> None:
    """Queries until `stop`; checks what each answer must be, whatever the index holds at that moment."""
    i = 0
    names = sorted(photos)
    while not stop.is_set():
        i += 1
        restarted = tally.restarted  # read before asking: an answer after this is the restarted service's
        try:
            url = json.loads((index / SERVICE_FILE).read_text())["url"]
            kind = (seed + i) % 3
            if kind == 0:
                status, body = ask(url, "GET", "/api/search?" + urllib.parse.urlencode({"q": f"a photo {i}", "k": 8}))
            elif kind == 1:
                path = names[(seed * 7 + i) % len(names)]
                status, body = upload(url, photos[path], 5)
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
        else:
            tally.right(kind, restarted)


def test_clients_while_indexing_with_a_kill_9_and_a_restart(tmp_path, tiny_model):
    folder = tmp_path / "photos"
    write_photos(folder)
    index = tmp_path / "idx"
    index_folder(folder, index, model=tiny_model, workers=0)  # ids 1..12: the id queries' targets
    photos = {str(p): p.read_bytes() for p in sorted(folder.rglob("*.jpg"))}

    service, _ = start_service(index)
    tally = Tally()
    stop = threading.Event()
    threads = [threading.Thread(target=client, args=(index, photos, stop, c, tally)) for c in range(CLIENTS)]
    for t in threads:
        t.start()
    newest = None
    try:
        for run_no in range(RUNS):  # the index grows, a batch at a time, committing every 2 files
            batch = folder / f"more-{run_no:03d}"
            batch.mkdir()
            for j in range(4):
                newest = batch / f"{j}.jpg"
                newest.write_bytes(jpeg_bytes(photo_like(160, 120, seed=10_000 + run_no * 4 + j)))
            run = subprocess.run([sys.executable, "-m", "clipengine", "index", str(folder), "--index", str(index),
                                  "--workers", "0", "--commit-every", "2"], capture_output=True, text=True)
            assert run.returncode == 0, run.stderr[-2000:]
            if run_no == RUNS // 2 - 1:  # mid-load: kill -9, then start again
                os.kill(service.pid, signal.SIGKILL)
                service.wait(timeout=30)
                service, url = start_service(index)
                tally.restarted = True
        deadline = time.monotonic() + 60
        while min(tally.right_after_restart) < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
        deadline = time.monotonic() + 5 * REFRESH_EVERY  # it follows a commit within REFRESH_EVERY of its last look
        while True:  # added after the restart: the service followed
            status, body = upload(url, newest.read_bytes(), 3)
            if status != 200 or json.loads(body)[0]["path"] == str(newest) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=120)
        service.send_signal(signal.SIGINT)
        service.wait(timeout=30)

    assert status == 200 and json.loads(body)[0]["path"] == str(newest), body[:300]
    assert min(tally.right_after_restart) >= 3, tally.right_after_restart  # every kind, after the restart
    served = sum(tally.statuses.values())
    assert served > 50, tally.statuses
    assert not [code for code in tally.statuses if code >= 500], tally.statuses  # zero 5xx
    assert not tally.wrong, tally.wrong[:5]  # zero wrong results
    info = index_info(index)
    assert info.count == 12 + 4 * RUNS and not info.skipped_files  # nothing lost from the index
    assert not (index / SERVICE_FILE).exists()

"""`clipengine serve`: the HTTP API answers as the library does, refuses every bad request with a JSON 4xx,
reaches no file that is not indexed, follows a growing index, and is found by `clipengine search`."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import CliRunner, jpeg_bytes, png_claiming_size, write_photos
from fastapi.testclient import TestClient
from serving import start_service

from clipengine.errors import BadInput
from clipengine.index.location import DATABASE, MANIFEST, SERVICE_FILE, THUMBNAILS_DIR
from clipengine.index.pipeline import index_folder
from clipengine.index.search import Searcher
from clipengine.index.service import find_service, search_through_service
from clipengine.scenes import photo_like
from clipengine.serve.app import create_app
from clipengine.serve.server import is_loopback, serve
from clipengine.serve.state import ServiceConfig


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_model, _export_cache) -> Path:
    """An index of 12 photos (with exported query encoders), built once for the module's read-only tests."""
    root = tmp_path_factory.mktemp("served")
    with pytest.MonkeyPatch.context() as m:
        m.setenv("CLIPENGINE_CACHE_DIR", str(_export_cache))
        index_folder(write_photos(root / "photos"), root / "idx", model=tiny_model, workers=0)
    return root


@pytest.fixture
def client(served):
    with TestClient(create_app(ServiceConfig({"photos": served / "idx"}))) as c:
        yield c


def refused(response, status: int, fragment: str = "") -> str:
    """A refusal as the API promises it: the status, JSON with a one-line error, no traceback."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert fragment in error and "Traceback" not in response.text and "\n" not in error
    return error


def photo_paths(served: Path) -> list[Path]:
    return sorted((served / "photos").rglob("*.jpg"))


def test_text_search_answers_as_the_library_does(client, served):
    hits = client.get("/api/search", params={"q": "a photo of a lake", "k": 5}).json()
    with Searcher(served / "idx") as searcher:
        expected = [h.to_dict() for h in searcher.search_text("a photo of a lake", 5)]
    assert [h["path"] for h in hits] == [h["path"] for h in expected] and len(hits) == 5
    assert [h["score"] for h in hits] == pytest.approx([h["score"] for h in expected], abs=1e-6)
    assert set(hits[0]) == {"rank", "score", "path", "width", "height", "id", "seconds", "taken", "taken_at", "place", "plan"}  # the fields of `search --json`
    under_b = client.get("/api/search", params={"q": "a photo", "k": 20, "prefix": str(served / "photos" / "b")}).json()
    assert len(under_b) == 6 and all("/photos/b/" in h["path"] for h in under_b)


def test_more_like_this_and_image_uploads(client, served):
    with Searcher(served / "idx") as searcher:
        target = searcher.search_image(photo_paths(served)[3], 1)[0]
    similar = client.get(f"/api/similar/{target.id}", params={"k": 4}).json()
    assert similar[0]["id"] == target.id and similar[0]["score"] == pytest.approx(1.0, abs=1e-5) and len(similar) == 4

    upload = {"file": ("x.jpg", photo_paths(served)[3].read_bytes(), "image/jpeg")}
    hits = client.post("/api/search/image", params={"k": 3}, files=upload).json()
    assert hits[0]["id"] == target.id and hits[0]["score"] == pytest.approx(1.0, abs=1e-5)  # stored vector, by content

    new = {"file": ("new.jpg", jpeg_bytes(photo_like(300, 200, seed=77)), "image/jpeg")}
    hits = client.post("/api/search/image", params={"k": 3}, files=new).json()
    assert len(hits) == 3 and hits[0]["score"] < 0.9999  # embedded now, not a copy of an indexed image


def test_the_api_documents_what_it_answers(client):
    """/docs is generated from the routes' response models: a hit's fields are in the schema, and every search
    route answers with a list of them."""
    spec = client.get("/openapi.json").json()
    hit = spec["components"]["schemas"]["HitOut"]
    assert set(hit["properties"]) == {"rank", "score", "path", "width", "height", "id", "seconds", "taken", "taken_at", "place", "plan"}
    for path in ("/api/search", "/api/similar/{file_id}", "/api/search/terms", "/api/search/image", "/api/search/vector"):
        (method,) = spec["paths"][path]
        answer = spec["paths"][path][method]["responses"]["200"]["content"]["application/json"]["schema"]
        assert answer["items"]["$ref"].endswith("/HitOut"), path
    assert spec["paths"]["/api/health"]["get"]["responses"]["200"]["content"]["application/json"]["schema"][
        "$ref"].endswith("/HealthOut")
    assert client.get("/docs").status_code == 200


def test_every_bad_request_is_a_json_4xx(client):
    refused(client.get("/api/search", params={"q": "x", "k": 0}), 422, "k")
    refused(client.get("/api/search", params={"q": "x", "k": 10**9}), 422, "k")
    refused(client.get("/api/search", params={"q": "x", "k": "many"}), 422, "k")
    refused(client.get("/api/search"), 422, "q")
    refused(client.get("/api/search", params={"q": "   "}), 400, "empty")
    refused(client.get("/api/search", params={"q": "x", "index": "scans"}), 404, "no index 'scans'")
    refused(client.get("/api/similar/999999"), 404, "999999")
    refused(client.get("/api/similar/-1"), 404)
    refused(client.get("/api/similar/abc"), 422)
    refused(client.get("/api/thumbnail/999999"), 404)
    refused(client.get("/api/file/999999"), 404)
    refused(client.post("/api/search/image", files={"file": ("a.txt", b"not an image", "text/plain")}), 400,
            "not a recognised image")
    refused(client.post("/api/search/image", files={"file": ("bomb.png", png_claiming_size(100_000, 100_000),
                                                              "image/png")}), 400, "pixels")
    refused(client.post("/api/search/image"), 422, "file")
    refused(client.post("/api/search/vector", json={"vector": [1.0, 2.0]}), 400, "dimension")
    refused(client.post("/api/search/vector", json={"vector": [0.0] * 64}), 400, "zero")
    refused(client.post("/api/search/vector", json={"vector": "north"}), 422)
    refused(client.post("/api/search/vector", content=b"{not json", headers={"content-type": "application/json"}), 422)
    refused(client.get("/api/nothing-here"), 404)


def test_upload_caps_apply_before_decoding(served):
    config = ServiceConfig({"photos": served / "idx"}, max_upload=5000, max_pixels=10_000)
    with TestClient(create_app(config)) as c:
        big = jpeg_bytes(photo_like(400, 300, seed=5), quality=95)
        assert len(big) > 5000
        refused(c.post("/api/search/image", files={"file": ("big.jpg", big, "image/jpeg")}), 413, "over")
        huge = b"\xff\xd8" + bytes(200_000)
        refused(c.post("/api/search/image", files={"file": ("huge.jpg", huge, "image/jpeg")}), 413, "over")
        # refused from its Content-Length, before the body is parsed: a form that would not even parse says so
        garbage = {"content-type": "multipart/form-data; boundary=nothing"}
        refused(c.post("/api/search/image", content=bytes(200_000), headers=garbage), 413, "over")
        refused(c.post("/api/search/image", content=bytes(2000), headers=garbage), 400, "multipart")
        small = jpeg_bytes(photo_like(120, 100, seed=5), quality=30)  # 12,000 pixels, under 5,000 bytes
        assert len(small) <= 5000
        refused(c.post("/api/search/image", files={"file": ("px.jpg", small, "image/jpeg")}), 400, "pixels")


def test_files_and_thumbnails_by_id_only(client, served):
    with Searcher(served / "idx") as searcher:
        hit = searcher.search_image(photo_paths(served)[0], 1)[0]
    original = client.get(f"/api/file/{hit.id}")
    assert original.status_code == 200 and original.content == Path(hit.path).read_bytes()
    thumb = client.get(f"/api/thumbnail/{hit.id}", params={"size": 100})
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    import io

    from PIL import Image

    assert max(Image.open(io.BytesIO(thumb.content)).size) == 128  # the smallest offered side that covers 100
    cached = served / "idx" / THUMBNAILS_DIR / f"{hit.id}-128.jpg"
    assert cached.is_file()
    made = cached.stat().st_mtime_ns
    assert client.get(f"/api/thumbnail/{hit.id}", params={"size": 100}).content == thumb.content
    assert cached.stat().st_mtime_ns == made  # served from the cache, not made again

    secret = Path("/etc/passwd").read_bytes()[:20]
    for url in ("/api/file/..%2F..%2F..%2Fetc%2Fpasswd", "/api/file/%2Fetc%2Fpasswd", "/api/file//etc/passwd",
                "/api/thumbnail/../../../../etc/passwd", "/static/../../../../etc/passwd",
                "/static/%2e%2e/%2e%2e/%2e%2e/%2e%2e/etc/passwd", "/static/..%2f..%2f..%2f..%2fetc%2fpasswd",
                "/static//etc/passwd", "/api/file/1/../../../../etc/passwd"):
        response = client.get(url)
        assert 400 <= response.status_code < 500 and secret not in response.content, url
    with_path = client.get(f"/api/file/{hit.id}", params={"path": "/etc/passwd"})  # extra parameters mean nothing
    assert with_path.content == Path(hit.path).read_bytes()


def test_a_link_or_file_changed_after_indexing_is_not_served(tmp_path, tiny_model):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "photo.jpg").write_bytes(jpeg_bytes(photo_like(200, 150, seed=3)))
    folder = tmp_path / "photos"
    write_photos(folder)
    (folder / "link.jpg").symlink_to(outside / "photo.jpg")
    index_folder(folder, tmp_path / "idx", model=tiny_model, workers=0, export=False)
    with Searcher(tmp_path / "idx") as searcher:
        linked = searcher.search_image(folder / "link.jpg", 1)[0]
        changed = searcher.search_image(folder / "a" / "img_000000.jpg", 1)[0]
    with TestClient(create_app(ServiceConfig({"p": tmp_path / "idx"}))) as c:
        assert c.get(f"/api/file/{linked.id}").status_code == 200  # an indexed link is served while unchanged
        (folder / "link.jpg").unlink()
        (outside / "secret.txt").write_text("the neighbour's diary\n")
        (folder / "link.jpg").symlink_to(outside / "secret.txt")  # now points out, at something never indexed
        for url in (f"/api/file/{linked.id}", f"/api/thumbnail/{linked.id}"):
            assert b"diary" not in refused_body(c.get(url), 404)
        Path(changed.path).write_bytes(jpeg_bytes(photo_like(200, 150, seed=999)))
        refused(c.get(f"/api/file/{changed.id}"), 404, "changed since it was indexed")


def refused_body(response, status: int) -> bytes:
    refused(response, status)
    return response.content


def test_a_token_guards_the_api_and_the_page(served):
    config = ServiceConfig({"photos": served / "idx"}, token="s3cret")
    with TestClient(create_app(config)) as c:
        refused(c.get("/api/search", params={"q": "x"}), 401, "token")
        refused(c.get("/api/search", params={"q": "x"}, headers={"Authorization": "Bearer wrong"}), 401)
        assert c.get("/api/search", params={"q": "x"}, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        refused(c.get("/api/thumbnail/1"), 401)
        refused(c.get("/"), 401)
        assert c.get("/api/health").json()["token_required"] is True  # discovery works without the token
        refused(c.get("/", params={"token": "wrong"}), 401)
        login = c.get("/", params={"token": "s3cret"}, follow_redirects=False)
        assert login.status_code == 303 and login.headers["location"] == "/"
        page = c.get("/")  # the cookie set by the redirect
        assert page.status_code == 200 and "<title>clipengine</title>" in page.text
        assert c.get("/api/search", params={"q": "x"}).status_code == 200


def test_binding_beyond_loopback_needs_a_token(served):
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5")
    with pytest.raises(BadInput, match="--token"):
        serve(ServiceConfig({"photos": served / "idx"}), host="0.0.0.0", port=0)
    assert not (served / "idx" / SERVICE_FILE).exists()


def test_the_service_follows_a_growing_index(tmp_path, tiny_model, monkeypatch):
    import clipengine.serve.state as state

    monkeypatch.setattr(state, "REFRESH_EVERY", 0.0)
    folder = tmp_path / "photos"
    write_photos(folder)
    index_folder(folder, tmp_path / "idx", model=tiny_model, workers=0, export=False)
    with TestClient(create_app(ServiceConfig({"p": tmp_path / "idx"}))) as c:
        assert c.get("/api/indexes").json()[0]["count"] == 12
        before = c.get("/api/search", params={"q": "a photo", "k": 50}).json()
        new = folder / "c" / "new.jpg"
        new.parent.mkdir()
        new.write_bytes(jpeg_bytes(photo_like(180, 120, seed=4242)))
        index_folder(folder, tmp_path / "idx", model=tiny_model, workers=0)  # another process would do the same
        after = c.get("/api/search", params={"q": "a photo", "k": 50}).json()
        assert len(before) == 12 and len(after) == 13 and str(new) in [h["path"] for h in after]
        assert c.get("/api/indexes").json()[0]["count"] == 13
        uploaded = c.post("/api/search/image", files={"file": ("n.jpg", new.read_bytes(), "image/jpeg")}).json()
        assert uploaded[0]["path"] == str(new) and uploaded[0]["score"] == pytest.approx(1.0, abs=1e-5)


def test_several_indexes_are_picked_by_name(served, tmp_path, tiny_model):
    other = tmp_path / "other"
    write_photos(other / "pics")
    index_folder(other / "pics", other / "idx", model=tiny_model, workers=0, export=False)
    with TestClient(create_app(ServiceConfig({"photos": served / "idx", "other": other / "idx"}))) as c:
        assert [i["name"] for i in c.get("/api/indexes").json()] == ["photos", "other"]
        hits = c.get("/api/search", params={"q": "a photo", "index": "other"}).json()
        assert hits and all(h["path"].startswith(str(other / "pics")) for h in hits)
        assert c.get("/api/info", params={"index": "other"}).json()["count"] == 12


@pytest.mark.slow
def test_search_finds_a_running_service_and_falls_back_without_one(served, tmp_path):
    index = tmp_path / "idx"
    shutil.copytree(served / "idx", index)
    cli = [sys.executable, "-m", "clipengine"]
    query = ["search", "a photo of a lake", "--index", str(index), "-k", "5", "--json"]
    local = subprocess.run(cli + query, capture_output=True, text=True, check=True).stdout
    filtered = [*query, "--prefix", str(served / "photos" / "b"), "--after", "2000", "--ext", "jpg", "--kind", "image"]
    local_filtered = json.loads(subprocess.run(cli + filtered, capture_output=True, text=True, check=True).stdout)

    service, _ = start_service(index)
    try:
        record = json.loads((index / SERVICE_FILE).read_text())
        assert record["pid"] == service.pid and oct((index / SERVICE_FILE).stat().st_mode)[-3:] == "600"
        through = search_through_service(index, text="a photo of a lake", k=5)
        assert through is not None  # answered by the service
        identity = json.loads((index / MANIFEST).read_text())["model"]["identity"]
        assert find_service(index, identity) is not None
        assert find_service(index, "ViT-B-32/laion2b_s34b_b79k") is None  # believed only for the index's model
        twin = Path(shutil.copytree(index, tmp_path / "twin"))  # its service.json too
        assert find_service(twin, identity) is None  # and only for the index it serves
        (index / DATABASE).rename(index / "away.sqlite")  # a search on its own would fail: only the service can answer
        try:
            remote = json.loads(subprocess.run(cli + query, capture_output=True, text=True, check=True).stdout)
            remote_filtered = json.loads(subprocess.run(cli + filtered, capture_output=True, text=True,
                                                        check=True).stdout)  # the filter goes to the service
            alone = subprocess.run(cli + [*query, "--runtime", "onnx"], capture_output=True, text=True)
        finally:
            (index / "away.sqlite").rename(index / DATABASE)
        assert alone.returncode == 1 and "meta.sqlite" in alone.stderr  # what searching locally meets
        expected = json.loads(local)
        assert [{**h, "score": 0} for h in remote] == [{**h, "score": 0} for h in expected]  # same hits, same fields
        assert [h["score"] for h in remote] == pytest.approx([h["score"] for h in expected], abs=1e-5)
        assert [h.to_dict()["path"] for h in through] == [h["path"] for h in expected]
        assert [h["path"] for h in remote_filtered] == [h["path"] for h in local_filtered]
        assert local_filtered and all("/photos/b/" in h["path"] for h in local_filtered)
        image = subprocess.run(cli + ["search", "--image", str(photo_paths(served)[2]), "--index", str(index), "-k",
                                      "3", "--paths-only"], capture_output=True, text=True, check=True).stdout
        assert image.splitlines()[0].endswith(photo_paths(served)[2].name)
        bad = subprocess.run(cli + ["search", "   ", "--index", str(index)], capture_output=True, text=True)
        assert bad.returncode == 1 and bad.stderr.startswith("error:") and "Traceback" not in bad.stderr
    finally:
        service.send_signal(signal.SIGINT)
        service.wait(timeout=30)
    assert not (index / SERVICE_FILE).exists()  # withdrawn on the way out

    stopped, _ = start_service(index)
    stopped.terminate()  # SIGTERM, as a service manager stops it
    assert stopped.wait(timeout=30) == 0 and not (index / SERVICE_FILE).exists()

    killed, _ = start_service(index)
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait(timeout=30)
    assert (index / SERVICE_FILE).exists() and find_service(index) is None  # stale: its process is gone
    again = subprocess.run(cli + query, capture_output=True, text=True, check=True).stdout
    assert [h["path"] for h in json.loads(again)] == [h["path"] for h in json.loads(local)]


def test_vectors_and_ids_round_trip(client, served):
    with Searcher(served / "idx") as searcher:
        vector = searcher.text_vector("a red boat")
        expected = [h.id for h in searcher.search_vector(vector, 4)]
    hits = client.post("/api/search/vector", params={"k": 4}, json={"vector": np.asarray(vector).tolist()}).json()
    assert [h["id"] for h in hits] == expected


def test_serve_refuses_a_missing_index_in_one_line(tmp_path):
    from clipengine.cli import app

    result = CliRunner().invoke(app, ["serve", "--index", str(tmp_path / "nowhere"), "--port", "0"])
    assert result.exit_code == 1 and "no index at" in result.output
    result = CliRunner().invoke(app, ["serve", "--index", str(tmp_path / "nowhere"), "--host", "0.0.0.0"])
    assert result.exit_code == 1 and "--token" in result.output  # refused before anything is opened or bound

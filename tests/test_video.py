"""Videos: frames chosen by scene change with their moments, bad and huge files bounded, and videos through
indexing, search, duplicates, thumbnails, the service and the CLI. Every video is written by PyAV's own
encoders with known content per second (tests/synthetic.py)."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
from conftest import CliRunner, interrupted_run
from PIL import Image
from synthetic import write_video

import clipengine.video as video_module
from clipengine.formats import VideoSampling
from clipengine.images import Decoded, Skipped
from clipengine.index.pipeline import index_folder
from clipengine.index.search import Searcher
from clipengine.index.store import FRAME_SHIFT, IndexStore
from clipengine.models import ModelSpec
from clipengine.scenes import photo_like
from clipengine.video import DecodedVideo, choose_frames, frame_at, open_video

RED, GREEN, BLUE, YELLOW = (200, 30, 30), (30, 200, 30), (30, 30, 200), (220, 220, 40)


def scene(seed: int) -> Image.Image:
    return photo_like(160, 120, seed=seed)


def test_a_video_is_its_scenes_each_at_its_moment_and_never_its_black_intro(tmp_path):
    starts = write_video(tmp_path / "v.mp4", [(3, None), (4, RED), (5, GREEN), (3, BLUE)])
    result = open_video(tmp_path / "v.mp4")
    assert isinstance(result, DecodedVideo)
    assert (result.width, result.height, result.duration) == (160, 120, 15.0)
    assert result.looks == 15  # one a second
    seconds = [f.seconds for f in result.frames]
    assert len(seconds) == 3, seconds  # one per scene: the moving picture inside a scene is no scene change
    for at, start, end in zip(seconds, starts[1:], [*starts[2:], 15], strict=True):
        assert start <= at < end
    colours = [f.image.getpixel((5, 5)) for f in result.frames]
    for colour, expected in zip(colours, (RED, GREEN, BLUE), strict=True):
        assert max(abs(a - b) for a, b in zip(colour, expected, strict=True)) < 30, colours


def test_a_black_first_minute_is_looked_past(tmp_path):
    write_video(tmp_path / "late.mp4", [(60, None), (4, YELLOW)], fps=5, size=(64, 48))
    result = open_video(tmp_path / "late.mp4")
    assert isinstance(result, DecodedVideo) and [f.seconds >= 60 for f in result.frames] == [True]


def test_a_video_with_nothing_but_black_is_skipped_with_the_reason(tmp_path):
    write_video(tmp_path / "black.mp4", [(3, None)])
    result = open_video(tmp_path / "black.mp4")
    assert isinstance(result, Skipped) and "black or a single colour" in result.reason


def test_a_phone_video_recorded_upright_comes_out_upright(tmp_path):
    """A phone stores a portrait video landscape with a display matrix: frames and size are as a player shows."""
    picture = np.zeros((96, 160, 3), np.uint8)
    picture[:24, :40] = (255, 255, 255)  # a white mark at the top left of the stored frame
    write_video(tmp_path / "portrait.mp4", [(2, Image.fromarray(picture))], size=(160, 96), rotation=90)
    result = open_video(tmp_path / "portrait.mp4", draft_size=None)
    assert isinstance(result, DecodedVideo) and (result.width, result.height) == (96, 160)
    image = result.frames[0].image
    assert image.size == (96, 160)
    # turned a quarter counter-clockwise: the top-left mark is now at the bottom left
    assert image.getpixel((5, 155))[0] > 200 and image.getpixel((5, 5))[0] < 60 and image.getpixel((90, 155))[0] < 60
    still = frame_at(tmp_path / "portrait.mp4", 1.0, draft_size=None)
    assert isinstance(still, Decoded) and still.image.size == (96, 160) and (still.width, still.height) == (96, 160)


def test_long_keyframe_intervals_still_find_every_scene(tmp_path):
    """A screen recording may have one keyframe for the whole file: the frames are then decoded in order."""
    write_video(tmp_path / "screen.mp4", [(3, RED), (3, GREEN), (3, BLUE)], gop=300)
    result = open_video(tmp_path / "screen.mp4")
    assert isinstance(result, DecodedVideo) and len(result.frames) == 3, [f.seconds for f in result.frames]
    assert [int(f.seconds // 3) for f in result.frames] == [0, 1, 2]


def test_past_the_cap_the_biggest_changes_are_kept_so_pans_go_before_scenes():
    def picture(seed: int) -> np.ndarray:  # blocks of 4x4: a pan by one column changes a quarter of it
        return np.kron(np.random.default_rng(seed).random((4, 4, 3), dtype=np.float32), np.ones((4, 4, 1), np.float32))

    looks, cuts = [], []
    for i in range(40):
        if i % 10 == 0:  # a cut to a new scene every tenth look
            base = picture(i)
            cuts.append(i)
        looks.append(np.roll(base, i % 10, axis=1))  # in between, the camera pans: each look differs a little
    sampling = VideoSampling(scene_change=0.05, max_frames=4)
    assert len(choose_frames(looks, VideoSampling(scene_change=0.05, max_frames=100))) == 40  # every look a change
    assert choose_frames(looks, sampling) == cuts  # capped at 4: the four cuts, not four looks spread evenly
    flat = [np.full((16, 16, 3), 0.5, np.float32)] * 3
    assert choose_frames(flat + looks[:2], sampling) == [3, 4]  # near-constant looks are never kept
    assert choose_frames(flat, sampling) == []


@pytest.fixture(scope="module")
def four_hours(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("long") / "four-hours.mp4"
    write_video(path, [(3600, RED), (3600, GREEN), (3600, BLUE), (3600, YELLOW)], fps=1, size=(32, 32), gop=10)
    return path


def test_a_four_hour_video_costs_a_bounded_number_of_looks(four_hours, monkeypatch):
    in_order = []
    monkeypatch.setattr(video_module._Looker, "_in_order", lambda *args: in_order.append(args))
    result = open_video(four_hours)
    assert isinstance(result, DecodedVideo) and result.duration == 4 * 3600
    assert result.looks == 240 and in_order == []  # 240 keyframes sought and decoded, of 14,400 frames; never in order
    assert [int(f.seconds // 3600) for f in result.frames] == [0, 1, 2, 3]  # every hour's scene, at its moment
    assert result.seen_seconds > 3.9 * 3600


def test_a_video_that_takes_too_long_is_represented_by_what_was_seen_in_its_budget(four_hours, monkeypatch):
    clock = iter(range(10**6))
    monkeypatch.setattr(video_module.time, "perf_counter", lambda: float(next(clock)))  # each reading: a second
    result = open_video(four_hours, VideoSampling(budget_seconds=30))
    assert isinstance(result, DecodedVideo) and 0 < result.looks < 30
    assert result.seen_seconds < 4 * 3600 / 2


def test_bad_videos_are_skipped_each_with_its_reason(tmp_path):
    import av

    (tmp_path / "zero.mp4").write_bytes(b"")
    (tmp_path / "junk.mov").write_bytes(os.urandom(4096))
    write_video(tmp_path / "cut.mp4", [(3, RED)])  # a copy cut short: the index (moov) at the end is missing
    os.truncate(tmp_path / "cut.mp4", (tmp_path / "cut.mp4").stat().st_size // 2)
    write_video(tmp_path / "noframes.mp4", [(3, RED)])
    data = bytearray((tmp_path / "noframes.mp4").read_bytes())
    at = data.index(b"mdat") + 4
    end = data.index(b"moov") - 4 if data.index(b"moov") > at else len(data)
    data[at:end] = bytes(end - at)  # the frames' data wiped: the container is fine, nothing decodes
    (tmp_path / "noframes.mp4").write_bytes(bytes(data))
    with av.open(str(tmp_path / "audio.mp4"), "w") as container:  # a voice memo named like a video
        stream = container.add_stream("aac", rate=8000)
        for i in range(8):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 8000, i * 1024
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    reasons = {name: open_video(tmp_path / name) for name in
               ("zero.mp4", "junk.mov", "cut.mp4", "noframes.mp4", "audio.mp4", "missing.mp4")}
    assert all(isinstance(r, Skipped) for r in reasons.values()), reasons
    assert reasons["zero.mp4"].reason == "empty file"
    assert reasons["junk.mov"].reason.startswith("not a readable video")
    assert "still being recorded or copied" in reasons["cut.mp4"].reason
    assert reasons["noframes.mp4"].reason == "no frame could be decoded"
    assert reasons["audio.mp4"].reason == "no video stream (audio only?)"
    assert reasons["missing.mp4"].reason.startswith("cannot read file")
    huge = open_video(tmp_path / "cut.mp4", max_pixels=100)
    assert isinstance(huge, Skipped)


def test_a_video_still_being_written_is_skipped_and_indexed_once_complete(tmp_path, monkeypatch):
    folder = tmp_path / "DCIM"
    folder.mkdir()
    write_video(folder / "rec.mp4", [(2, RED), (2, GREEN)])
    real = video_module._Looker.look

    def while_recording(self, container, stream, duration):
        real(self, container, stream, duration)
        with open(folder / "rec.mp4", "ab") as f:  # the camera app appends as we read
            f.write(b"\0" * 64)

    monkeypatch.setattr(video_module._Looker, "look", while_recording)
    result = open_video(folder / "rec.mp4")
    assert isinstance(result, Skipped) and "still being recorded" in result.reason
    first = index_folder(folder, tmp_path / "idx", ModelSpec(arch="tiny"), workers=0)
    assert first.count == 0 and "still being recorded" in first.skips[0]["reason"]
    monkeypatch.undo()  # the recording is finished
    report = index_folder(folder, tmp_path / "idx", workers=0)  # it changed since: indexed now
    assert report.changed == 1 and report.embedded == 1 and report.videos == 1 and report.count == 1


def library(folder: Path) -> dict[str, list[float]]:
    """Three photos and three videos; returns each video's scene starts."""
    from synthetic import write_photo_folder

    write_photo_folder(folder, 3, (200, 150))
    return {
        "VID_0001.mp4": write_video(folder / "VID_0001.mp4", [(5, None), (4, scene(50)), (4, scene(51))]),
        "VID_0002.webm": write_video(folder / "VID_0002.webm", [(3, scene(60)), (3, scene(61))]),
        "VID_0003.mov": write_video(folder / "VID_0003.mov", [(2, scene(70)), (2, scene(71)), (2, scene(72))]),
    }


def test_a_library_with_videos_indexes_completely_and_a_search_finds_the_moment(tmp_path, tiny_model):
    from clipengine.embed import embed_pil_images

    folder = tmp_path / "Phone"
    folder.mkdir()
    starts = library(folder)
    report = index_folder(folder, tmp_path / "idx", model=tiny_model, workers=0)
    assert report.skips == [] and report.not_indexed == {}
    assert report.formats == {"JPG": 3, "MOV": 1, "MP4": 1, "WEBM": 1} and report.videos == 3
    assert report.frames == 7 and report.count == 6
    with IndexStore.open(tmp_path / "idx") as store:
        assert store.counts()["frames"] == 7 and store.live_ids().size == 3 + 7  # photos by id, videos by frame
        assert (store.live_ids() >> FRAME_SHIFT).max() == 3
    query = embed_pil_images(tiny_model, [scene(51)])[0]  # the second scene of VID_0001, from 9 s
    with Searcher(tmp_path / "idx") as searcher:
        hits = searcher.search_vector(query, 6)
        assert hits[0].path == str(folder / "VID_0001.mp4") and hits[0].score > 0.99
        assert starts["VID_0001.mp4"][2] <= hits[0].seconds < 13 and hits[0].moment == "at 0:09"
        assert len({h.path for h in hits}) == 6  # one hit per file: a video's other frames do not crowd the rest
        assert [h.seconds is None for h in hits].count(True) == 3
        more = searcher.search_id(hits[0].id, 2)  # "more like this" of a video: by its own vector
        assert more[0].path == hits[0].path
        under = searcher.search_vector(query, 3, prefix=str(folder / "VID_0003"))
        assert [h.path for h in under] == [str(folder / "VID_0003.mov")]  # a prefix filter keeps a video's frames


def test_a_videos_frames_are_looked_through_until_k_files_are_found(tmp_path, tiny_model):
    folder = tmp_path / "lib"
    folder.mkdir()
    write_video(folder / "many.mp4", [(1, scene(80 + i)) for i in range(16)])  # 16 scenes: 16 frames
    photo_like(200, 150, seed=1).save(folder / "photo.jpg")
    index_folder(folder, tmp_path / "idx", model=tiny_model, workers=0)
    from clipengine.embed import embed_pil_images

    with Searcher(tmp_path / "idx") as searcher:
        hits = searcher.search_vector(embed_pil_images(tiny_model, [scene(80)])[0], 2)
    assert [Path(h.path).name for h in hits] == ["many.mp4", "photo.jpg"]


def test_videos_are_incremental_moved_by_hash_and_left_out_with_no_video(tmp_path, tiny_model, monkeypatch):
    folder = tmp_path / "lib"
    folder.mkdir()
    library(folder)
    index_folder(folder, tmp_path / "idx", model=tiny_model, workers=0)
    opened: list[tuple] = []

    def never(*args, **kwargs):
        opened.append(args)
        return Skipped("decoded again")

    monkeypatch.setattr("clipengine.decode.open_video", never)
    again = index_folder(folder, tmp_path / "idx", model=tiny_model, workers=0)
    assert again.unchanged == 6 and again.embedded == 0 and opened == []
    shutil.move(folder / "VID_0002.webm", folder / "moved.webm")
    moved = index_folder(folder, tmp_path / "idx", model=tiny_model, workers=0)
    assert (moved.reused, moved.removed, moved.embedded) == (1, 1, 0) and opened == []  # its frames kept by hash
    with IndexStore.open(tmp_path / "idx") as store:
        assert store.counts()["frames"] == 7
    without = index_folder(folder, tmp_path / "idx", model=tiny_model, workers=0, video=None)
    assert without.not_indexed == {".mov": 1, ".mp4": 1, ".webm": 1} and without.count == 3
    with IndexStore.open(tmp_path / "idx") as store:
        assert store.counts()["frames"] == 0 and store.live_ids().size == 3


KILL_SCRIPT = """
import sys
from clipengine.index.pipeline import index_folder
from clipengine.models import ModelSpec
index_folder(sys.argv[1], sys.argv[2], ModelSpec(arch="tiny"), workers=0, batch_size=1, commit_every=1)
"""


def test_a_killed_run_over_videos_resumes_and_embeds_each_once(tmp_path):
    folder = tmp_path / "videos"
    folder.mkdir()
    for i in range(12):
        write_video(folder / f"v{i:02d}.mp4", [(2, scene(100 + i)), (2, scene(200 + i))], size=(320, 240))
    index = tmp_path / "idx"
    at_kill = interrupted_run(KILL_SCRIPT, folder, index, 3, signal.SIGKILL)
    assert 3 <= at_kill < 12, "the run must be interrupted part-way for this test to mean anything"
    report = index_folder(folder, index, workers=0)
    assert report.embedded == 12 - at_kill and report.count == 12 and report.videos == 12 - at_kill
    with IndexStore.open(index) as store:
        assert store.counts()["frames"] == 24
        hashes = [h for _, _, h in store.file_hashes()]
        assert all(len(store.frames_of_contents([h])[h][0]) == 2 for h in hashes)


def test_videos_that_share_an_intro_are_not_duplicates_and_a_copy_is(tmp_path, tiny_model):
    from clipengine.index.duplicates import find_duplicates

    folder = tmp_path / "lib"
    folder.mkdir()
    intro = [(2, None), (3, RED)]  # a black frame, and a first scene both share
    write_video(folder / "a.mp4", [*intro, (3, GREEN), (3, BLUE)])
    write_video(folder / "b.mp4", [*intro, (3, GREEN), (3, YELLOW)])  # and the second too: only the last differs
    write_video(folder / "a-copy.mp4", [*intro, (3, GREEN), (3, BLUE)], size=(192, 144))  # re-encoded
    index_folder(folder, tmp_path / "idx", model=tiny_model, workers=0)
    groups = find_duplicates(tmp_path / "idx")
    assert [[Path(f.path).name for f in g.files] for g in groups] == [["a-copy.mp4", "a.mp4"]]
    with IndexStore.open(tmp_path / "idx") as store:  # by their own vectors alone, a and b would be grouped
        vectors = store.content_vectors([h for _, _, h in store.file_hashes()])
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    assert float(vectors[1] @ vectors[2]) > 0.95  # the default threshold


def test_the_service_shows_a_videos_matching_frame_and_plays_it(tmp_path, tiny_model):
    from fastapi.testclient import TestClient

    from clipengine.serve.app import create_app
    from clipengine.serve.state import ServiceConfig

    folder = tmp_path / "lib"
    folder.mkdir()
    write_video(folder / "clip.mp4", [(3, RED), (3, BLUE)])
    write_video(folder / "clip.mkv", [(3, GREEN)])
    index_folder(folder, tmp_path / "idx", model=tiny_model, workers=0)
    with TestClient(create_app(ServiceConfig({"lib": tmp_path / "idx"}))) as client:
        hits = client.get("/api/search", params={"q": "a video", "k": 5}).json()
        assert sorted(Path(h["path"]).name for h in hits) == ["clip.mkv", "clip.mp4"]
        mp4 = next(h for h in hits if h["path"].endswith(".mp4"))
        assert isinstance(mp4["seconds"], float)
        for t, colour in ((1.0, RED), (4.0, BLUE)):
            got = client.get(f"/api/thumbnail/{mp4['id']}", params={"size": 128, "t": t})
            pixel = Image.open(io.BytesIO(got.content)).convert("RGB").getpixel((3, 3))
            assert got.status_code == 200 and max(abs(a - b) for a, b in zip(pixel, colour, strict=True)) < 40
        assert client.get(f"/api/view/{mp4['id']}").content == (folder / "clip.mp4").read_bytes()  # played as it is
        part = client.get(f"/api/view/{mp4['id']}", headers={"Range": "bytes=100-199"})  # a player seeking to #t=
        assert part.status_code == 206 and part.content == (folder / "clip.mp4").read_bytes()[100:200]
        upload = client.post("/api/search/image", files={"file": ("other.mp4", b"\0" * 64 + b"x", "video/mp4")})
        assert upload.status_code == 400 and "is a video" in upload.json()["error"], upload.text
        mkv = next(h for h in hits if h["path"].endswith(".mkv"))
        view = client.get(f"/api/view/{mkv['id']}")  # browsers do not play MKV: its frame as a JPEG
        assert Image.open(io.BytesIO(view.content)).format == "JPEG"


def test_the_cli_says_where_in_a_video_a_hit_is_and_json_carries_the_seconds(tmp_path):
    from clipengine.cli import app

    folder = tmp_path / "lib"
    folder.mkdir()
    write_video(folder / "clip.mp4", [(3, None), (3, RED)])
    (folder / "notes.txt").write_text("x")
    runner = CliRunner()
    result = runner.invoke(app, ["index", str(folder), "--index", "v", "--model", "tiny", "--no-export",
                                 "--workers", "0"])
    assert result.exit_code == 0, result.output
    assert "embedded 1 (1 MP4)" in result.output and "of them 1 video (1 frame)" in result.output
    assert "not indexed: 1 .txt (no decoder)" in result.output
    text = runner.invoke(app, ["search", "red", "--index", "v"])
    assert text.exit_code == 0 and text.stdout.rstrip().endswith(f"{folder / 'clip.mp4'}  at 0:03"), text.output
    hits = json.loads(runner.invoke(app, ["search", "red", "--index", "v", "--json"]).stdout)
    assert hits[0]["seconds"] == 3.0
    info = runner.invoke(app, ["info", "--index", "v"])
    assert "1 video among them (1 frame)" in info.output
    skipped = runner.invoke(app, ["index", str(folder), "--index", "v", "--no-video"])
    assert "1 .mp4 (--no-video)" in skipped.output
    bad = runner.invoke(app, ["index", str(folder), "--index", "v", "--video-frames", "0"])
    assert bad.exit_code != 0 and "--video-frames" in bad.output


def test_part_files_of_a_torchrun_job_carry_a_videos_frames(tmp_path):
    from clipengine.index.sharded import PartWriter, _read_part
    from clipengine.index.store import FileRecord

    frames = np.eye(3, 4, dtype=np.float32)
    records = [FileRecord("/a.jpg", 1, 1, "h1", 2, 2, np.ones(4, np.float32)),
               FileRecord("/v.mp4", 1, 1, "h2", 2, 2, np.ones(4, np.float32), None, (0.5, 3.0, 7.5), frames),
               FileRecord("/bad.mp4", 1, 1, skip_reason="empty file")]
    PartWriter(tmp_path, 0, 4)(records)
    (part,) = tmp_path.rglob("part-*.npz")
    back = _read_part(part, set())
    assert back[0].frames == () and back[0].frame_vectors is None
    assert back[1].frames == (0.5, 3.0, 7.5) and np.array_equal(back[1].frame_vectors, frames)
    assert back[2].skip_reason == "empty file"


def test_an_older_index_without_frames_reads_and_follows_a_writer_that_adds_videos(tmp_path, tiny_model):
    import sqlite3

    from clipengine.index.location import DATABASE

    folder = tmp_path / "lib"
    folder.mkdir()
    photo_like(200, 150, seed=1).save(folder / "photo.jpg")
    index_folder(folder, tmp_path / "idx", model=tiny_model, workers=0)
    with sqlite3.connect(tmp_path / "idx" / DATABASE) as conn:  # as written before videos were indexed
        conn.execute("DROP TABLE frames")
    reader = Searcher(tmp_path / "idx")  # read-only: the index is not changed by reading it
    assert reader.search_text("x", 5)[0].path.endswith("photo.jpg")
    with sqlite3.connect(tmp_path / "idx" / DATABASE) as conn:
        assert conn.execute("SELECT COUNT(*) FROM sqlite_master WHERE name = 'frames'").fetchone() == (0,)
    write_video(folder / "clip.mp4", [(2, RED)])
    index_folder(folder, tmp_path / "idx", model=tiny_model, workers=0)
    reader.refresh()
    assert {Path(h.path).name for h in reader.search_text("x", 5)} == {"photo.jpg", "clip.mp4"}
    reader.close()


def test_a_video_as_the_query_finds_the_videos_that_share_its_scenes(tmp_path, tiny_model, monkeypatch):
    folder = tmp_path / "lib"
    folder.mkdir()
    write_video(folder / "holiday.mp4", [(2, None), (3, GREEN), (3, BLUE)])
    write_video(folder / "other.mp4", [(3, YELLOW)])
    photo_like(160, 120, seed=3).save(folder / "photo.jpg")
    index_folder(folder, tmp_path / "idx", model=tiny_model, workers=0)
    write_video(tmp_path / "copy.mov", [(3, BLUE)], size=(192, 144))  # not indexed: one of holiday's scenes
    with Searcher(tmp_path / "idx") as searcher:
        hits = searcher.search_image(tmp_path / "copy.mov", 3)
        assert hits[0].path == str(folder / "holiday.mp4") and hits[0].score > 0.99 and hits[0].seconds >= 5
        monkeypatch.setattr("clipengine.video.open_video", lambda *a, **k: Skipped("decoded again"))
        itself = searcher.search_image(folder / "holiday.mp4", 1)  # indexed and unchanged: its stored frames
        assert itself[0].path == str(folder / "holiday.mp4") and itself[0].score > 0.999
    from clipengine.cli import app

    result = CliRunner().invoke(app, ["search", "--image", str(tmp_path / "none.mp4"), "--index", str(tmp_path / "idx")])
    assert result.exit_code == 1 and "cannot read query video" in result.output

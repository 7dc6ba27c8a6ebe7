"""Reading when, with what and where from files the tests write with real EXIF (Pillow, pillow-heif) and real
video tags (PyAV's muxers), and the nonsense cameras write."""

from __future__ import annotations

import datetime as dt
import io

import pytest
from PIL import Image
from PIL.TiffImagePlugin import IFDRational

from clipengine.metadata import (
    DATETIME,
    DATETIME_DIGITIZED,
    DATETIME_ORIGINAL,
    EXIF_IFD,
    GPS_IFD,
    LENS_MODEL,
    MAKE,
    MODEL,
    OFFSET_TIME_ORIGINAL,
    MediaInfo,
    from_exif,
    from_video,
    parse_exif_time,
)

NOW = dt.datetime(2026, 12, 2, tzinfo=dt.timezone.utc)


def dms(degrees: float) -> tuple:
    whole = int(degrees)
    minutes = (degrees - whole) * 60
    return (IFDRational(whole), IFDRational(int(minutes)), IFDRational(round((minutes - int(minutes)) * 60, 4)))


def exif_of(taken=None, offset=None, make=None, model=None, lens=None, gps=None, digitized=None, modified=None):
    exif = Image.Exif()
    if make:
        exif[MAKE] = make
    if model:
        exif[MODEL] = model
    if modified:
        exif[DATETIME] = modified
    details = exif.get_ifd(EXIF_IFD)
    for tag, value in ((DATETIME_ORIGINAL, taken), (OFFSET_TIME_ORIGINAL, offset), (LENS_MODEL, lens),
                       (DATETIME_DIGITIZED, digitized)):
        if value is not None:
            details[tag] = value
    if gps:
        lat, lon, *alt = gps
        place = exif.get_ifd(GPS_IFD)
        place[1], place[2] = ("N" if lat >= 0 else "S"), dms(abs(lat))
        place[3], place[4] = ("E" if lon >= 0 else "W"), dms(abs(lon))
        if alt:
            place[5], place[6] = (b"\x01" if alt[0] < 0 else b"\x00"), IFDRational(abs(alt[0]))
    return exif


def read_back(exif, fmt: str = "JPEG") -> MediaInfo:
    """Write a picture with this EXIF in `fmt`, open it as any file is opened, and read its metadata."""
    if fmt == "HEIF":
        import pillow_heif

        pillow_heif.register_heif_opener()
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (10, 200, 30)).save(buffer, fmt, exif=exif.tobytes())
    with Image.open(io.BytesIO(buffer.getvalue())) as image:
        return from_exif(image.getexif(), now=NOW)


@pytest.mark.parametrize("fmt", ["JPEG", "HEIF", "WEBP", "PNG"])
def test_a_phone_photo_says_when_with_what_and_where_in_every_format(fmt):
    exif = exif_of("2023:07:14 18:03:22", "+02:00", "Google", "Pixel 7", "Pixel 7 back camera 6.81mm f/1.85",
                   (52.520008, 13.404954, 34.5))
    info = read_back(exif, fmt)
    assert info.taken == "2023-07-14T18:03:22+02:00" and info.taken_source == "exif"
    assert (info.make, info.model, info.lens) == ("Google", "Pixel 7", "Pixel 7 back camera 6.81mm f/1.85")
    assert info.camera == "Google Pixel 7"
    assert info.latitude == pytest.approx(52.520008, abs=1e-5) and info.longitude == pytest.approx(13.404954, abs=1e-5)
    assert info.altitude == 34.5


def test_south_west_below_sea_level_and_a_model_that_names_its_maker():
    info = read_back(exif_of("2019:01:02 03:04:05", make="Canon", model="Canon EOS R5", gps=(-33.8688, -70.6693, -12)))
    assert info.latitude == pytest.approx(-33.8688, abs=1e-5) and info.longitude == pytest.approx(-70.6693, abs=1e-5)
    assert info.altitude == -12.0 and info.camera == "Canon EOS R5"
    assert info.taken == "2019-01-02T03:04:05"  # no offset written: local time where it was taken, stated as such


@pytest.mark.parametrize("value, offset, expected", [
    ("0000:00:00 00:00:00", None, None),  # a camera whose clock was never set
    ("    :  :     :  :  ", None, None),
    ("2023:02:31 10:00:00", None, None),  # no such day
    ("2031:05:01 10:00:00", None, None),  # the future
    ("1601:01:01 00:00:00", None, None),  # before photography: a zeroed Windows FILETIME
    ("2023:07:14 18:03:22\x00", "+05:30", "2023-07-14T18:03:22+05:30"),
    ("2023:07:14 18:03:22", "+25:00", "2023-07-14T18:03:22"),  # an offset no zone has is no zone
    ("2023:07:14 18:03:22", "garbage", "2023-07-14T18:03:22"),
    (b"2023:07:14 18:03:22", None, "2023-07-14T18:03:22"),
    (12345, None, None),
])
def test_exif_dates_cameras_really_write(value, offset, expected):
    assert parse_exif_time(value, offset, now=NOW) == expected


def test_a_bad_original_time_falls_back_to_the_digitized_then_the_modified_one():
    assert read_back(exif_of("0000:00:00 00:00:00", digitized="2020:05:06 07:08:09")).taken_source == "exif-digitized"
    fallback = read_back(exif_of(modified="2021:01:01 12:00:00"))
    assert (fallback.taken, fallback.taken_source) == ("2021-01-01T12:00:00", "exif-modified")
    assert read_back(exif_of()) == MediaInfo()  # nothing at all: the caller uses the file's mtime, and says so


@pytest.mark.parametrize("gps", [(0.0, 0.0), (95.0, 10.0), (10.0, 190.0)])
def test_a_position_out_of_range_or_without_a_fix_is_no_place(gps):
    exif = exif_of("2023:07:14 18:03:22", gps=gps)
    if gps[0] > 90:  # EXIF's degrees cannot say 95 N through dms(): write the rationals as a broken receiver does
        exif.get_ifd(GPS_IFD)[2] = (IFDRational(95), IFDRational(0), IFDRational(0))
    info = read_back(exif)
    assert (info.latitude, info.longitude, info.altitude) == (None, None, None) and info.taken is not None


def test_a_damaged_gps_rational_is_dropped_not_raised():
    exif = exif_of(gps=(48.85, 2.35))
    exif.get_ifd(GPS_IFD)[2] = (IFDRational(48, 0), IFDRational(51), IFDRational(0))  # a zero denominator
    assert read_back(exif).latitude is None


def write_tagged_video(path, tags: dict, fmt: str | None = None) -> None:
    import av
    import numpy as np

    # use_metadata_tags: keep keys such as com.apple.quicktime.make, as an iPhone's file holds them
    with av.open(str(path), "w", format=fmt, options={"movflags": "use_metadata_tags"}) as container:
        container.metadata.update(tags)
        stream = container.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for _ in range(5):
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.zeros((48, 64, 3), np.uint8), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def read_video(path) -> MediaInfo:
    import av

    with av.open(str(path)) as container:
        return from_video(dict(container.metadata), now=NOW)


def test_a_phone_video_says_when_and_where(tmp_path):
    write_tagged_video(tmp_path / "IMG_0042.MOV", {"creation_time": "2023-07-14T16:03:22.000000Z",
                                                   "location": "+52.5200+013.4050+034.500/",
                                                   "com.apple.quicktime.make": "Apple",
                                                   "com.apple.quicktime.model": "iPhone 13"}, fmt="mov")
    info = read_video(tmp_path / "IMG_0042.MOV")
    assert info.taken == "2023-07-14T16:03:22+00:00" and info.taken_source == "video"
    assert (info.latitude, info.longitude, info.altitude) == (52.52, 13.405, 34.5)
    assert info.camera == "Apple iPhone 13"


def test_video_tags_without_a_time_or_with_a_muxers_epoch(tmp_path):
    write_tagged_video(tmp_path / "screen.mp4", {"creation_time": "1970-01-01T00:00:00.000000Z"})
    assert read_video(tmp_path / "screen.mp4").taken is None
    info = from_video({"creation_time": "not a time", "location": "+00.0000+000.0000/",
                       "com.android.manufacturer": "Google", "com.android.model": "Pixel 7"}, now=NOW)
    assert (info.taken, info.latitude, info.camera) == (None, None, "Google Pixel 7")
    assert from_video({"creation_time": "2040-01-01T00:00:00Z"}, now=NOW).taken is None


def write_photo(path, exif) -> None:
    from clipengine.scenes import photo_like

    photo_like(160, 120, seed=hash(path.name) % 1000).save(path, "JPEG", exif=exif.tobytes())


def media_rows(index) -> dict:
    import sqlite3

    from clipengine.index.location import DATABASE

    with sqlite3.connect(index / DATABASE) as conn:
        conn.row_factory = sqlite3.Row
        return {r["path"].rsplit("/", 1)[-1]: dict(r) for r in conn.execute(
            "SELECT f.path, m.* FROM files f JOIN media m ON m.hash = f.hash")}


def test_indexing_keeps_each_files_metadata_and_info_sums_it_up(tmp_path, tiny_model):
    import json

    from conftest import CliRunner
    from synthetic import write_video

    from clipengine.cli import app
    from clipengine.index.pipeline import index_folder

    folder = tmp_path / "Phone"
    folder.mkdir()
    write_photo(folder / "berlin.jpg", exif_of("2023:07:14 18:03:22", "+02:00", "Google", "Pixel 7",
                                               gps=(52.52, 13.405)))
    write_photo(folder / "paris.jpg", exif_of("2024:03:02 09:00:00", "+01:00", "Apple", "iPhone 13",
                                              gps=(48.8566, 2.3522)))
    write_photo(folder / "scan.jpg", exif_of())  # a scanner writes nothing: its file time stands in
    write_video(folder / "clip.mp4", [(3, (200, 30, 30))])
    report = index_folder(folder, tmp_path / "idx", model=tiny_model, workers=0)
    assert report.embedded == 4 and report.metadata_read == 0  # read while decoding, not again
    rows = media_rows(tmp_path / "idx")
    assert rows["berlin.jpg"]["taken"] == "2023-07-14T18:03:22+02:00" and rows["berlin.jpg"]["model"] == "Pixel 7"
    assert rows["berlin.jpg"]["taken_at"] == dt.datetime(2023, 7, 14, 16, 3, 22, tzinfo=dt.timezone.utc).timestamp()
    assert rows["paris.jpg"]["latitude"] == pytest.approx(48.8566, abs=1e-5)
    assert (rows["scan.jpg"]["taken"], rows["scan.jpg"]["taken_source"], rows["scan.jpg"]["kind"]) == (None, "mtime", "image")
    assert rows["clip.mp4"]["kind"] == "video" and rows["clip.mp4"]["duration"] == 3.0
    (folder / "trip").mkdir()
    (folder / "paris.jpg").rename(folder / "trip" / "paris.jpg")  # moved: its metadata goes with its content
    assert index_folder(folder, tmp_path / "idx", model=tiny_model, workers=0).reused == 1
    assert media_rows(tmp_path / "idx")["paris.jpg"]["model"] == "iPhone 13"
    info = json.loads(CliRunner().invoke(app, ["info", "--index", str(tmp_path / "idx"), "--json"]).stdout)["media"]
    assert info["cameras"] == 2 and info["with_position"] == 2 and info["with_taken_time"] == 2 and info["files"] == 4
    assert info["first_taken"] == "2023-07-14"
    text = CliRunner().invoke(app, ["info", "--index", str(tmp_path / "idx")]).stdout
    assert "taken     2023-07-14 .. " in text and "(2 by file time); 2 cameras; 2 places; 50% with a position" in text


def test_an_index_from_before_metadata_is_filled_in_from_headers_without_embedding(tmp_path, tiny_model, monkeypatch):
    import sqlite3

    from clipengine.index.location import DATABASE
    from clipengine.index.pipeline import index_folder

    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(5):
        write_photo(folder / f"{i}.jpg", exif_of(f"2022:0{i + 1}:01 12:00:00", make="Sony", model="ILCE-7M3"))
    index_folder(folder, tmp_path / "idx", model=tiny_model, workers=0)
    with sqlite3.connect(tmp_path / "idx" / DATABASE) as conn:  # as an older clipengine left it
        conn.execute("DROP TABLE media")
    monkeypatch.setattr("clipengine.decode.open_image", lambda *a, **k: pytest.fail("decoded again"))
    report = index_folder(folder, tmp_path / "idx", model=tiny_model, workers=0)
    assert (report.embedded, report.unchanged, report.metadata_read) == (0, 5, 5)
    rows = media_rows(tmp_path / "idx")
    assert sorted(r["taken"] for r in rows.values()) == [f"2022-0{i + 1}-01T12:00:00" for i in range(5)]
    assert index_folder(folder, tmp_path / "idx", model=tiny_model, workers=0).metadata_read == 0  # once only


def test_headers_alone_give_the_metadata_of_every_kind_of_file(tmp_path):
    import pillow_heif
    from synthetic import write_dng

    from clipengine.video import metadata_of

    pillow_heif.register_heif_opener()
    Image.new("RGB", (64, 48)).save(tmp_path / "IMG_0001.HEIC", "HEIF",
                                    exif=exif_of("2021:12:24 20:00:00", "-05:00", "Apple", "iPhone 12").tobytes())
    write_tagged_video(tmp_path / "VID.mov", {"creation_time": "2022-01-01T10:00:00Z"}, fmt="mov")
    write_dng(tmp_path / "DSC_0001.NEF")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe1 not really")
    heic, _ = metadata_of(tmp_path / "IMG_0001.HEIC")
    assert heic.taken == "2021-12-24T20:00:00-05:00" and heic.camera == "Apple iPhone 12"
    video, duration = metadata_of(tmp_path / "VID.mov")
    assert video.taken == "2022-01-01T10:00:00+00:00" and duration == pytest.approx(0.5)
    assert metadata_of(tmp_path / "DSC_0001.NEF") == (MediaInfo(), None)  # no preview, so no EXIF: not an error
    assert metadata_of(tmp_path / "broken.jpg") == (MediaInfo(), None)
    assert metadata_of(tmp_path / "gone.jpg") == (MediaInfo(), None)

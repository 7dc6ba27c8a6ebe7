"""Filters on a search: when a file was taken, with what camera, what kind and extension, and where in the
folder; on a library the test writes with real EXIF."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest
from conftest import CliRunner
from synthetic import write_video
from test_metadata import exif_of

from clipengine.errors import BadInput
from clipengine.index.filters import Filter, make_filter, parse_when
from clipengine.index.pipeline import index_folder
from clipengine.index.search import Searcher
from clipengine.models import ModelSpec
from clipengine.scenes import photo_like


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> float:
    return dt.datetime(year, month, day, hour, minute, tzinfo=dt.timezone.utc).timestamp()


@pytest.mark.parametrize("text, expected", [
    ("2023", utc(2023, 1, 1)), ("2023-06", utc(2023, 6, 1)), ("2023-6-14", utc(2023, 6, 14)),
    ("2023-06-14T10:30", utc(2023, 6, 14, 10, 30)), (" 2023-06-14 10:30 ", utc(2023, 6, 14, 10, 30)),
])
def test_partial_dates_are_the_first_moment_of_their_period_in_utc(text, expected):
    assert parse_when(text, "--after") == expected


@pytest.mark.parametrize("kwargs, fragment", [
    ({"after": "June 2023"}, "--after 'June 2023': give a date such as 2023"),
    ({"before": "2023-13"}, "--before '2023-13': month must be in 1..12"),
    ({"after": "2024", "before": "2023"}, "is not before --before"),
    ({"kinds": ["photo"]}, "--kind 'photo': choose image or video"),
])
def test_a_bad_filter_is_a_one_line_error(kwargs, fragment):
    with pytest.raises(BadInput, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        make_filter(**kwargs)


@pytest.fixture(scope="module")
def library(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("filters")
    folder = root / "Phone"
    folder.mkdir()
    shots = [("beach.jpg", "2023:07:14 18:03:22", "+02:00", "Google", "Pixel 7"),
             ("late.jpg", "2023:08:31 23:30:00", None, "Google", "Pixel 7"),  # no zone: local time, kept on the 31st
             ("winter.jpg", "2023:12:24 20:00:00", "-05:00", "Apple", "iPhone 12"),
             ("march.jpg", "2024:03:02 09:00:00", "+01:00", "Canon", "Canon EOS R5")]
    for i, (name, taken, offset, make, model) in enumerate(shots):
        photo_like(160, 120, seed=i).save(folder / name, "JPEG", exif=exif_of(taken, offset, make, model).tobytes())
    photo_like(160, 120, seed=9).save(folder / "receipt.png")  # no EXIF: counts by its file time
    write_video(folder / "clip.mp4", [(3, (200, 30, 30))])
    index_folder(folder, root / "idx", model=tiny_model, workers=0)
    return folder, root / "idx"


def names(hits) -> list[str]:
    return sorted(Path(h.path).name for h in hits)


def test_each_filter_keeps_what_it_says_and_they_combine(library, tiny_model):
    folder, index = library
    with Searcher(index) as searcher:
        def found(**kwargs) -> list[str]:
            return names(searcher.search_text("a photo", 10, where=make_filter(**kwargs)))

        assert found(after="2023-06", before="2023-09") == ["beach.jpg", "late.jpg"]  # June to August
        assert found(after="2023-12-24", before="2023-12-25") == []  # 20:00 at -05:00 is 01:00 UTC...
        assert found(after="2023-12-25", before="2023-12-26") == ["winter.jpg"]  # ...on the 25th, in UTC
        assert found(cameras=["pixel 7"]) == ["beach.jpg", "late.jpg"]  # ignoring case
        assert found(cameras=["iPhone", "EOS"]) == ["march.jpg", "winter.jpg"]  # repeated: any of them
        assert found(kinds=["video"]) == ["clip.mp4"]
        assert found(kinds=["image"], extensions=["PNG"]) == ["receipt.png"]
        assert found(cameras=["Pixel"], after="2023-08") == ["late.jpg"]  # AND
        assert found(before="2000") == []
        assert names(searcher.search_text("a photo", 10, str(folder / "beach"), where=make_filter(cameras=["Pixel"]))) \
            == ["beach.jpg"]  # with --prefix too
        assert found() == names(searcher.search_text("a photo", 10))  # an empty filter keeps everything
        assert Filter().is_empty and not make_filter(kinds=["video"]).is_empty


def test_the_cli_filters_and_says_how_many_files_a_fruitless_filter_kept(library):
    from clipengine.cli import app

    _, index = library
    runner = CliRunner()
    hits = runner.invoke(app, ["search", "a cat", "--index", str(index), "--camera", "Pixel 7", "--after", "2023-08",
                               "--paths-only"])
    assert hits.exit_code == 0 and [Path(p).name for p in hits.stdout.split()] == ["late.jpg"]
    none = runner.invoke(app, ["search", "a cat", "--index", str(index), "--camera", "Pixel", "--kind", "video"])
    assert none.exit_code == 0 and "no results: the filter keeps 0 files" in none.output
    one = runner.invoke(app, ["search", "a cat", "--index", str(index), "--ext", "mp4", "--json"])
    assert [Path(h["path"]).name for h in json.loads(one.stdout)] == ["clip.mp4"]
    bad = runner.invoke(app, ["search", "a cat", "--index", str(index), "--after", "last summer"])
    assert bad.exit_code == 1 and "--after 'last summer'" in bad.output


def test_the_api_and_duplicates_take_the_same_filters(library, tmp_path):
    import shutil

    from fastapi.testclient import TestClient

    from clipengine.cli import app
    from clipengine.index.duplicates import find_duplicates
    from clipengine.serve.app import create_app
    from clipengine.serve.state import ServiceConfig

    folder, index = library
    with TestClient(create_app(ServiceConfig({"phone": index}))) as client:
        def found(**params) -> list[str]:
            answer = client.get("/api/search", params={"q": "a photo", "k": 10, **params})
            assert answer.status_code == 200, answer.text
            return sorted(Path(h["path"]).name for h in answer.json())

        assert found(after="2023-06", before="2023-09") == ["beach.jpg", "late.jpg"]
        assert found(camera=["iPhone", "EOS"]) == ["march.jpg", "winter.jpg"]
        assert found(kind="video") == ["clip.mp4"] and found(ext="png") == ["receipt.png"]
        bad = client.get("/api/search", params={"q": "a photo", "after": "last summer"})
        assert bad.status_code == 400 and "--after 'last summer'" in bad.json()["error"]
    copies = tmp_path / "copies"
    shutil.copytree(folder, copies)  # every file twice: each pair is a duplicate group
    for each in (folder, copies):
        index_folder(each, index.parent / "idx-copies", ModelSpec(arch="tiny"), workers=0)
    everything = find_duplicates(index.parent / "idx-copies", 0.999)
    assert all(g.exact for g in everything) and len(everything) >= 5
    pixel = find_duplicates(index.parent / "idx-copies", 0.999, where=make_filter(cameras=["Pixel"]))
    assert sorted(Path(f.path).name for g in pixel for f in g.files) == ["beach.jpg"] * 2 + ["late.jpg"] * 2
    result = CliRunner().invoke(app, ["duplicates", "--index", str(index.parent / "idx-copies"), "--kind", "video",
                                      "--paths-only"])
    assert result.exit_code == 0 and [line.count("clip.mp4") for line in result.stdout.splitlines()] == [2]

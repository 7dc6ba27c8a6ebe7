"""Where photos were taken: GPS tracks across several cities named offline, searched by place and by distance,
and the top hits ordered and grouped by date and place; on a library the test writes with real EXIF."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from conftest import CliRunner
from test_metadata import exif_of

from clipengine.errors import BadInput
from clipengine.index.filters import Filter, make_filter
from clipengine.index.hits import Hit, group_hits, order_hits
from clipengine.index.pipeline import index_folder
from clipengine.index.search import Searcher
from clipengine.places import Near, distance_km, name_places, parse_near, place_words
from clipengine.scenes import photo_like

# (file, taken, offset, (lat, lon)): a walk through each city, a few hundred metres apart
TRACKS = [
    ("berlin-1.jpg", "2023:05:01 10:00:00", "+02:00", (52.5200, 13.4050)),
    ("berlin-2.jpg", "2023:05:01 16:30:00", "+02:00", (52.5163, 13.3777)),
    ("berlin-3.jpg", "2023:05:02 09:15:00", "+02:00", (52.5076, 13.3904)),
    ("paris-1.jpg", "2023:07:14 18:03:22", "+02:00", (48.8566, 2.3522)),
    ("paris-2.jpg", "2023:07:14 23:30:00", None, (48.8606, 2.3376)),  # no zone: the day where it was taken
    ("tokyo-1.jpg", "2024:03:02 09:00:00", "+09:00", (35.6595, 139.7005)),
    ("tokyo-2.jpg", "2024:03:03 11:00:00", "+09:00", (35.6586, 139.7454)),
    ("sydney-1.jpg", "2024:12:24 20:00:00", "+11:00", (-33.8568, 151.2153)),
]


@pytest.fixture(scope="module")
def library(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("places")
    folder = root / "Trips"
    folder.mkdir()
    for i, (name, taken, offset, gps) in enumerate(TRACKS):
        size = (320, 240) if name.startswith("tokyo") else (160, 120)
        photo_like(*size, seed=i).save(folder / name, "JPEG", exif=exif_of(taken, offset, "Google", "Pixel 7",
                                                                           gps=gps).tobytes())
    photo_like(160, 120, seed=20).save(folder / "nowhere.jpg", "JPEG",
                                       exif=exif_of("2022:01:01 12:00:00", "+00:00").tobytes())
    report = index_folder(folder, root / "idx", model=tiny_model, workers=0)
    assert report.places_named == len(TRACKS)
    return folder, root / "idx"


def names(hits) -> list[str]:
    return sorted(Path(h.path).name for h in hits)


def test_positions_are_named_offline_with_city_region_and_country():
    berlin, paris, tokyo, sydney = name_places([(52.52, 13.405), (48.8566, 2.3522), (35.6595, 139.7005),
                                                (-33.8568, 151.2153)])
    assert (berlin.region, berlin.country, berlin.country_code) == ("State of Berlin", "Germany", "DE")
    assert (paris.city, paris.region, paris.country) == ("Paris", "Île-de-France", "France")
    assert tokyo.region == "Tokyo" and tokyo.country == "Japan"
    assert sydney.country == "Australia" and "Sydney" in sydney.label
    assert paris.label == "Paris, Île-de-France, France"
    assert name_places([]) == []
    assert name_places([(48.8584, 2.2945)])[0].city == "Vanves"  # the Eiffel Tower: the nearest town centre (docs)


def test_names_fold_case_accents_and_punctuation():
    assert place_words("Île-de-France") == "ile de france" == place_words("ILE DE FRANCE")
    assert place_words("Kópavogur") == "kopavogur"
    assert distance_km(48.8566, 2.3522, 52.52, 13.405) == pytest.approx(878, abs=5)  # Paris-Berlin
    assert distance_km(0, 179.9, 0, -179.9) == pytest.approx(22.2, abs=0.2)  # across the date line


@pytest.mark.parametrize("text, fragment", [
    ("48.85,2.35,20", "the radius 20 needs a unit: 20km, 20m or 20mi"),
    ("48.85,2.35,20ft", "unknown unit 'ft'"),
    ("48.85,2.35", "give LAT,LON,RADIUS"),
    ("95,2.35,1km", "latitude must be in [-90, 90]"),
    ("48.85,2.35,0km", "the radius must be more than 0"),
])
def test_a_bad_near_is_a_one_line_error(text, fragment):
    with pytest.raises(BadInput, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        parse_near(text)


def test_near_units_and_the_box_that_holds_the_circle():
    assert parse_near("48.85, 2.35, 500m").radius_km == pytest.approx(0.5)
    assert parse_near("48.85,2.35,10mi").radius_km == pytest.approx(16.09344)
    near = Near(48.85, 2.35, 50)
    lat_lo, lat_hi, lon_lo, lon_hi = near.box()
    for bearing_point in ((48.85 + 0.449, 2.35), (48.85, 2.35 + 0.68), (48.85, 2.35 - 0.68)):  # ~50 km away
        assert distance_km(48.85, 2.35, *bearing_point) < 50.5
        assert lat_lo <= bearing_point[0] <= lat_hi and lon_lo <= bearing_point[1] <= lon_hi
    assert Near(89.9, 0, 50).box()[2:] == (-180.0, 180.0)  # over the pole: every longitude
    assert Near(0, 179.9, 50).box()[2:] == (-180.0, 180.0)  # across the date line


def test_place_and_near_filters_keep_what_they_say(library):
    _, index = library
    with Searcher(index) as searcher:
        def found(**kwargs) -> list[str]:
            return names(searcher.search_text("a photo", 20, where=make_filter(**kwargs)))

        assert found(places=["Berlin"]) == ["berlin-1.jpg", "berlin-2.jpg", "berlin-3.jpg"]  # "State of Berlin"
        assert found(places=["ile-de-france"]) == ["paris-1.jpg", "paris-2.jpg"]  # accents and case ignored
        assert found(places=["Japan", "Australia"]) == ["sydney-1.jpg", "tokyo-1.jpg", "tokyo-2.jpg"]  # OR
        with pytest.raises(BadInput, match="--place 'erlin'"):  # whole words only
            found(places=["erlin"])
        assert found(places=["Paris"], after="2023-07-14T20:00") == ["paris-2.jpg"]  # AND with a date
        assert found(near="48.8566,2.3522,3km") == ["paris-1.jpg", "paris-2.jpg"]
        assert found(near="48.8566,2.3522,900km") == ["berlin-1.jpg", "berlin-2.jpg", "berlin-3.jpg",
                                                      "paris-1.jpg", "paris-2.jpg"]  # Berlin is 878 km away
        assert found(near="48.8566,2.3522,850km") == ["paris-1.jpg", "paris-2.jpg"]
        assert found(near="-33.85,151.2,2km") == ["sydney-1.jpg"]
        assert found(min_size="0.07MP") == ["tokyo-1.jpg", "tokyo-2.jpg"]  # 320x240 = 76,800 pixels
        assert found(max_size="160x120", places=["Japan"]) == []
        with pytest.raises(BadInput, match=r"--place 'berln': no file in this index was taken there; the nearest "
                                           r"names here: State of Berlin"):
            searcher.search_text("a photo", 5, where=make_filter(places=["Berln"]))


def test_hits_carry_their_date_and_place_and_order_by_date(library):
    _, index = library
    with Searcher(index) as searcher:
        hits = searcher.search_text("a photo", 20)
    by_name = {Path(h.path).name: h for h in hits}
    assert by_name["paris-2.jpg"].taken == "2023-07-14T23:30:00" and by_name["paris-1.jpg"].place == \
        "Paris, Île-de-France, France"
    assert by_name["nowhere.jpg"].place is None and by_name["nowhere.jpg"].taken == "2022-01-01T12:00:00+00:00"
    oldest = order_hits(hits, "date")
    assert [Path(h.path).name for h in oldest][:3] == ["nowhere.jpg", "berlin-1.jpg", "berlin-2.jpg"]
    assert [h.path for h in order_hits(hits, "-date")] == [h.path for h in reversed(oldest)]
    assert sorted(h.rank for h in oldest) == list(range(1, len(hits) + 1))  # each keeps its rank by score
    assert order_hits(hits, "score") == hits
    days = group_hits(oldest, "day")
    assert [day for day, _ in days] == ["2022-01-01", "2023-05-01", "2023-05-02", "2023-07-14", "2024-03-02",
                                        "2024-03-03", "2024-12-24"]
    assert names(dict(days)["2023-07-14"]) == ["paris-1.jpg", "paris-2.jpg"]  # 23:30 local stays on the 14th
    assert [month for month, _ in group_hits(oldest, "month")][:3] == ["2022-01", "2023-05", "2023-07"]
    places = dict(group_hits(hits, "place"))
    assert names(places["no place"]) == ["nowhere.jpg"] and len(places) >= 5
    with pytest.raises(BadInput, match="--sort 'when': choose score, date, -date"):
        order_hits(hits, "when")


def test_order_keeps_ties_by_rank_and_puts_hits_without_a_date_first():
    hits = [Hit(1, 0.9, "/a", 1, 1, 1, taken_at=5.0), Hit(2, 0.8, "/b", 1, 1, 2, taken_at=5.0),
            Hit(3, 0.7, "/c", 1, 1, 3, taken_at=1.0)]
    assert [h.path for h in order_hits(hits, "date")] == ["/c", "/a", "/b"]
    assert [h.path for h in order_hits(hits, "-date")] == ["/a", "/b", "/c"]


def test_the_cli_shows_dates_places_and_groups(library):
    from clipengine.cli import app

    _, index = library
    runner = CliRunner()
    shown = runner.invoke(app, ["search", "a photo", "--index", str(index), "--place", "Paris", "--sort", "date"])
    assert shown.exit_code == 0, shown.output
    lines = shown.stdout.splitlines()
    assert len(lines) == 2 and "2023-07-14" in lines[0] and lines[0].endswith("(Paris, Île-de-France, France)")
    assert "paris-1.jpg" in lines[0] and "paris-2.jpg" in lines[1]
    grouped = runner.invoke(app, ["search", "a photo", "--index", str(index), "--near", "52.52,13.40,10km",
                                  "--sort", "-date", "--group-by", "day"])
    assert grouped.exit_code == 0, grouped.output
    headings = [line for line in grouped.stdout.splitlines() if not line.startswith(" ")]
    assert headings == ["2023-05-02 (1 hit)", "2023-05-01 (2 hits)"]
    as_json = json.loads(runner.invoke(app, ["search", "a photo", "--index", str(index), "--group-by", "month",
                                             "--sort", "date", "--json"]).stdout)
    assert [g["group"] for g in as_json] == ["2022-01", "2023-05", "2023-07", "2024-03", "2024-12"]
    assert {h["place"] for h in as_json[1]["hits"]} >= {"Mitte, State of Berlin, Germany"}
    assert all(h["plan"] is None for g in as_json for h in g["hits"])  # no filter: no plan to choose
    planned = json.loads(runner.invoke(app, ["search", "a photo", "--index", str(index), "--place", "Berlin",
                                             "--json"]).stdout)
    assert [h["plan"] for h in planned] == ["exact scan: 3 of 9 kept (33.3%)"] * 3  # --json records the plan
    for args, fragment in ((["--near", "52.52,13.40,10"], "needs a unit"), (["--sort", "oldest"], "--sort 'oldest'"),
                           (["--group-by", "year"], "--group-by 'year'"), (["--place", "Atlantis"], "--place 'atlantis'"),
                           (["--min-size", "big"], "--min-size 'big'")):
        bad = runner.invoke(app, ["search", "a photo", "--index", str(index), *args])
        assert bad.exit_code == 1 and fragment in bad.output and bad.exception is not None
        assert "Traceback" not in bad.output
    info = runner.invoke(app, ["info", "--index", str(index)])
    assert "1 camera; 7 places; 89% with a position" in info.stdout  # 8 of 9 photos carry GPS, both Paris ones "Paris"


def test_an_older_index_names_its_places_on_the_next_run_without_embedding_again(library, tmp_path, tiny_model):
    import shutil

    folder, index = library
    old = tmp_path / "old"
    shutil.copytree(index, old)
    with sqlite3.connect(old / "meta.sqlite") as db:  # as an index made before places were
        db.execute("DROP TABLE places")
    with Searcher(old) as searcher:  # read-only: searches it, and a place filter finds nothing to match yet
        assert len(searcher.search_text("a photo", 20)) == 9
        with pytest.raises(BadInput, match="no file in this index has a GPS position"):
            searcher.search_text("a photo", 5, where=make_filter(places=["Berlin"]))
    report = index_folder(folder, old, model=tiny_model, workers=0)
    assert report.embedded == 0 and report.places_named == len(TRACKS)
    with Searcher(old) as searcher:
        assert names(searcher.search_text("a photo", 20, where=make_filter(places=["Tokyo"]))) == \
            ["tokyo-1.jpg", "tokyo-2.jpg"]
    assert index_folder(folder, old, model=tiny_model, workers=0).places_named == 0  # named once


def test_a_filter_travels_to_a_service_as_query_parameters_and_back(library):
    from fastapi.testclient import TestClient

    from clipengine.serve.app import create_app
    from clipengine.serve.state import ServiceConfig

    folder, index = library
    kept = make_filter(str(folder), "2023-05", "2024-03-02T10:30", ["Pixel"], ["image"], ["jpg"], ["Île-de-France",
                       "Berlin"], "48.85,2.35,1000mi", "0.01MP", "1920x1080")
    params = kept.to_params()
    assert make_filter(params["prefix"], params["after"], params["before"], params["camera"], params["kind"],
                       params["ext"], params["place"], params["near"], params["min_size"], params["max_size"]) == kept
    assert Filter().to_params() == {}
    with TestClient(create_app(ServiceConfig({"trips": index}))) as client:
        answer = client.get("/api/search", params={"q": "a photo", "k": 20, "place": "Japan", "near": "35.66,139.7,10km"})
        assert answer.status_code == 200, answer.text
        assert sorted(Path(h["path"]).name for h in answer.json()) == ["tokyo-1.jpg", "tokyo-2.jpg"]
        assert answer.json()[0]["place"].endswith("Tokyo, Japan")
        bad = client.get("/api/search", params={"q": "a photo", "near": "35.66,139.7,10"})
        assert bad.status_code == 400 and "needs a unit" in bad.json()["error"]
        unknown = client.get("/api/search", params={"q": "a photo", "place": "Tokio"})
        assert unknown.status_code == 400 and "Tokyo" in unknown.json()["error"]

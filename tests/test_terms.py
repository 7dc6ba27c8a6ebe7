"""Query arithmetic: terms parse as the README says, bad ones are refused in one line, and on a tiny model
trained on the built-in scenes the arithmetic moves results the way it should."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import CliRunner
from fastapi.testclient import TestClient

from clipengine.cli import app
from clipengine.errors import BadInput
from clipengine.index.search import Searcher
from clipengine.index.terms import Term, parse_term, parse_terms
from clipengine.serve.app import create_app
from clipengine.serve.state import ServiceConfig


def test_terms_parse_weights_files_and_ids(tmp_path):
    image = tmp_path / "query.jpg"
    image.write_bytes(b"\xff\xd8")
    assert parse_term("a red car") == Term(text="a red car")
    assert parse_term("2:a red car") == Term(text="a red car", weight=2.0)
    assert parse_term("-0.5:snow") == Term(text="snow", weight=-0.5)
    assert parse_term("1e-1:snow", -1) == Term(text="snow", weight=-0.1)
    assert parse_term("x:y") == Term(text="x:y")  # no number before the colon: all text
    assert parse_term(str(image)) == Term(image=str(image))
    assert parse_term(f"3:{image}") == Term(image=str(image), weight=3.0)
    assert parse_term("id:12", -1) == Term(id=12, weight=-1.0)
    assert parse_terms("a cat", ["in the snow"], ["indoors"]) == [
        Term(text="a cat"), Term(text="in the snow"), Term(text="indoors", weight=-1.0)]
    for bad, message in (("", "empty"), ("2:", "empty"), ("  ", "empty"), ("1.2.3:red", "not a number"),
                         ("nan:red", "finite"), ("inf:red", "finite"), ("id:x", "id:N"),
                         (str(tmp_path / "missing.jpg"), "no such image file")):
        with pytest.raises(BadInput, match=message):
            parse_term(bad)


def first_groups(hits, captions: dict[str, str]) -> list[str]:
    """The main group of each hit's scene ("two large blue circles"), without the optional second shape."""
    return [captions[Path(h.path).name].split(" and ")[0] for h in hits]


@pytest.mark.slow
def test_arithmetic_moves_results_the_way_it_should(trained_scenes):
    from clipengine.scenes import COLOURS

    index, captions = trained_scenes
    with Searcher(index) as searcher:
        def top(query: str, add=(), subtract=()) -> list[str]:
            return first_groups(searcher.search_terms(parse_terms(query, add, subtract), 10), captions)

        red_circles = top("a red circle")
        moved = {colour: top("a red circle", [colour], ["red"]) for colour in ("blue", "green", "yellow")}
        no_red = top("a red circle", [], ["red"])

    def count(groups: list[str], word: str) -> int:
        return sum(word in g.split() or word + "s" in g.split() or word + "es" in g.split() for g in groups)

    def commonest_colour(groups: list[str]) -> str:
        return max(COLOURS, key=lambda c: count(groups, c))

    assert count(red_circles, "red") >= 8 and commonest_colour(red_circles) == "red"
    for colour, groups in moved.items():  # - red + COLOUR: the colour changes to the one added
        assert count(groups, "red") <= 1 and commonest_colour(groups) == colour and count(groups, colour) >= 4, groups
    assert count(no_red, "red") <= count(red_circles, "red") / 2, no_red  # subtracting alone takes most of it away


@pytest.mark.slow
def test_terms_on_the_command_line_and_over_http(trained_scenes):
    index, captions = trained_scenes
    runner = CliRunner()
    result = runner.invoke(app, ["search", "a red circle", "--add", "blue", "--subtract", "red", "--index", str(index),
                                 "-k", "5", "--paths-only"])
    assert result.exit_code == 0, result.output
    with Searcher(index) as searcher:
        expected = searcher.search_terms(parse_terms("a red circle", ["blue"], ["red"]), 5)
        image = expected[0].path
        mixed = searcher.search_terms([Term(text="a red circle", weight=2.0), Term(image=image)], 5)
        vector = searcher.terms_vector([Term(text="a red circle", weight=2.0), Term(id=expected[0].id)])
    assert result.stdout.split() == [h.path for h in expected]
    assert np.linalg.norm(vector) == pytest.approx(1.0, abs=1e-5)
    result = runner.invoke(app, ["search", "2:a red circle", "--add", image, "--index", str(index), "-k", "5",
                                 "--paths-only"])
    assert result.stdout.split() == [h.path for h in mixed]  # a weight, and an image file among the terms
    for args, message in ((["x", "--add", "nope.png"], "no such image file"), (["x", "--subtract", "x"], "cancel out"),
                          (["x", "--add", "nan:red"], "finite"), (["--vector", "v.npy", "--add", "x"], "not --vector")):
        result = runner.invoke(app, ["search", *args, "--index", str(index)])
        assert result.exit_code == 1 and message in result.output, result.output

    with TestClient(create_app(ServiceConfig({"scenes": index}))) as client:
        body = {"terms": [{"text": "a red circle"}, {"text": "blue"}, {"text": "red", "weight": -1}]}
        hits = client.post("/api/search/terms", params={"k": 5}, json=body).json()
        assert [h["path"] for h in hits] == [h.path for h in expected]
        hits = client.post("/api/search/terms", params={"k": 5},
                           json={"terms": [{"text": "a red circle", "weight": 2}, {"id": expected[0].id}]}).json()
        assert [h["path"] for h in hits] == [h.path for h in mixed]  # an indexed image by id: the same as by path
        for terms, status in (([], 422), ([{"text": "x", "id": 1}], 400), ([{"text": " "}], 400),
                              ([{"image": "/etc/passwd"}], 400), ([{"id": 99999}], 404), ([{"text": "x", "weight": "heavy"}], 422)):
            response = client.post("/api/search/terms", json={"terms": terms})
            assert response.status_code == status and "error" in response.json(), (terms, response.text)

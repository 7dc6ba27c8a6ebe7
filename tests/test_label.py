"""Texts ranked for an image: on the tiny model trained on the built-in scenes, the texts that describe an
image come first; the index's model and the named checkpoint agree; bad input is one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import CliRunner

from clipengine.cli import app
from clipengine.errors import BadInput
from clipengine.index.label import label_image, read_texts
from clipengine.models import ModelSpec
from clipengine.scenes import COLOURS


def test_read_texts_from_lines_and_csv(tmp_path):
    (tmp_path / "labels.txt").write_text("red\n\n# a comment\nblue\nred\n")
    assert read_texts(tmp_path / "labels.txt") == ["red", "blue"]
    (tmp_path / "caps.csv").write_text("filepath,caption\na.jpg,a red circle\nb.jpg,a blue square\nc.jpg,a red circle\n")
    assert read_texts(tmp_path / "caps.csv") == ["a red circle", "a blue square"]
    (tmp_path / "plain.tsv").write_text("x\tone\ny\ttwo\n")
    assert read_texts(tmp_path / "plain.tsv") == ["one", "two"]  # no header it knows: the last column
    for name, content in (("empty.txt", "\n\n"), ("empty.csv", ""), ("nocaps.csv", "filepath,caption\na.jpg,\n")):
        (tmp_path / name).write_text(content)
        with pytest.raises(BadInput, match="empty|no captions"):
            read_texts(tmp_path / name)
    with pytest.raises(BadInput, match="cannot read"):
        read_texts(tmp_path / "missing.txt")


@pytest.mark.slow
def test_the_texts_that_describe_an_image_come_first(trained_scenes):
    index, captions = trained_scenes
    images = sorted((index.parent / "test" / "images").glob("*.jpg"))[:40]
    colours = list(COLOURS)
    right = 0
    for image in images:
        main_colour = captions[image.name].split(" and ")[0].split()[2]  # "two large blue circles ..." -> blue
        top = label_image(image, colours, index=index, templates=["a {} shape", "a picture of something {}"], k=3)
        right += top[0].text == main_colour
        assert [x.rank for x in top] == [1, 2, 3] and top[0].score >= top[1].score >= top[2].score
    assert right >= 0.6 * len(images), right  # zero-shot colour, 8 classes: chance is 5 of 40

    own = sorted(set(captions.values()))  # every test scene's caption: its own should rank near the top
    hits = sum(captions[image.name] in [x.text for x in label_image(image, own, index=index, k=10)]
               for image in images[:20])
    assert hits >= 10, hits  # chance: 10 of ~300 captions, 0.7 of 20 images

    checkpoint = index.parent / "run"
    by_index = label_image(images[0], colours, index=index, k=8)
    by_model = label_image(images[0], colours, spec=ModelSpec(checkpoint=str(checkpoint)), k=8)
    assert [x.text for x in by_index] == [x.text for x in by_model]
    assert [x.score for x in by_index] == pytest.approx([x.score for x in by_model], abs=1e-4)


@pytest.mark.slow
def test_the_label_command(trained_scenes, tmp_path):
    index, _ = trained_scenes
    image = sorted((index.parent / "test" / "images").glob("*.jpg"))[0]
    (tmp_path / "colours.txt").write_text("\n".join(COLOURS) + "\n")
    runner = CliRunner()
    result = runner.invoke(app, ["label", str(image), "--texts", str(tmp_path / "colours.txt"), "--index", str(index),
                                 "-k", "3", "--template", "a {} shape", "--json"])
    assert result.exit_code == 0, result.output
    labels = json.loads(result.stdout)
    assert [x["rank"] for x in labels] == [1, 2, 3] and set(labels[0]) == {"rank", "score", "text"}
    text = runner.invoke(app, ["label", str(image), "--texts", str(tmp_path / "colours.txt"), "--index", str(index)])
    assert len(text.stdout.splitlines()) == 5 and text.stdout.split()[2] in COLOURS
    (tmp_path / "empty.txt").write_text("")
    for args, message in (([str(image), "--texts", str(tmp_path / "empty.txt")], "empty"),
                          ([str(tmp_path / "nope.jpg"), "--texts", str(tmp_path / "colours.txt")], "image not found"),
                          ([str(image), "--texts", str(tmp_path / "colours.txt"), "--template", "no slot"], "has no {}"),
                          ([str(image), "--texts", str(tmp_path / "colours.txt"), "-k", "0"], "-k must be at least 1")):
        result = runner.invoke(app, ["label", *args, "--index", str(index)])
        assert result.exit_code == 1 and message in result.output, result.output
    assert Path(image).is_file()


@pytest.mark.slow
def test_a_caption_set_stored_in_the_index_answers_as_the_file_does(trained_scenes, tmp_path):
    from clipengine.index.location import TEXTS_FAISS_FILE as FAISS_FILE
    from clipengine.index.texts import index_texts

    index, captions = trained_scenes
    index = Path(shutil.copytree(index, tmp_path / "idx"))  # this test writes into the index
    texts = sorted(set(captions.values()))
    image = sorted((trained_scenes[0].parent / "test" / "images").glob("*.jpg"))[5]
    with pytest.raises(BadInput, match="index-texts"):
        label_image(image, None, index=index)
    report = index_texts(texts[:-1], index)
    assert (report.added, report.already, report.total) == (len(texts) - 1, 0, len(texts) - 1)
    report = index_texts(texts, index)  # incremental: only the new one is embedded
    assert (report.added, report.already, report.total) == (1, len(texts) - 1, len(texts))
    stored = label_image(image, None, index=index, k=10)
    from_file = label_image(image, texts, index=index, k=10)
    assert [x.text for x in stored] == [x.text for x in from_file]
    assert [x.score for x in stored] == pytest.approx([x.score for x in from_file], abs=1e-5)
    (index / FAISS_FILE).unlink()  # as if a run was interrupted before the search file was written
    assert [x.text for x in label_image(image, None, index=index, k=10)] == [x.text for x in stored]
    with pytest.raises(BadInput, match="--template"):
        label_image(image, None, index=index, templates=["a {}"])
    result = CliRunner().invoke(app, ["index-texts", str(tmp_path / "missing.csv"), "--index", str(index)])
    assert result.exit_code == 1 and "cannot read" in result.output
    result = CliRunner().invoke(app, ["label", str(image), "--index", str(index), "-k", "3", "--json"])
    assert [x["text"] for x in json.loads(result.stdout)] == [x.text for x in stored[:3]]

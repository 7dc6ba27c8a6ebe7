"""The command line: the contract of names and JSON shapes, exit codes, and one-line errors."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import CliRunner, committed_count, interruptible, write_bad_inputs, write_photos

from clipengine.cli import app
from clipengine.index.location import MANIFEST

runner = CliRunner()


def run(*args: str, code: int = 0):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == code, (result.output, result.stderr if result.stderr_bytes else "")
    return result


@pytest.fixture
def indexed(photos, monkeypatch):
    run("index", photos, "--index", "photos", "--model", "tiny", "--workers", "0")
    return photos


@pytest.fixture(scope="module")
def _shared_index_dir(tmp_path_factory, _export_cache) -> Path:
    """An index directory holding "photos", built once for the tests that only read it."""
    root = tmp_path_factory.mktemp("shared")
    with pytest.MonkeyPatch.context() as m:
        m.setenv("CLIPENGINE_INDEX_DIR", str(root / "indexes"))
        m.setenv("CLIPENGINE_CACHE_DIR", str(_export_cache))
        run("index", write_photos(root / "photos"), "--index", "photos", "--model", "tiny", "--workers", "0")
    return root / "indexes"


@pytest.fixture
def read_only_index(_shared_index_dir, monkeypatch):
    """The shared "photos" index as this test's index directory (a test that writes must use `indexed`)."""
    monkeypatch.setenv("CLIPENGINE_INDEX_DIR", str(_shared_index_dir))


def test_index_search_info_round_trip_by_name(indexed, tmp_path):
    index_dir = tmp_path / "indexes" / "photos"  # named indexes live in $CLIPENGINE_INDEX_DIR
    assert (index_dir / MANIFEST).is_file()
    query = sorted(indexed.rglob("*.jpg"))[2]
    hits = json.loads(run("search", "--image", query, "--index", "photos", "-k", "3", "--json").stdout)
    assert [h["rank"] for h in hits] == [1, 2, 3]
    assert hits[0]["path"] == str(query) and hits[0]["score"] == pytest.approx(1.0, abs=1e-5)
    assert set(hits[0]) >= {"rank", "score", "path"}
    human = run("search", "--image", query, "--index", "photos", "-k", "2").stdout.splitlines()
    taken = dt.datetime.fromtimestamp(query.stat().st_mtime, dt.timezone.utc).date().isoformat()  # no EXIF: its mtime
    assert human[0].split() == ["1", "+1.0000", taken, str(query)]
    paths = run("search", "a photo", "--index", "photos", "-k", "5", "--paths-only").stdout.splitlines()
    assert len(paths) == 5 and all(os.path.isfile(p) for p in paths)
    by_path = json.loads(run("search", "--image", query, "--index", str(index_dir), "-k", "1", "--json").stdout)
    assert by_path[0]["path"] == str(query)
    info = json.loads(run("info", "--index", "photos", "--json").stdout)
    assert info["count"] == 12 and info["skipped_files"] == [] and info["model"]["arch"] == "tiny"
    assert "12 searchable" in run("info", "--index", "photos").stdout


def test_search_by_vector_and_prefix(indexed, tmp_path):
    query = sorted(indexed.rglob("*.jpg"))[0]
    from clipengine.index.search import Searcher

    with Searcher(tmp_path / "indexes" / "photos") as s:
        np.save(tmp_path / "q.npy", s.image_vector(query))
    hits = json.loads(run("search", "--vector", tmp_path / "q.npy", "--index", "photos", "--json").stdout)
    assert hits[0]["path"] == str(query) and len(hits) == 10
    only_b = json.loads(run("search", "--vector", tmp_path / "q.npy", "--index", "photos", "--prefix",
                            indexed / "b", "-k", "50", "--json").stdout)
    assert len(only_b) == 6 and all(h["path"].startswith(str(indexed / "b") + os.sep) for h in only_b)


def test_index_json_report_and_incremental_rerun(indexed):
    report = json.loads(run("index", indexed, "--index", "photos", "--json", "--workers", "0").stdout)
    assert report["embedded"] == 0 and report["unchanged"] == 12 and report["count"] == 12


def test_skipped_files_are_reported_and_listed(tmp_path):
    expected = write_bad_inputs(tmp_path / "bad")
    out = run("index", tmp_path / "bad", "--index", "bad", "--model", "tiny", "--workers", "0").stdout
    assert "skipped" in out and "empty file" in out
    info = json.loads(run("info", "--index", "bad", "--json").stdout)
    assert len(info["skipped_files"]) == sum(outcome != "ok" for outcome in expected.values())
    assert all(set(s) == {"path", "reason"} for s in info["skipped_files"])


@pytest.mark.parametrize("args,message", [
    (["search", "x", "--index", "nothing-here"], "no index at"),
    (["info", "--index", "nothing-here"], "no index at"),
    (["search", "--index", "photos"], "exactly one query"),
    (["search", "x", "--image", "y.jpg", "--index", "photos"], "exactly one query"),
    (["search", "--image", "/no/such.jpg", "--index", "photos"], "cannot read query image"),
    (["search", "x", "--index", "photos", "-k", "0"], "-k must be at least 1"),
    (["search", "x", "--index", "photos", "--model", "ViT-B-32"], "was built with tiny"),
    (["search", "--vector", "/no/q.npy", "--index", "photos"], "cannot read query vector"),
    (["index", "/no/such/folder", "--index", "photos"], "folder not found"),
    (["index", ".", "--index", "photos", "--model", "ViT-B-16"], "name the weights of ViT-B-16"),
    (["index", ".", "--index", "photos", "--faiss", "IVFxyz"], "not a faiss index_factory string"),
    (["index", ".", "--index", "photos", "--memory-budget", "lots"], "give a size such as 4GB"),
    (["index", ".", "--index", "photos", "--max-pixels", "lots"], "give a pixel count such as 200M"),
    (["serve", "--index", "photos", "--max-upload", "lots"], "give a size such as 4GB"),
    (["reindex", "--index", "photos", "--target-recall", "1.5"], "--target-recall must be in (0, 1]"),
    (["reindex", "--index", "nothing-here"], "no index at"),
])
def test_user_mistakes_are_one_line_errors(read_only_index, args, message):
    result = run(*args, code=1)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr


def test_a_named_faiss_index_is_built_tuned_shown_and_reindexed(indexed):
    report = json.loads(run("index", indexed, "--index", "photos", "--faiss", "HNSW8", "--json").stdout)
    assert report["faiss"]["factory"] == "IDMap2,HNSW8" and report["faiss"]["tuning"]["param"] == "efSearch"
    text = report["faiss"]["text_tuning"]  # tuned on the shipped prompts through the index's own text tower too
    assert text["param"] == "efSearch" and text["queries"] == 500 and text["reached"]
    info = run("info", "--index", "photos").stdout
    assert "search    hnsw (IDMap2,HNSW8), image queries efSearch" in info and "; text queries efSearch" in info
    assert info.count("recall@10") == 2 and info.count("ms/query") == 2
    again = json.loads(run("reindex", "--index", "photos", "--target-recall", "0.99", "--json").stdout)
    assert again["faiss"]["tuning"]["target"] == 0.99 and again["faiss_policy"]["factory"] == "HNSW8"
    assert again["faiss"]["text_tuning"]["target"] == 0.99
    hits = json.loads(run("search", "--image", sorted(indexed.rglob("*.jpg"))[0], "--index", "photos", "--json").stdout)
    assert hits[0]["path"] == str(sorted(indexed.rglob("*.jpg"))[0])


def test_corrupt_manifest_is_a_one_line_error(indexed, tmp_path):
    (tmp_path / "indexes" / "photos" / MANIFEST).write_text("][")
    result = run("search", "x", "--index", "photos", code=1)
    assert "damaged" in result.stderr and "--rebuild" in result.stderr


def test_usage_errors_exit_2(indexed):
    run("index", code=2)
    run("search", "x", "-k", "many", code=2)


def test_models_lists_shipped_and_open_clip_architectures():
    listing = json.loads(run("models", "--json").stdout)
    assert "tiny" in listing["shipped"] and "laion2b_s34b_b79k" in listing["models"]["ViT-B-32"]
    assert listing["default"] == {"model": "ViT-B-32", "pretrained": "laion2b_s34b_b79k"}
    assert "tiny" in run("models").stdout


def test_real_process_exit_codes_and_no_traceback(tmp_path):
    env = {**os.environ, "CLIPENGINE_INDEX_DIR": str(tmp_path)}
    result = subprocess.run([sys.executable, "-m", "clipengine", "info", "--index", "missing"],
                            capture_output=True, text=True, env=env)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.startswith("error: no index at") and "Traceback" not in result.stderr


@pytest.mark.slow
def test_ctrl_c_during_indexing_exits_130_with_a_hint(tmp_path):
    from synthetic import write_photo_folder

    write_photo_folder(tmp_path / "f", 80, (640, 480), fmt="PNG")
    env = {**os.environ, "CLIPENGINE_INDEX_DIR": str(tmp_path / "indexes")}
    proc = subprocess.Popen([sys.executable, "-m", "clipengine", "index", str(tmp_path / "f"), "--index", "x",
                             "--model", "tiny", "--workers", "0", "--commit-every", "4", "--batch-size", "4"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=interruptible)
    deadline = time.monotonic() + 120
    while committed_count(tmp_path / "indexes" / "x") < 4 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)  # until the first commit: interrupted while embedding, not while starting up
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert 4 <= committed_count(tmp_path / "indexes" / "x") < 80  # what was committed is kept


def test_train_options_come_from_train_config(tmp_path, monkeypatch):
    """Every TrainConfig setting is an option, with its help and default; what is given reaches the config,
    and what is not keeps TrainConfig's default (or, resuming, the saved run's)."""
    import dataclasses

    from clipengine.training import TrainConfig
    from clipengine.training.config import command_line_options

    options = command_line_options()
    settable = {f.name for f in dataclasses.fields(TrainConfig)} - {"max_pixels", "shard_backoff"}  # library-only
    assert {o.name for o in options} == settable
    monkeypatch.setenv("COLUMNS", "300")  # no option name cut short, whatever the terminal
    help_text = " ".join(re.sub("[│╭╮╰╯─]", " ", run("train", "--help").output).split())  # rich's boxes, unwrapped
    for option in options:
        assert f"--{option.name.replace('_', '-')}" in help_text
    assert "(default 10)" in help_text and "(default 0.0005)" in help_text  # epochs, lr: from the dataclass

    seen = []

    def train(config, progress=None):
        seen.append(config)
        raise ZeroDivisionError  # stop here: the config is what this test is about

    monkeypatch.setattr("clipengine.training.loop.train", train)
    with pytest.raises(AssertionError, match="crashed: ZeroDivisionError") as crash:  # reached the loop
        runner.invoke(app, ["train", "--data", "c.csv", "--out", str(tmp_path / "run"), "--epochs", "3",
                            "-m", "small", "--lock-image", "--lr", "1e-3", "--decode-cache", "off"])
    assert isinstance(crash.value.__cause__, ZeroDivisionError)
    expected = TrainConfig(data="c.csv", out=str(tmp_path / "run"), epochs=3, model="small", lock_image=True, lr=1e-3,
                           decode_cache="off")
    assert seen == [expected]
    run("train", "--epochs", "3", code=1)  # no --data: a one-line error
    assert "nothing to resume" in run("train", "--resume", "--out", str(tmp_path / "none"), code=1).output


def test_what_index_passes_over_is_counted_in_its_report_and_in_info(indexed):
    (indexed / "notes.xmp").write_text("<x/>")
    (indexed / "a" / "IMG_0001.xmp").write_text("<x/>")
    (indexed / "a" / "clip.mp4").write_bytes(b"\x00" * 64)
    (indexed / ".thumbs").mkdir()
    report = json.loads(run("index", indexed, "--index", "photos", "--json", "--no-video").stdout)
    assert report["not_indexed"] == {".xmp": 2, ".mp4": 1, "hidden": 1} and report["unchanged"] == 12
    text = run("index", indexed, "--index", "photos", "--no-video").stdout
    assert "not indexed: 2 .xmp (no decoder); 1 .mp4 (--no-video); 1 hidden" in text
    assert json.loads(run("info", "--index", "photos", "--json").stdout)["not_indexed"] == report["not_indexed"]
    (indexed / "notes.xmp").unlink()  # the next walk's count replaces the last one's
    assert json.loads(run("info", "--index", "photos", "--json").stdout)["not_indexed"][".xmp"] == 2
    run("index", indexed, "--index", "photos")  # videos indexed (this one is no video: skipped with its reason)
    info = run("info", "--index", "photos").stdout
    assert "not indexed: " in info and "1 .xmp (no decoder)" in info and "2 .xmp" not in info
    assert "clip.mp4: not a readable video" in info and "1 .mp4" not in info

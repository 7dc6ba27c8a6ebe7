"""`clipengine bench`: retrieval, through an index, zero-shot and linear probe on a tiny model and
generated data; the JSON contract, compare, and one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CliRunner
from PIL import Image

from clipengine.cli import app
from clipengine.errors import BadInput
from clipengine.evaluation.probe import probe_benchmark
from clipengine.evaluation.retrieval import embed_pairs, retrieval_benchmark
from clipengine.evaluation.zeroshot import zeroshot_benchmark, zeroshot_classifier
from clipengine.metrics import retrieval_recall
from clipengine.models import ModelSpec
from clipengine.pairs import read_pairs
from clipengine.scenes import write_scene_set

TINY = ModelSpec(arch="tiny")
runner = CliRunner()


def run(*args, code: int = 0):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == code, (result.output, result.stderr if result.stderr_bytes else "")
    return result


@pytest.fixture
def scenes(tmp_path) -> Path:
    return write_scene_set(tmp_path / "scenes", 24, size=80)


@pytest.fixture
def classes(tmp_path) -> Path:
    """Three classes of plain-coloured images with a caption each: separable by any image features."""
    rng = np.random.default_rng(0)
    for name, colour in (("red", (220, 30, 30)), ("green", (30, 200, 30)), ("blue", (30, 30, 220))):
        folder = tmp_path / "classes" / name
        folder.mkdir(parents=True)
        for i in range(20):
            pixels = np.clip(np.array(colour) + rng.integers(-30, 30, (40, 40, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{i:02d}.png")
            (folder / f"{i:02d}.txt").write_text(f"a {name} square\n")
    return tmp_path / "classes"


def test_embeddings_are_open_clips_own_preprocessing_at_full_size(tiny_model, scenes):
    pairs = read_pairs(scenes)
    embedded = embed_pairs(tiny_model, pairs, workers=0)
    transform = tiny_model.image_transform()
    with torch.no_grad():
        pixels = torch.stack([transform(Image.open(p).convert("RGB")) for p in pairs.images])
        reference = tiny_model.model.encode_image(pixels, normalize=True).numpy()
        texts = tiny_model.model.encode_text(tiny_model.tokenizer([c for cs in pairs.captions for c in cs]),
                                             normalize=True).numpy()
    assert embedded.image_emb.dtype == np.float32 and embedded.text_emb.dtype == np.float32
    np.testing.assert_allclose(embedded.image_emb, reference, atol=2e-5)
    np.testing.assert_allclose(embedded.text_emb, texts, atol=2e-5)
    assert embedded.owners.tolist() == [i for i, cs in enumerate(pairs.captions) for _ in cs]


def test_transparency_is_white_unless_asked_to_reproduce_open_clip(tiny_model, tmp_path):
    """open_clip's transform drops alpha (PIL's convert("RGB")); ours composites on white; bench offers both
    and records which."""
    folder = tmp_path / "alpha"
    folder.mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(4):
        pixels = rng.integers(0, 256, (48, 48, 4), dtype=np.uint8)
        pixels[..., 3] = np.where(rng.random((48, 48)) < 0.5, 0, 255)  # half the pixels transparent
        Image.fromarray(pixels, "RGBA").save(folder / f"{i}.png")
        rows.append(f"{i}.png,image number {i}\n")
    (folder / "captions.csv").write_text("filepath,caption\n" + "".join(rows))
    pairs = read_pairs(folder / "captions.csv")
    transform = tiny_model.image_transform()
    with torch.no_grad():
        open_clips = tiny_model.model.encode_image(torch.stack([transform(Image.open(p)) for p in pairs.images]),
                                                   normalize=True).numpy()
    dropped = embed_pairs(tiny_model, pairs, workers=0, transparency="drop").image_emb
    white = embed_pairs(tiny_model, pairs, workers=0).image_emb
    np.testing.assert_allclose(dropped, open_clips, atol=2e-5)
    assert np.abs(white - open_clips).max() > 0.05
    out = tmp_path / "r.json"
    run("bench", "retrieval", "--data", folder / "captions.csv", "--model", "tiny", "--transparency", "drop", "--json", out)
    assert json.loads(out.read_text())["settings"]["transparency"] == "drop"
    result = run("bench", "retrieval", "--data", folder / "captions.csv", "--model", "tiny", "--transparency", "grey", code=1)
    assert "unknown transparency 'grey'" in result.output


def test_retrieval_benchmark_skips_a_corrupt_image_with_its_captions(scenes):
    (scenes.parent / "images" / "scene_000003.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    result = retrieval_benchmark(scenes, spec=TINY, ks=(1, 5), workers=0)
    assert result.counts["n_images"] == 23 and result.counts["n_captions"] == 69
    assert result.counts["n_skipped_images"] == 1 and "scene_000003.jpg" in result.skipped[0][0]
    assert set(result.metrics) == {"text_to_image_R@1", "text_to_image_R@5", "image_to_text_R@1", "image_to_text_R@5"}
    for name, value in result.metrics.items():  # shares of what is left: 69 captions, 23 images
        left = 69 if name.startswith("text_to_image") else 23
        assert value * left == pytest.approx(round(value * left), abs=1e-6), name
    assert result.metrics["text_to_image_R@5"] > 0 and result.metrics["image_to_text_R@5"] > 0  # not 0/anything
    assert result.settings["precision"] == "float32" and result.dataset["layout"] == "csv"


def test_cli_retrieval_json_contract_and_compare(scenes, tmp_path):
    checkpoint_free = ("--model", "tiny", "--workers", "0")
    run("bench", "retrieval", "--data", scenes, *checkpoint_free, "--k", "1,5,10", "--json", tmp_path / "a.json")
    a = json.loads((tmp_path / "a.json").read_text())
    assert a["task"] == "retrieval" and a["n_images"] == 24 and a["n_captions"] == 72
    assert sorted(a["metrics"]) == sorted(f"{d}_R@{k}" for d in ("text_to_image", "image_to_text") for k in (1, 5, 10))
    assert a["model"]["arch"] == "tiny" and a["settings"]["ks"] == [1, 5, 10] and a["versions"]["torch"]
    shown = run("bench", "retrieval", "--data", scenes, *checkpoint_free, "--k", "2").stdout
    assert "text → image" in shown and "R@2" in shown
    b = json.loads(run("bench", "retrieval", "--data", scenes, *checkpoint_free, "--k", "1,5", "--json", "-").stdout)
    (tmp_path / "b.json").write_text(json.dumps(b))
    comparison = json.loads(run("bench", "compare", tmp_path / "a.json", tmp_path / "b.json", "--json", "-").stdout)
    by_metric = {row["metric"]: row for row in comparison["metrics"]}
    assert by_metric["text_to_image_R@1"]["delta"] == 0.0 and by_metric["text_to_image_R@10"]["b"] is None
    assert {"field": "settings.ks", "a": [1, 5, 10], "b": [1, 5]} in comparison["differences"]
    assert "differs: settings.ks" in run("bench", "compare", tmp_path / "a.json", tmp_path / "b.json").stdout


def test_cli_bench_mistakes_are_one_line_errors(scenes, tmp_path):
    for args, message in (
        (("--data", tmp_path / "nope.csv"), "data not found"),
        (("--data", scenes, "--index", "missing"), "no index"),
        (("--data", scenes, "--split", "test"), "--split applies to Karpathy"),
    ):
        result = run("bench", "retrieval", *args, "--model", "tiny", code=1)
        assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "--k" in run("bench", "retrieval", "--data", scenes, "--k", "0,x", code=2).stderr
    (tmp_path / "junk.json").write_text("{}")
    assert "not a result" in run("bench", "compare", tmp_path / "junk.json", tmp_path / "junk.json", code=1).stderr


def test_recall_through_an_index_next_to_exact(scenes, tmp_path):
    images = scenes.parent / "images"
    run("index", images, "--index", "scenes", "--model", "tiny", "--workers", "0")
    with open(scenes, "a") as f:  # an image the index does not hold is left out of the queries
        extra = tmp_path / "elsewhere.jpg"
        extra.write_bytes((images / "scene_000000.jpg").read_bytes())
        f.write(f"{extra},a caption of an image outside the index\n")
    out = run("bench", "retrieval", "--index", "scenes", "--data", scenes, "--json", "-").stdout
    result = json.loads(out)
    assert result["n_images"] == 24 and result["n_captions"] == 72 and result["n_not_in_index"] == 1
    for k in (1, 5, 10):  # a flat index is exact: its search and exact search agree
        assert result["metrics"][f"index_text_to_image_R@{k}"] == result["metrics"][f"text_to_image_R@{k}"]
    assert result["settings"]["image_vectors"] == "from the index"
    assert "index text → image" in run("bench", "retrieval", "--index", "scenes", "--data", scenes).stdout
    assert "not tiny" not in run("bench", "retrieval", "--index", "scenes", "--data", scenes,
                                 "--model", "ViT-B-32", "--pretrained", "none", code=1).stderr


def test_zeroshot_classifier_is_the_mean_of_normalised_prompts(tiny_model, classes, tmp_path):
    templates = [lambda c: f"a photo of a {c}.", lambda c: f"a {c} thing"]
    weights = zeroshot_classifier(tiny_model, ["red", "blue"], templates)
    with torch.no_grad():
        prompts = tiny_model.model.encode_text(tiny_model.tokenizer(
            ["a photo of a red.", "a red thing", "a photo of a blue.", "a blue thing"]), normalize=True)
    mean = prompts.reshape(2, 2, -1).mean(1)
    np.testing.assert_allclose(weights, (mean / mean.norm(dim=1, keepdim=True)).numpy(), atol=1e-6)

    (tmp_path / "names.txt").write_text("blue\ngreen\nred\n")
    (tmp_path / "templates.txt").write_text("# prompts\na photo of a {c}.\nitap of a {}.\n")
    result = zeroshot_benchmark(classes, spec=TINY, classnames_file=tmp_path / "names.txt",
                                templates_file=tmp_path / "templates.txt", workers=0)
    assert result.counts == {"n_images": 60, "n_classes": 3, "n_skipped_images": 0}
    assert set(result.metrics) == {"acc@1", "mean_per_class_recall"}  # acc@5 needs five classes
    assert result.settings["n_templates"] == 2
    (tmp_path / "two.txt").write_text("red\nblue\n")
    with pytest.raises(BadInput, match="2 names but the data has 3 class folders"):
        zeroshot_benchmark(classes, spec=TINY, classnames_file=tmp_path / "two.txt")
    (tmp_path / "bad.txt").write_text("a photo\n")
    with pytest.raises(BadInput, match="has no {c}"):
        zeroshot_benchmark(classes, spec=TINY, templates_file=tmp_path / "bad.txt")


@pytest.mark.slow
def test_linear_probe_separates_separable_classes(classes, tmp_path):
    result = probe_benchmark(classes, spec=TINY, workers=0)
    assert result.counts["n_train"] + result.counts["n_test"] == 60 and result.counts["n_test"] == 12
    assert result.metrics["acc@1"] == 1.0 and result.metrics["mean_per_class_recall"] == 1.0
    assert 1e-6 <= result.settings["C"] <= 1e6
    with_text = probe_benchmark(classes, spec=TINY, with_text=True, workers=0)
    assert with_text.settings["features"] == "image+text" and with_text.metrics["acc@1"] == 1.0
    # labels that the images do not carry cannot be learned: the probe stays near chance
    shuffled = tmp_path / "shuffled"
    rng = np.random.default_rng(1)
    for image in sorted(classes.rglob("*.png")):
        target = shuffled / ["x", "y", "z"][rng.integers(3)] / f"{image.parent.name}{image.name}"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(image.read_bytes())
    assert probe_benchmark(shuffled, spec=TINY, workers=0).metrics["acc@1"] < 0.75
    (classes / "red" / "00.txt").unlink()
    with pytest.raises(BadInput, match="--with-text needs captions"):
        probe_benchmark(classes, spec=TINY, with_text=True, workers=0)


@pytest.mark.slow
def test_probe_uses_train_and_test_folders_when_present(classes, tmp_path):
    for split, names in (("train", range(0, 15)), ("test", range(15, 20))):
        for cls in ("red", "green", "blue"):
            (tmp_path / "split" / split / cls).mkdir(parents=True)
            for i in names:
                (tmp_path / "split" / split / cls / f"{i:02d}.png").write_bytes((classes / cls / f"{i:02d}.png").read_bytes())
    result = probe_benchmark(tmp_path / "split", spec=TINY, workers=0)
    assert result.counts["n_train"] == 45 and result.counts["n_test"] == 15
    assert result.dataset["split"] == "train/ and test/ folders"


def test_recall_sees_a_wrong_ground_truth():
    """The metric is not blind: shuffled owners (a wrong ground truth) score at chance level."""
    rng = np.random.default_rng(0)
    images = rng.standard_normal((50, 64)).astype(np.float32)
    owners = np.repeat(np.arange(50), 2)
    texts = images[owners] + 0.3 * rng.standard_normal((100, 64)).astype(np.float32)
    norm = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    right = retrieval_recall(norm(images), norm(texts), owners)
    wrong = retrieval_recall(norm(images), norm(texts), rng.permutation(owners))
    assert right["text_to_image_R@1"] > 0.9 and wrong["text_to_image_R@1"] < 0.1


@pytest.mark.slow
def test_retrieval_through_the_onnx_towers_matches_torch_and_int8_is_measured_not_assumed(scenes):
    from clipengine.evaluation.retrieval import model_for
    from clipengine.models import resolve_source

    source = resolve_source(TINY)
    pairs = read_pairs(scenes)
    embedded = {}
    for runtime, precision in (("torch", None), ("onnx", "fp32"), ("onnx", "int8")):
        with model_for(source, "cpu", runtime, precision) as model:
            embedded[precision or runtime] = embed_pairs(model, pairs, workers=0)
    for name in ("image_emb", "text_emb"):
        reference, fp32, int8 = (getattr(embedded[k], name) for k in ("torch", "fp32", "int8"))
        np.testing.assert_allclose(fp32, reference, atol=1e-4)
        assert np.abs(int8 - fp32).max() > 1e-4  # int8 really ran ...
        assert (int8 * fp32).sum(axis=1).min() > 0.99  # ... and stays close
    result = json.loads(run("bench", "retrieval", "--data", scenes, "--model", "tiny", "--workers", "0",
                            "--runtime", "onnx", "--precision", "int8", "--json", "-").stdout)
    assert result["settings"]["runtime"] == "onnxruntime" and result["settings"]["precision"] == "int8 weights"
    error = run("bench", "retrieval", "--data", scenes, "--model", "tiny", "--precision", "int8", "--runtime", "torch",
                code=1).stderr
    assert error.startswith("error: --precision int8 runs the exported int8 towers: it needs --runtime onnx")

"""Naming, resolving and loading models: tags, local files, checkpoints, offline failure, safety."""

from __future__ import annotations

import json
import os
import pickle

import numpy as np
import open_clip
import pytest
import torch
from conftest import same_weights, spy

from clipengine.embed import embed_texts
from clipengine.errors import BadInput, ModelMismatch, ModelUnavailable
from clipengine.models import (
    ModelSpec,
    _arch_preprocess,
    check_same_model,
    hub_reachable,
    load_model,
    pick_device,
    resolve_source,
    save_checkpoint,
)


def tiny_state(seed: int) -> dict:
    torch.manual_seed(seed)
    return open_clip.create_model("tiny").state_dict()


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """An empty Hugging Face cache, so pretrained weights must come from the network."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HOME", str(tmp_path))  # ~/.cache/clip, where URL-only tags are cached
    import socket

    from clipengine import models

    connect = socket.create_connection

    def unreachable(address, *args, **kwargs):  # a machine without network, on every machine
        if address[0] == models.HUB_HOST[0]:
            raise OSError(101, "Network is unreachable")
        return connect(address, *args, **kwargs)

    monkeypatch.setattr(socket, "create_connection", unreachable)
    assert not hub_reachable()


def test_random_tiny_is_identical_in_every_load_and_leaves_the_rng_alone(tiny_model):
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    again = load_model(ModelSpec(arch="tiny"), device="cpu")
    assert torch.rand(1) == expected_next  # loading did not consume the caller's random numbers
    assert same_weights(again.model, tiny_model.model.state_dict())
    assert again.source["identity"] == "random:tiny:seed0" and again.embed_dim == 64


def test_default_model_and_tags_resolve_without_loading():
    assert resolve_source(ModelSpec())["identity"] == "ViT-B-32/laion2b_s34b_b79k"
    assert resolve_source(ModelSpec(arch="ViT-B-32"))["identity"] == "ViT-B-32/laion2b_s34b_b79k"
    assert resolve_source(ModelSpec("ViT-B-16", "openai"))["identity"] == "ViT-B-16/openai"
    assert resolve_source(ModelSpec("ViT-B-16", "none"))["source"] == "random"
    with pytest.raises(BadInput, match="--pretrained TAG"):  # never silently random for a published model
        resolve_source(ModelSpec(arch="ViT-B-16"))
    with pytest.raises(BadInput, match="not found"):
        resolve_source(ModelSpec("tiny", "/no/such/weights.safetensors"))
    with pytest.raises(BadInput, match="not both"):
        resolve_source(ModelSpec("tiny", None, "/some/dir"))


def test_unknown_tag_and_arch_are_refused_with_the_choices():
    with pytest.raises(BadInput, match="laion2b_s34b_b79k"):
        load_model(ModelSpec("ViT-B-32", "no-such-tag"))
    with pytest.raises(BadInput, match="clipengine models"):
        load_model(ModelSpec("no-such-arch", "none"))


def _network_calls(monkeypatch) -> dict[str, list[tuple]]:
    """Counts of the network probe and of download attempts (a download offline retries for minutes)."""
    import open_clip.pretrained

    from clipengine import models

    probes = spy(monkeypatch, models, "hub_reachable")
    downloads: list[tuple] = []

    def download(*args, **kwargs):
        downloads.append(args)
        raise AssertionError("a download was attempted")

    for name in ("download_pretrained", "download_pretrained_from_hf", "download_pretrained_from_url"):
        monkeypatch.setattr(open_clip.pretrained, name, download)
    return {"probes": probes, "downloads": downloads}


def test_offline_pretrained_fails_fast_naming_the_fix(offline_hub, monkeypatch):
    calls = _network_calls(monkeypatch)
    with pytest.raises(ModelUnavailable) as e:
        load_model(ModelSpec("ViT-B-32", "laion2b_s34b_b79k"))
    assert (len(calls["probes"]), len(calls["downloads"])) == (1, 0)  # one bounded probe, no download to time out
    message = str(e.value)
    assert "not in the local cache" in message and "--pretrained FILE" in message and "HF_HUB_OFFLINE" in message


def test_hf_hub_offline_env_fails_at_once(offline_hub, monkeypatch):
    import socket

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    calls = _network_calls(monkeypatch)
    connects: list[object] = []

    def connect(*args, **kwargs):
        connects.append(args)
        return socket.socket()

    monkeypatch.setattr(socket, "create_connection", connect)
    with pytest.raises(ModelUnavailable, match="HF_HUB_OFFLINE is set"):
        load_model(ModelSpec("ViT-B-32", "laion2b_s34b_b79k"))
    with pytest.raises(ModelUnavailable, match="HF_HUB_OFFLINE is set"):
        load_model(ModelSpec("hf-hub:nobody/nothing"))
    assert calls["downloads"] == [] and connects == []  # decided from the variable: not even a probe's connect


@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".bin"])
def test_local_weights_file_loads_exactly(tmp_path, suffix):
    state = tiny_state(seed=1)
    path = tmp_path / f"w{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    loaded = load_model(ModelSpec("tiny", str(path)), device="cpu")
    assert same_weights(loaded.model, state)
    assert loaded.source["source"] == "file" and loaded.source["identity"].startswith("tiny@sha256:")


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_pickled_code_in_a_weights_file_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"visual.proj": Exploit()}, f)
    with pytest.raises(BadInput, match="could not load"):
        load_model(ModelSpec("tiny", str(path)), device="cpu")
    assert not marker.exists()


def test_weights_of_the_wrong_shape_are_a_clear_error(tmp_path):
    torch.save({"not": torch.zeros(1)}, tmp_path / "w.pt")
    with pytest.raises(BadInput, match="could not load tiny"):
        load_model(ModelSpec("tiny", str(tmp_path / "w.pt")), device="cpu")


def test_local_file_keeps_the_preprocessing_of_the_architectures_weights(tmp_path, monkeypatch):
    # open_clip would give a local file OpenAI's mean/std and 'shortest' resizing; we keep the tag's.
    from open_clip import pretrained

    monkeypatch.setitem(pretrained._PRETRAINED, "tiny", {"webli": pretrained._pcfg(
        hf_hub="nobody/tiny/", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), resize_mode="squash")})
    torch.save(tiny_state(seed=2), tmp_path / "w.pt")
    loaded = load_model(ModelSpec("tiny", str(tmp_path / "w.pt")), device="cpu")
    assert loaded.preprocess_cfg["mean"] == [0.5, 0.5, 0.5] and loaded.preprocess_cfg["resize_mode"] == "squash"
    assert loaded.preprocess_cfg["size"] == [64, 64]
    steps = repr(loaded.image_transform())
    assert "Resize(size=[64, 64]" in steps and "CenterCrop" not in steps  # squash, not shortest side


def test_preprocess_of_published_architectures():
    assert _arch_preprocess("ViT-B-16-SigLIP", None)["mean"] == (0.5, 0.5, 0.5)
    with pytest.raises(BadInput, match="--preprocess-from"):  # ViT-H-14's tags disagree on resize mode
        _arch_preprocess("ViT-H-14", None)
    assert _arch_preprocess("ViT-H-14", "dfn5b")["resize_mode"] == "squash"


def test_checkpoint_directory_round_trip_and_identity(tmp_path, tiny_model):
    state = tiny_state(seed=3)
    tiny_model_copy = open_clip.create_model("tiny")
    tiny_model_copy.load_state_dict(state)
    directory = save_checkpoint(tmp_path / "ckpt", tiny_model_copy, open_clip.get_model_config("tiny"),
                                tiny_model.preprocess_cfg, arch="tiny")
    loaded = load_model(ModelSpec(checkpoint=str(directory)), device="cpu")
    assert same_weights(loaded.model, state)
    assert loaded.source["arch"] == "tiny" and loaded.source["identity"].startswith("checkpoint@sha256:")
    texts = ["a red square", "a blue circle"]
    reference = open_clip.create_model("tiny")
    reference.load_state_dict(state)
    with torch.no_grad():
        expected = torch.nn.functional.normalize(reference.encode_text(open_clip.get_tokenizer("tiny")(texts)), dim=-1)
    np.testing.assert_allclose(embed_texts(loaded, texts), expected.numpy(), atol=1e-5)
    # the index's record of the checkpoint notices when its weights are replaced
    source = loaded.source
    torch.manual_seed(4)
    save_checkpoint(directory, open_clip.create_model("tiny"), open_clip.get_model_config("tiny"),
                    tiny_model.preprocess_cfg, arch="tiny")
    with pytest.raises(ModelMismatch, match="changed"):
        load_model(source, device="cpu")


def test_check_same_model(tiny_model, tmp_path):
    from safetensors.torch import save_file

    expected = tiny_model.source
    for same in (ModelSpec(), ModelSpec(arch="tiny")):  # naming nothing, or the index's own model, passes
        check_same_model(expected, same, "index x")
    with pytest.raises(ModelMismatch, match="index x was built with tiny"):
        check_same_model(expected, ModelSpec("ViT-B-32", "openai"), "index x")
    other = tmp_path / "other.safetensors"  # the same architecture with other weights is another model
    save_file({k: v.contiguous() for k, v in tiny_model.model.state_dict().items()}, str(other))
    with pytest.raises(ModelMismatch, match="index x"):
        check_same_model(expected, ModelSpec("tiny", str(other)), "index x")


def test_device_choice(monkeypatch):
    assert pick_device("cpu").type == "cpu"
    with monkeypatch.context() as m:  # unasked, the best there is: cuda, then mps, then the cpu
        for cuda, mps, chosen in ((True, True, "cuda"), (False, True, "mps"), (False, False, "cpu")):
            m.setattr(torch.cuda, "is_available", lambda cuda=cuda: cuda)
            m.setattr(torch.backends.mps, "is_available", lambda mps=mps: mps)
            assert pick_device(None).type == pick_device("auto").type == chosen
    if not torch.cuda.is_available():
        with pytest.raises(BadInput, match="no CUDA GPU"):
            pick_device("cuda")
    with pytest.raises(BadInput, match="unknown device"):
        pick_device("tpu9")


def test_cpu_embeddings_are_float32(tiny_model):
    vectors = embed_texts(tiny_model, ["one", "two", "three"], batch_size=2)
    assert vectors.dtype == np.float32 and vectors.shape == (3, 64)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(vectors, embed_texts(tiny_model, ["one", "two", "three"]), atol=1e-6)
    assert json.loads(json.dumps(tiny_model.source)) == tiny_model.source  # plain JSON, as manifests store it

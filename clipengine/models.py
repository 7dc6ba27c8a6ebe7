"""Build an open_clip model from what a user names, and say exactly which weights it has.

A user names a model three ways: an architecture with a pretrained tag (downloaded once, then cached),
an architecture with a local weights file, or a checkpoint directory (open_clip's ``local-dir`` layout,
which ``clipengine train`` writes). Each resolves to a *model source*: a small JSON-able dict that an
index stores in its manifest, so that a later ``search`` rebuilds the very same model and an index
refuses vectors from any other. Resolving a source is cheap (no torch import, no download); loading it
is where the time goes.

Two things open_clip does not do for us and we must: fail within seconds, with the fix in the message,
when weights are not cached and the network is unreachable; and keep the preprocessing (mean, std,
resize mode) of the architecture's published weights when the weights come from a local file, where
open_clip silently falls back to OpenAI's defaults.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clipengine.errors import BadInput, ModelMismatch, ModelUnavailable, first_line

if TYPE_CHECKING:  # torch is imported only when a model is really loaded: it costs seconds.
    import torch

DEFAULT_ARCH = "ViT-B-32"
DEFAULT_PRETRAINED = "laion2b_s34b_b79k"
RANDOM_INIT_SEED = 0
CHECKPOINT_CONFIG = "open_clip_config.json"
CHECKPOINT_WEIGHTS = "open_clip_model.safetensors"
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
SHIPPED_CONFIG_DIR = Path(__file__).parent / "model_configs"
HUB_HOST = ("huggingface.co", 443)
NETWORK_PROBE_SECONDS = 3.0


@dataclass(frozen=True)
class ModelSpec:
    """What the user asked for, before anything is resolved or loaded."""

    arch: str | None = None
    pretrained: str | None = None  # a pretrained tag of `arch`, or a path to a weights file
    checkpoint: str | None = None  # a checkpoint directory (open_clip_config.json + weights)
    preprocess_from: str | None = None  # the tag whose preprocessing a local weights file uses

    @property
    def is_empty(self) -> bool:
        return not (self.arch or self.pretrained or self.checkpoint)


def shipped_configs() -> list[str]:
    """Names of the small model configs that ship with clipengine (``tiny`` is the smallest)."""
    return sorted(p.stem for p in SHIPPED_CONFIG_DIR.glob("*.json"))


def _register_shipped_configs() -> None:
    import open_clip

    if not set(shipped_configs()) <= set(open_clip.list_models()):
        open_clip.add_model_config(SHIPPED_CONFIG_DIR)


# --------------------------------------------------------------------------------------------------
# Resolving a spec to a source (cheap; what the manifest stores)
# --------------------------------------------------------------------------------------------------


def _file_fingerprint(path: Path, trusted: dict | None) -> dict:
    """sha256 of a weights file, reusing `trusted`'s digest when the file's size and mtime still match,
    so that checking a 600 MB file against an index manifest does not re-read it on every search."""
    st = path.stat()
    if trusted and trusted.get("size") == st.st_size and trusted.get("mtime_ns") == st.st_mtime_ns:
        digest = trusted["sha256"]
    else:
        import hashlib  # here, not at the top: a search imports this module and needs none of it

        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        digest = h.hexdigest()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}


def checkpoint_weights_file(directory: Path) -> Path:
    """The weights file of a checkpoint directory, with the same preference order as open_clip."""
    for name in (CHECKPOINT_WEIGHTS, "open_clip_pytorch_model.safetensors", "open_clip_pytorch_model.bin",
                 "model.safetensors", "pytorch_model.bin"):
        if (directory / name).is_file():
            return directory / name
    candidates = sorted(p for p in directory.iterdir() if p.suffix in WEIGHT_SUFFIXES)
    if not candidates:
        raise BadInput(f"checkpoint directory {directory} has no weights file ({CHECKPOINT_WEIGHTS})")
    return candidates[0]


def resolve_source(spec: ModelSpec, trusted: dict | None = None) -> dict:
    """Turn a spec into a model source: the dict an index manifest stores to identify its model.

    `trusted` is a source from an existing manifest; a local file whose size and mtime match it is
    not hashed again. The result's ``identity`` is what two sources are compared by.
    """
    if spec.checkpoint:
        if spec.arch or spec.pretrained:
            raise BadInput("give either --checkpoint or --model/--pretrained, not both")
        directory = Path(spec.checkpoint).expanduser().resolve()
        config_file = directory / CHECKPOINT_CONFIG
        if not config_file.is_file():
            raise BadInput(f"{directory} is not a checkpoint directory: it has no {CHECKPOINT_CONFIG}")
        try:
            config = json.loads(config_file.read_text())
            config["model_cfg"]["embed_dim"]
        except (ValueError, KeyError, TypeError) as e:
            raise BadInput(f"checkpoint config {config_file} is unreadable ({e})") from None
        weights = checkpoint_weights_file(directory)
        fp = _file_fingerprint(weights, trusted if trusted and trusted.get("checkpoint") == str(directory) else None)
        arch = config.get("clipengine", {}).get("arch") or directory.name
        return {"source": "checkpoint", "arch": arch, "checkpoint": str(directory), "weights": weights.name,
                **fp, "identity": f"checkpoint@sha256:{fp['sha256']}"}

    arch = spec.arch or DEFAULT_ARCH
    pretrained = spec.pretrained
    if pretrained is None and arch == DEFAULT_ARCH:
        pretrained = DEFAULT_PRETRAINED
    elif pretrained is None and not arch.startswith("hf-hub:") and arch not in shipped_configs():
        from open_clip.pretrained import list_pretrained_tags_by_model

        tags = list_pretrained_tags_by_model(arch)
        if tags:  # random weights for a published model are almost never what the user meant
            raise BadInput(f"name the weights of {arch}: --pretrained TAG (one of {', '.join(tags)}), "
                           "a weights file, or --pretrained none for random weights")
    if arch.startswith("hf-hub:"):
        if pretrained:
            raise BadInput("an hf-hub: model carries its own weights: drop --pretrained")
        return {"source": "hf-hub", "arch": arch, "identity": arch}
    if not pretrained or pretrained.lower() in ("none", "random"):
        return {"source": "random", "arch": arch, "seed": RANDOM_INIT_SEED,
                "identity": f"random:{arch}:seed{RANDOM_INIT_SEED}"}
    path = Path(pretrained).expanduser()
    if path.suffix in WEIGHT_SUFFIXES or os.sep in pretrained or path.exists():
        if not path.is_file():
            raise BadInput(f"weights file not found: {pretrained}")
        path = path.resolve()
        fp = _file_fingerprint(path, trusted if trusted and trusted.get("pretrained") == str(path) else None)
        return {"source": "file", "arch": arch, "pretrained": str(path), "preprocess_from": spec.preprocess_from,
                **fp, "identity": f"{arch}@sha256:{fp['sha256']}"}
    return {"source": "pretrained", "arch": arch, "pretrained": pretrained, "identity": f"{arch}/{pretrained}"}


def describe_source(source: dict) -> str:
    """One short human line naming a model source."""
    kind = source["source"]
    if kind == "pretrained":
        return f"{source['arch']} ({source['pretrained']})"
    if kind == "file":
        return f"{source['arch']} (weights {source['pretrained']}, sha256 {source['sha256'][:12]})"
    if kind == "checkpoint":
        return f"{source['arch']} (checkpoint {source['checkpoint']})"
    if kind == "random":
        return f"{source['arch']} (random weights, seed {source['seed']})"
    return source["arch"]


def require_same_source(expected: dict, asked: dict, what: str) -> None:
    """Refuse a model source whose identity differs from `expected` (an index's)."""
    if asked["identity"] != expected["identity"]:
        raise ModelMismatch(
            f"{what} was built with {describe_source(expected)}, not {describe_source(asked)}: "
            "drop --model/--pretrained/--checkpoint to use the index's own model, or build a new index"
        )


def check_same_model(expected: dict, spec: ModelSpec, what: str) -> dict:
    """Refuse a user-named model that differs from `expected` (an index's), before loading anything."""
    if not spec.is_empty:
        require_same_source(expected, resolve_source(spec, trusted=expected), what)
    return expected


# --------------------------------------------------------------------------------------------------
# Offline detection
# --------------------------------------------------------------------------------------------------


def _env_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def hub_reachable(timeout: float = NETWORK_PROBE_SECONDS) -> bool:
    """Whether huggingface.co answers a TCP connect within `timeout` seconds, DNS included.

    The probe runs in a daemon thread so that a resolver which hangs cannot hold us past the deadline.
    """
    import socket
    import threading

    if _env_offline():
        return False
    outcome: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection(HUB_HOST, timeout=timeout).close()
            outcome.append(True)
        except OSError:
            outcome.append(False)

    worker = threading.Thread(target=probe, daemon=True)
    worker.start()
    worker.join(timeout)
    return bool(outcome and outcome[0])


def _offline_error(what: str) -> ModelUnavailable:
    reason = "HF_HUB_OFFLINE is set" if _env_offline() else "huggingface.co cannot be reached"
    return ModelUnavailable(
        f"{what} is not in the local cache and {reason}: run once with internet access to cache it, "
        "or pass a local weights file (--pretrained FILE.safetensors) or a checkpoint (--checkpoint DIR); "
        "HF_HUB_OFFLINE=1 skips the network check"
    )


def _cached_pretrained_file(tag_cfg: dict) -> str | None:
    """The cached weights file of a pretrained tag, found without touching the network."""
    from huggingface_hub import try_to_load_from_cache

    if tag_cfg.get("file"):
        return tag_cfg["file"] if os.path.isfile(tag_cfg["file"]) else None
    hub = tag_cfg.get("hf_hub", "")
    if hub:
        repo, filename = os.path.split(hub)
        filename = filename or "open_clip_pytorch_model.bin"
        names = [filename]
        if filename.endswith((".bin", ".pth")):
            names.insert(0, filename[:-4] + ".safetensors")
        if filename == "open_clip_pytorch_model.bin":
            names.insert(0, "open_clip_model.safetensors")
        for name in names:
            found = try_to_load_from_cache(repo, name)
            if isinstance(found, str):
                return found
    url = tag_cfg.get("url", "")
    if url:
        candidate = os.path.join(os.path.expanduser("~/.cache/clip"), os.path.basename(url))
        if os.path.isfile(candidate):
            return candidate
    return None


def _pretrained_weights_file(arch: str, tag: str) -> tuple[str, dict]:
    """Path of the weights for `arch`/`tag` (downloading when online), and the tag's config."""
    from open_clip.pretrained import download_pretrained, get_pretrained_cfg, list_pretrained_tags_by_model

    tag_cfg = get_pretrained_cfg(arch, tag)
    if not tag_cfg:
        tags = ", ".join(list_pretrained_tags_by_model(arch)) or "none"
        raise BadInput(f"'{tag}' is not a pretrained tag of {arch} (tags: {tags}); see `clipengine models`")
    cached = _cached_pretrained_file(tag_cfg)
    if cached:
        return cached, tag_cfg
    if not hub_reachable():
        raise _offline_error(f"pretrained weights {arch}/{tag}")
    try:
        return download_pretrained(tag_cfg), tag_cfg
    except Exception as e:  # a network failure mid-download is the user's environment, not our bug
        raise ModelUnavailable(f"downloading {arch}/{tag} failed ({e}); check the connection and retry") from None


def _hf_hub_directory(repo: str) -> str:
    """A local directory holding an hf-hub model's config and weights (downloading when online)."""
    from huggingface_hub import try_to_load_from_cache
    from open_clip.pretrained import download_pretrained_from_hf

    config = try_to_load_from_cache(repo, CHECKPOINT_CONFIG)
    if isinstance(config, str):
        for name in (CHECKPOINT_WEIGHTS, "open_clip_pytorch_model.safetensors", "open_clip_pytorch_model.bin"):
            if isinstance(try_to_load_from_cache(repo, name), str):
                return os.path.dirname(config)
    if not hub_reachable():
        raise _offline_error(f"model hf-hub:{repo}")
    try:
        config = download_pretrained_from_hf(repo, filename=CHECKPOINT_CONFIG)
        download_pretrained_from_hf(repo)
    except Exception as e:
        raise ModelUnavailable(f"downloading hf-hub:{repo} failed ({e}); check the name and the connection") from None
    return os.path.dirname(config)


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def pick_device(requested: str | None = None) -> torch.device:
    """The device to embed on: the one asked for, else cuda, then mps, then cpu."""
    import torch

    if requested and requested != "auto":
        try:
            device = torch.device(requested)
        except RuntimeError:
            raise BadInput(f"unknown device '{requested}' (use cpu, cuda, cuda:N or mps)") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise BadInput(f"device {requested} was asked for, but no CUDA GPU is available: use --device cpu")
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise BadInput("device mps was asked for, but MPS is not available: use --device cpu")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """Half precision where it is fast and safe (GPUs), full float32 on the CPU."""
    import torch

    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return None


def _arch_preprocess(arch: str, preprocess_from: str | None) -> dict:
    """The preprocessing that a local weights file of `arch` must keep.

    The architecture's published weights define it; when they disagree, the user names the tag.
    Architectures without published weights (our shipped configs) use the config's own, or defaults.
    """
    from open_clip import get_model_config
    from open_clip.pretrained import get_pretrained_cfg, list_pretrained_tags_by_model

    keys = ("mean", "std", "interpolation", "resize_mode")
    if preprocess_from:
        cfg = get_pretrained_cfg(arch, preprocess_from)
        if not cfg:
            raise BadInput(f"--preprocess-from {preprocess_from} is not a pretrained tag of {arch}")
        return {k: cfg[k] for k in keys if k in cfg}
    variants: dict[str, dict] = {}
    for tag in list_pretrained_tags_by_model(arch):
        cfg = get_pretrained_cfg(arch, tag)
        variant = {k: cfg[k] for k in keys if k in cfg}
        variants.setdefault(json.dumps(variant, sort_keys=True), variant)
    if len(variants) > 1:
        tags = ", ".join(list_pretrained_tags_by_model(arch))
        raise BadInput(f"{arch}'s published weights use different preprocessing: name the one your file "
                       f"was trained with, --preprocess-from TAG (one of {tags})")
    if variants:
        return next(iter(variants.values()))
    return dict((get_model_config(arch) or {}).get("preprocess_cfg", {}))


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Random init that is the same in every process, without disturbing the caller's RNG state."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


@dataclass
class LoadedModel:
    """A ready model with the tokenizer and preprocessing that belong to it."""

    model: Any  # open_clip CLIP / CustomTextCLIP, in eval mode on `device`
    tokenizer: Callable
    preprocess_cfg: dict
    source: dict
    device: Any  # torch.device
    onnx: Any = None  # QueryEncoders: when set, its verified towers embed instead of `model` (clipengine.embed)

    @property
    def embed_dim(self) -> int:
        return int(self.source["embed_dim"])

    @property
    def image_size(self) -> int:
        size = self.preprocess_cfg["size"]
        return int(max(size) if isinstance(size, (tuple, list)) else size)

    def image_transform(self, train: bool = False) -> Callable:
        """open_clip's own transform for this model's preprocessing: evaluation, or (`train`) its
        training augmentation (random resized crop)."""
        from open_clip.transform import PreprocessCfg, image_transform_v2

        return image_transform_v2(PreprocessCfg(**self.preprocess_cfg), is_train=train)

    def autocast(self) -> contextlib.AbstractContextManager:
        import torch

        dtype = autocast_dtype(self.device)
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=dtype)


def _arch_model(arch: str, **kwargs: Any) -> Any:
    import open_clip

    _register_shipped_configs()
    if open_clip.get_model_config(arch) is None:
        raise BadInput(f"unknown model architecture '{arch}'; see `clipengine models`")
    return open_clip.create_model(arch, **kwargs)


def load_model(source: dict | ModelSpec, device: str | None = None) -> LoadedModel:
    """Build the model a source names, on `device` (auto when None), in eval mode.

    Weights are never unpickled with code execution: safetensors, or torch.load(weights_only=True).
    """
    import pickle

    import open_clip
    import torch
    from open_clip.model import get_model_preprocess_cfg, set_model_preprocess_cfg
    from open_clip.transform import PreprocessCfg, merge_preprocess_dict

    if isinstance(source, ModelSpec):
        source = resolve_source(source)
    source = dict(source)
    kind, arch = source["source"], source["arch"]
    tokenizer_name = arch
    preprocess_overlay: dict = {}
    try:
        if kind == "checkpoint":
            directory = source["checkpoint"]
            fp = _file_fingerprint(Path(directory) / source["weights"], source)
            if fp["sha256"] != source["sha256"]:
                raise ModelMismatch(f"the weights in checkpoint {directory} changed since this index was built")
            model = open_clip.create_model(f"local-dir:{directory}")
            tokenizer_name = f"local-dir:{directory}"
        elif kind == "hf-hub":
            directory = _hf_hub_directory(arch[len("hf-hub:"):])
            model = open_clip.create_model(f"local-dir:{directory}")
            tokenizer_name = f"local-dir:{directory}"
        elif kind == "pretrained":
            path, tag_cfg = _pretrained_weights_file(arch, source["pretrained"])
            model = _arch_model(arch, force_quick_gelu=bool(tag_cfg.get("quick_gelu")))
            open_clip.load_checkpoint(model, path, weights_only=True)
            preprocess_overlay = tag_cfg
        elif kind == "file":
            weights = Path(source["pretrained"])
            if not weights.is_file():
                raise ModelUnavailable(f"weights file {weights} is gone: put it back, or build a new index")
            if _file_fingerprint(weights, source)["sha256"] != source["sha256"]:
                raise ModelMismatch(f"weights file {weights} changed since this index was built")
            preprocess_overlay = _arch_preprocess(arch, source.get("preprocess_from"))
            model = _arch_model(arch)
            open_clip.load_checkpoint(model, str(weights), weights_only=True)
        elif kind == "random":
            with _seeded(int(source["seed"])):
                model = _arch_model(arch)
        else:
            raise BadInput(f"unknown model source kind '{kind}'")
    except (RuntimeError, ValueError, KeyError, OSError, EOFError, pickle.UnpicklingError) as e:
        # a weights file that does not fit the architecture, is damaged, or holds pickled code
        # (refused by weights_only) is the user's file, not our bug: say which and why, in one line
        raise BadInput(f"could not load {describe_source(source)}: {first_line(e)}") from None

    if kind in ("pretrained", "file"):
        cfg = merge_preprocess_dict(PreprocessCfg(), preprocess_overlay)
        cfg["size"] = model.visual.image_size
        set_model_preprocess_cfg(model, cfg)
    preprocess_cfg = {k: v for k, v in get_model_preprocess_cfg(model).items()
                      if k in PreprocessCfg.__dataclass_fields__}
    preprocess_cfg = json.loads(json.dumps(preprocess_cfg))  # tuples -> lists, as the manifest holds them

    torch_device = pick_device(device)
    model = model.to(torch_device).eval()
    try:
        tokenizer = open_clip.get_tokenizer(tokenizer_name)
    except OSError as e:  # a Hugging Face tokenizer (SigLIP, hf-hub) that is neither cached nor downloadable
        if not hub_reachable():
            raise _offline_error(f"the tokenizer of {arch}") from None
        raise ModelUnavailable(f"loading the tokenizer of {arch} failed ({first_line(e)})") from None
    with torch.inference_mode():
        embed_dim = int(model.encode_text(tokenizer(["a"]).to(torch_device)).shape[-1])
    source.update(embed_dim=embed_dim, preprocess=preprocess_cfg)
    return LoadedModel(model=model, tokenizer=tokenizer, preprocess_cfg=preprocess_cfg, source=source,
                       device=torch_device)


def save_checkpoint(directory: str | os.PathLike, model: Any, model_cfg: dict, preprocess_cfg: dict,
                    arch: str) -> Path:
    """Write `model` as a checkpoint directory that `--checkpoint DIR` (and open_clip's
    ``local-dir:``) loads: open_clip_config.json plus weights as safetensors."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg, "clipengine": {"arch": arch}}
    (directory / CHECKPOINT_CONFIG).write_text(json.dumps(config, indent=2))
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(directory / CHECKPOINT_WEIGHTS))
    return directory


def model_config(source: dict) -> dict:
    """The open_clip model config (``model_cfg``) that rebuilds a source's architecture: what a
    checkpoint written after training must carry so that ``local-dir:`` can load it."""
    import copy

    import open_clip

    kind = source["source"]
    if kind == "checkpoint":
        return json.loads((Path(source["checkpoint"]) / CHECKPOINT_CONFIG).read_text())["model_cfg"]
    if kind == "hf-hub":
        return json.loads((Path(_hf_hub_directory(source["arch"][len("hf-hub:"):])) / CHECKPOINT_CONFIG)
                          .read_text())["model_cfg"]
    _register_shipped_configs()
    cfg = copy.deepcopy(open_clip.get_model_config(source["arch"]))
    if cfg is None:
        raise BadInput(f"unknown model architecture '{source['arch']}'; see `clipengine models`")
    if kind == "pretrained":
        from open_clip.pretrained import get_pretrained_cfg

        if get_pretrained_cfg(source["arch"], source["pretrained"]).get("quick_gelu"):
            cfg["quick_gelu"] = True
    return cfg


def list_models() -> dict[str, list[str]]:
    """Every architecture open_clip and clipengine know, with its pretrained tags."""
    import open_clip

    _register_shipped_configs()
    tags: dict[str, list[str]] = {name: [] for name in open_clip.list_models()}
    for arch, tag in open_clip.list_pretrained():
        tags.setdefault(arch, []).append(tag)
    return tags

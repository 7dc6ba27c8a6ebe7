"""Queries encoded by ONNX Runtime alone: the cold path of `clipengine search`, with no torch on it.

A text query in a fresh process used to cost 4.5 s (tiny) to 6.4 s (ViT-B-32): importing torch and
open_clip, then loading the whole model to run its text tower once. An index now carries its model's
towers as ONNX files (written and verified by `clipengine.index.export`), and this module runs them with
numpy, onnxruntime and the torch-free tokenizer only. Where the time went decided the shape:

* **Weights are memory-mapped, not read.** The towers are saved with their weights as external data,
  which onnxruntime maps; and weight pre-packing, which copies every matrix at session creation, is off
  for one-shot use. ViT-B-32's text tower: 0.46 s to create a session from one 153 MB file, 0.21 s
  with mapped weights, 0.05 s without pre-packing (its runs then take ~20 ms instead of ~9 ms, so a
  long-lived `Searcher` keeps pre-packing: `one_shot=False`).
* **The token-embedding table stays outside the graph** (40% of the text tower's bytes): a query needs a
  dozen of its rows, gathered from a memory-mapped .npy, and the positional embedding is added there.
* **A causal text tower stops at the end token.** Its output is read at the end token, and causal
  attention never lets a position see later ones, so positions after it cannot change the result: a
  query runs on its own length (7 tokens for "a dog on a beach") instead of the full 77.
* **Images are preprocessed with PIL and numpy**, reproducing open_clip's resize, centre crop and
  normalisation (torchvision hands PIL images to PIL's own resize, so the pixels are the same).

Every tower is verified against torch before it is kept, and its files are fingerprinted; a file that is
missing or changed makes `open` raise `EncodersUnavailable`, and the caller goes back to torch.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from clipengine.cores import available_cores
from clipengine.errors import BadInput, first_line
from clipengine.index.store import ENCODERS_PENDING
from clipengine.tokenizer import load_tokenizer

TEXT_FILE = "text.onnx"
IMAGE_FILE = "image.onnx"
TOKEN_TABLE_FILE = "token_embedding.npy"
POSITIONS_FILE = "positional_embedding.npy"
EXTERNAL_DATA_SUFFIX = ".data"
_SAMPLE_BLOCKS, _SAMPLE_BYTES = 16, 1 << 16


class EncodersUnavailable(Exception):
    """The exported encoders cannot be used (missing, damaged, changed, or never verified); `reason` says why."""


def fingerprint(path: str | os.PathLike) -> dict:
    """Size and a sha256 of 16 blocks spread over the file (1 MiB read): enough to notice a file that was
    cut, overwritten or copied from another model's export, without hashing hundreds of megabytes per query
    (a copy keeps size and mtime, so those alone would not do)."""
    size = os.stat(path).st_size
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for i in range(_SAMPLE_BLOCKS):
            f.seek(size * i // _SAMPLE_BLOCKS)
            h.update(f.read(_SAMPLE_BYTES))
    return {"size": size, "sample_sha256": h.hexdigest()}


def _check_files(directory: Path, files: dict[str, dict]) -> None:
    for name, expected in files.items():
        path = directory / name
        try:
            found = fingerprint(path)
        except OSError:
            raise EncodersUnavailable(f"{path} is missing") from None
        if found["size"] != expected["size"]:
            raise EncodersUnavailable(f"{path} is damaged ({found['size']:,} bytes, not {expected['size']:,})")
        if found != expected:
            raise EncodersUnavailable(f"{path} changed since it was verified")


def never_exported(record: dict | None) -> bool:
    """Whether an index's encoders record says no export was attempted: an index from before query encoders
    (no record), or a new one whose export has not run yet. (A failed export is a record of why it failed.)"""
    return not record or record == ENCODERS_PENDING


def describe_encoders(record: dict | None) -> str:
    """One line on the exported query encoders: per tower, verified (how closely) or why not."""
    if record is None or never_exported(record):
        return "torch (no exported query encoders)"
    parts = []
    for tower, what in (("text", "prompts"), ("image", "images")):
        t = record.get(tower) or {}
        if t.get("status") == "verified":
            text = f"{tower} onnx, within {t['max_abs_diff']:.1e} of torch on {t['checked']} {what}"
            int8 = t.get("int8")
            if int8:
                change = (f"recall@10 {-100 * int8['recall_drop']:+.2f} points vs fp32" if int8["recall_drop"] is not None
                          else int8["reason"])
                text += f" (int8: {change}; {'used' if int8['preferred'] else 'used only with --precision int8'})"
            parts.append(text)
        else:
            parts.append(f"{tower} torch ({t.get('reason', 'not exported')})")
    return "; ".join(parts)


def check_runtime(runtime: str | None, precision: str | None) -> None:
    """Refuse runtime/precision options that name nothing: one rule for search, index and bench."""
    if runtime not in (None, "torch", "onnx"):
        raise BadInput(f"unknown runtime '{runtime}': use torch or onnx")
    if precision not in (None, "fp32", "int8"):
        raise BadInput(f"unknown precision '{precision}': use fp32 or int8")
    if precision == "int8" and runtime == "torch":
        raise BadInput("--precision int8 runs the exported int8 towers: it needs --runtime onnx, not torch")


def fallback_advice(record: dict | None, error: EncodersUnavailable, index_path: str | os.PathLike) -> str | None:
    """What to tell a user whose searches load torch because of `error`, or None when there is nothing to fix
    (the model's towers did not export or failed their check: `info` says why, once)."""
    fix = f"`clipengine export --index {index_path}`"
    if record is None or never_exported(record):
        return f"{error}, so searches load torch (seconds): {fix} makes them start in a fraction of a second"
    if not record.get("dir"):
        return None
    return f"searches load torch because {error}: {fix} writes the query encoders again"


def create_session(path: str | os.PathLike, *, one_shot: bool, threads: int | None = None):
    """An onnxruntime CPU session of an exported (already optimised) graph. `one_shot` skips weight
    pre-packing: creation is ~4x faster and each run ~2x slower, the right trade for a process that runs
    one query."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # done once, at export
    options.intra_op_num_threads = threads or available_cores()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    if one_shot:
        options.add_session_config_entry("session.disable_prepacking", "1")
    return ort.InferenceSession(os.fspath(path), options, providers=["CPUExecutionProvider"])


# --------------------------------------------------------------------------------------------------
# Images: open_clip's evaluation preprocessing with PIL and numpy
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImagePreprocess:
    """open_clip's eval transform for `size` (resize, centre crop, to [0, 1], normalise), on PIL images."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"

    @classmethod
    def from_config(cls, cfg: dict) -> ImagePreprocess:
        """From a model's preprocess config (as the index manifest holds it); ValueError if torch-free
        preprocessing cannot reproduce it."""
        size = cfg["size"]
        if isinstance(size, (list, tuple)):
            if len(set(size)) != 1:
                raise ValueError(f"non-square input size {size} is not reproduced without torch")
            size = size[0]
        mode = cfg.get("resize_mode") or "shortest"
        if mode not in ("shortest", "squash"):
            raise ValueError(f"resize mode '{mode}' is not reproduced without torch")
        interpolation = cfg.get("interpolation") or "bicubic"
        mean, std = cfg["mean"], cfg["std"]
        mean = tuple(mean) if isinstance(mean, (list, tuple)) else (mean,) * 3
        std = tuple(std) if isinstance(std, (list, tuple)) else (std,) * 3
        return cls(int(size), mean, std, "bilinear" if interpolation == "bilinear" else "bicubic", mode)

    def pil_part(self, image):
        """Resize and crop, as torchvision does it for a PIL image (which is PIL's own resize)."""
        from PIL import Image

        resample = Image.Resampling.BILINEAR if self.interpolation == "bilinear" else Image.Resampling.BICUBIC
        s = self.size
        w, h = image.size
        if self.resize_mode == "squash":
            return image if (w, h) == (s, s) else image.resize((s, s), resample)
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = s, int(s * long / short)
        new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
        if (new_w, new_h) != (w, h):
            image = image.resize((new_w, new_h), resample)
        top, left = int(round((new_h - s) / 2.0)), int(round((new_w - s) / 2.0))
        return image.crop((left, top, left + s, top + s))

    def __call__(self, images: Sequence) -> np.ndarray:
        """RGB PIL images -> float32 (n, 3, size, size), normalised."""
        pixels = np.stack([np.asarray(self.pil_part(im), dtype=np.uint8) for im in images])
        return normalise_pixels(pixels.transpose(0, 3, 1, 2), self.mean, self.std)


def normalise_pixels(pixels: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """uint8 (n, 3, h, w) -> float32 normalised, with the same float32 steps as torch's ToTensor + Normalize."""
    x = pixels.astype(np.float32) / np.float32(255)
    x -= np.asarray(mean, dtype=np.float32).reshape(1, 3, 1, 1)
    x /= np.asarray(std, dtype=np.float32).reshape(1, 3, 1, 1)
    return x


# --------------------------------------------------------------------------------------------------
# The towers
# --------------------------------------------------------------------------------------------------


class TextTower:
    """Token ids -> L2-normalised embeddings through an exported text tower.

    `form` "split": the graph takes token embeddings (rows of the memory-mapped table plus positions)
    and the position to pool at, and each batch is cut after its last end token. "whole": the graph
    takes the full token ids (towers that are not causal, or that pool differently).
    """

    def __init__(self, directory: Path, record: dict, *, file: str, one_shot: bool):
        self.tokenizer = load_tokenizer(directory)
        self.form = record["form"]
        self.pool = record.get("pool")
        self.eos_id = record.get("eos_id")
        if self.form == "split":
            self.table = np.load(directory / TOKEN_TABLE_FILE, mmap_mode="r")
            self.positions = np.load(directory / POSITIONS_FILE)
        self.session = create_session(directory / file, one_shot=one_shot)

    def pool_index(self, ids: np.ndarray) -> np.ndarray:
        if self.pool == "eos":
            return (ids == self.eos_id).argmax(axis=1)
        return ids.argmax(axis=1)  # open_clip's argmax pooling: the end token has the highest id

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        ids = self.tokenizer(list(texts))
        if self.form == "whole":
            return self.session.run(None, {"ids": ids})[0]
        pool = self.pool_index(ids)
        length = int(pool.max()) + 1
        x = self.table[ids[:, :length]] + self.positions[:length]
        return self.session.run(None, {"x": x.astype(np.float32, copy=False), "pool_index": pool})[0]


class ImageTower:
    """Normalised pixels (or PIL images) -> L2-normalised embeddings through an exported image tower."""

    def __init__(self, directory: Path, record: dict, *, file: str, one_shot: bool):
        self.preprocess = ImagePreprocess.from_config(record["preprocess"])
        self.session = create_session(directory / file, one_shot=one_shot)

    def encode_pixels(self, pixels: np.ndarray) -> np.ndarray:
        return self.session.run(None, {"pixels": np.ascontiguousarray(pixels, dtype=np.float32)})[0]

    def __call__(self, images: Sequence) -> np.ndarray:
        return self.encode_pixels(self.preprocess(images))


class QueryEncoders:
    """An index's exported, verified towers, loaded lazily: a text query never creates the image session."""

    def __init__(self, directory: Path, record: dict, *, precision: str | None = None, one_shot: bool = False):
        self.directory = directory
        self.record = record
        self.precision = precision
        self.one_shot = one_shot
        self._towers: dict[str, TextTower | ImageTower] = {}

    @classmethod
    def open(cls, index_path: str | os.PathLike, record: dict | None, *, precision: str | None = None,
             one_shot: bool = False) -> QueryEncoders:
        """The encoders an index manifest's `query_encoders` record describes, with their files checked.
        Raises EncodersUnavailable with the reason when there are none that can be used."""
        if record is None or never_exported(record):
            raise EncodersUnavailable("this index has no exported query encoders")
        if not record.get("dir"):
            raise EncodersUnavailable("its model's towers did not export or did not pass the check")
        directory = Path(index_path) / record["dir"]
        _check_files(directory, record.get("files", {}))
        return cls(directory, record, precision=precision, one_shot=one_shot)

    def available(self, tower: str) -> bool:
        return self.record.get(tower, {}).get("status") == "verified"

    def file_for(self, tower: str) -> str:
        """The tower's file: int8 when asked for, or when its measured recall change allowed it; else fp32."""
        record = self.record[tower]
        int8 = record.get("int8") or {}
        wanted = self.precision or ("int8" if int8.get("preferred") else "fp32")
        if wanted == "int8":
            if not int8.get("file"):  # only when asked for: a preferred int8 tower exists by construction
                raise BadInput(f"no int8 {tower} tower was exported for this index: "
                               f"`clipengine export --index {self.directory.parent} --quantize int8`")
            return int8["file"]
        return record["file"]

    def _tower(self, tower: str):
        if tower not in self._towers:
            if not self.available(tower):
                reason = self.record.get(tower, {}).get("reason", "not exported")
                raise EncodersUnavailable(f"the {tower} tower cannot be used without torch: {reason}")
            kind, file = (TextTower if tower == "text" else ImageTower), self.file_for(tower)
            try:
                self._towers[tower] = kind(self.directory, self.record[tower], file=file, one_shot=self.one_shot)
            except Exception as e:  # onnxruntime's own errors for a file it cannot parse or run
                raise EncodersUnavailable(f"{self.directory / file} cannot be loaded ({first_line(e)[:200]})") from None
        return self._towers[tower]

    def prepare(self, tower: str) -> None:
        """Create the tower's session now (it is otherwise created by its first use)."""
        self._tower(tower)

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        return self._tower("text")(texts)

    def encode_images(self, images: Sequence) -> np.ndarray:
        """RGB PIL images (decoded as indexing decodes them) -> embeddings."""
        return self._tower("image")(images)

    def encode_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """Pixels already normalised by the model's preprocessing, (n, 3, size, size) -> embeddings."""
        return self._tower("image").encode_pixels(pixels)

    @property
    def image_size(self) -> int:
        return ImagePreprocess.from_config(self.record["image"]["preprocess"]).size

"""Image–caption and labelled-image data, read from the layouts users and papers ship it in.

`read_pairs` detects the layout of an image–caption set:
- ``csv``: a CSV or TSV file with a header holding ``filepath`` and ``caption`` (separator detected;
  paths relative to the file; an image on several rows has several captions);
- ``sidecar``: a folder of images with sidecar captions (``cat.jpg`` + ``cat.txt``, one caption per line);
- ``coco``: the official COCO caption JSON (``images`` with ``id``/``file_name``, ``annotations`` with
  ``image_id``/``caption``);
- ``karpathy``: Karpathy's split files (``dataset_coco.json``, ``dataset_flickr30k.json``): ``images``
  with ``filepath``/``filename``, ``split`` and ``sentences[].raw``, the layout the retrieval literature
  reports its COCO 5k and Flickr30k 1k test numbers on;
- ``blip``: the BLIP/LAVIS annotation lists CLIP_benchmark downloads (``coco_karpathy_test.json``,
  ``flickr30k_test.json``): ``[{"image": ..., "caption": [...]}, ...]``;
- ``flickr-token``: Flickr30k's own ``results_20130124.token`` (``name.jpg#N<TAB>caption``);
- ``shards``: WebDataset tar shards, local, named by a brace pattern (``shards/{000..099}.tar``): each
  sample is an image member plus a ``.txt`` (or ``.json`` with ``caption``) member with the same key.

Image paths in JSON and token files are relative to `image_root` (default: the file's folder); when
that path does not exist, the file name alone is tried under the root, so both ``--images coco`` and
``--images coco/val2014`` find ``val2014/COCO_val2014_….jpg``.

Every layout becomes the same `PairSet`: a list of images and their captions. Tar members are addressed
by (shard, offset, size), found by reading the tar headers once, so shards get the same random access
as files. `read_labelled` reads the image-folder layout of classification sets (one folder per class).
"""

from __future__ import annotations

import csv
import json
import os
import re
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from clipengine.errors import BadInput
from clipengine.formats import IMAGE_EXTENSIONS
from clipengine.images import ImageRef

MOSTLY_BAD = 0.5  # refuse data when more than this fraction of its rows is unusable
SIDECAR_SUFFIX = ".txt"
_TOKEN_LINE = re.compile(r"^([^\t#]+)#\d+\t(.*)$")


@dataclass
class PairSet:
    """Images and their captions (one or more each), plus the rows that were dropped and why."""

    images: list[ImageRef] = field(default_factory=list)
    captions: list[list[str]] = field(default_factory=list)
    dropped: list[tuple[str, str]] = field(default_factory=list)  # (row or file, reason)
    layout: str = ""

    def __len__(self) -> int:
        return len(self.images)

    @property
    def n_captions(self) -> int:
        return sum(map(len, self.captions))

    def add(self, image: ImageRef, captions: Sequence[str]) -> None:
        self.images.append(image)
        self.captions.append(list(captions))

    def subset(self, indices: Sequence[int]) -> PairSet:
        return PairSet([self.images[i] for i in indices], [self.captions[i] for i in indices], [], self.layout)


def clean_captions(captions: Sequence[str]) -> list[str]:
    """The captions that say something, stripped."""
    return [c.strip() for c in captions if c and c.strip()]


def _add_checked(pairs: PairSet, path: Path, captions: Sequence[str], where: str) -> None:
    """Add one image with its captions, or record why the row is dropped (cheap checks only:
    decoding happens in the loader, which skips and counts what fails there)."""
    captions = clean_captions(captions)
    if not captions:
        pairs.dropped.append((where, "empty caption"))
    elif not path.is_file():
        pairs.dropped.append((where, f"image not found: {path}"))
    elif path.stat().st_size == 0:
        pairs.dropped.append((where, f"empty image file: {path}"))
    else:
        pairs.add(str(path), captions)


def _locate(root: Path, relative: str) -> Path:
    """`root/relative`, or `root/<file name>` when only that exists (the root already names the folder)."""
    path = root / relative
    if not path.exists() and (root / Path(relative).name).exists():
        return root / Path(relative).name
    return path


def _add_grouped(pairs: PairSet, root: Path, grouped: dict[str, list[str]], where: str) -> None:
    for image, captions in grouped.items():
        _add_checked(pairs, _locate(root, image), captions, f"{where}:{image}")


def _read_csv(path: Path) -> PairSet:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise BadInput(f"cannot read caption file {path}: {e}") from None
    header = text.split("\n", 1)[0]
    delimiter = "\t" if header.count("\t") > header.count(",") else ","
    reader = csv.DictReader(text.splitlines(), delimiter=delimiter)
    missing = {"filepath", "caption"} - set(reader.fieldnames or [])
    if missing:
        raise BadInput(f"{path}: the header needs 'filepath' and 'caption' columns "
                       f"(found {', '.join(reader.fieldnames or []) or 'none'})")
    grouped: dict[str, tuple[int, list[str]]] = {}
    for line, row in enumerate(reader, start=2):
        image = (row.get("filepath") or "").strip()
        if not image:
            grouped.setdefault(f"<row {line}>", (line, []))
            continue
        grouped.setdefault(image, (line, []))[1].append(row.get("caption") or "")
    pairs = PairSet()
    for image, (line, captions) in grouped.items():
        _add_checked(pairs, path.parent / image, captions, f"{path.name}:{line}")
    return pairs


def _read_sidecar_folder(folder: Path) -> PairSet:
    pairs = PairSet()
    for image in sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()):
        sidecar = image.with_suffix(SIDECAR_SUFFIX)
        if not sidecar.is_file():
            pairs.dropped.append((str(image), f"no caption file {sidecar.name}"))
            continue
        _add_checked(pairs, image, sidecar.read_text(encoding="utf-8", errors="replace").splitlines(), str(image))
    return pairs


def _json_layout(data: object) -> str | None:
    if isinstance(data, list) and data and isinstance(data[0], dict) and {"image", "caption"} <= data[0].keys():
        return "blip"
    if isinstance(data, dict) and isinstance(data.get("images"), list) and data["images"]:
        first = data["images"][0]
        if isinstance(first, dict) and "sentences" in first and "filename" in first:
            return "karpathy"
        if "annotations" in data:
            return "coco"
    return None


def _read_json(path: Path, root: Path, split: str | None, default_split: str | None) -> PairSet:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise BadInput(f"cannot read {path}: {e}") from None
    layout = _json_layout(data)
    if layout is None:
        raise BadInput(f"{path} is none of the caption JSON layouts read here: COCO (images + annotations), "
                       "Karpathy (images[].sentences) or BLIP/LAVIS ([{image, caption}])")
    if split is not None and layout != "karpathy":
        raise BadInput(f"--split applies to Karpathy split files; {path.name} has no splits")
    split = split if split is not None or layout != "karpathy" else default_split
    grouped: dict[str, list[str]] = {}
    try:
        if layout == "blip":
            for item in data:
                caption = item["caption"]
                grouped.setdefault(str(item["image"]), []).extend(caption if isinstance(caption, list) else [caption])
        elif layout == "karpathy":
            wanted = set(split.split(",")) if split else None
            for img in data["images"]:
                if wanted is None or img.get("split") in wanted:
                    name = os.path.join(img.get("filepath") or "", img["filename"])
                    grouped.setdefault(name, []).extend(str(s.get("raw") or "") for s in img["sentences"])
            if not grouped:
                raise BadInput(f"no images of split '{split}' in {path.name} "
                               f"(it has: {', '.join(sorted({str(i.get('split')) for i in data['images']}))})")
        else:
            files = {img["id"]: img["file_name"] for img in data["images"]}
            by_id: dict[int, list[str]] = {i: [] for i in files}
            for ann in data["annotations"]:
                if ann.get("image_id") in by_id:
                    by_id[ann["image_id"]].append(str(ann.get("caption") or ""))
            grouped = {files[i]: captions for i, captions in by_id.items()}
    except (KeyError, TypeError, AttributeError) as e:
        raise BadInput(f"{path} looks like a {layout} caption file but an entry lacks {e}") from None
    pairs = PairSet(layout=layout)
    _add_grouped(pairs, root, grouped, path.name)
    return pairs


def _is_token_file(path: Path) -> bool:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            first = next((line for line in f if line.strip()), "")
    except OSError:
        return False
    return bool(_TOKEN_LINE.match(first.rstrip("\n")))


def _read_token_file(path: Path, root: Path) -> PairSet:
    grouped: dict[str, list[str]] = {}
    pairs = PairSet(layout="flickr-token")
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        match = _TOKEN_LINE.match(line)
        if match:
            grouped.setdefault(match.group(1), []).append(match.group(2))
        elif line.strip():
            pairs.dropped.append((f"{path.name}:{number}", "not 'name.jpg#N<TAB>caption'"))
    _add_grouped(pairs, root, grouped, path.name)
    return pairs


def expand_braces(pattern: str) -> list[str]:
    """'a/{000..002}.tar' -> ['a/000.tar', 'a/001.tar', 'a/002.tar'] (bash-style, as WebDataset names shards)."""
    from braceexpand import braceexpand

    return list(braceexpand(pattern))


def split_key(name: str) -> tuple[str, str]:
    """WebDataset's grouping rule: the key is the path up to the first dot of the file name."""
    directory, base = os.path.split(name)
    stem, _, ext = base.partition(".")
    return os.path.join(directory, stem), ext.lower()


def member_captions(ext: str, data: bytes) -> list[str]:
    """A caption member's captions: a ``.txt``'s lines, or a ``.json``'s ``caption`` (a string or a list).
    Raises ValueError for a ``.json`` that is not JSON."""
    if ext == "txt":
        return data.decode("utf-8", "replace").splitlines()
    meta = json.loads(data or b"{}")
    caption = meta.get("caption") if isinstance(meta, dict) else None
    return caption if isinstance(caption, list) else [str(caption or "")]


def _member_bytes(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    """A regular member's bytes (`extractfile` gives None only for members that are not files)."""
    f = tar.extractfile(member)
    return f.read() if f is not None else b""


def _read_shards(pattern: str) -> PairSet:
    shards = expand_braces(pattern)
    pairs = PairSet()
    for shard in shards:
        if not os.path.isfile(shard):
            raise BadInput(f"shard not found: {shard} (from {pattern})")
        samples: dict[str, dict[str, tarfile.TarInfo]] = {}
        try:
            with tarfile.open(shard, "r:") as tar:  # reads headers only, seeking over the data
                for member in tar:
                    if member.isfile():
                        key, ext = split_key(member.name)
                        samples.setdefault(key, {})[ext] = member
                caption_of: dict[str, list[str]] = {}
                for key, parts in samples.items():
                    caption_ext = "txt" if "txt" in parts else "json" if "json" in parts else None
                    if caption_ext is not None:
                        caption_of[key] = member_captions(caption_ext, _member_bytes(tar, parts[caption_ext]))
        except (tarfile.TarError, OSError, ValueError) as e:
            raise BadInput(f"cannot read shard {shard}: {e}") from None
        for key, parts in samples.items():
            image = next((parts[e] for e in parts if "." + e in IMAGE_EXTENSIONS), None)
            where = f"{shard}:{key}"
            captions = clean_captions(caption_of.get(key, []))
            if image is None:
                pairs.dropped.append((where, "no image member"))
            elif not captions:
                pairs.dropped.append((where, "empty caption"))
            else:
                pairs.add((shard, image.offset_data, image.size), captions)
    return pairs


def read_pairs(source: str | os.PathLike, image_root: str | os.PathLike | None = None,
               split: str | None = None, default_split: str | None = None) -> PairSet:
    """Read image–caption pairs from any of the layouts above.

    `split` (Karpathy files only) is comma-separated, e.g. ``test`` or ``train,restval``; without it a
    Karpathy file gives `default_split` (benchmarks pass ``test``), or every image when that is None.

    Rows with an empty caption or a missing image are dropped and listed in ``dropped``; when most
    rows are bad the data is refused, since that is a wrong path or column rather than a few bad rows.
    """
    text = str(source)
    path = Path(text).expanduser()
    root = Path(image_root).expanduser() if image_root else path.parent
    if image_root and not root.is_dir():
        raise BadInput(f"image folder not found: {image_root}")
    if split is not None and not (path.is_file() and path.suffix.lower() == ".json"):
        raise BadInput("--split applies to Karpathy split files (dataset_coco.json, dataset_flickr30k.json)")
    if "{" in text or text.endswith(".tar"):
        pairs, pairs.layout = _read_shards(str(path)), "shards"
    elif path.is_dir():
        pairs, pairs.layout = _read_sidecar_folder(path), "sidecar"
    elif not path.is_file():
        raise BadInput(f"data not found: {text}")
    elif path.suffix.lower() == ".json":
        pairs = _read_json(path, root, split, default_split)
    elif _is_token_file(path):
        pairs = _read_token_file(path, root)
    else:
        pairs, pairs.layout = _read_csv(path), "csv"
    total = len(pairs) + len(pairs.dropped)
    if not pairs:
        first = f" (first: {pairs.dropped[0][0]}: {pairs.dropped[0][1]})" if pairs.dropped else ""
        raise BadInput(f"no usable image-caption pairs in {text}{first}")
    if len(pairs.dropped) > MOSTLY_BAD * total:
        where, reason = pairs.dropped[0]
        raise BadInput(f"{len(pairs.dropped)} of {total} rows in {text} are unusable (first: {where}: {reason}); "
                       "check the image paths (--images for JSON and token files) and the caption column")
    return pairs


@dataclass
class LabelledSet:
    """Images with a class each (an index into `classes`), and their sidecar captions where they have any."""

    images: list[str]
    labels: list[int]
    classes: list[str]  # folder names, sorted
    captions: list[list[str]]

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, indices: Sequence[int]) -> LabelledSet:
        return LabelledSet([self.images[i] for i in indices], [self.labels[i] for i in indices], self.classes,
                           [self.captions[i] for i in indices])


def read_labelled(folder: str | os.PathLike, classes: Sequence[str] | None = None) -> LabelledSet:
    """The image-folder layout (``root/<class>/**/*.jpg``, as ImageNet's val set is usually laid out).

    `classes` fixes the class list (so a test folder lacking a class keeps the train folder's numbering).
    """
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise BadInput(f"image folder not found: {folder}")
    found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    classes = list(classes) if classes is not None else found
    if not classes:
        raise BadInput(f"{folder} has no class folders: lay it out as {folder}/<class name>/<image>")
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise BadInput(f"{folder} has class folders the class list lacks: {', '.join(unknown[:5])}")
    images, labels, captions = [], [], []
    for label, name in enumerate(classes):
        directory = root / name
        if not directory.is_dir():
            continue
        for image in sorted(p for p in directory.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()):
            sidecar = image.with_suffix(SIDECAR_SUFFIX)
            text = sidecar.read_text(encoding="utf-8", errors="replace").splitlines() if sidecar.is_file() else []
            images.append(str(image))
            labels.append(label)
            captions.append(clean_captions(text))
    if not images:
        raise BadInput(f"no images under the class folders of {folder}")
    return LabelledSet(images, labels, classes, captions)


def read_lines(path: str | os.PathLike, what: str) -> list[str]:
    """The non-empty, non-comment lines of a text file (class names, templates, labels), or a one-line error."""
    try:
        lines = Path(path).expanduser().read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise BadInput(f"cannot read {what} file {path}: {e}") from None
    lines = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not lines:
        raise BadInput(f"{what} file {path} is empty")
    return lines

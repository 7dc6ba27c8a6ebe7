"""Build the emoji development set, offline, from npm packages: real drawings with human-written text.

Four vendors drew the same emoji. `emoji-datasource-{apple,google,twitter,facebook}` ship the drawings
as 64-px RGBA PNGs (transparent backgrounds) with a name for each ("grinning face"), and `emojilib`
adds the keywords people search emoji by ("face, smile, happy, joy, grin"). The caption of a drawing is
its name and its keywords; the four drawings of one emoji share it.

The split is by emoji, never by drawing: no held-out emoji has a sibling drawing in training. The
held-out half keeps one drawing per emoji (its vendor chosen by a hash), so that every held-out
caption names exactly one image and recall@k means what it says.

    make emoji-set                          # npm install into data/npm, then this script
    python benchmarks/make_emoji_set.py     # -> data/emoji/train.csv, data/emoji/val.csv (absolute paths)
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ROOT / "data" / "npm" / "node_modules"
OUT = ROOT / "data" / "emoji"
VENDORS = ("apple", "google", "twitter", "facebook")


def _char(codepoints: str) -> str:
    return "".join(chr(int(c, 16)) for c in codepoints.split("-"))


def _caption(name: str, keywords: list[str]) -> str:
    """'grinning face: face, smile, happy, joy, grin' — the name first, then its distinct keywords."""
    name = name.lower()
    seen = {name, name.replace(" ", "_")}
    words = []
    for k in keywords:
        k = k.replace("_", " ").strip().lower()
        if k not in seen and re.search(r"[a-z]", k):  # drop repeats of the name and letterless ones (':)')
            seen.add(k)
            words.append(k)
    return f"{name}: {', '.join(words)}" if words else name


def _rank(text: str) -> bytes:
    return hashlib.sha1(text.encode()).digest()


def build(packages: Path, out: Path, held_out: int) -> dict:
    """Write train.csv and val.csv under `out`; returns counts."""
    missing = [p for p in [*(f"emoji-datasource-{v}" for v in VENDORS), "emojilib"] if not (packages / p).is_dir()]
    if missing:
        raise SystemExit(f"error: {', '.join(missing)} not installed under {packages}: run `make emoji-set`")
    emoji = json.loads((packages / "emoji-datasource-apple" / "emoji.json").read_text())
    keywords = json.loads((packages / "emojilib" / "dist" / "emoji-en-US.json").read_text())
    items = []  # (unified, caption, [paths of the four drawings])
    for e in emoji:
        paths = [packages / f"emoji-datasource-{v}" / "img" / v / "64" / e["image"] for v in VENDORS]
        if not all(e.get(f"has_img_{v}") for v in VENDORS) or not all(p.is_file() for p in paths):
            continue  # the same emoji drawn by every vendor, or not at all
        words = keywords.get(_char(e["unified"])) or keywords.get(_char(e["non_qualified"] or e["unified"])) or []
        items.append((e["unified"], _caption(e["name"], words), [str(p) for p in paths]))
    items.sort(key=lambda it: _rank(it[0]))
    val, train = items[:held_out], items[held_out:]
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "train.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["filepath", "caption"])
        writer.writerows((path, caption) for _, caption, paths in train for path in paths)
    with open(out / "val.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["filepath", "caption"])
        writer.writerows((paths[_rank("vendor" + u)[0] % len(paths)], caption) for u, caption, paths in val)
    return {"emoji": len(items), "train_images": 4 * len(train), "val_images": len(val)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--packages", type=Path, default=PACKAGES)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--held-out", type=int, default=500, help="emoji held out (one drawing each)")
    args = parser.parse_args()
    counts = build(args.packages, args.out, args.held_out)
    print(f"{counts['emoji']} emoji: {counts['train_images']} training drawings, {counts['val_images']} held out "
          f"-> {args.out}")


if __name__ == "__main__":
    main()

"""The emoji development set's builder (benchmarks/make_emoji_set.py), on a small fake of the npm packages."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import make_emoji_set  # noqa: E402


def _fake_packages(root: Path, n: int) -> Path:
    emoji, keywords = [], {}
    for i in range(n):
        code = f"{0x1F600 + i:X}"
        emoji.append({"name": f"FACE NUMBER {i}", "unified": code, "non_qualified": None, "image": f"{code.lower()}.png",
                      **{f"has_img_{v}": True for v in make_emoji_set.VENDORS}})
        keywords[chr(0x1F600 + i)] = [f"face_number_{i}", "face", ":D", ":)", "smile", "face"]
    emoji.append({"name": "NOT DRAWN BY ALL", "unified": "1F9FF", "non_qualified": None, "image": "1f9ff.png",
                  **{f"has_img_{v}": v != "facebook" for v in make_emoji_set.VENDORS}})
    for vendor in make_emoji_set.VENDORS:
        folder = root / f"emoji-datasource-{vendor}" / "img" / vendor / "64"
        folder.mkdir(parents=True)
        for e in emoji:
            Image.new("RGBA", (64, 64)).save(folder / e["image"])
    (root / "emoji-datasource-apple" / "emoji.json").write_text(json.dumps(emoji))
    (root / "emojilib" / "dist").mkdir(parents=True)
    (root / "emojilib" / "dist" / "emoji-en-US.json").write_text(json.dumps(keywords))
    return root


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_split_by_emoji_with_one_drawing_each_held_out(tmp_path):
    packages = _fake_packages(tmp_path / "node_modules", 30)
    counts = make_emoji_set.build(packages, tmp_path / "out", held_out=10)
    assert counts == {"emoji": 30, "train_images": 80, "val_images": 10}  # the one not drawn by all is left out
    train, val = _rows(tmp_path / "out" / "train.csv"), _rows(tmp_path / "out" / "val.csv")
    emoji_of = lambda row: Path(row["filepath"]).name  # noqa: E731
    assert not {emoji_of(r) for r in train} & {emoji_of(r) for r in val}  # no emoji in both halves
    assert len({emoji_of(r) for r in val}) == 10 and len({r["caption"] for r in val}) == 10
    assert all(Path(r["filepath"]).is_absolute() and Path(r["filepath"]).is_file() for r in train + val)
    for r in train + val:  # the name, then its distinct keywords with a letter in them
        assert r["caption"] == f"face number {int(Path(r['filepath']).stem, 16) - 0x1F600}: face, :d, smile"
    again = make_emoji_set.build(packages, tmp_path / "again", held_out=10)
    assert again == counts and _rows(tmp_path / "again" / "val.csv") == val  # the same split every time

"""Real camera RAW files for the tests: ExifTool's own test images, from Debian's source package of ExifTool.

ExifTool keeps one file per camera maker (Canon CR2/CR3/CRW, Nikon NEF, Fujifilm RAF, Panasonic RW2, Minolta
MRW, Sigma X3F, Phase One IIQ, a DNG) with its real headers and metadata and most of its pixel data cut away,
to keep its source small. They are what a camera writes, cut short: LibRaw reads their real headers, and
their sensor data ends early, as in a copy that was interrupted. `make test` fetches them once into
data/camera-raw/ (3.5 MB from deb.debian.org, checked against its sha256), and tests/test_formats.py reads them.

    python scripts/camera_raw.py [FOLDER]
"""

from __future__ import annotations

import hashlib
import io
import sys
import tarfile
import urllib.request
from pathlib import Path

from clipengine.formats import RAW_EXTENSIONS

SOURCE = ("http://deb.debian.org/debian/pool/main/libi/libimage-exiftool-perl/"
          "libimage-exiftool-perl_12.57+dfsg.orig.tar.xz")
SHA256 = "9de7ccd6ed6adf92038c8d943b1960d087b58c00b3924d19f61a1d774b7610fc"
FOLDER = Path(__file__).resolve().parent.parent / "data" / "camera-raw"


def fetch(folder: Path = FOLDER) -> list[Path]:
    """Download the source once, check it, and keep its RAW test images in `folder`."""
    with urllib.request.urlopen(SOURCE, timeout=120) as response:
        data = response.read()
    digest = hashlib.sha256(data).hexdigest()
    if digest != SHA256:
        raise SystemExit(f"{SOURCE}: sha256 {digest}, expected {SHA256}")
    folder.mkdir(parents=True, exist_ok=True)
    kept = []
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:xz") as tar:
        for member in tar.getmembers():
            path = Path(member.name)
            if member.isfile() and path.parent.name == "images" and path.suffix.lower() in RAW_EXTENSIONS:
                content = tar.extractfile(member)
                assert content is not None  # a regular file's
                (folder / path.name).write_bytes(content.read())
                kept.append(folder / path.name)
    return sorted(kept)


if __name__ == "__main__":
    files = fetch(Path(sys.argv[1]) if len(sys.argv) > 1 else FOLDER)
    print(f"{len(files)} camera RAW files in {files[0].parent}: {', '.join(f.name for f in files)}")

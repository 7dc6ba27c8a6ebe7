"""Sizes as people write them on a command line, read the same way by every option that takes one
(`index --memory-budget`, `serve --max-upload`, `train --decode-cache-size`, and in pixels `index
--max-pixels`): k, M, G, T are powers of 1000, KiB, MiB, GiB, TiB powers of 1024. And the one size limit every image path shares (kept here, away from PIL, so that
the training config can name it without importing an image library)."""

from __future__ import annotations

import re

from clipengine.errors import BadInput

DEFAULT_MAX_PIXELS = 200_000_000  # pixels actually decoded; a 200 MP JPEG still fits after draft

_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "t": 1e12, "tb": 1e12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str | int, option: str, *, pixels: bool = False) -> int:
    """'4GB', '512MiB', '2.5g' -> bytes; with `pixels`, '200M', '12MP', '50000' -> a pixel count. Anything
    else is a one-line error naming `option`."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    suffix = match.group(2).lower() if match else ""
    if pixels:
        suffix = suffix.removesuffix("px").removesuffix("p")
    unit = _UNITS.get(suffix) if match else None
    if match is None or not unit or float(match.group(1)) <= 0:
        example = "a pixel count such as 200M or 12MP" if pixels else "a size such as 4GB, 512MB or 2GiB"
        raise BadInput(f"{option} {text!r}: give {example}")
    return int(float(match.group(1)) * unit)

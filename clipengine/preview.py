"""Thumbnails inline in the terminal, for `clipengine search --preview`.

Four ways, the best the terminal supports: the kitty graphics protocol (kitty, Ghostty, WezTerm, Konsole),
iTerm2's inline images (iTerm2, WezTerm), sixel (xterm -ti vt340, foot, mlterm, Windows Terminal), and
Unicode half blocks in 24-bit colour everywhere else. kitty, sixel and half blocks are encoded by
textual-image (a maintained library that also asks the terminal what it supports); iTerm2's protocol is
one escape sequence, written here. `detect` chooses from the environment and the terminal's answers;
`--preview=kitty|iterm|sixel|blocks` overrides it.
"""

from __future__ import annotations

import base64
import io
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING

from clipengine.errors import BadInput

if TYPE_CHECKING:
    from PIL import Image

PROTOCOLS = ("kitty", "iterm", "sixel", "blocks")


def detect(env: Mapping[str, str] = os.environ) -> str:
    """The protocol this terminal shows best: named by its environment, else asked (textual-image)."""
    if env.get("KITTY_WINDOW_ID") or env.get("TERM") in ("xterm-kitty", "xterm-ghostty") or env.get(
            "TERM_PROGRAM") == "ghostty":
        return "kitty"
    if env.get("TERM_PROGRAM") in ("iTerm.app", "WezTerm") or env.get("LC_TERMINAL") == "iTerm2":
        return "iterm"
    from textual_image import renderable

    return {"TGPImage": "kitty", "SixelImage": "sixel"}.get(getattr(renderable.Image, "__name__", ""), "blocks")


def iterm_sequence(image: Image.Image, width_cells: int) -> str:
    """iTerm2's inline image: the PNG, base64, in one OSC 1337 sequence, `width_cells` wide."""
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    data = buffer.getvalue()
    return (f"\x1b]1337;File=inline=1;size={len(data)};width={width_cells};preserveAspectRatio=1:"
            f"{base64.b64encode(data).decode()}\x07\n")


def show(console, image: Image.Image, protocol: str, width_cells: int) -> None:
    """Write `image`, `width_cells` wide, to a rich Console's file."""
    if protocol not in PROTOCOLS:
        raise BadInput(f"--preview={protocol}: choose one of {', '.join(PROTOCOLS)}")
    if protocol == "iterm":  # one escape sequence that rich must not measure or wrap
        console.file.write(iterm_sequence(image, width_cells))
        return
    from textual_image.renderable import halfcell, sixel, tgp

    kind = {"kitty": tgp.Image, "sixel": sixel.Image, "blocks": halfcell.Image}[protocol]
    console.print(kind(image.convert("RGB"), width=width_cells))

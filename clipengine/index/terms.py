"""Query arithmetic: a query as a weighted sum of terms, each a text, an image file or an indexed image.

    "a cat" + "in the snow" - "indoors"          texts
    "2:a red car" + ./query.jpg                  a weight (a number before the first colon), an image file
    id:1234                                      an indexed image, by its id

Each term is embedded and normalised, multiplied by its weight, and the sum is normalised before the
search (`Searcher.search_terms`). A term is an image when it names an existing file; a term that looks
like an image file name (an image extension) but names no file is refused, since the user meant a file.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass

from clipengine.errors import BadInput
from clipengine.formats import IMAGE_EXTENSIONS

# what a weight prefix looks like: digits, dots, signs and exponents before the first colon ("2:", "-0.5:", "1e-1:")
_WEIGHTISH = re.compile(r"^\s*[+-]?(?=[.\d])[\d.]*(?:[eE][+-]?\d*)?\s*$|^\s*[+-]?(?:nan|inf|infinity)\s*$", re.I)


@dataclass(frozen=True)
class Term:
    """One part of a query: exactly one of text, image (a file path) or id, with its weight."""

    text: str | None = None
    image: str | None = None
    id: int | None = None
    weight: float = 1.0

    def __post_init__(self) -> None:
        if sum(x is not None for x in (self.text, self.image, self.id)) != 1:
            raise BadInput("a query term is one text, one image file or one id")
        if self.text is not None and not self.text.strip():
            raise BadInput("a query term is empty: give some text, an image file or id:N")
        if not math.isfinite(self.weight):
            raise BadInput(f"the weight {self.weight} of a query term is not a finite number")

    def describe(self) -> str:
        what = repr(self.text) if self.text is not None else self.image if self.image is not None else f"id:{self.id}"
        return f"{self.weight:+g} × {what}"


def parse_term(spec: str, sign: float = 1.0) -> Term:
    """A term as typed on the command line: [WEIGHT:]TEXT, [WEIGHT:]IMAGE_FILE or [WEIGHT:]id:N; `sign` -1 for
    --subtract."""
    weight = 1.0
    head, colon, rest = spec.partition(":")
    if colon and _WEIGHTISH.match(head):
        try:
            weight = float(head)
        except ValueError:
            raise BadInput(f"the weight '{head.strip()}' in '{spec}' is not a number") from None
        spec = rest
    weight *= sign
    if not spec.strip():
        raise BadInput("a query term is empty: give some text, an image file or id:N")
    if spec.startswith("id:"):
        try:
            return Term(id=int(spec[3:]), weight=weight)
        except ValueError:
            raise BadInput(f"'{spec}' is not an indexed image's id (id:N)") from None
    path = os.path.expanduser(spec)
    if os.path.isfile(path):
        return Term(image=path, weight=weight)
    extension = os.path.splitext(spec.strip())[1].lower()
    if extension in IMAGE_EXTENSIONS:
        raise BadInput(f"no such image file: {spec}")
    return Term(text=spec, weight=weight)


def parse_terms(query: str | None, add: Sequence[str] = (), subtract: Sequence[str] = ()) -> list[Term]:
    """The terms of `search QUERY --add A --subtract B`."""
    terms = [parse_term(query)] if query is not None else []
    return terms + [parse_term(a) for a in add] + [parse_term(s, -1.0) for s in subtract]

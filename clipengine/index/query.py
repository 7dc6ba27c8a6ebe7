"""One query as a user gives it, answered the cheapest way that gives the same hits.

A query is a text, an image file, a raw vector, or a weighted sum of terms (`--add`, `--subtract`, a
`WEIGHT:` prefix, an image file or `id:N` as the query: `clipengine.index.terms`). `search_index` asks a
running service for the index when the service would answer alike (`clipengine.index.service` checks it
serves this index with this model, and nothing was asked of the local runtime), and otherwise opens a
one-shot `Searcher`. Deciding this here keeps the CLI and any other caller to one call, and keeps a
search answered by a service free of numpy, PIL and faiss (imported only on the local path).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clipengine.errors import BadInput
from clipengine.formats import is_video_name
from clipengine.index.filters import KEEP_ALL, Filter
from clipengine.index.terms import Term, parse_term, parse_terms
from clipengine.models import ModelSpec

if TYPE_CHECKING:
    from clipengine.index.hits import Hit


@dataclass(frozen=True)
class Query:
    """Exactly one of: a text, an image file, a raw vector, or a sum of terms."""

    text: str | None = None
    image: Path | None = None
    vector: Any = None  # a numpy vector, read from a .npy file
    terms: tuple[Term, ...] | None = None


def read_query(text: str | None = None, image: str | os.PathLike | None = None,
               vector_file: str | os.PathLike | None = None, add: Sequence[str] = (),
               subtract: Sequence[str] = ()) -> Query:
    """The query of `search [TEXT] [--image FILE] [--vector FILE.npy] [--add T] [--subtract T]`. A TEXT that
    is a term of its own (`2:a red car`, an image file, `id:N`) makes it a sum of terms, as --add does."""
    if sum(x is not None for x in (text, image, vector_file)) != 1:
        raise BadInput("give exactly one query: TEXT, --image PATH or --vector FILE.npy")
    image_path = Path(image) if image is not None else None
    if add or subtract or (text is not None and text.strip() and parse_term(text) != Term(text=text)):
        if vector_file is not None:
            raise BadInput("--add and --subtract combine texts and images, not --vector")
        terms = parse_terms(text, add, subtract)
        if image_path is not None:
            terms.insert(0, Term(image=str(image_path)))
        return Query(terms=tuple(terms))
    if vector_file is not None:
        import numpy as np

        try:
            return Query(vector=np.load(vector_file, allow_pickle=False))
        except (OSError, ValueError) as e:
            raise BadInput(f"cannot read query vector {vector_file}: {e}") from None
    return Query(text=text, image=image_path)


def search_index(index_path: Path, query: Query, k: int = 10, prefix: str | None = None, *,
                 spec: ModelSpec = ModelSpec(), device: str | None = None, runtime: str | None = None,
                 precision: str | None = None, keep: Filter = KEEP_ALL) -> list[Hit]:
    """The `k` best hits for `query` (under the path `prefix`, among the files `keep` keeps), from a running
    service when it would give the same answer, else from the index itself. Naming a model, device, runtime or
    precision asks for a local search: the service answers with its own. A filter goes to the service as the
    query parameters its API takes (`Filter.to_params`)."""
    video = query.image is not None and is_video_name(query.image)  # a service takes images only
    if (query.terms is None and not video and spec.is_empty
            and (runtime, precision, device) == (None, None, None)):
        from clipengine.index.service import search_through_service

        hits = search_through_service(index_path, text=query.text, image=query.image, vector=query.vector, k=k,
                                      where=keep.under(prefix))
        if hits is not None:
            return hits
    from clipengine.index.search import Searcher

    with Searcher(index_path, spec=spec, device=device, runtime=runtime, precision=precision,
                  one_shot=True) as searcher:
        if query.terms is not None:
            return searcher.search_terms(list(query.terms), k, prefix, where=keep)
        if query.text is not None:
            return searcher.search_text(query.text, k, prefix, where=keep)
        if query.image is not None:
            return searcher.search_image(query.image, k, prefix, where=keep)
        return searcher.search_vector(query.vector, k, prefix, where=keep)


def count_matching(index_path: Path, keep: Filter) -> int:
    """How many searchable files of the index a filter keeps."""
    from clipengine.index.store import IndexStore, file_id_of

    with IndexStore.open(index_path) as store:
        return len(set(file_id_of(store.ids_matching(store.visible(keep))).tolist()))


def offline_files(index_path: Path) -> int:
    """How many searchable files of the index are in folders whose drive is away (left out of searches)."""
    from clipengine.index.store import IndexStore

    with IndexStore.open(index_path) as store:
        return sum(root.files for root in store.roots() if root.offline)

"""Token ids exactly as open_clip's tokenizers make them, without importing torch.

open_clip's tokenizer module imports torch (0.5–4 s), so a cold text query cannot use it. This module
reproduces the two kinds of tokenizer open_clip models use, id for id:

* `BpeTokenizer`: open_clip's `SimpleTokenizer`, the byte-level BPE of OpenAI's CLIP that nearly every
  open_clip model (and every `clipengine train` checkpoint) uses. The algorithm is the same code
  path (ftfy and HTML cleaning, whitespace folding, lower-casing, the same `regex` word pattern, the
  same greedy lowest-rank merges, start/end tokens, truncation that keeps the end token last). Its two
  tables (merge ranks, token ids) are a small sqlite file next to the exported towers, read entry by
  entry as a query needs them: building them as dicts takes ~30 ms of a cold search, and the
  `tokenizers` package needs ~90 ms to parse the equivalent tokenizer.json.
* `HfTokenizer`: models that carry a Hugging Face tokenizer (`hf-hub:` models, SigLIP) run its
  `tokenizer.json` through the `tokenizers` package with open_clip's cleaning, truncation and padding.

Both are checked against open_clip's own tokenizer when a model is exported (`query_encoders`), and
`tests/test_tokenizer.py` compares `BpeTokenizer` with `SimpleTokenizer` on over 10,000 strings.
"""

from __future__ import annotations

import json
import os
import string
from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np

CONFIG_FILE = "tokenizer_config.json"
BPE_TABLES_FILE = "bpe.sqlite"
HF_TOKENIZER_FILE = "tokenizer.json"
SPECIAL_TOKENS = ("<start_of_text>", "<end_of_text>")
# open_clip's word pattern, before its special tokens are prepended (see BpeTokenizer.__init__)
_WORD_PATTERN = r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
_PUNCTUATION = str.maketrans("", "", string.punctuation)


# --------------------------------------------------------------------------------------------------
# Cleaning (open_clip.tokenizer's basic_clean / whitespace_clean / canonicalize_text)
# --------------------------------------------------------------------------------------------------


def _fix_text(text: str) -> str:
    """ftfy.fix_text, skipped where it cannot change anything: importing ftfy costs ~50 ms.

    Printable ASCII without '&' holds nothing ftfy rewrites: mojibake, ligatures, wide characters, curly
    quotes and NFC changes need non-ASCII characters, terminal escapes and line breaks need control
    characters, and HTML entities need '&' (a test checks the equivalence on random strings).
    """
    if text.isascii() and text.isprintable() and "&" not in text:
        return text
    import ftfy

    return ftfy.fix_text(text)


def basic_clean(text: str) -> str:
    text = _fix_text(text)
    if "&" in text:  # html.unescape leaves text without '&' alone; importing it costs a cold search ~2 ms
        import html

        text = html.unescape(html.unescape(text))
    return text.strip()


def whitespace_clean(text: str) -> str:
    return " ".join(text.split()).strip()


def canonicalize_text(text: str) -> str:
    """Lower case, punctuation removed (big_vision's prompt canonicalisation, as open_clip has it)."""
    text = text.replace("_", " ").translate(_PUNCTUATION).lower()
    return " ".join(text.split()).strip()


CLEANERS: dict[str, Callable[[str], str]] = {
    "lower": lambda text: whitespace_clean(basic_clean(text)).lower(),
    "whitespace": lambda text: whitespace_clean(basic_clean(text)),
    "canonicalize": lambda text: canonicalize_text(basic_clean(text)),
}


def _cleaner(name: str) -> Callable[[str], str]:
    try:
        return CLEANERS[name]
    except KeyError:
        raise ValueError(f"unknown text cleaning '{name}'") from None


# --------------------------------------------------------------------------------------------------
# Byte-level BPE (open_clip's SimpleTokenizer)
# --------------------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """The reversible byte -> printable character map of CLIP's (and GPT-2's) byte-level BPE."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


class BpeTables:
    """The merge ranks and token ids of a byte-level BPE, looked up in a small sqlite file as a query needs
    them: a query touches a few dozen of the ~100,000 entries, and building both tables as dicts would take
    ~30 ms of a cold search. Every answer is memoised, so repeated words and pairs cost nothing."""

    def __init__(self, path: str | os.PathLike):
        import sqlite3

        self.conn = sqlite3.connect(f"file:{os.fspath(path)}?mode=ro&immutable=1", uri=True, check_same_thread=False)
        self._ranks: dict[str, int | None] = {}
        self._ids: dict[str, int] = {}

    @staticmethod
    def write(path: str | os.PathLike, ranks: dict[str, int], ids: dict[str, int]) -> None:
        """`ranks`: "first second" -> merge rank; `ids`: token -> id (open_clip's bpe_ranks and encoder)."""
        import sqlite3

        conn = sqlite3.connect(os.fspath(path))
        with conn:
            conn.execute("CREATE TABLE ranks (pair TEXT PRIMARY KEY, rank INTEGER NOT NULL) WITHOUT ROWID")
            conn.execute("CREATE TABLE ids (token TEXT PRIMARY KEY, id INTEGER NOT NULL) WITHOUT ROWID")
            conn.executemany("INSERT INTO ranks VALUES (?, ?)", ranks.items())
            conn.executemany("INSERT INTO ids VALUES (?, ?)", ids.items())
        conn.close()

    def _lookup(self, table: str, column: str, keys: Sequence[str], memo: dict) -> None:
        missing = list(dict.fromkeys(k for k in keys if k not in memo))
        for start in range(0, len(missing), 500):
            chunk = missing[start:start + 500]
            marks = ",".join("?" * len(chunk))
            key = "pair" if table == "ranks" else "token"
            found = dict(self.conn.execute(f"SELECT {key}, {column} FROM {table} WHERE {key} IN ({marks})", chunk))
            memo.update((k, found.get(k)) for k in chunk)

    def ranks(self, pairs: Sequence[str]) -> list[int | None]:
        self._lookup("ranks", "rank", pairs, self._ranks)
        return [self._ranks[p] for p in pairs]

    def ids(self, tokens: Sequence[str]) -> list[int]:
        self._lookup("ids", "id", tokens, self._ids)
        return [self._ids[t] for t in tokens]


class BpeTokenizer:
    """open_clip's SimpleTokenizer without torch, over `tables` written from its own vocabulary."""

    def __init__(self, tables: BpeTables, *, context_length: int = 77, clean: str = "lower",
                 special_tokens: Sequence[str] = SPECIAL_TOKENS):
        import regex

        self.tables = tables
        self.context_length = int(context_length)
        self.clean = _cleaner(clean)
        self.byte_encoder = bytes_to_unicode()
        self.cache: dict[str, list[str]] = {t: [t] for t in special_tokens}
        self.pattern = regex.compile("|".join(special_tokens) + _WORD_PATTERN, regex.IGNORECASE)
        self.sot_id, self.eot_id = tables.ids(special_tokens[:2])

    def _bpe(self, token: str) -> list[str]:
        cached = self.cache.get(token)
        if cached is not None:
            return cached
        word = [*token[:-1], token[-1] + "</w>"]
        while len(word) > 1:
            ranks = self.tables.ranks([f"{a} {b}" for a, b in zip(word, word[1:], strict=False)])
            known = [(rank, i) for i, rank in enumerate(ranks) if rank is not None]
            if not known:
                break
            first, second = word[min(known)[1]], word[min(known)[1] + 1]
            merged: list[str] = []
            i = 0
            while i < len(word):  # every non-overlapping occurrence, left to right, as open_clip does
                if word[i] == first and i < len(word) - 1 and word[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        self.cache[token] = word
        return word

    def encode(self, text: str) -> list[int]:
        """The BPE ids of `text`, without start and end tokens."""
        pieces: list[str] = []
        for token in self.pattern.findall(self.clean(text)):
            pieces += self._bpe("".join(self.byte_encoder[b] for b in token.encode("utf-8")))
        return self.tables.ids(pieces)

    def __call__(self, texts: str | Sequence[str]) -> np.ndarray:
        """int64 ids of shape (len(texts), context_length): start, tokens, end, zero padding; a text too
        long is truncated with its end token kept last."""
        if isinstance(texts, str):
            texts = [texts]
        out = np.zeros((len(texts), self.context_length), dtype=np.int64)
        for row, text in zip(out, texts, strict=True):
            ids = [self.sot_id, *self.encode(text), self.eot_id][: self.context_length]
            ids[-1] = self.eot_id
            row[: len(ids)] = ids
        return out


# --------------------------------------------------------------------------------------------------
# Hugging Face tokenizers (hf-hub: models, SigLIP)
# --------------------------------------------------------------------------------------------------


class HfTokenizer:
    """A Hugging Face fast tokenizer run through the `tokenizers` package, with open_clip's cleaning and
    its fixed-length output: truncated to the context length, padded with `pad_id`."""

    def __init__(self, tokenizer_file: str | os.PathLike, *, context_length: int, clean: str, pad_id: int,
                 strip_sep_id: int | None = None):
        from tokenizers import Tokenizer

        self.context_length = int(context_length)
        self.clean = _cleaner(clean)
        self.strip_sep_id = strip_sep_id
        self.tokenizer = Tokenizer.from_file(os.fspath(tokenizer_file))
        self.tokenizer.enable_truncation(self.context_length)
        self.tokenizer.enable_padding(length=self.context_length, pad_id=pad_id)

    def __call__(self, texts: str | Sequence[str]) -> np.ndarray:
        if isinstance(texts, str):
            texts = [texts]
        encodings = self.tokenizer.encode_batch([self.clean(t) for t in texts])
        ids = np.array([e.ids for e in encodings], dtype=np.int64).reshape(len(texts), self.context_length)
        if self.strip_sep_id is not None:
            ids[ids == self.strip_sep_id] = 0
        return ids


Tokenizer = BpeTokenizer | HfTokenizer


def load_tokenizer(directory: str | os.PathLike) -> Tokenizer:
    """The tokenizer saved in `directory` by `save_tokenizer`."""
    directory = Path(directory)
    config = json.loads((directory / CONFIG_FILE).read_text())
    if config["kind"] == "bpe":
        return BpeTokenizer(BpeTables(directory / BPE_TABLES_FILE), context_length=config["context_length"],
                            clean=config["clean"], special_tokens=config["special_tokens"])
    if config["kind"] == "hf":
        return HfTokenizer(directory / HF_TOKENIZER_FILE, context_length=config["context_length"],
                           clean=config["clean"], pad_id=config["pad_id"], strip_sep_id=config.get("strip_sep_id"))
    raise ValueError(f"unknown tokenizer kind '{config['kind']}'")


def save_tokenizer(open_clip_tokenizer, directory: str | os.PathLike) -> dict:
    """Write what `load_tokenizer` needs to reproduce `open_clip_tokenizer` (an open_clip tokenizer object)
    into `directory`, and return its config. Raises ValueError for a tokenizer it cannot reproduce."""
    directory = Path(directory)
    kind = type(open_clip_tokenizer).__name__
    if kind == "SimpleTokenizer":
        tok = open_clip_tokenizer
        if tok.reduction_fn is not None:
            raise ValueError("its tokenizer drops tokens at random (reduction_mask), which a query must not do")
        clean = _clean_name(tok)
        BpeTables.write(directory / BPE_TABLES_FILE, {f"{a} {b}": r for (a, b), r in tok.bpe_ranks.items()},
                        tok.encoder)
        config = {"kind": "bpe", "context_length": tok.context_length, "clean": clean,
                  "special_tokens": [tok.decoder[i] for i in tok.all_special_ids]}
    elif kind in ("HFTokenizer", "SigLipTokenizer"):
        tok = open_clip_tokenizer
        if getattr(tok, "tokenizer_mode", "") == "clips":
            raise ValueError("its tokenizer's 'clips' mode is not reproduced without torch")
        backend = getattr(tok.tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise ValueError("its Hugging Face tokenizer is not a fast (tokenizers) one")
        backend.save(str(directory / HF_TOKENIZER_FILE))
        if kind == "SigLipTokenizer":
            clean, strip_sep = "canonicalize", None
        else:
            clean = _clean_name(tok)
            strip_sep = tok.tokenizer.sep_token_id if tok.strip_sep_token else None
        config = {"kind": "hf", "context_length": tok.context_length, "clean": clean,
                  "pad_id": int(tok.tokenizer.pad_token_id or 0), "strip_sep_id": strip_sep}
    else:
        raise ValueError(f"its tokenizer ({kind}) is not one clipengine can run without torch")
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return config


def _clean_name(open_clip_tokenizer) -> str:
    """Which of open_clip's cleaning functions a tokenizer uses, by name (what `CLEANERS` reproduces)."""
    from open_clip import tokenizer as oc

    names = {"lower": oc._clean_lower, "whitespace": oc._clean_whitespace, "canonicalize": oc._clean_canonicalize}
    clean = next((name for name, fn in names.items() if fn is open_clip_tokenizer.clean_fn), None)
    if clean is None:
        raise ValueError("its tokenizer uses a text cleaning function open_clip does not name")
    return clean

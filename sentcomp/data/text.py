"""Text plumbing shared by every path that feeds text to a model: tokenisation, prompts, truncation, word sets,
length buckets and fixed-shape batches.

- **Tokenisation**: :func:`encode` (no special tokens) and :func:`prefix_tokens` (what the tokenizer puts before
  any text, e.g. Llama's BOS; nothing for GPT-2) work with ``tokenizers.Tokenizer`` and transformers' tokenizers.
- **Prompt** (the paper's sentence-completion view): appended to the text with its trailing whitespace stripped
  by default (:func:`effective_prompt`; the authors' tokenizer did that, so ``f(s)`` is read at ``" is"`` of
  ``" This movie is "``). :func:`encode_texts` gives ``prefix + tokens(text + prompt)`` for causal LMs (features,
  zero-shot and fine-tuning alike), :func:`encode_with_specials` ``[CLS] tokens(text + prompt) [SEP]`` for
  BERT-family encoders. Text and prompt are tokenised **together**, as the model sees them in running text
  (:func:`encode_joined`), and told apart by the tokenizer's character offsets; a causal LM gets only the special
  tokens its tokenizer puts *before* a text (:func:`special_tokens`), never those after (BERT's ``[SEP]``).
- **Truncation** to ``max_length`` tokens (``TRUNCATIONS``): ``"start"`` (default) drops the *beginning* of the
  document so the special tokens and the prompt always survive; ``"end"`` is the authors' behaviour (cut the
  end, prompt included).
- **Word sets** (:func:`word_set`): the single-token forms ``" w"``/``"w"`` of a word list, the paper's rule.
- **Batches**: sequences sorted by length and right-padded (masked) to a few length buckets
  (:func:`length_buckets`) with a fixed batch size (:func:`make_batches`), so a jitted function compiles once
  per bucket.
- :func:`tokenizer_fingerprint`: a hash of a tokenizer's definition, part of every cache key.
- **k-shot contexts** (:func:`sample_demonstrations`, :func:`demonstration_prefix`): ``k`` seeded labelled train
  examples, each written as ``text + prompt.rstrip() + delimiter + gold word + separator``, put before the test
  text. The prefix is part of the text, so ``truncation="start"`` drops it from the left first, then the test
  text's beginning; the test text's end and the prompt always survive.

Pure Python and numpy: nothing here imports JAX.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import itertools
import json
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from sentcomp.errors import SentcompError

TRUNCATIONS = ("start", "end")


# ----------------------------------------------------------------------------------------------- tokenizing


def encode(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text, without special tokens (a ``tokenizers.Tokenizer`` or a transformers tokenizer)."""
    texts = list(texts)
    if hasattr(tokenizer, "encode_batch"):
        return [encoding.ids for encoding in tokenizer.encode_batch(texts, add_special_tokens=False)]
    return list(tokenizer(texts, add_special_tokens=False)["input_ids"])


def _encode_with_specials(tokenizer, text: str) -> list[int]:
    if hasattr(tokenizer, "encode_batch"):
        return list(tokenizer.encode(text, add_special_tokens=True).ids)
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])


def special_tokens(tokenizer) -> tuple[list[int], list[int]]:
    """``(before, after)``: the special tokens the tokenizer puts before and after any text (Llama: ``([BOS],
    [])``; BERT: ``([CLS], [SEP])``; GPT-2: ``([], [])``), found by locating a plain text's tokens inside its
    encoding with special tokens."""
    plain = encode(tokenizer, ["a"])[0]
    full = _encode_with_specials(tokenizer, "a")
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return full[:start], full[start + len(plain):]
    raise SentcompError(f"Cannot tell this tokenizer's special tokens apart: 'a' encodes to {plain} without them "
                        f"and {full} with them.")


def prefix_tokens(tokenizer) -> list[int]:
    """The special tokens the tokenizer puts before any text (Llama's BOS, BERT's ``[CLS]``; none for GPT-2): what
    starts every causal LM input. Tokens it puts *after* the text (BERT's ``[SEP]``, an EOS) are never given to
    a causal LM, whose ``f(s)`` is read at the last token."""
    return special_tokens(tokenizer)[0]


def encode_joined(tokenizer, texts: Sequence[str], suffix: str) -> list[tuple[list[int], int]]:
    """For each text, the token ids of ``text + suffix`` tokenised **as one string** (what the model sees in
    running text), and how many of them are the text's: the tokens that end within the text's characters
    (from the tokenizer's offsets). The rest cover the suffix (a token straddling the boundary counts as the
    suffix's). Tokenising the two apart would differ with SentencePiece-style tokenizers, which mark a word's
    leading space as "▁" and may give ``suffix`` alone an extra "▁" token the model never sees there."""
    joined = [text + suffix for text in texts]
    if not joined:
        return []
    if hasattr(tokenizer, "encode_batch"):
        encodings = tokenizer.encode_batch(joined, add_special_tokens=False)
        pieces = [(encoding.ids, encoding.offsets) for encoding in encodings]
    else:
        out = tokenizer(joined, add_special_tokens=False, return_offsets_mapping=True)
        pieces = list(zip(out["input_ids"], out["offset_mapping"]))
    return [(list(ids), sum(1 for _, end in offsets if end <= len(text)))
            for (ids, offsets), text in zip(pieces, texts)]


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of everything that decides how a tokenizer splits text (its full serialised definition).

    Two tokenizers with the same fingerprint give the same token ids, whatever folder they were loaded from;
    feature caches use it as part of their key. The transient ``truncation``/``padding`` settings are left out:
    transformers rewrites them on every call, and callers choose them per call anyway.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return hashlib.sha256(repr(tokenizer).encode()).hexdigest()[:16]
    return _definition_fingerprint(backend.to_str())


@functools.lru_cache(maxsize=8)
def _definition_fingerprint(serialised: str) -> str:
    """:func:`tokenizer_fingerprint` of a tokenizer's serialised definition, remembered: parsing and re-dumping a
    49k-word vocabulary's definition takes ~0.2 s, and every feature-cache lookup asks."""
    definition = json.loads(serialised)
    definition.pop("truncation", None)
    definition.pop("padding", None)
    return hashlib.sha256(json.dumps(definition, sort_keys=True).encode()).hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class Encoding:
    """Token ids of every text (prompt appended, truncated) and how many texts were truncated."""

    token_ids: list[np.ndarray]
    n_truncated: int
    prompt: str | None


def effective_prompt(prompt: str | None, keep_prompt_trailing_space: bool = False) -> str | None:
    """The prompt as appended: trailing whitespace stripped (the paper's tokenizer did) unless kept."""
    if prompt is None or keep_prompt_trailing_space:
        return prompt
    return prompt.rstrip()


def encode_texts(
    tokenizer,
    texts: Sequence[str],
    max_length: int,
    prompt: str | None = None,
    keep_prompt_trailing_space: bool = False,
    truncation: str = "start",
) -> Encoding:
    """Token ids of ``prefix + tokens(text + prompt)`` for every text, at most ``max_length`` tokens each: the
    causal-LM input of features, zero-shot scoring and fine-tuning alike.

    ``prefix`` is what the tokenizer puts before any text (:func:`prefix_tokens`, e.g. a BOS; nothing for GPT-2);
    text and prompt are tokenised together (:func:`encode_joined`). ``truncation="start"`` drops the oldest text
    tokens and keeps the prefix and the prompt's tokens; ``truncation="end"`` keeps the first ``max_length``
    tokens (the authors' behaviour: the prompt may be lost).
    """
    prompt = effective_prompt(prompt, keep_prompt_trailing_space)
    encoded, n_truncated = _assemble(tokenizer, texts, max_length, prompt, truncation, with_suffix=False)
    empty = [i for i, ids in enumerate(encoded) if not len(ids)]
    if empty:
        raise SentcompError(f"Texts at positions {empty[:10]} are empty (no tokens) and there is no prompt: features "
                            "need at least one token; drop them or pass a prompt.")
    return Encoding(encoded, n_truncated, prompt)


def encode_with_specials(tokenizer, texts: Sequence[str], max_length: int, prompt: str | None = None,
                         truncation: str = "start") -> list[np.ndarray]:
    """Token ids of ``[CLS] tokens(text + prompt) [SEP]`` (the tokenizer's own special tokens, before and after),
    ≤ ``max_length`` each: a BERT-family encoder's input. Truncation drops the text's beginning (``"start"``)
    or its end (``"end"``); the prompt and the special tokens always survive."""
    if tokenizer.cls_token_id is None or tokenizer.sep_token_id is None:
        raise SentcompError("The encoder's tokenizer has no [CLS]/[SEP] tokens: BERT features need a BERT tokenizer.")
    return _assemble(tokenizer, texts, max_length, prompt, truncation, with_suffix=True)[0]


def _assemble(tokenizer, texts: Sequence[str], max_length: int, prompt: str | None, truncation: str,
              with_suffix: bool) -> tuple[list[np.ndarray], int]:
    """``before + tokens(text + prompt) [+ after]`` per text, truncated to ``max_length``; and how many were cut.

    ``"start"`` keeps the specials and the prompt's tokens and the last text tokens that fit; ``"end"`` keeps
    the first tokens (of a causal LM's input: its prompt may be lost; of an encoder's input: the text's end is
    cut, the prompt and the closing special tokens kept).
    """
    if truncation not in TRUNCATIONS:
        raise SentcompError(f"truncation must be one of {TRUNCATIONS}, got {truncation!r}.")
    before, after = special_tokens(tokenizer)
    after = after if with_suffix else []
    encoded, n_truncated = [], 0
    for ids, n_text in encode_joined(tokenizer, texts, prompt or ""):
        text_ids, prompt_ids = ids[:n_text], ids[n_text:]
        room = max_length - len(before) - len(prompt_ids) - len(after)
        if room < 1:
            raise SentcompError(f"The prompt {prompt!r} takes {len(prompt_ids)} tokens: no room left for text within "
                                f"max_length={max_length}.")
        if len(text_ids) > room:
            n_truncated += 1
            if truncation == "end" and not with_suffix:
                text_ids, prompt_ids = (text_ids + prompt_ids)[:max_length - len(before)], []
            else:
                text_ids = text_ids[len(text_ids) - room:] if truncation == "start" else text_ids[:room]
        encoded.append(np.asarray([*before, *text_ids, *prompt_ids, *after], np.int32))
    return encoded, n_truncated


# ---------------------------------------------------------------------------------------- k-shot contexts


def split_prompt(prompt: str) -> tuple[str, str]:
    """``(context suffix, continuation delimiter)``: the prompt without its trailing whitespace, and that
    whitespace (a single space if it has none: lm-evaluation-harness's default ``target_delimiter``)."""
    stripped = prompt.rstrip()
    return stripped, prompt[len(stripped):] or " "


def sample_demonstrations(texts: Sequence[str], labels: Sequence[int] | np.ndarray, k: int, seed: int,
                          balanced: bool = True, exclude: Sequence[str] = ()) -> np.ndarray:
    """Indices of ``k`` demonstrations drawn from the labelled pool ``(texts, labels)`` (a train split), seeded.

    A pool item whose text is in ``exclude`` (the test texts) is never drawn, so a test example never shows up
    as its own demonstration. ``balanced``: the classes present get ``⌊k/C⌋`` demonstrations each and a seeded
    choice of ``k mod C`` of them one more; otherwise ``k`` items uniformly without replacement. The order is a
    seeded shuffle (no class blocks). The same arguments always give the same indices.
    """
    if k < 0:
        raise SentcompError(f"k (the number of demonstrations) must be ≥ 0, got {k}.")
    excluded = set(exclude)
    label_array = np.asarray(labels)
    eligible = np.array([i for i, text in enumerate(texts) if text not in excluded], np.int64)
    rng = np.random.default_rng(seed)
    if not balanced:
        if k > len(eligible):
            raise SentcompError(f"{k} demonstrations asked for, but only {len(eligible)} train examples are "
                                "not test texts: lower k.")
        return rng.permutation(rng.choice(eligible, size=k, replace=False))
    classes = np.unique(label_array[eligible]) if len(eligible) else np.array([], np.int64)
    if k and not len(classes):
        raise SentcompError("No train example is eligible as a demonstration (all are test texts).")
    counts = np.full(len(classes), k // max(len(classes), 1))
    counts[rng.choice(len(classes), size=k % max(len(classes), 1), replace=False)] += 1
    chosen = []
    for label, count in zip(classes, counts):
        members = eligible[label_array[eligible] == label]
        if count > len(members):
            raise SentcompError(f"A balanced {k}-shot context needs {count} demonstrations of label {label}, but "
                                f"train has only {len(members)}: lower k or set balanced=False.")
        chosen.extend(rng.choice(members, size=count, replace=False))
    return rng.permutation(np.asarray(chosen, np.int64))


def demonstration_prefix(texts: Sequence[str], words: Sequence[str], prompt: str, separator: str = "\n\n") -> str:
    """The k-shot prefix: ``Σ_i texts[i] + prompt.rstrip() + delimiter + words[i] + separator`` (each
    demonstration with its gold label word, in the test example's format; ``""`` for no demonstrations).
    ``prefix + test_text`` is then completed as any text (:func:`split_prompt`)."""
    suffix, delimiter = split_prompt(prompt)
    return "".join(f"{text}{suffix}{delimiter}{word.strip()}{separator}" for text, word in zip(texts, words))


# ------------------------------------------------------------------------------------------------ word sets


@dataclasses.dataclass(frozen=True)
class WordSet:
    """The single-token forms of a word list.

    Attributes:
      words: the words asked for.
      token_ids: the kept token ids, in order (``" w"`` before ``"w"``, word by word).
      forms: the string of each kept token (``" great"`` or ``"great"``).
      source_words: which asked-for word each kept token comes from.
      dropped: the words with no single-token form.
    """

    words: tuple[str, ...]
    token_ids: tuple[int, ...]
    forms: tuple[str, ...]
    source_words: tuple[str, ...]
    dropped: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def word_set(tokenizer, words: Sequence[str]) -> WordSet:
    """Resolves ``words`` to token ids with the paper's rule.

    Each word is tried in its ``" w"`` and ``"w"`` forms; a form is kept when the tokenizer makes it a single
    token, and a token id already kept (a repeated word, or two forms sharing a token) is not added twice.
    """
    if isinstance(words, str):
        raise SentcompError(f"words must be a list of words, not the string {words!r}.")
    ids: list[int] = []
    forms: list[str] = []
    sources: list[str] = []
    dropped: list[str] = []
    for word in words:
        kept_any = False
        for form in (" " + word, word):
            encoded = encode(tokenizer, [form])[0]
            if len(encoded) == 1:
                kept_any = True
                if encoded[0] not in ids:
                    ids.append(encoded[0])
                    forms.append(form)
                    sources.append(word)
        if not kept_any:
            dropped.append(word)
    return WordSet(tuple(words), tuple(ids), tuple(forms), tuple(sources), tuple(dropped))


# ------------------------------------------------------------------------------------------------- batching


def length_buckets(max_length: int, smallest: int = 16) -> tuple[int, ...]:
    """Padded lengths ``smallest·{1, 1.5, 2, 3, 4, 6, ...}`` below ``max_length``, then ``max_length`` itself.

    Consecutive buckets differ by ≤ 1.5×, so padding wastes at most a third of a batch while a 512-token
    context needs only 11 compilations.
    """
    buckets, length = [], smallest
    while length < max_length:
        buckets += [b for b in (length, length * 3 // 2) if b < max_length]
        length *= 2
    return (*buckets, max_length)


def batch_maxima(lengths: Sequence[int], batch_size: int) -> list[int]:
    """The longest sequence of each batch :func:`make_batches` forms from sequences of these ``lengths``."""
    longest_first = sorted(lengths, reverse=True)
    return [longest_first[start] for start in range(0, len(longest_first), batch_size)]


# Fewer batches keep the grid's lengths (:func:`fitted_buckets`): programs compiled for the grid serve every small
# call alike (e.g. each template's three content-free texts), and a few batches save little padding.
MIN_BATCHES_TO_FIT = 8


def fitted_buckets(maxima: Sequence[int], grid: Sequence[int]) -> tuple[int, ...]:
    """Padded lengths for batches whose longest sequences are ``maxima``: no more of them than the batches would
    use from ``grid`` (so no more compiled programs), placed where these batches need them; ``grid`` itself for
    fewer than :data:`MIN_BATCHES_TO_FIT` batches.

    A batch is padded to the smallest chosen length ≥ its maximum, so with the distinct maxima ``v_1 < … < v_u``
    (``c_i`` batches each) the chosen lengths are maxima, and the best ``k`` of them cover consecutive runs:
    ``cost(i, k) = min_{j ≥ i} v_j · (c_i + … + c_j) + cost(j + 1, k − 1)``, ``cost(u + 1, ·) = 0``, minimises
    the padded tokens per row, ``Σ_b length(b)``. E.g. maxima of 33 and 50 tokens need 48 and 64 from the
    geometric grid (:func:`length_buckets`) but 33 and 50 here.
    """
    if len(maxima) < MIN_BATCHES_TO_FIT:
        return tuple(grid)
    batches_at = collections.Counter(maxima)
    values = sorted(batches_at)
    batches_below = list(itertools.accumulate((batches_at[v] for v in values), initial=0))  # c_1 + … + c_{i-1}

    @functools.cache
    def cost(i: int, k: int) -> tuple[float, tuple[int, ...]]:
        """(padded tokens per row, the lengths) of the batches with maxima ``values[i:]``, in ≤ ``k`` lengths."""
        if i == len(values):
            return 0.0, ()
        if k == 0:
            return math.inf, ()
        runs = []
        for j in range(i, len(values)):
            rest, lengths = cost(j + 1, k - 1)
            runs.append((values[j] * (batches_below[j + 1] - batches_below[i]) + rest, (values[j], *lengths)))
        return min(runs)

    return cost(0, len({min(b for b in grid if b >= m) for m in values}))[1]


@dataclasses.dataclass(frozen=True)
class Batch:
    indices: np.ndarray  # positions (within the chunk) of the real rows
    token_ids: np.ndarray  # [batch_size, bucket], right-padded
    mask: np.ndarray  # [batch_size, bucket] int32; padding rows hold one dummy token so no row is empty
    n_tokens: int


def bucket_lengths(max_length: int, buckets: Sequence[int] | None = None) -> tuple[int, ...]:
    """The padded lengths to use: ``buckets`` (default :func:`length_buckets`) up to ``max_length``, sorted, always
    ending with ``max_length`` itself so every sequence fits."""
    kept = sorted(b for b in (buckets or length_buckets(max_length)) if b < max_length)
    return (*kept, max_length)


def make_batches(token_ids: Sequence[np.ndarray], batch_size: int, buckets: Sequence[int], pad_id: int) -> list[Batch]:
    """Groups sequences by length (longest first) into fixed-size batches padded to the smallest fitting bucket."""
    lengths = np.array([len(ids) for ids in token_ids])
    order = np.argsort(-lengths, kind="stable")
    batches = []
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        longest = lengths[rows].max()
        fitting = [b for b in buckets if b >= longest]
        if not fitting:
            raise SentcompError(f"A sequence of {longest} tokens exceeds the largest bucket {max(buckets)}.")
        ids = np.full((batch_size, fitting[0]), pad_id, np.int32)
        mask = np.zeros((batch_size, fitting[0]), np.int32)
        mask[len(rows):, 0] = 1
        for row, index in enumerate(rows):
            ids[row, : lengths[index]] = token_ids[index]
            mask[row, : lengths[index]] = 1
        batches.append(Batch(rows, ids, mask, int(lengths[rows].sum())))
    return batches


def pad_id(tokenizer) -> int:
    """The id padding positions hold. Any valid id works (padding is masked); prefer the tokenizer's pad, then
    EOS, then 0."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0

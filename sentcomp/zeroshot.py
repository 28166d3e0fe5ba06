"""Zero-shot classification by sentence completion (the paper's view of a task, used directly).

For a text ``s`` and a task with prompt ``π`` (e.g. ``" This movie is "``), each label ``y`` has completion
words ``W_y`` (``task.label_words``, e.g. ``great`` for positive). A word ``w`` is scored by the summed
next-token log-probabilities of its tokens ``c_1..c_m`` after the context ``s + π``:

    score(w) = Σ_i log p_f(ctx, c_1..c_{i-1})(c_i),      log p_f(s)(c) = f(s)ᵀφ_c − log Z(f(s))

a label by the total probability of its words, ``score(y) = log Σ_{w∈W_y} exp score(w)``, and the prediction
is ``argmax_y score(y)``. Other scoring rules (:data:`SCORING_RULES`, :func:`rule_scores`): ``acc_norm`` (÷ the
word's length in characters, lm-evaluation-harness), ``pmi`` (− the word's log-probability after the template
alone) and ``calibrated`` (contextual calibration); one pass of the model (:func:`score_words`: the texts and
:data:`CONTENT_FREE_TEXTS`) gives them all. A k-shot ``prefix`` (:func:`sentcomp.data.text.demonstration_prefix`)
goes before every text, content-free ones included. Templates and verbalizers are arguments of
:func:`zero_shot` (default: the task's prompt and label words); :class:`ZeroShotPlan` scores every template ×
verbalizer × number of demonstrations (prompt sensitivity) and :func:`summarise_variants` sums them up.
Formulas and conventions: docs/zeroshot.md.

Conventions (lm-evaluation-harness's loglikelihood requests): the context is ``s + π.rstrip()`` and the
continuation is the prompt's trailing whitespace (a single space if it has none) followed by the word; the
continuation's tokens are those of ``tokenize(context + continuation)`` after ``tokenize(context)``; the
tokenizer's own prefix tokens (a BOS, for Llama-style tokenizers; none for GPT-2) start every sequence.

The context is built exactly as features build theirs (:func:`sentcomp.data.text.encode_texts`: prefix tokens,
``text + π.rstrip()`` tokenised as one string, the same ``truncation`` rule), within ``max_length`` minus the
room the longest continuation needs; the same truncated context is used for all of a document's words. Words
whose continuations share all tokens but the last are scored in one forward pass (single-token words: one pass
per document). Batches have a fixed size (padded with copies of a real row) and lengths padded to a few buckets,
so the jitted scorer compiles once per bucket; every row is scored independently of the others, so results do
not depend on the batch size. log Z is streamed over the vocabulary (``sentcomp.kernels``), only at the scored
positions: no ``[B, T, V]`` buffer.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from sentcomp import kernels, parallel
from sentcomp.data.loaders import Split
from sentcomp.data.tasks import Task, get_task
from sentcomp.data.text import (
    demonstration_prefix,
    encode,
    encode_texts,
    fitted_buckets,
    length_buckets,
    prefix_tokens,
    sample_demonstrations,
    split_prompt,
)
from sentcomp.errors import SentcompError
from sentcomp.models.base import COMPUTE_DTYPES, LanguageModel, cast_floats
from sentcomp.results import statistics, storage

# ----------------------------------------------------------------------------------------------------------
# Tokenization


def verbalizer_words(label_names: Sequence[str], label_words) -> tuple[tuple[str, ...], np.ndarray]:
    """All words of a verbalizer (label name -> words) in label order, and the label index of each."""
    words, labels = [], []
    for index, label in enumerate(label_names):
        for word in label_words[label]:
            words.append(word.strip())
            labels.append(index)
    return tuple(words), np.asarray(labels, np.int64)


def label_word_list(task: Task) -> tuple[tuple[str, ...], np.ndarray]:
    """The task's label words in label order, and the label index of each."""
    return verbalizer_words(task.label_names, task.label_words)


@dataclasses.dataclass(frozen=True)
class ScoringRow:
    """One forward pass: ``input_ids``; for each word ``words[k]``, its tokens ``targets[k]`` are scored at
    positions ``start, start+1, ...`` (the positions whose next token they are). Also the rows of lm-eval's
    requests (:mod:`sentcomp.lmeval.model`: ``words`` are request indices, ``document`` the row's group)."""

    document: int
    input_ids: tuple[int, ...]
    start: int
    words: tuple[int, ...]
    targets: tuple[tuple[int, ...], ...]


def build_rows(tokenizer, texts: Sequence[str], prompt: str, words: Sequence[str], max_length: int,
               truncation: str = "start") -> list[ScoringRow]:
    """The forward passes scoring every word after every ``text + prompt`` (see the module docstring).

    Each context is ``prefix + tokens(text + prompt.rstrip())`` as features build it
    (:func:`sentcomp.data.text.encode_texts`, same ``truncation`` rule), within ``max_length`` minus the room the
    longest continuation needs after it.
    """
    context_suffix, delimiter = split_prompt(prompt)
    contexts = [text + context_suffix for text in texts]
    context_ids = encode(tokenizer, contexts)
    continuations = [encode(tokenizer, [context + delimiter + word for context in contexts]) for word in words]
    conts = [[full[len(ids):] for full in (continuation[document] for continuation in continuations)]
             for document, ids in enumerate(context_ids)]
    for document, document_conts in enumerate(conts):
        if not all(document_conts):
            raise SentcompError(f"Document {document}: a label word tokenizes to nothing after the prompt.")
    longest = max(len(cont) for document_conts in conts for cont in document_conts) if conts else 1
    prefix = prefix_tokens(tokenizer)
    needed = len(prefix) + len(encode(tokenizer, [context_suffix])[0]) + longest
    if max_length - (longest - 1) < needed - longest + 2:
        raise SentcompError(f"The prompt {prompt!r} and the label words need {needed} tokens with one token of text, "
                            f"more than max_length {max_length}.")
    encoding = encode_texts(tokenizer, texts, max_length - (longest - 1), context_suffix,
                            keep_prompt_trailing_space=True, truncation=truncation)
    rows = []
    for document, (context_array, document_conts) in enumerate(zip(encoding.token_ids, conts)):
        context = tuple(int(token) for token in context_array)
        groups: dict[tuple[int, ...], list[int]] = {}
        for word, cont in enumerate(document_conts):
            groups.setdefault(tuple(cont[:-1]), []).append(word)
        for shared, members in groups.items():
            rows.append(ScoringRow(document, context + shared, len(context) - 1, tuple(members),
                             tuple(tuple(document_conts[word]) for word in members)))
    return rows


# ----------------------------------------------------------------------------------------------------------
# Scoring


def _continuation_log_probs(hidden_fn, phi_fn, chunk_size, params, ids, mask, positions, targets, valid):
    """``Σ_l log p(targets[b,k,l] | ids[b, :positions[b,k,l]+1])`` over valid ``l``: ``[B, K]``."""
    hidden = hidden_fn(params, ids, mask)  # [B, T, d]
    batch, words, length = positions.shape
    picked = jnp.take_along_axis(hidden, positions.reshape(batch, words * length, 1), axis=1)
    picked = picked.reshape(batch, words, length, hidden.shape[-1]).astype(jnp.float32)
    phi = phi_fn(params).astype(jnp.float32)  # log p in float32, whatever the model ran in
    log_probs = -kernels.xent_per_position(picked, phi, targets, chunk_size)
    return jnp.sum(jnp.where(valid, log_probs, 0.0), axis=-1)


@functools.lru_cache(maxsize=8)
def _jitted_scorer(hidden_fn, phi_fn, chunk_size):
    return jax.jit(functools.partial(_continuation_log_probs, hidden_fn, phi_fn, chunk_size))


@functools.lru_cache(maxsize=8)
def _jitted_cached_scorer(continue_fn, phi_fn, chunk_size):
    """:func:`_continuation_log_probs` of rows continuing a cached prefix: ``(params, cache, ids, ...)``."""
    def log_probs(params, cache, *arrays):
        def hidden_fn(params, ids, mask):
            return continue_fn(params, cache, ids, mask)

        return _continuation_log_probs(hidden_fn, phi_fn, chunk_size, params, *arrays)

    return jax.jit(log_probs)


@functools.lru_cache(maxsize=8)
def _jitted_prefill(prefill_fn):
    return jax.jit(prefill_fn)


# A shared token prefix shorter than this is not worth its own compiled programs (k = 0 texts share ~0 tokens).
MIN_SHARED_PREFIX = 16


def shared_prefix_length(rows: Sequence[ScoringRow], minimum: int = MIN_SHARED_PREFIX) -> int:
    """``P``, the number of leading tokens the rows continuing a common prefix share with ``rows[0]`` (a k-shot
    prefix: BOS + the demonstrations, up to where the text's first token may merge with the separator), or 0
    when fewer than ``minimum``, or when fewer than half of the documents (and fewer than 2) share them (e.g. the
    rows of one document's multi-token words, which share its whole context). Rows sharing fewer tokens (their
    demonstrations cut by truncation) do not count; ``P`` leaves every sharing row's scored positions (``start``
    on) after the prefix."""
    reference = np.asarray(rows[0].input_ids)
    shared, documents = [], set()
    for row in rows:
        ids = np.asarray(row.input_ids[: len(reference)])
        differ = np.flatnonzero(ids != reference[: len(ids)])
        common = min(int(differ[0]) if len(differ) else len(ids), row.start)
        if common >= minimum:
            shared.append(common)
            documents.add(row.document)
    if len(documents) < max(2, len({row.document for row in rows}) / 2):
        return 0
    return min(shared)


def _shifted(row: ScoringRow, prefix_length: int) -> ScoringRow:
    """``row`` without its first ``prefix_length`` tokens (read from a cache), positions shifted alike."""
    return dataclasses.replace(row, input_ids=row.input_ids[prefix_length:], start=row.start - prefix_length)


def scoring_arrays(rows: Sequence[ScoringRow], batch_size: int, length: int, words: int, tokens: int):
    """Fixed-shape arrays for ``rows``, padded to ``batch_size`` rows with copies of the first (scores ignored)."""
    padded = list(rows) + [rows[0]] * (batch_size - len(rows))
    ids = np.zeros((batch_size, length), np.int32)
    mask = np.zeros((batch_size, length), np.int32)
    positions = np.zeros((batch_size, words, tokens), np.int32)
    targets = np.zeros((batch_size, words, tokens), np.int32)
    valid = np.zeros((batch_size, words, tokens), bool)
    for b, row in enumerate(padded):
        ids[b, : len(row.input_ids)] = row.input_ids
        mask[b, : len(row.input_ids)] = 1
        for k, target in enumerate(row.targets):
            positions[b, k, : len(target)] = row.start + np.arange(len(target))
            targets[b, k, : len(target)] = target
            valid[b, k, : len(target)] = b < len(rows)
    return ids, mask, positions, targets, valid


def label_word_scores(lm: LanguageModel, task: Task | str, texts: Sequence[str], **options) -> np.ndarray:
    """``[N, W]``: :func:`word_scores` of the task's label words (``label_word_list(task)`` order) after each
    ``text + task.prompt``."""
    task = get_task(task)
    return word_scores(lm, texts, task.prompt, label_word_list(task)[0], **options)


def word_scores(lm: LanguageModel, texts: Sequence[str], prompt: str, words: Sequence[str], batch_size: int = 32,
                max_length: int | None = None, mesh=None, chunk_size: int | None = None,
                progress: bool = True, compute_dtype: str = "float32", truncation: str = "start",
                kv_cache: bool = True) -> np.ndarray:
    """``[N, W]``: summed log-probability of each of ``words`` after each ``text + prompt``.

    Sequences hold at most ``max_length`` tokens (default and cap: ``lm.max_length``; the paper used 512), long
    documents cut by ``truncation`` as features cut them. The model runs in ``compute_dtype`` (``"float32"`` or
    ``"bfloat16"``, as :func:`sentcomp.features.extract_features`); log-probabilities are computed in float32.
    Batches are split over ``mesh`` (default: every device of every process; each process passes the same
    texts); ``batch_size`` (≥ 1) is rounded up to a multiple of the mesh size. ``chunk_size``: the vocabulary
    chunk of the streamed log-probabilities (None: :func:`sentcomp.kernels.vocab_chunk_for` a batch's scored
    positions).

    Shared prefix (``kv_cache``, models with a key/value cache, ``lm.prefill_fn``): when the texts start with the
    same ≥ :data:`MIN_SHARED_PREFIX` tokens (a k-shot prefix, :func:`shared_prefix_length`), the model reads them
    once and every row that starts with them continues from their cached keys/values: the same scores (to
    float32 rounding) for the cost of the rows' own tokens. ``kv_cache=False`` reads every row whole.
    """
    if not len(texts):
        raise SentcompError("Zero-shot scoring got no texts to score.")
    if batch_size < 1:
        raise SentcompError(f"batch_size must be a positive number of sequences, got {batch_size}.")
    if compute_dtype not in COMPUTE_DTYPES:
        raise SentcompError(f"compute_dtype must be one of {sorted(COMPUTE_DTYPES)}, got {compute_dtype!r}.")
    max_length = min(max_length or lm.max_length, lm.max_length)
    rows = build_rows(lm.tokenizer, texts, prompt, words, max_length, truncation)
    rows.sort(key=lambda row: len(row.input_ids))
    mesh = mesh if mesh is not None else parallel.data_mesh()
    batch_size = parallel.pad_to_multiple(batch_size, mesh.size)
    shape = (max(len(row.words) for row in rows), max(len(target) for row in rows for target in row.targets))
    params = parallel.replicate(cast_floats(lm.params, COMPUTE_DTYPES[compute_dtype]), mesh)
    buckets = length_buckets(max_length)
    scores = np.full((len(texts), len(words)), np.nan)
    chunk_size = chunk_size or kernels.vocab_chunk_for(batch_size * shape[0] * shape[1], int(lm.phi.shape[0]))
    scorer = _jitted_scorer(lm.hidden_fn, lm.phi_fn, chunk_size)
    shared = shared_prefix_length(rows) if kv_cache and lm.prefill_fn is not None else 0
    # (rows, jitted scorer, its leading arguments)
    passes: list[tuple[list[ScoringRow], Any, tuple[Any, ...]]] = [(rows, scorer, (params,))]
    if shared:
        prefix = rows[0].input_ids[:shared]
        continues = [row.input_ids[:shared] == prefix for row in rows]
        passes = [([row for row, yes in zip(rows, continues) if not yes], scorer, (params,)),
                  ([_shifted(row, shared) for row, yes in zip(rows, continues) if yes],
                   _jitted_cached_scorer(lm.continue_fn, lm.phi_fn, chunk_size),
                   (params, prefix_cache(lm, params, prefix, buckets, mesh)))]
    bar = tqdm(total=len(rows), desc=f"zero-shot {prompt.strip()!r}", disable=not progress)
    for pass_rows, scorer, args in passes:
        batches = [pass_rows[first: first + batch_size] for first in range(0, len(pass_rows), batch_size)]
        maxima = [max(len(row.input_ids) for row in batch) for batch in batches]
        fitted = fitted_buckets(maxima, buckets)
        for batch, longest in zip(batches, maxima):
            length = next(bucket for bucket in fitted if bucket >= longest)
            row_scores = parallel.apply_to_batch(scorer, scoring_arrays(batch, batch_size, length, *shape), mesh, *args)
            for row, values in zip(batch, row_scores):
                scores[row.document, list(row.words)] = values[: len(row.words)]
            bar.update(len(batch))
    bar.close()
    return scores


def prefix_cache(lm: LanguageModel, params, prefix: Sequence[int], buckets: Sequence[int], mesh):
    """The :class:`sentcomp.models.layers.KVCache` of the token ids ``prefix`` (one row, padded to a length of
    ``buckets`` with masked positions, so prefixes of other lengths reuse the compiled programs), on every device
    of ``mesh``."""
    length = next(bucket for bucket in buckets if bucket >= len(prefix))
    ids, mask = np.zeros((1, length), np.int32), np.zeros((1, length), np.int32)
    ids[0, : len(prefix)], mask[0, : len(prefix)] = prefix, 1
    _, cache = _jitted_prefill(lm.prefill_fn)(params, ids, mask)
    return parallel.replicate(cache, mesh)


# ----------------------------------------------------------------------------------------------------------
# Scoring rules


@dataclasses.dataclass(frozen=True)
class WordScores:
    """Summed continuation log-probabilities of ``words`` after each text (``texts``, ``[N, W]``) and after each
    of :data:`CONTENT_FREE_TEXTS` (``content_free``, ``[C, W]``), every text behind the same k-shot prefix: all
    a scoring rule needs, from one pass of the model (:func:`score_words`)."""

    words: tuple[str, ...]
    texts: np.ndarray
    content_free: np.ndarray

    def select(self, words: Sequence[str]) -> WordScores:
        """The columns of ``words`` (which must all be among ``self.words``)."""
        columns = [self.words.index(word) for word in words]
        return WordScores(tuple(words), self.texts[:, columns], self.content_free[:, columns])


# Zhao et al. 2021, "Calibrate Before Use": inputs with no content, whose label distribution is the LM's bias.
CONTENT_FREE_TEXTS = ("N/A", "", "[MASK]")
# PMI's null context (Holtzman et al. 2021's domain premise): the template with an empty text.
NULL_TEXT = CONTENT_FREE_TEXTS.index("")
SCORING_RULES = ("ll", "acc_norm", "pmi", "calibrated")


def score_words(lm: LanguageModel, texts: Sequence[str], prompt: str, words: Sequence[str], prefix: str = "",
                **options) -> WordScores:
    """:func:`word_scores` of ``prefix + text`` for every text and every content-free text, in one call."""
    if not len(texts):
        raise SentcompError("Zero-shot scoring got no texts to score.")
    inputs = [prefix + text for text in (*texts, *CONTENT_FREE_TEXTS)]
    scores = word_scores(lm, inputs, prompt, words, **options)
    return WordScores(tuple(words), scores[: len(texts)], scores[len(texts):])


def label_scores_from_words(word_scores: np.ndarray, word_labels: np.ndarray, num_labels: int) -> np.ndarray:
    """``score(y) = log Σ_{w ∈ W_y} exp score(w)``: ``[N, K]`` from ``[N, W]``."""
    return np.stack([np.logaddexp.reduce(word_scores[:, word_labels == label], axis=1)
                     for label in range(num_labels)], axis=1)


def completion_lengths(words: Sequence[str]) -> np.ndarray:
    """lm-evaluation-harness's ``acc_norm`` divisor: ``len(choice)``, the word's length in characters, without
    the target delimiter (``completion_len = [float(len(c)) for c in choices]`` in its ``process_results``)."""
    return np.array([float(len(word.strip())) for word in words])


def contextual_log_prior(content_free_label_scores: np.ndarray) -> np.ndarray:
    """``log p_cf(y) = log mean_c softmax_y(score_c(y))``, ``[K]``: the label distribution of the content-free
    inputs, each normalised over labels, averaged (contextual calibration, Zhao et al., ICML 2021)."""
    normalised = content_free_label_scores - np.logaddexp.reduce(content_free_label_scores, axis=1, keepdims=True)
    return np.log(np.mean(np.exp(normalised), axis=0))


def rule_scores(scores: WordScores, word_labels: np.ndarray, num_labels: int) -> dict[str, np.ndarray]:
    """Label scores ``[N, K]`` under every rule of :data:`SCORING_RULES`, from one :class:`WordScores`:

    - ``ll``: ``s(w) = log p(w | x)`` (summed over the word's tokens);
    - ``acc_norm``: ``s(w) = log p(w | x) / len(w)`` (characters, :func:`completion_lengths`);
    - ``pmi``: ``s(w) = log p(w | x) − log p(w | x₀)``, ``x₀`` the template with an empty text (:data:`NULL_TEXT`);
    - per label ``score(y) = log Σ_{w∈W_y} exp s(w)`` (one word per label: ``s(w)`` itself);
    - ``calibrated``: ``score_ll(y) − log p_cf(y)`` (:func:`contextual_log_prior`).
    """
    def labels_of(word_scores):
        return label_scores_from_words(word_scores, word_labels, num_labels)

    ll = labels_of(scores.texts)
    return {
        "ll": ll,
        "acc_norm": labels_of(scores.texts / completion_lengths(scores.words)),
        "pmi": labels_of(scores.texts - scores.content_free[NULL_TEXT]),
        "calibrated": ll - contextual_log_prior(labels_of(scores.content_free)),
    }


def evaluate_scores(label_scores: np.ndarray, labels: Sequence[int] | np.ndarray,
                    n_bins: int = statistics.DEFAULT_BINS) -> dict:
    """Accuracy of ``argmax_y score(y)``, and ECE / Brier of ``softmax_y score(y)`` (:mod:`~results.statistics`)."""
    label_array = np.asarray(labels)
    probabilities = statistics.softmax(label_scores)
    return {"accuracy": float(np.mean(label_scores.argmax(axis=1) == label_array)),
            "ece": statistics.expected_calibration_error(probabilities, label_array, n_bins),
            "brier": statistics.brier_score(probabilities, label_array), "n": int(len(label_array))}


@dataclasses.dataclass(frozen=True)
class ZeroShotResult:
    """One zero-shot run: per label word ``[N, W]``, label scores ``[N, K]`` under every rule
    (``rule_scores``) and under the chosen ``rule`` (``label_scores``), the contextual-calibration log prior
    ``[K]``, and the chosen rule's predictions ``[N]``."""

    words: tuple[str, ...]
    word_labels: np.ndarray
    word_scores: np.ndarray
    rule: str
    rule_scores: dict[str, np.ndarray]
    log_prior: np.ndarray
    prefix: str = ""

    @property
    def label_scores(self) -> np.ndarray:
        return self.rule_scores[self.rule]

    @property
    def predictions(self) -> np.ndarray:
        return self.label_scores.argmax(axis=1)

    def accuracy(self, labels: Sequence[int]) -> float:
        return float(np.mean(self.predictions == np.asarray(labels)))

    def evaluate(self, labels: Sequence[int], n_bins: int = statistics.DEFAULT_BINS) -> dict[str, dict]:
        """``{rule: {"accuracy", "ece", "brier", "n"}}`` for every rule (:func:`evaluate_scores`)."""
        return {rule: evaluate_scores(scores, labels, n_bins) for rule, scores in self.rule_scores.items()}


def check_rule(rule: str) -> None:
    if rule not in SCORING_RULES:
        raise SentcompError(f"Unknown zero-shot scoring rule {rule!r}; choose one of {list(SCORING_RULES)}.")


_PLACEHOLDER = re.compile(r"\{\w*\}")


def check_template(prompt: str) -> None:
    """A template is appended after the text (``text + prompt``): one holding a format placeholder such as
    ``{text}`` would be scored literally, braces and all, so it is refused."""
    placeholder = _PLACEHOLDER.search(prompt)
    if placeholder:
        raise SentcompError(f"The zero-shot template {prompt!r} holds the placeholder {placeholder.group()}, but "
                            "templates are appended after the text (text + template), never formatted: write only "
                            "what follows the text, e.g. ' This movie is '.")


def zero_shot(lm: LanguageModel, task: Task | str, texts: Sequence[str], rule: str = "ll", prompt: str | None = None,
              label_words: dict[str, Sequence[str]] | None = None, prefix: str = "", **options) -> ZeroShotResult:
    """Zero-shot (``prefix=""``) or k-shot (``prefix`` from :func:`sentcomp.data.text.demonstration_prefix`)
    sentence-completion predictions for ``texts`` under ``rule`` (every rule is computed: ``rule_scores``).

    ``prompt`` and ``label_words`` (default: the task's) choose the template and the verbalizer; ``options`` as
    :func:`word_scores`. Rules: :func:`rule_scores`; ``calibrated`` divides each label's probability by its
    content-free prior, removing the LM's preference for some label words whatever the text (an addition of
    ours; the paper has no zero-shot column).
    """
    task = get_task(task)
    check_rule(rule)
    check_template(prompt if prompt is not None else task.prompt)
    words, word_labels = verbalizer_words(task.label_names, label_words or task.label_words)
    scores = score_words(lm, texts, prompt if prompt is not None else task.prompt, words, prefix, **options)
    label_scores = rule_scores(scores, word_labels, task.num_classes)
    log_prior = contextual_log_prior(label_scores_from_words(scores.content_free, word_labels, task.num_classes))
    return ZeroShotResult(words, word_labels, scores.texts, rule, label_scores, log_prior, prefix)


def zero_shot_accuracy(lm: LanguageModel, task: Task | str, split, **options) -> float:
    """Accuracy of :func:`zero_shot` on a labeled ``Split`` (``sentcomp.data.Split``)."""
    return zero_shot(lm, task, split.texts, **options).accuracy(split.labels)


# ----------------------------------------------------------------------------------------------------------
# Prompt sensitivity: templates × verbalizers × shots


Verbalizer = dict[str, tuple[str, ...]]  # label -> its words


@dataclasses.dataclass(frozen=True)
class ZeroShotVariant:
    """One way of asking the LM: ``k`` demonstrations, template ``templates[t]``, verbalizer ``verbalizers[v]``."""

    k: int
    t: int
    v: int
    template: str
    verbalizer: Verbalizer

    def describe(self) -> dict:
        return {"k": self.k, "t": self.t, "v": self.v, "template": self.template,
                "verbalizer": {label: list(words) for label, words in self.verbalizer.items()}}


def parse_verbalizer(text: str, label_names: Sequence[str]) -> Verbalizer:
    """``"terrible;great"`` (one entry per label, in label order; a label's alternatives joined by ``,``, e.g.
    ``"bad,awful;good"``) -> ``{label: words}``."""
    parts = [tuple(word.strip() for word in part.split(",")) for part in text.split(";")]
    if len(parts) != len(label_names) or not all(all(parts_) for parts_ in parts):
        raise SentcompError(f"config.zeroshot.verbalizers entry {text!r} must give non-blank word(s) for each of the "
                            f"{len(label_names)} labels {list(label_names)}, separated by ';' (alternatives by ','), "
                            "e.g. 'terrible;great'.")
    return dict(zip(label_names, parts))


# A scorer: (texts, the pass's first variant, words, its k-shot prefix) -> the WordScores of the words after the
# variant's template (score_words, or a cheaper equivalent).
Scorer = Callable[[Sequence[str], ZeroShotVariant, Sequence[str], str], WordScores]


@dataclasses.dataclass(frozen=True)
class ZeroShotPlan:
    """Which variants of a task to score and how their demonstrations are drawn.

    The variants (:meth:`variants`): template 0 with verbalizer 0 at ``k = 0`` (a table's zero-shot column) and
    at each k of ``shots`` (the scoring-rule table), and every template × verbalizer at each k of
    ``sensitivity_shots`` (the prompt-sensitivity table). Demonstrations (:meth:`demonstrations`): ``k`` seeded
    (``seed``), optionally class-balanced examples of a split's train set (never one of its test texts), each
    with its label's first word, joined by ``separator`` (:func:`sentcomp.data.text.demonstration_prefix`).

    For a user: ``plan = ZeroShotPlan.for_task(task, shots=(0, 4))``; ``records = plan.run(lm, task, [(train,
    test)])``; ``summarise_variants(records, plan.sensitivity_shots)`` (docs/zeroshot.md).
    """

    templates: tuple[str, ...]
    verbalizers: tuple[Verbalizer, ...]
    shots: tuple[int, ...] = (0,)
    sensitivity_shots: tuple[int, ...] = (0,)
    balanced: bool = True
    separator: str = "\n\n"
    seed: int = 0

    @classmethod
    def for_task(cls, task: Task, templates: Sequence[str] = (), verbalizers: Sequence[str] = (),
                 **options) -> ZeroShotPlan:
        """The plan of ``templates`` (prompts) and ``verbalizers`` (:func:`parse_verbalizer` strings), each
        defaulting to the task's own (:attr:`Task.prompt_templates`, :attr:`Task.label_verbalizers`: its prompt and
        label words first); ``options``: the other fields (``shots`` and ``sensitivity_shots`` any sequence of ints,
        stored as tuples)."""
        plan = cls(tuple(templates) or task.prompt_templates,
                   tuple(parse_verbalizer(v, task.label_names) for v in verbalizers) or task.label_verbalizers,
                   **options)
        return dataclasses.replace(plan, shots=tuple(plan.shots), sensitivity_shots=tuple(plan.sensitivity_shots))

    def variants(self) -> list[ZeroShotVariant]:
        """Every variant to score, ordered by ``(k, t, v)``."""
        chosen = {(0, 0, 0), *((k, 0, 0) for k in self.shots)}
        chosen |= {(k, t, v) for k in self.sensitivity_shots for t in range(len(self.templates))
                   for v in range(len(self.verbalizers))}
        return [ZeroShotVariant(k, t, v, self.templates[t], self.verbalizers[v]) for k, t, v in sorted(chosen)]

    def headline(self) -> ZeroShotVariant:
        """Template 0, verbalizer 0, ``k = 0``: the variant of a table's zero-shot column."""
        return ZeroShotVariant(0, 0, 0, self.templates[0], self.verbalizers[0])

    def sampling(self, k: int) -> tuple | None:
        """What, besides ``k``, decides the demonstrations (``None`` at ``k = 0``: there are none)."""
        return (self.balanced, self.separator, self.seed) if k else None

    def digest(self, variant: ZeroShotVariant) -> str:
        """A hash of the variant's content and its demonstrations' sampling settings: equal digests, equal scores."""
        return storage.content_hash(variant.template, variant.verbalizer, variant.k, self.sampling(variant.k))

    def demonstrations(self, variant: ZeroShotVariant, label_names: Sequence[str], train: Split,
                       test: Split) -> tuple[str, list[int]]:
        """The k-shot prefix of ``variant`` for one split and the train indices it shows (``("", [])`` at k = 0)."""
        if not variant.k:
            return "", []
        chosen = sample_demonstrations(train.texts, train.labels, variant.k, self.seed, self.balanced,
                                       exclude=test.texts)
        words = [variant.verbalizer[label_names[train.labels[i]]][0] for i in chosen]
        prefix = demonstration_prefix([train.texts[i] for i in chosen], words, variant.template, self.separator)
        return prefix, [int(i) for i in chosen]

    def check_demonstrations(self, pairs: Sequence[tuple[Split, Split]]) -> None:
        """Every k-shot context can be drawn from each split's train set (a balanced one needs ``k / C`` examples
        of every class); raises :class:`SentcompError` otherwise."""
        for k in sorted({variant.k for variant in self.variants() if variant.k}):
            for train, test in pairs:
                sample_demonstrations(train.texts, train.labels, k, self.seed, self.balanced, exclude=test.texts)

    @staticmethod
    def passes(todo: Sequence[tuple[ZeroShotVariant, int]]) -> list[list[tuple[ZeroShotVariant, int]]]:
        """``(variant, split)`` pairs grouped by model pass: one per template at ``k = 0`` (the union of its
        verbalizers' words over the unique test texts of its splits), one per variant and split at ``k > 0`` (the
        prefix depends on both)."""
        passes: dict[tuple, list[tuple[ZeroShotVariant, int]]] = {}
        for variant, r in todo:
            passes.setdefault((variant.t,) if not variant.k else (variant.t, variant.k, variant.v, r), []).append(
                (variant, r))
        return list(passes.values())

    def score(self, task: Task, pairs: Sequence[tuple[Split, Split]], todo: Sequence[tuple[ZeroShotVariant, int]],
              scorer: Scorer, ece_bins: int = statistics.DEFAULT_BINS) -> Iterator[tuple[ZeroShotVariant, int, dict]]:
        """``(variant, split, record)`` for each of ``todo`` (pairs of a variant and an index into ``pairs``), pass
        by pass (:meth:`passes`, each scored by ``scorer``); ``record``: the variant (:meth:`ZeroShotVariant.
        describe`), its ``demonstrations`` (train indices), ``prefix_chars``, and ``rules``: accuracy, ECE and
        Brier on the split's test set under every scoring rule (:func:`rule_scores`, :func:`evaluate_scores`)."""
        for members in self.passes(todo):
            first, first_split = members[0]
            repeats = list(dict.fromkeys(r for _, r in members))
            texts = list(dict.fromkeys(text for r in repeats for text in pairs[r][1].texts))
            words = list(dict.fromkeys(word for variant, _ in members
                                       for word in verbalizer_words(task.label_names, variant.verbalizer)[0]))
            prefix, chosen = self.demonstrations(first, task.label_names, *pairs[first_split])
            scores = scorer(texts, first, words, prefix)
            pool = {text: row for row, text in enumerate(texts)}
            for variant, r in members:
                variant_words, word_labels = verbalizer_words(task.label_names, variant.verbalizer)
                by_rule = rule_scores(scores.select(variant_words), word_labels, task.num_classes)
                test = pairs[r][1]
                rows = np.fromiter((pool[text] for text in test.texts), np.int64, len(test.texts))
                yield variant, r, {**variant.describe(), "demonstrations": chosen, "prefix_chars": len(prefix),
                                   "rules": {rule: evaluate_scores(scores_[rows], test.labels, ece_bins)
                                             for rule, scores_ in by_rule.items()}}

    def run(self, lm: LanguageModel, task: Task, pairs: Sequence[tuple[Split, Split]],
            ece_bins: int = statistics.DEFAULT_BINS, **options) -> list[dict]:
        """Every variant on every ``(train, test)`` pair: :meth:`score`'s records with ``row`` (the task's name)
        and ``repeat`` (the pair's index), ready for :func:`summarise_variants`; ``options`` as
        :func:`score_words`."""
        def scorer(texts, variant, words, prefix):
            return score_words(lm, texts, variant.template, words, prefix, **options)

        todo = [(variant, r) for variant in self.variants() for r in range(len(pairs))]
        return [{"row": task.name, "repeat": r, **record}
                for _, r, record in self.score(task, pairs, todo, scorer, ece_bins)]


def summarise_variants(records: Sequence[dict], sensitivity_shots: Sequence[int]) -> dict[str, list[dict]]:
    """``{"rules": [...], "sensitivity": [...]}`` from variant records (:meth:`ZeroShotPlan.score`'s, each with
    a ``row``).

    ``rules``: per row, k and rule, template 0 / verbalizer 0: accuracy (mean, std over splits; Wilson interval
    over the pooled test predictions), mean ECE and Brier. ``sensitivity``: per row, k of ``sensitivity_shots``
    and rule, the accuracy of each template × verbalizer (mean over splits) and their mean, min and max.
    """
    grouped: dict[tuple, list[dict]] = {}
    for record in records:
        grouped.setdefault((record["row"], record["k"], record["t"], record["v"]), []).append(record)
    rules, sensitivity = [], []
    for (row, k, t, v), group in grouped.items():
        if (t, v) != (0, 0):
            continue
        for rule in SCORING_RULES:
            values = [record["rules"][rule] for record in group]
            accuracies = [value["accuracy"] for value in values]
            trials = sum(value["n"] for value in values)
            low, high = statistics.wilson_interval(sum(value["accuracy"] * value["n"] for value in values), trials)
            rules.append({"row": row, "k": k, "rule": rule, "mean": float(np.mean(accuracies)),
                          "std": float(np.std(accuracies)), "n_splits": len(values), "low": low, "high": high,
                          "ece": float(np.mean([value["ece"] for value in values])),
                          "brier": float(np.mean([value["brier"] for value in values]))})
    for row, k in dict.fromkeys((row, k) for row, k, _, _ in grouped if k in sensitivity_shots):
        variants = {(t, v): group for (row_, k_, t, v), group in grouped.items() if (row_, k_) == (row, k)}
        for rule in SCORING_RULES:
            accuracy = {f"t{t}/v{v}": float(np.mean([record["rules"][rule]["accuracy"] for record in group]))
                        for (t, v), group in sorted(variants.items())}
            values = list(accuracy.values())
            sensitivity.append({"row": row, "k": k, "rule": rule, "mean": float(np.mean(values)),
                                "min": min(values), "max": max(values), "best": max(accuracy, key=accuracy.__getitem__),
                                "accuracies": accuracy})
    return {"rules": rules, "sensitivity": sensitivity}

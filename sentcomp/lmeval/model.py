"""sentcomp's JAX models as an lm-evaluation-harness backend: the model class registered as ``sentcomp``.

``SentcompLM(pretrained=<anything sentcomp.models.load takes>, dtype="float32"|"bfloat16", batch_size=32,
max_length=None, max_gen_toks=256)``; ``pretrained`` may also be a loaded :class:`LanguageModel`. Run it with
``python -m sentcomp.lmeval --model sentcomp --model_args pretrained=smollm2-135m --tasks ...`` (lm-eval's own
command line with this class registered) or ``lm_eval.simple_evaluate(model="sentcomp", ...)`` after
``import sentcomp.lmeval``. Commands and what is supported: docs/lmeval.md.

lm-eval's request conventions (read from lm-eval 0.4.13: ``TemplateLM`` and ``HFLM``), which this class
follows; the text → token step is lm-eval's own ``TemplateLM.loglikelihood``, which this class inherits:

- **context / continuation**: a context's trailing whitespace moves to the continuation; the continuation's
  tokens are those of ``tokenize(context + continuation)`` after ``tokenize(context)`` (``TemplateLM``);
- **BOS**: a string is tokenised with the tokenizer's own special tokens (a Llama-style BOS, none for GPT-2),
  unless it already starts with the prefix token's text; an empty context becomes the single prefix token (BOS,
  else EOS), unless the continuation already starts with it;
- **truncation**: the model reads ``(context + continuation)[-(max_length+1):][:-1]`` and scores the last
  ``len(continuation)`` positions: ``log p = Σ_i log p(c_i | tokens before c_i)``, and ``is_greedy`` says whether
  every ``c_i`` is the argmax next token;
- **rolling log-likelihood** (perplexity tasks): lm-eval's ``get_rolling_token_windows`` (windows of
  ``max_length`` tokens, each token predicted once, the first after the prefix token, the last window filled
  with as much context as fits) and ``make_disjoint_window``; a document's value is the sum over its windows;
- **generation**: greedy; the context is cut to its last ``max_length - max_gen_toks`` tokens, decoding stops
  at EOS, at ``max_gen_toks`` or once the text holds a stop sequence (``until`` plus the EOS text), and the text is
  cut at the first stop sequence (lm-eval's ``postprocess_generated_text``). No key/value cache: each new token
  re-runs the model on the whole sequence (cost O(new tokens × length) forward passes of growing length).

Batching: requests whose model input and scored positions coincide (a context's choices that differ only in
their last token: one-token answers) are one row, scored in one forward pass. Rows are sorted by length and
batched with :mod:`sentcomp.zeroshot`'s fixed-shape arrays (lengths padded to :func:`length_buckets`), split over
this process's devices (:func:`sentcomp.parallel.apply_to_batch`); log Z is streamed over the vocabulary.

Several processes (JAX's multi-process runtime, :func:`sentcomp.parallel.initialize_distributed` first): the
class reports ``rank = jax.process_index()`` and ``world_size = jax.process_count()``, so lm-eval gives each
process its share of the documents; each scores them on its own devices, and process 0 gathers the samples and
metrics (``gather_object``, ``all_gather`` through JAX's collectives) and alone gets the results.
"""

from __future__ import annotations

import functools
import pickle
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm.auto import tqdm

from sentcomp import kernels, parallel
from sentcomp.data.text import length_buckets, pad_id
from sentcomp.errors import SentcompError
from sentcomp.kernels.softmax_features import DEFAULT_VOCAB_CHUNK
from sentcomp.models.base import COMPUTE_DTYPES, LanguageModel, cast_floats
from sentcomp.zeroshot import ScoringRow, scoring_arrays

GREEDY_BLOCK = 64  # scored positions whose full logits are formed at once for the argmax (memory: block × V)


def _scores_and_greedy(hidden_fn, phi_fn, chunk_size, params, ids, mask, positions, targets, valid):
    """``(Σ_l log p(targets[b,k,l] | ids[b, :positions[b,k,l]+1]), all_l targets[b,k,l] == argmax)``: ``[B, K]``
    each, summed / all-ed over the valid ``l``. log p streams log Z over the vocabulary; the argmax forms the
    logits of :data:`GREEDY_BLOCK` positions at a time."""
    hidden = hidden_fn(params, ids, mask)  # [B, T, d]
    batch, words, length = positions.shape
    picked = jnp.take_along_axis(hidden, positions.reshape(batch, words * length, 1), axis=1)
    picked = picked.reshape(batch, words, length, hidden.shape[-1]).astype(jnp.float32)
    phi = phi_fn(params).astype(jnp.float32)
    log_probs = -kernels.xent_per_position(picked, phi, targets, chunk_size)
    best = jax.lax.map(lambda h: jnp.argmax(jnp.dot(phi, h, precision="highest")),
                       picked.reshape(-1, picked.shape[-1]), batch_size=GREEDY_BLOCK).reshape(targets.shape)
    return (jnp.sum(jnp.where(valid, log_probs, 0.0), axis=-1),
            jnp.all(jnp.where(valid, best == targets, True), axis=-1))


def _next_tokens(hidden_fn, phi_fn, params, ids, mask, last):
    """The argmax next token after position ``last[b]`` of each row: ``[B]``."""
    hidden = hidden_fn(params, ids, mask)
    h = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0].astype(jnp.float32)
    return jnp.argmax(jnp.dot(h, phi_fn(params).astype(jnp.float32).T, precision="highest"), axis=-1)


@functools.lru_cache(maxsize=8)
def _jitted(function, hidden_fn, phi_fn, *static):
    return jax.jit(functools.partial(function, hidden_fn, phi_fn, *static))


def score_rows(rows: Sequence[ScoringRow], n_scores: int, lm: LanguageModel, params, mesh, batch_size: int,
               progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Log-probabilities ``[n_scores]`` and greedy flags of every target of ``rows`` (``row.words[k]`` is the
    index of the score its ``row.targets[k]`` gives), batched by length over ``mesh``."""
    rows = sorted(rows, key=lambda row: len(row.input_ids))
    max_words = max(len(row.words) for row in rows)
    max_tokens = max(len(target) for row in rows for target in row.targets)
    buckets = length_buckets(lm.max_length)
    scorer = _jitted(_scores_and_greedy, lm.hidden_fn, lm.phi_fn, DEFAULT_VOCAB_CHUNK)
    log_probs, greedy = np.full(n_scores, np.nan), np.zeros(n_scores, bool)
    for first in tqdm(range(0, len(rows), batch_size), desc="sentcomp loglikelihood", disable=not progress):
        batch = rows[first: first + batch_size]
        length = next(bucket for bucket in buckets if bucket >= max(len(row.input_ids) for row in batch))
        arrays = scoring_arrays(batch, batch_size, length, max_words, max_tokens)
        batch_scores, batch_greedy = parallel.apply_to_batch(scorer, arrays, mesh, params)
        for row, values, flags in zip(batch, batch_scores, batch_greedy):
            log_probs[list(row.words)] = values[: len(row.words)]
            greedy[list(row.words)] = flags[: len(row.words)]
    return log_probs, greedy


def request_rows(pairs: Sequence[tuple[Sequence[int], Sequence[int]]], max_length: int) -> list[ScoringRow]:
    """One row per distinct (model input, first scored position) of the ``(context, continuation)`` token pairs:
    the input is ``(context + continuation)[-(max_length+1):][:-1]`` and the continuation is scored at its last
    ``len(continuation)`` positions (lm-eval's causal truncation)."""
    groups: dict[tuple[tuple[int, ...], int], list[int]] = {}
    for index, (context, continuation) in enumerate(pairs):
        if not continuation or len(continuation) > max_length:
            raise SentcompError(f"Request {index}: a continuation of {len(continuation)} tokens; lm-eval scores "
                                f"1 to max_length ({max_length}) tokens.")
        model_input = tuple(int(t) for t in (list(context) + list(continuation))[-(max_length + 1):][:-1])
        groups.setdefault((model_input, len(model_input) - len(continuation)), []).append(index)
    return [ScoringRow(group, model_input, start, tuple(members),
                       tuple(tuple(int(t) for t in pairs[i][1]) for i in members))
            for group, ((model_input, start), members) in enumerate(groups.items())]


def _batch_size(value) -> int:
    """lm-eval's ``batch_size`` argument as a positive int (this backend does not search for one: no ``auto``)."""
    try:
        size = int(value)
    except (TypeError, ValueError):
        raise SentcompError(f"batch_size must be a positive integer for the sentcomp backend (got {value!r}; "
                            "'auto' is not supported): it is rounded up to a multiple of the device count.") from None
    if size < 1:
        raise SentcompError(f"batch_size must be a positive integer, got {value!r}.")
    return size


@register_model("sentcomp")
class SentcompLM(TemplateLM):
    """A sentcomp :class:`LanguageModel` (any causal family) behind lm-eval's model interface (module docstring).

    ``device`` and ``max_batch_size`` (which lm-eval's command line always passes) are ignored: JAX runs on its
    default platform (``JAX_PLATFORMS``) over every device of this process, and the batch size is fixed."""

    def __init__(self, pretrained: str | LanguageModel, dtype: str = "float32", batch_size=32,
                 max_length: int | None = None, max_gen_toks: int = 256, max_batch_size=None, device=None,
                 progress: bool = True, **unknown):
        super().__init__()
        if unknown:
            raise SentcompError(f"Unknown sentcomp model_args {sorted(unknown)}; known: pretrained, dtype, "
                                "batch_size, max_length, max_gen_toks, progress.")
        if dtype == "auto":
            dtype = "float32"
        if dtype not in COMPUTE_DTYPES:
            raise SentcompError(f"dtype must be one of {sorted(COMPUTE_DTYPES)} (or auto = float32), got {dtype!r}.")
        if isinstance(pretrained, LanguageModel):
            self.lm = pretrained
        else:
            from sentcomp.models import causal_families, load

            self.lm = load(str(pretrained))
            if self.lm.family not in causal_families():
                raise SentcompError(f"{pretrained}: a {self.lm.family!r} model is not a causal LM; lm-eval's "
                                    f"requests need one of {list(causal_families())}.")
        self.tokenizer = self.lm.tokenizer
        self.dtype = dtype
        self._max_length = min(int(max_length or self.lm.max_length), self.lm.max_length)
        self._max_gen_toks = int(max_gen_toks)
        self.mesh = parallel.data_mesh(jax.local_devices())  # lm-eval gives each process its own documents
        self.batch_size = parallel.pad_to_multiple(_batch_size(batch_size), self.mesh.size)
        self.params = parallel.replicate(cast_floats(self.lm.params, COMPUTE_DTYPES[dtype]), self.mesh)
        self.progress = bool(progress)
        self._rank, self._world_size = jax.process_index(), jax.process_count()

    # ------------------------------------------------------------------ tokens (lm-eval's conventions)

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        """What an empty context becomes: BOS if the tokenizer has one, else EOS (as lm-eval's HF backend)."""
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def tokenizer_name(self) -> str:
        return str(self.tokenizer.name_or_path).replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """Token ids of ``string``: with the tokenizer's own special tokens unless ``add_special_tokens`` is False
        or (left unset) the string already starts with the prefix token's text."""
        if add_special_tokens is None:
            add_special_tokens = not string.startswith(self.tokenizer.decode([self.prefix_token_id]))
        return list(self.tokenizer.encode(string, add_special_tokens=add_special_tokens))

    # ------------------------------------------------------------------ requests

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """``(Σ log p(continuation | context), is_greedy)`` for lm-eval's ``((context, continuation), context
        tokens, continuation tokens)`` requests."""
        if not requests:
            return []
        pairs = [(context, continuation) for _, context, continuation in requests]
        log_probs, greedy = score_rows(request_rows(pairs, self.max_length), len(pairs), self.lm, self.params,
                                       self.mesh, self.batch_size, self.progress and not disable_tqdm)
        results = [(float(value), bool(flag)) for value, flag in zip(log_probs, greedy)]
        for (strings, _, _), result in zip(requests, results):
            if strings is not None:
                self.cache_hook.add_partial("loglikelihood", strings, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each string's log-likelihood, summed over lm-eval's rolling windows (module docstring)."""
        windows, owners = [], []
        for index, (string,) in enumerate(request.args for request in requests):
            tokens = self.tok_encode(string)
            for window in get_rolling_token_windows(tokens, self.prefix_token_id, self.max_length, context_len=1):
                windows.append((None, *make_disjoint_window(window)))
                owners.append(index)
        totals = np.zeros(len(requests))
        np.add.at(totals, np.asarray(owners, np.int64),
                  [value for value, _ in self._loglikelihood_tokens(windows, disable_tqdm)])
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, float(total))
        return [float(total) for total in totals]

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuations (module docstring), requests with the same generation arguments decoded together."""
        groups: dict[str, list[int]] = {}
        for index, request in enumerate(requests):
            groups.setdefault(repr(sorted(request.args[1].items())), []).append(index)
        results: list[str] = [""] * len(requests)
        for members in groups.values():
            contexts = [requests[i].args[0] for i in members]
            for i, text in zip(members, self._greedy(contexts, requests[members[0]].args[1])):
                results[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return results

    def _greedy(self, contexts: Sequence[str], gen_kwargs: dict) -> list[str]:
        kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
        if kwargs.get("do_sample") or kwargs.get("temperature", 0.0) > 0:
            raise NotImplementedError(f"The sentcomp backend decodes greedily only (do_sample=False, temperature=0); "
                                      f"the task asks for {gen_kwargs}.")
        stops = handle_stop_sequences(kwargs["until"], eos=self.tokenizer.decode([self.eot_token_id]))
        max_new = int(kwargs["max_gen_toks"])
        if max_new >= self.max_length:
            raise SentcompError(f"max_gen_toks ({max_new}) must be less than the model's max_length "
                                f"({self.max_length}).")
        sequences = [self.tok_encode(context)[-(self.max_length - max_new):] for context in contexts]
        starts = [len(tokens) for tokens in sequences]
        active = list(range(len(sequences)))
        step = _jitted(_next_tokens, self.lm.hidden_fn, self.lm.phi_fn)
        buckets, padding = length_buckets(self.max_length), pad_id(self.tokenizer)
        for _ in range(max_new):
            if not active:
                break
            for first in range(0, len(active), self.batch_size):
                batch = active[first: first + self.batch_size]
                length = next(b for b in buckets if b >= max(len(sequences[i]) for i in batch))
                ids = np.full((self.batch_size, length), padding, np.int32)
                mask = np.zeros((self.batch_size, length), np.int32)
                last = np.zeros(self.batch_size, np.int32)
                for row, i in enumerate(batch + [batch[0]] * (self.batch_size - len(batch))):
                    ids[row, : len(sequences[i])], mask[row, : len(sequences[i])] = sequences[i], 1
                    last[row] = len(sequences[i]) - 1
                tokens = parallel.apply_to_batch(step, (ids, mask, last), self.mesh, self.params)
                for row, i in enumerate(batch):
                    sequences[i].append(int(tokens[row]))
            active = [i for i in active if not self._finished(sequences[i][starts[i]:], stops)]
        return [postprocess_generated_text(self.tokenizer.decode(tokens[start:], skip_special_tokens=True), stops,
                                           None) for tokens, start in zip(sequences, starts)]

    def _finished(self, generated: list[int], stops: Sequence[str]) -> bool:
        """Whether decoding stops: EOS was generated, or the text holds a stop sequence."""
        if generated[-1] == self.eot_token_id:
            return True
        text = self.tokenizer.decode(generated, skip_special_tokens=False)
        return any(stop and stop in text for stop in stops)

    # ------------------------------------------------------------------ several processes (lm-eval's hooks)

    def all_gather(self, tensor):
        """Every process's ``tensor`` (a torch tensor) on every process: concatenated along its first axis, or stacked
        into ``[processes]`` for a scalar (what lm-eval's evaluator gathers: each rank's request count)."""
        if self.world_size == 1:
            return tensor
        import torch

        local = tensor.detach().cpu().numpy()
        return torch.as_tensor(np.asarray(multihost_utils.process_allgather(local, tiled=local.ndim > 0)))

    def gather_object(self, obj, dst: int = 0):
        """Every process's ``obj`` as a list on process ``dst`` (None on the others), pickled through JAX."""
        if self.world_size == 1:
            return [obj]
        payload = np.frombuffer(pickle.dumps(obj), np.uint8)
        sizes = np.asarray(multihost_utils.process_allgather(np.int64(len(payload)))).reshape(-1)
        padded = np.zeros(int(sizes.max()), np.uint8)
        padded[: len(payload)] = payload
        buffers = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(sizes), -1)
        if self.rank != dst:
            return None
        return [pickle.loads(buffer[:size].tobytes()) for buffer, size in zip(buffers, sizes)]

    def barrier(self) -> None:
        parallel.sync("sentcomp.lmeval barrier")

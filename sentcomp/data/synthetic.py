"""A synthetic "natural language" whose true next-word distribution ``p*(.|s)`` is computable exactly.

Why: for real text p* is unknown, so nobody can check the paper's guarantee (ε-optimal LM ⇒ downstream loss
≤ τ + sqrt(2B²ε/γ)) end to end. Here every quantity of ../shared/PAPER.md is exact: ε, τ, B and γ.

The generative model (a hidden Markov model whose emissions depend on a document label):

    y ~ prior                                  document label, K = num_labels values
    z_1 ~ initial,  z_{t+1} ~ transition[z_t]  hidden states (num_states of them), shared by all labels
    x_t ~ emission[y, z_t]                     body words, t = 1..L (L = body_length)
    x_{L+1} = PROMPT                           deterministic prompt token ("This movie is")
    x_{L+2} ~ answer[y]                        the label's own answer word with prob 1 − answer_noise,
                                               each other label's answer word with prob answer_noise/(K−1)

Vocabulary layout (``vocab_size = num_body_words + K + 1``)::

    0 .. num_body_words−1     body words
    num_body_words + k         the answer word of label k
    vocab_size − 1             the prompt token

A document is ``L + 2`` tokens. Its pretraining contexts are its ``L + 1`` prefixes ``x_{1:t}`` (t = 1..L+1),
each followed by the next word ``x_{t+1}``. The downstream task is "predict y from s = body + prompt", i.e. the
context ``x_{1:L+1}``; completing the sentence (the next word after the prompt) reveals y noisily, so the task is
natural by construction: ``p*(answer_k | s) = Σ_y p(y|s) q(answer_k|y)`` is linear in the label posterior.

Exact p*: for each label y the forward algorithm (in log space, normalised filtering) gives
``log p(x_{1:t} | y)`` and ``p(x_{t+1} = w | x_{1:t}, y)``; then

    p(y | x_{1:t}) ∝ prior(y) p(x_{1:t} | y),      p*(w | x_{1:t}) = Σ_y p(y | x_{1:t}) p(w | x_{1:t}, y).

Coverage (closed form): p_L picks a document and a uniformly random one of its L+1 contexts, so a context of
length t has ``p_L(s) = p(s)/(L+1)`` where ``p(s)`` is the prefix probability under the model. Task contexts are
exactly the prefixes of length L+1 (only they end with the prompt) and ``p_T(s) = p(s)``. Hence
``γ = inf_s p_L(s)/p_T(s) = 1/(L+1)`` (:func:`task_coverage`; ``theory.coverage`` recovers it numerically).

Sampling is vectorised (``vmap`` over documents, ``lax.scan`` over time) and jitted.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from sentcomp.errors import SentcompError


@struct.dataclass
class SyntheticLanguage:
    """Parameters of the HMM-with-label language (a pytree; sizes are static fields).

    Attributes:
      log_prior: ``[K]`` log p(y).
      log_initial: ``[H]`` log p(z_1).
      log_transition: ``[H, H]`` log p(z_{t+1} | z_t) (rows sum to one).
      log_emission: ``[K, H, V]`` log p(x_t | y, z_t); ``-inf`` outside the body words.
      log_answer: ``[K, V]`` log p(x_{L+2} | y); ``-inf`` outside the answer words.
      body_length: L, body words per document.
    """

    log_prior: jax.Array
    log_initial: jax.Array
    log_transition: jax.Array
    log_emission: jax.Array
    log_answer: jax.Array
    body_length: int = struct.field(pytree_node=False)

    @property
    def num_labels(self) -> int:
        return self.log_prior.shape[0]

    @property
    def num_states(self) -> int:
        return self.log_initial.shape[0]

    @property
    def vocab_size(self) -> int:
        return self.log_answer.shape[1]

    @property
    def num_body_words(self) -> int:
        return self.vocab_size - self.num_labels - 1

    @property
    def prompt_id(self) -> int:
        return self.vocab_size - 1

    @property
    def answer_ids(self) -> np.ndarray:
        """Token id of each label's answer word, ``[K]``."""
        return np.arange(self.num_labels) + self.num_body_words

    @property
    def document_length(self) -> int:
        """Tokens per document: L body words, the prompt, the answer."""
        return self.body_length + 2

    @property
    def num_contexts(self) -> int:
        """Pretraining contexts per document: the prefixes x_{1:t}, t = 1..L+1."""
        return self.body_length + 1


def make_language(
    seed: int,
    *,
    vocab_size: int = 64,
    num_states: int = 8,
    num_labels: int = 2,
    body_length: int = 8,
    answer_noise: float = 0.1,
    label_signal: float = 0.5,
    emission_scale: float = 2.0,
    transition_scale: float = 2.0,
) -> SyntheticLanguage:
    """Draws a language from ``seed`` and its sizes.

    Emission logits are ``emission_scale·g[z, w] + label_signal·u[y, w]`` with g, u standard normal: each hidden
    state has its own word preferences, and the label tilts every state's words the same way (``label_signal``
    sets how much a body reveals y; 0 makes the body useless). Transition logits are
    ``transition_scale·N(0, 1)``; the label prior is uniform. The defaults give a task of middling difficulty:
    with seed 0 the exact Bayes posterior p(y|s) reaches ~79% accuracy (logistic loss ~0.46) after 8 words.
    """
    num_body_words = vocab_size - num_labels - 1
    if num_labels < 2 or num_body_words < 1 or num_states < 1 or body_length < 1:
        raise SentcompError(
            f"Synthetic language sizes must satisfy num_labels ≥ 2, num_states ≥ 1, body_length ≥ 1 and "
            f"vocab_size ≥ num_labels + 2 (got vocab_size={vocab_size}, num_labels={num_labels}, "
            f"num_states={num_states}, body_length={body_length})."
        )
    if not 0.0 <= answer_noise < 1.0:
        raise SentcompError(f"answer_noise must be in [0, 1), got {answer_noise}.")
    k_init, k_trans, k_state_words, k_label_words = jax.random.split(jax.random.key(seed), 4)
    log_initial = jax.nn.log_softmax(jax.random.normal(k_init, (num_states,)))
    log_transition = jax.nn.log_softmax(transition_scale * jax.random.normal(k_trans, (num_states, num_states)))
    body_logits = emission_scale * jax.random.normal(k_state_words, (1, num_states, num_body_words)) + (
        label_signal * jax.random.normal(k_label_words, (num_labels, 1, num_body_words))
    )
    log_body = jax.nn.log_softmax(body_logits, axis=-1)
    log_emission = jnp.concatenate(
        [log_body, jnp.full((num_labels, num_states, num_labels + 1), -jnp.inf)], axis=-1
    )
    answer_probs = np.full((num_labels, num_labels), answer_noise / (num_labels - 1))
    np.fill_diagonal(answer_probs, 1.0 - answer_noise)
    with np.errstate(divide="ignore"):
        log_answer_words = np.log(answer_probs)
    log_answer = jnp.concatenate(
        [
            jnp.full((num_labels, num_body_words), -jnp.inf),
            jnp.asarray(log_answer_words, jnp.float32),
            jnp.full((num_labels, 1), -jnp.inf),
        ],
        axis=-1,
    )
    return SyntheticLanguage(
        log_prior=jnp.full((num_labels,), -np.log(num_labels), jnp.float32),
        log_initial=log_initial,
        log_transition=log_transition,
        log_emission=log_emission,
        log_answer=log_answer,
        body_length=body_length,
    )


def _sample_document(language: SyntheticLanguage, key: jax.Array) -> tuple[jax.Array, jax.Array]:
    k_label, k_state, k_body, k_answer = jax.random.split(key, 4)
    label = jax.random.categorical(k_label, language.log_prior)
    first_state = jax.random.categorical(k_state, language.log_initial)

    def step(state, step_key):
        k_word, k_next = jax.random.split(step_key)
        word = jax.random.categorical(k_word, language.log_emission[label, state])
        return jax.random.categorical(k_next, language.log_transition[state]), word

    _, body = jax.lax.scan(step, first_state, jax.random.split(k_body, language.body_length))
    answer = jax.random.categorical(k_answer, language.log_answer[label])
    tokens = jnp.concatenate([body, jnp.array([language.prompt_id]), answer[None]]).astype(jnp.int32)
    return tokens, label.astype(jnp.int32)


@functools.partial(jax.jit, static_argnums=2)
def sample_documents(language: SyntheticLanguage, key: jax.Array, num_documents: int):
    """``num_documents`` documents: ``tokens [N, L+2]`` (int32) and their labels ``[N]``."""
    return jax.vmap(_sample_document, in_axes=(None, 0))(language, jax.random.split(key, num_documents))


class Truth(NamedTuple):
    """Exact quantities for the contexts ``x_{1:t}``, t = 1..L+1, of a batch of documents.

    Attributes:
      log_next: ``[N, L+1, V]`` log p*(w | x_{1:t}) (``-inf`` for impossible words).
      log_prefix: ``[N, L+1]`` log p(x_{1:t}), the marginal probability of the prefix.
      log_label_posterior: ``[N, L+1, K]`` log p(y | x_{1:t}).
    """

    log_next: jax.Array
    log_prefix: jax.Array
    log_label_posterior: jax.Array


def _forward_one_label(language: SyntheticLanguage, label: jax.Array, body: jax.Array):
    """Forward algorithm for one document body and one label y.

    Carries the predictive state distribution ``log p(z_t | x_{<t}, y)`` and ``log p(x_{<t} | y)``. Returns, for
    t = 1..L, ``log p(x_{1:t} | y)`` ``[L]`` and the body-word prediction ``log p(x_{t+1} = w | x_{1:t}, y)``
    ``[L, V]`` (at t = L the true next word is the prompt; that row is replaced by the caller).
    """
    log_emission = language.log_emission[label]  # [H, V]

    def step(carry, word):
        log_state, log_likelihood = carry
        log_joint = log_state + log_emission[:, word]
        log_word = jax.nn.logsumexp(log_joint)
        log_filtered = log_joint - log_word
        log_next_state = jax.nn.logsumexp(log_filtered[:, None] + language.log_transition, axis=0)
        log_next_word = jax.nn.logsumexp(log_next_state[:, None] + log_emission, axis=0)
        log_likelihood = log_likelihood + log_word
        return (log_next_state, log_likelihood), (log_likelihood, log_next_word)

    _, (log_likelihood, log_next_word) = jax.lax.scan(step, (language.log_initial, jnp.float32(0.0)), body)
    return log_likelihood, log_next_word


def _truth_one_document(language: SyntheticLanguage, tokens: jax.Array) -> Truth:
    length = language.body_length
    labels = jnp.arange(language.num_labels)
    log_likelihood, log_next_body = jax.vmap(_forward_one_label, in_axes=(None, 0, None))(
        language, labels, tokens[:length]
    )  # [K, L], [K, L, V]
    prompt_row = jnp.where(jnp.arange(language.vocab_size) == language.prompt_id, 0.0, -jnp.inf)
    log_next_given_label = jnp.concatenate(
        [
            log_next_body[:, :-1],
            jnp.broadcast_to(prompt_row, (language.num_labels, 1, language.vocab_size)),
            language.log_answer[:, None, :],
        ],
        axis=1,
    )  # [K, L+1, V]: after x_{1:L} comes the prompt, after the prompt the answer
    log_likelihood = jnp.concatenate([log_likelihood, log_likelihood[:, -1:]], axis=1)  # the prompt is certain
    log_joint = language.log_prior[:, None] + log_likelihood  # [K, L+1]
    log_prefix = jax.nn.logsumexp(log_joint, axis=0)
    log_posterior = log_joint - log_prefix
    log_next = jax.nn.logsumexp(log_posterior[:, :, None] + log_next_given_label, axis=0)
    return Truth(log_next=log_next, log_prefix=log_prefix, log_label_posterior=log_posterior.T)


@jax.jit
def exact_next_word(language: SyntheticLanguage, tokens: jax.Array) -> Truth:
    """Exact ``log p*(.|x_{1:t})`` (and prefix/label posteriors) for every context t = 1..L+1 of each document.

    ``tokens`` is ``[N, T]`` with ``T ≥ L+1`` (whole documents, or their contexts); only the first L+1 tokens
    are read, and the body must be the language's own (the prompt at position L+1 is assumed, not checked).
    """
    if tokens.ndim != 2 or tokens.shape[1] < language.num_contexts:
        raise SentcompError(
            f"exact_next_word needs documents of shape [N, ≥{language.num_contexts}] (L body words + prompt), "
            f"got {tokens.shape}."
        )
    return jax.vmap(_truth_one_document, in_axes=(None, 0))(language, tokens)


def task_coverage(language: SyntheticLanguage) -> float:
    """γ = inf_s p_L(s)/p_T(s) = 1/(L+1) for this construction (derivation in the module docstring)."""
    return 1.0 / language.num_contexts


class TaskData(NamedTuple):
    """The downstream task "predict y from s = body + prompt".

    Attributes:
      documents: ``[N, L+2]`` whole documents (the task context is ``documents[:, :L+1]``).
      labels: ``[N]`` int32 labels y.
      truth: exact quantities for every prefix of the documents (``Truth``; task rows at index ``L``).
    """

    documents: jax.Array
    labels: jax.Array
    truth: Truth

    @property
    def contexts(self) -> jax.Array:
        """Task contexts s = body + prompt, ``[N, L+1]``."""
        return self.documents[:, :-1]

    @property
    def log_p_star(self) -> jax.Array:
        """Exact ``log p*(.|s)`` at the task contexts, ``[N, V]``."""
        return self.truth.log_next[:, -1]


def task_dataset(language: SyntheticLanguage, key: jax.Array, num_documents: int) -> TaskData:
    """Samples documents and computes the exact truth for every prefix (the task context is the last one).

    The same documents serve both distributions: all their prefixes are samples of p_L (uniform position ×
    document), their last contexts are samples of p_T.
    """
    documents, labels = sample_documents(language, key, num_documents)
    return TaskData(documents=documents, labels=labels, truth=exact_next_word(language, documents))


def synthetic_tokenizer(language: SyntheticLanguage):
    """A word-level tokenizer naming the language's tokens (``w0``.., ``answer0``.., ``<prompt>``), so the model
    carries a tokenizer of exactly its vocabulary; the experiment itself feeds token ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    names = ([f"w{i}" for i in range(language.num_body_words)] + [f"answer{k}" for k in range(language.num_labels)]
             + ["<prompt>"])
    tokenizer = Tokenizer(models.WordLevel({name: i for i, name in enumerate(names)}, unk_token="<prompt>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer)

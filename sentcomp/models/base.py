"""The one view of a language model the rest of sentcomp uses: pure functions over a parameter pytree."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sentcomp.errors import SentcompError

HiddenFn = Callable[[Any, jax.Array, jax.Array], jax.Array]
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}  # what a model may run in


def cast_floats(tree, dtype):
    """The pytree with every floating-point leaf cast to ``dtype`` (integer leaves untouched)."""
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


@dataclasses.dataclass(frozen=True, eq=False)
class LanguageModel:
    """A loaded LM.

    Attributes:
      name: where it came from (hub name, directory or file); part of every cache key.
      family: architecture family, e.g. ``"gpt2"`` or ``"llama"``.
      config: the family's config object (hyperparameters).
      params: parameter pytree.
      hidden_fn: pure ``hidden_fn(params, token_ids [B, T], attention_mask [B, T]) -> [B, T, d]``: the features
        f(s) at every position (final-norm output, or the Quad model's extra linear layer's output).
      phi_fn: pure ``phi_fn(params) -> [V, d]``, the output word embeddings Φ (rows φ_w).
      tokenizer: a Hugging Face tokenizer (``tokenizers``/``transformers`` fast tokenizer).
      max_length: the longest sequence the model accepts.
      prefill_fn, continue_fn: a key/value cache, for families that have one (the rotary decoders; None
        otherwise): ``prefill_fn(params, token_ids, attention_mask) -> (hidden, cache)`` reads a sequence and
        keeps its keys/values; ``continue_fn(params, cache, token_ids, attention_mask) -> [B, T, d]`` gives the
        features of tokens continuing it, as ``hidden_fn`` over the whole sequence would
        (:class:`sentcomp.models.layers.KVCache`).
    """

    name: str
    family: str
    config: Any
    params: Any
    hidden_fn: HiddenFn
    phi_fn: Callable[[Any], jax.Array]
    tokenizer: Any
    max_length: int
    prefill_fn: Callable | None = None
    continue_fn: Callable | None = None

    @property
    def phi(self) -> jax.Array:
        """Output word embeddings Φ, ``[V, d]``."""
        return self.phi_fn(self.params)

    @functools.cached_property
    def fingerprint(self) -> str:
        """A hash of the model's name, family, config and every parameter value (so retrained weights miss a
        cache). Computed once per object (~1 s for SmolLM2-135M's 0.5 GB, which every feature-cache lookup
        needs): parameters are never changed in place; new weights make a new model (:meth:`replace`)."""
        digest = hashlib.sha256(json.dumps([self.name, self.family, repr(self.config)]).encode())
        for path, leaf in jax.tree_util.tree_flatten_with_path(self.params)[0]:
            array = np.asarray(jax.device_get(leaf))
            digest.update(jax.tree_util.keystr(path).encode() + str(array.dtype).encode() + array.tobytes())
        return digest.hexdigest()[:20]

    @functools.cached_property
    def _jitted_hidden(self) -> HiddenFn:
        return jax.jit(self.hidden_fn)

    def hidden(self, token_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
        """Features f(s) at every position, ``[B, T, d]`` (jitted)."""
        return self._jitted_hidden(self.params, token_ids, attention_mask)

    def replace(self, **changes) -> LanguageModel:
        """A copy with some fields changed (e.g. new ``params`` after training)."""
        return dataclasses.replace(self, **changes)

    @property
    def phi_param(self) -> str:
        """The top-level parameter holding Φ (the one to freeze to keep Φ fixed), in any family: the key whose
        leaves include the very array ``phi_fn`` returns (e.g. GPT-2's ``phi``, a decoder's ``lm_head``, or the
        input embeddings of a tied model, which are then frozen too)."""
        phi = self.phi_fn(self.params)
        for key, value in self.params.items():
            if any(leaf is phi for leaf in jax.tree.leaves(value)):
                return key
        raise SentcompError(f"{self.name}: Φ is computed from the parameters, not stored in one of them "
                            f"({sorted(self.params)}), so it cannot be frozen on its own.")


@dataclasses.dataclass(frozen=True)
class FamilyFacts:
    """What code outside a model family needs to know about its parameters and shape, declared once by the family
    module (its ``FACTS``) and read through :func:`sentcomp.models.facts`, so that no other module keys on family
    names: adding a family touches only its own module and the registry (``sentcomp.models.FAMILIES``).

    Attributes:
      input_embedding: the top-level parameter holding the token embeddings ``params[key]["embedding"]`` ``[V, d]``
        (also Φ when the family ties them).
      lookups: every top-level parameter that is an input lookup (a gather, no FLOPs: token, position, token-type
        embeddings), ``input_embedding`` among them.
      attention_shape: ``config -> (n_layer, d_attn)``, the layer count and attention width (heads × head size)
        of the FLOPs formula (:mod:`sentcomp.training.throughput`).
      untied_phi: the top-level parameter of an untied Φ ``[V, d]``; None if the family never unties it.
      output_head: top-level parameters only the output projection uses (BERT's MLM transform), left out of the
        FLOPs of training that computes no word logits.
      untie: ``lm -> lm`` with Φ untied from the input embeddings (a copy of them, so outputs do not change);
        None: the family cannot untie.
      pretrain_config: ``(config.model, vocab_size) -> dict``: pretraining's ``config.model`` (``n_embd``,
        ``n_layer``, ``n_head``, ``n_positions``, ``tie_word_embeddings`` and the family's own keys) as the
        family's Hugging Face ``config.json`` keys, for :func:`sentcomp.models.init`; None: no random models.
      causal: a next-token LM (False: a masked-LM encoder, which pretraining, the auxiliary LM loss of
        fine-tuning and zero-shot scoring refuse).
      special_tokens: classification inputs are wrapped in the tokenizer's special tokens (``[CLS] text [SEP]``).
    """

    input_embedding: str
    lookups: tuple[str, ...]
    attention_shape: Callable[[Any], tuple[int, int]]
    untied_phi: str | None = None
    output_head: tuple[str, ...] = ()
    untie: Callable[[LanguageModel], LanguageModel] | None = None
    pretrain_config: Callable[[Any, int], dict[str, Any]] | None = None
    causal: bool = True
    special_tokens: bool = False

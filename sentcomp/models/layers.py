"""The shared transformer pieces, written once: what the GPT-2 and BERT families (``sentcomp.models.gpt2``,
``bert``) and the rotary decoder families (:mod:`sentcomp.models.decoder`: Llama, Qwen2, Mistral, GPT-NeoX,
Gemma) build their networks and their :class:`LanguageModel` views from.

- Config checks: :func:`check_config` (heads split the width, a known activation from :data:`ACTIVATIONS`).
- Layers: :func:`layer_norm` (torch's LayerNorm, exactly), :class:`RMSNorm` (``g ⊙ x/rms(x)``, or Gemma's
  ``(1 + g) ⊙ x/rms(x)``), :func:`dense` (Dense with an N(0, σ²) kernel).
- Attention: :func:`positions` (rotary/learned positions count the real tokens), :func:`visible_keys` (which keys
  a query may see: padding, causality, a sliding window), :func:`rotary_cos_sin` + :func:`apply_rotary` (rotary
  position embeddings, full or partial), :func:`attend` (softmax over the visible keys in float32, times the values
  in their dtype; grouped-query attention when there are fewer value heads than score heads),
  :func:`self_attention`, the whole of it from queries, keys and values by one of :data:`ATTENTION`
  implementations (``jax.nn.dot_product_attention`` on XLA or cuDNN, or query chunks whose memory grows as T, not
  T²), and :class:`KVCache` + :func:`attend_continuation`: tokens continuing a prefix whose keys/values are kept.
- The layer stack: :func:`layer_stack` (one ``nn.scan`` over layer-stacked parameters, compiled once or unrolled,
  with an optional rematerialisation policy, :data:`REMAT_POLICIES`), :func:`check_execution` (the config fields
  :data:`EXECUTION_FIELDS` that choose them), :func:`with_execution` (a loaded model run another way),
  :func:`stack_layer_paths` / :func:`unstack_layer_path` (per-layer checkpoint names to stacked parameters).
- The paper's **Quad head** (Section 6 of arXiv 2010.03648): one d×d linear layer with bias after the final norm,
  ``f(s) = W·h + b`` where ``h`` is the final-norm output, with Φ untied from the input embeddings.
  :func:`quad_head` is the layer (initialised to the identity, so ``f(s) = h`` until trained), :func:`quad_config`
  the config of a randomly initialised Quad model, :func:`add_quad_head` puts it on pretrained weights.
- The :class:`LanguageModel` view: :func:`language_model_view` (what each family's ``language_model`` returns),
  :func:`check_tokenizer_fits`, :func:`check_length`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any, Literal

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from sentcomp.errors import SentcompError
from sentcomp.models.base import LanguageModel

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)

# HF ``activation_function``/``hidden_act`` names -> jnp functions (transformers/activations.py semantics).
ACTIVATIONS = {
    "gelu_new": lambda x: 0.5 * x * (1.0 + jnp.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * x**3))),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: 0.5 * x * (1.0 + jnp.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x))),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
    "sigmoid": jax.nn.sigmoid,
    "linear": lambda x: x,
}

QUAD_HEAD = "quad_head"  # the Quad head's parameters, ``params["quad_head"] = {"kernel" [d, d], "bias" [d]}``
QUAD_CONFIG_KEY = "sentcomp_quad_head"  # config.json flag of HF-format checkpoints saved with the Quad head


def check_config(model: str, config, width: str, heads: str, activation: str) -> None:
    """The checks GPT-2's and BERT's configs share (errors name the ``model``): the width ``config.<width>``
    splits into ``config.<heads>`` attention heads, and ``config.<activation>`` is one of :data:`ACTIVATIONS`."""
    if getattr(config, width) % getattr(config, heads):
        raise SentcompError(f"{model} config: {width}={getattr(config, width)} is not divisible by "
                            f"{heads}={getattr(config, heads)}.")
    if getattr(config, activation) not in ACTIVATIONS:
        raise SentcompError(f"{model} config: {activation} {getattr(config, activation)!r} is not supported; "
                            f"choose one of {sorted(ACTIVATIONS)}.")


# ---------------------------------------------------------------------------------------------------- layers


def layer_norm(epsilon: float, name: str) -> nn.LayerNorm:
    """``γ ⊙ (x − μ)/sqrt(σ² + ε) + β`` over the last axis, as torch computes it: statistics and normalisation in
    float32 (Flax's default), the output in the dtype of ``x`` and the parameters (bf16 for a bf16 model)."""
    # use_fast_variance=False: E[(x-μ)²] like torch, not E[x²]-μ² (which loses precision).
    return nn.LayerNorm(epsilon=epsilon, use_fast_variance=False, name=name)


class RMSNorm(nn.Module):
    """``(offset + g) ⊙ x / sqrt(mean(x²) + ε)`` over the last axis: ``offset = 0`` is Llama's RMSNorm (``g``
    initialised to 1), ``offset = 1`` Gemma's, which stores ``w = g − 1`` (initialised to 0). Computed in float32
    (the gain too) and returned in ``x``'s dtype, so a bf16 model's activations stay bf16."""

    eps: float
    offset: float = 0.0

    @nn.compact
    def __call__(self, x):
        init = nn.initializers.zeros if self.offset else nn.initializers.ones
        scale = self.param("scale", init, (x.shape[-1],), jnp.float32).astype(jnp.float32)
        dtype, x = x.dtype, x.astype(jnp.float32)
        normed = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
        return ((self.offset + scale) * normed).astype(dtype)


def dense(features: int, stddev: float, name: str) -> nn.Dense:
    """A Dense layer with bias, kernel ``[in, out]`` initialised N(0, stddev²), bias 0."""
    return nn.Dense(features, kernel_init=nn.initializers.normal(stddev), name=name)


# ------------------------------------------------------------------------------------------------- attention


def positions(attention_mask: jax.Array) -> jax.Array:
    """Position of each token among the real ones, ``cumsum(mask) − 1`` (0 on left padding), ``[B, T]``: with
    right padding these are ``0..T-1``, and left padding gives the same features as no padding."""
    return jnp.maximum(jnp.cumsum(attention_mask, axis=1) - 1, 0)


def visible_keys(attention_mask: jax.Array, causal: bool, window: jax.Array | int | None = None,
                 queries: jax.Array | None = None) -> jax.Array:
    """Whether query t may attend to key s, bool, broadcastable to ``[B, Tq, T]`` (query, key): s is a real token
    (``attention_mask [B, T]``), if ``causal`` ``s ≤ t``, and if ``window`` is given ``p_t − p_s < window`` with
    ``p`` = :func:`positions` (the distance in real tokens; Mistral's and Qwen2's sliding window). ``queries``: the
    query indices ``t`` (int ``[Tq]``; default all ``0..T-1``); indices past the end see what ``T − 1`` sees (they
    are the padding of the last query chunk, see :func:`self_attention`)."""
    real = attention_mask.astype(bool)[:, None, :]
    length = attention_mask.shape[1]
    queries = jnp.arange(length) if queries is None else queries
    visible = real & (jnp.arange(length)[None, :] <= queries[:, None])[None] if causal else real
    if window is not None:
        position = positions(attention_mask)
        query_position = jnp.take(position, jnp.minimum(queries, length - 1), axis=1)
        visible = visible & (query_position[:, :, None] - position[:, None, :] < window)
    return visible


def rotary_cos_sin(positions: jax.Array, inv_freq: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """``cos(p·ω), sin(p·ω)`` in float32, shape ``positions.shape + (rotary_dim,)``: the ``rotary_dim/2``
    frequencies ``ω`` repeated over both halves (Hugging Face's half-split convention)."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotary position embedding of ``x [B, T, heads, head_dim]`` with ``cos, sin [B, T, r]`` (:func:`rotary_cos_sin`):
    the first ``r`` dims ``y = [y₁, y₂]`` (two halves) become ``y ⊙ cos + [−y₂, y₁] ⊙ sin``, the other
    ``head_dim − r`` pass unchanged (partial rotary, GPT-NeoX's ``rotary_pct``). Computed in float32 (the tables'
    dtype), returned in ``x``'s dtype (bf16 for a bf16 model)."""
    r = cos.shape[-1]
    y, rest = x[..., :r], x[..., r:]
    y1, y2 = jnp.split(y, 2, axis=-1)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    rotated = (y * cos + jnp.concatenate([-y2, y1], axis=-1) * sin).astype(x.dtype)
    return jnp.concatenate([rotated, rest], axis=-1) if rest.shape[-1] else rotated


def attend(scores: jax.Array, values: jax.Array, visible: jax.Array) -> jax.Array:
    """Multi-head attention output ``[B, T, heads·head_dim]``: ``softmax(scores)`` over the visible keys (the
    others get float32's most negative score: finite, so a query that sees no key averages uniformly instead of
    giving NaN), times ``values [B, T, kv_heads, head_dim]``. ``scores [B, heads, T, T]`` (query, key), already
    scaled; ``visible [B, T, T]`` as :func:`visible_keys` gives it. Grouped-query attention: with
    ``kv_heads < heads``, score head ``h`` uses value head ``h // (heads / kv_heads)`` (Hugging Face's
    ``repeat_kv`` order); ``kv_heads = heads`` is plain multi-head attention.

    Precision: the masking and softmax are computed in float32 (bf16 scores are upcast), and the attention
    weights are cast back to the values' dtype, so the product with V runs in the model's dtype (bf16 with bf16
    parameters) and the output has that dtype."""
    scores = scores.astype(jnp.promote_types(scores.dtype, jnp.float32))
    scores = jnp.where(visible[:, None], scores, jnp.finfo(scores.dtype).min)
    weights = jax.nn.softmax(scores, axis=-1).astype(values.dtype)
    batch, heads, queries, keys = weights.shape
    kv_heads = values.shape[2]
    grouped = weights.reshape(batch, kv_heads, heads // kv_heads, queries, keys)
    out = jnp.einsum("bkgqs,bskd->bqkgd", grouped, values)
    return out.reshape(batch, queries, -1)


ATTENTION = ("xla", "cudnn", "chunked")  # implementations of :func:`self_attention`


def _scores_attend(q: jax.Array, k: jax.Array, v: jax.Array, visible: jax.Array, scale) -> jax.Array:
    """Dense attention of queries ``q [B, Tq, heads, D]`` over keys/values ``[B, T, kv_heads, D]``: scores
    ``scale · q·k`` accumulated in float32 (from bf16 operands for a bf16 model), then :func:`attend`."""
    batch, length, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    grouped = q.reshape(batch, length, kv_heads, heads // kv_heads, head_dim)  # head h = kv·groups + g
    scores = jnp.einsum("btkgd,bskd->bkgts", grouped, k, preferred_element_type=jnp.float32)
    return attend(scores.reshape(batch, heads, length, k.shape[1]) * scale, v, visible)


def _chunked_attention(q, k, v, attention_mask, scale, causal, window, chunk: int) -> jax.Array:
    """:func:`self_attention` over query chunks of ``chunk`` rows, one after the other (``lax.map``): each chunk
    takes its softmax over all keys, so the result is the dense one; only one ``[B, heads, chunk, T]`` block of
    scores (and its mask) exists at a time, and each chunk is rematerialised in the backward pass
    (``jax.checkpoint``), so memory grows as ``T·chunk``, not ``T²``, forward and backward. The queries are padded
    to a multiple of ``chunk``; the padded rows are dropped."""
    batch, length, heads, head_dim = q.shape
    count = -(-length // chunk)
    padded = jnp.pad(q, ((0, 0), (0, count * chunk - length), (0, 0), (0, 0)))
    blocks = padded.reshape(batch, count, chunk, heads, head_dim).swapaxes(0, 1)

    @jax.checkpoint
    def one_chunk(block_and_start):
        block, start = block_and_start
        visible = visible_keys(attention_mask, causal, window, queries=start + jnp.arange(chunk))
        return _scores_attend(block, k, v, visible, scale)

    out = jax.lax.map(one_chunk, (blocks, jnp.arange(count) * chunk))  # [count, B, chunk, heads·D]
    return out.swapaxes(0, 1).reshape(batch, count * chunk, -1)[:, :length]


def self_attention(q: jax.Array, k: jax.Array, v: jax.Array, attention_mask: jax.Array, *, scale, causal: bool,
                   window: jax.Array | int | None = None, implementation: str = "xla",
                   chunk: int = 512) -> jax.Array:
    """``softmax(scale · q·kᵀ + mask) v`` over the keys :func:`visible_keys` allows, ``[B, T, heads·head_dim]``.

    ``q [B, T, heads, D]``, ``k, v [B, T, kv_heads, D]`` (grouped-query when ``kv_heads < heads``: query head
    ``h`` uses key/value head ``h // (heads/kv_heads)``, Hugging Face's ``repeat_kv`` order); ``attention_mask
    [B, T]`` marks real tokens; ``scale`` a float or a traced scalar (GPT-2's per-layer ``1/(layer+1)``);
    ``window`` a sliding window in real tokens (None: none). A query that sees no key (a row of padding) averages
    the values uniformly instead of giving NaN.

    ``implementation`` (one of :data:`ATTENTION`): ``"xla"``, ``jax.nn.dot_product_attention`` with a dense
    ``[B, 1, T, T]`` mask (memory ∝ T²); ``"cudnn"``, the same call on cuDNN's fused kernel (NVIDIA GPUs only,
    fp16/bf16 only; a traced scale is folded into the queries; JAX hands cuDNN our mask as a dense bias, so memory
    is still ∝ T²); ``"chunked"``, :func:`_chunked_attention` (queries in
    blocks of ``chunk``; memory ∝ T·chunk on every backend). Precision, all three: scores accumulated and
    softmaxed in float32, the weights cast to the values' dtype for the product with V (bf16 in a bf16 model).
    """
    if implementation == "chunked":
        return _chunked_attention(q, k, v, attention_mask, scale, causal, window, chunk)
    if implementation not in ("xla", "cudnn"):
        raise SentcompError(f"attention={implementation!r} is not an attention implementation; choose one of "
                            f"{ATTENTION}.")
    fused: Literal["xla", "cudnn"] = "cudnn" if implementation == "cudnn" else "xla"
    if fused == "cudnn":
        if jax.default_backend() != "gpu":
            raise SentcompError(f"attention='cudnn' needs an NVIDIA GPU; this is a {jax.default_backend()!r} "
                                "backend. Use attention='xla' (or 'chunked' for long sequences).")
        if not isinstance(scale, int | float):  # cuDNN takes a static scale; GPT-2's per-layer one is traced
            q, scale = (q * scale).astype(q.dtype), 1.0
    mask = visible_keys(attention_mask, causal, window)[:, None]
    out = jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation=fused)
    return out.reshape(*q.shape[:2], -1)


@flax.struct.dataclass
class KVCache:
    """The keys and values a causal decoder computed for a sequence it has read (its prefix), so that tokens
    continuing it attend to them without recomputing them: a shared k-shot prefix read once for every text
    (:func:`sentcomp.zeroshot.word_scores`), or the tokens generated so far in greedy decoding.

    ``keys``, ``values`` ``[L, B, P, kv_heads, head_dim]`` (layer, row, position; keys after the rotary
    rotation, in the model's compute dtype); ``mask [B, P]`` marks the real tokens (1) among them. ``B`` may
    be 1 for a prefix every row shares (broadcast against the continuation's rows). A continuation's positions
    count on from the prefix's real tokens (:func:`positions` over ``[mask, continuation mask]``), and each of its
    queries sees every real prefix key (within a sliding window, if any) and the continuation's keys causally:
    the very attention the whole sequence would get in one pass (:func:`attend_continuation`).
    """

    keys: jax.Array
    values: jax.Array
    mask: jax.Array

    @property
    def length(self) -> int:
        """``P``, the positions held (real or padding)."""
        return self.keys.shape[2]

    def extended(self, keys: jax.Array, values: jax.Array, mask: jax.Array) -> KVCache:
        """This cache followed by the ``[L, B, T, kv_heads, head_dim]`` keys/values of ``T`` more positions
        (``mask [B, T]``): the cache a further continuation (the next generated token) reads."""
        batch = keys.shape[1]
        grow = functools.partial(broadcast_rows, batch=batch, axis=1)
        return KVCache(jnp.concatenate([grow(self.keys), keys], axis=2),
                       jnp.concatenate([grow(self.values), values], axis=2),
                       jnp.concatenate([broadcast_rows(self.mask, batch, 0), mask.astype(self.mask.dtype)], axis=1))


def broadcast_rows(x: jax.Array, batch: int, axis: int = 0) -> jax.Array:
    """``x`` with its row axis ``axis`` (of size 1 or ``batch``) broadcast to ``batch`` rows."""
    shape = list(x.shape)
    shape[axis] = batch
    return jnp.broadcast_to(x, shape)


def attend_continuation(q: jax.Array, k: jax.Array, v: jax.Array, attention_mask: jax.Array, *, scale,
                        window: jax.Array | int | None = None) -> jax.Array:
    """Causal attention of ``T`` continuation queries ``q [B, T, heads, D]`` over ``P`` cached positions followed
    by the continuation itself: ``k, v [B, P + T, kv_heads, D]``, ``attention_mask [B, P + T]`` (real tokens).
    Query ``t`` is position ``P + t`` of the whole sequence, so it sees key ``s`` iff ``s`` is real, ``s ≤ P + t``
    and (with a ``window``) within the window (:func:`visible_keys`): the rows :func:`self_attention` gives
    these positions when run over the whole sequence. Dense scores (memory ∝ T·(P + T)), float32 softmax as
    :func:`attend`."""
    prefix = k.shape[1] - q.shape[1]
    visible = visible_keys(attention_mask, True, window, queries=prefix + jnp.arange(q.shape[1]))
    return _scores_attend(q, k, v, visible, scale)


# ------------------------------------------------------------------------------------------- the layer stack

# How a layer's activations are kept for the backward pass: "none" stores them all; "full" stores only the
# layer's input and recomputes the rest; "dots" stores the results of the weight matmuls (no batch dims) and
# recomputes the elementwise ops and the attention scores (jax.checkpoint_policies).
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
# Config fields that choose how a model executes, not what it computes: not written to Hugging Face config.json.
EXECUTION_FIELDS = ("scan_layers", "remat", "attention", "attention_chunk")


def check_execution(model: str, config) -> None:
    """Clear errors (naming the ``model``) for the :data:`EXECUTION_FIELDS` of ``config``."""
    if config.remat not in REMAT_POLICIES:
        raise SentcompError(f"{model} config: remat={config.remat!r}; choose one of {tuple(REMAT_POLICIES)}.")
    if config.attention not in ATTENTION:
        raise SentcompError(f"{model} config: attention={config.attention!r}; choose one of {ATTENTION}.")
    if config.attention_chunk < 1:
        raise SentcompError(f"{model} config: attention_chunk must be ≥ 1, got {config.attention_chunk}.")


def layer_stack(block: type[nn.Module], config, num_layers: int, name: str, **fields) -> nn.Module:
    """``num_layers`` copies of ``block(config)`` as one ``nn.scan`` over parameters stacked on a leading layer
    axis (``params[name]``, leaf shapes ``[num_layers, ...]``). ``block`` has the scan signature ``(carry, x_i) ->
    (carry, None)``, ``x_i`` the layer's slice of the scanned input. ``config.scan_layers``: True compiles the body
    once (a loop); False unrolls it (``unroll=num_layers``: L copies, no loop; the same parameters, so the two
    read each other's checkpoints). ``config.remat``: a :data:`REMAT_POLICIES` policy wraps the body in
    ``nn.remat`` (same values and gradients, less activation memory, more compute). ``fields``: the block's
    other attributes (e.g. a decoder layer's ``keep_kv``); its per-layer outputs are stacked on the layer axis."""
    policy = REMAT_POLICIES[config.remat]
    if policy is not None:  # a loop body is safe from XLA's CSE merging recomputation into the forward pass;
        block = nn.remat(block, policy=policy, prevent_cse=not config.scan_layers)  # unrolled copies are not
    return nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True}, length=num_layers,
                   unroll=1 if config.scan_layers else num_layers)(config, name=name, **fields)


def init_params(module: nn.Module, rng: jax.Array, *inputs: jax.Array) -> Any:
    """``module.init(rng, *inputs)["params"]`` as one compiled program (run op by op, every initialiser and
    every operation of the dummy forward pass would compile on its own)."""
    return jax.jit(lambda key, *args: module.init(key, *args)["params"])(rng, *inputs)


def with_execution(lm: LanguageModel, **fields) -> LanguageModel:
    """``lm`` run another way: its config with the :data:`EXECUTION_FIELDS` ``fields`` changed (e.g.
    ``remat="dots"``, ``attention="chunked"``), the same parameters; ``lm.hidden_fn`` rebound to the new config."""
    unknown = set(fields) - set(EXECUTION_FIELDS)
    if unknown:
        raise SentcompError(f"with_execution sets {EXECUTION_FIELDS}, not {sorted(unknown)}.")
    config = dataclasses.replace(lm.config, **fields)
    rebound = {name: functools.partial(fn.func, config) for name in ("hidden_fn", "prefill_fn", "continue_fn")
               if (fn := getattr(lm, name)) is not None}
    return lm.replace(config=config, **rebound)


def stack_layer_paths(flat: dict[str, Any], key: str, num_layers: int) -> dict[str, Any]:
    """Per-layer tensors ``{"<key>/<i>/<rest>": a_i}`` stacked as ``{"<key>/<rest>": stack_i a_i}`` (numpy), other
    paths unchanged; the inverse of :func:`unstack_layer_path`."""
    out: dict[str, Any] = {}
    stacks: dict[str, list[Any]] = {}
    for path, value in flat.items():
        parts = path.split("/")
        if parts[0] == key:
            stacks.setdefault("/".join([key, *parts[2:]]), [None] * num_layers)[int(parts[1])] = value
        else:
            out[path] = value
    return {**out, **{path: np.stack(values) for path, values in stacks.items()}}


def unstack_layer_path(flat: dict[str, Any], path: str, key: str) -> Any:
    """The tensor at per-layer ``path`` (``"<key>/<i>/<rest>"``: layer i's slice of ``flat["<key>/<rest>"]``), or
    ``flat[path]`` for any other path."""
    parts = path.split("/")
    if parts[0] != key:
        return flat[path]
    return flat["/".join([key, *parts[2:]])][int(parts[1])]


# -------------------------------------------------------------------------------------------- the Quad head


def _identity(key, shape: tuple[int, int], dtype=jnp.float32) -> jax.Array:
    del key
    rows, columns = shape
    return jnp.eye(rows, columns, dtype=dtype)


def quad_head(features: int) -> nn.Dense:
    """The Quad head: a ``features × features`` Dense layer with bias, named ``quad_head``, initialised to the
    identity (bias 0)."""
    return nn.Dense(features, kernel_init=_identity, name=QUAD_HEAD)


def quad_config(config):
    """``config`` (a family's config dataclass) with the Quad architecture on: the head and an untied Φ."""
    return dataclasses.replace(config, quad_head=True, tie_word_embeddings=False)


def add_quad_head(params: dict, config, phi: str, embedding: str) -> tuple[dict, Any]:
    """The Quad architecture on top of pretrained weights, and its config: the head at the identity (so f(s)
    starts as the pretrained features) and Φ = ``params[phi]``, a copy of the input embeddings
    ``params[embedding]["embedding"]`` if they were tied. A head or Φ the weights already have is kept."""
    params = dict(params)
    if QUAD_HEAD not in params:
        d = params[embedding]["embedding"].shape[1]
        params[QUAD_HEAD] = quad_head(d).init(jax.random.key(0), jnp.zeros((1, d)))["params"]
    params.setdefault(phi, jnp.array(params[embedding]["embedding"]))
    return params, quad_config(config)


# ------------------------------------------------------------------------------------ the LanguageModel view


def language_model_view(family: str, config, params, tokenizer, name: str, hidden_fn: Callable,
                        phi_fn: Callable[[Any], jax.Array], max_length: int) -> LanguageModel:
    """A family's parameters as a :class:`LanguageModel`: ``lm.hidden_fn`` is the family's
    ``hidden_fn(config, params, token_ids, attention_mask)`` with ``config`` bound, ``lm.phi_fn`` its
    ``phi_fn(params)``; the tokenizer (None: token ids only) must fit the vocabulary."""
    check_tokenizer_fits(tokenizer, config.vocab_size, name)
    return LanguageModel(name=name, family=family, config=config, params=params,
                         hidden_fn=functools.partial(hidden_fn, config), phi_fn=phi_fn, tokenizer=tokenizer,
                         max_length=max_length)


def check_tokenizer_fits(tokenizer, vocab_size: int, name: str) -> None:
    """A clear error if ``tokenizer`` (None: token ids only) has ids beyond the model's ``vocab_size`` embeddings."""
    if tokenizer is not None and len(tokenizer) > vocab_size:
        raise SentcompError(
            f"Model {name}: its tokenizer has {len(tokenizer)} tokens but the model only {vocab_size} "
            "embeddings; pass a tokenizer matching the model's vocabulary."
        )


def check_length(token_ids: jax.Array, max_length: int, model: str) -> None:
    """A clear error if the sequences ``token_ids [B, T]`` are longer than the model's context."""
    if token_ids.shape[1] > max_length:
        raise SentcompError(
            f"Sequences of {token_ids.shape[1]} tokens exceed this {model}'s context of {max_length}; truncate "
            "them (sentcomp.features and sentcomp.baselines do)."
        )

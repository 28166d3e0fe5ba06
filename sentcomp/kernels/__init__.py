"""Pure jnp kernels: no I/O, no configs, no global state; jit/vmap/shard friendly."""

from sentcomp.kernels.features import (
    conditional_mean_features,
    log_partition,
    word_log_probs,
    word_logits,
    word_probs,
)
from sentcomp.kernels.losses import masked_mean, quad_loss, quad_per_position, xent_loss, xent_per_position

__all__ = [
    "conditional_mean_features",
    "log_partition",
    "word_logits",
    "word_log_probs",
    "word_probs",
    "masked_mean",
    "xent_loss",
    "xent_per_position",
    "quad_loss",
    "quad_per_position",
]

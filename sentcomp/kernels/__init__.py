"""Pure jnp kernels: no I/O, no configs, no global state; jit/vmap/shard friendly."""

from sentcomp.kernels.features import (
    conditional_mean_features,
    log_partition,
    word_log_probs,
    word_logits,
    word_probs,
)
from sentcomp.kernels.losses import masked_mean, quad_loss, quad_per_position, xent_loss, xent_per_position
from sentcomp.kernels.partition import (
    AffineFit,
    QuadraticFit,
    embedding_covariance,
    fit_affine,
    fit_log_partition,
    fit_log_partition_fixed_a,
    gaussian_log_partition,
    r_squared,
)

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
    "AffineFit",
    "QuadraticFit",
    "embedding_covariance",
    "fit_affine",
    "fit_log_partition",
    "fit_log_partition_fixed_a",
    "gaussian_log_partition",
    "r_squared",
]

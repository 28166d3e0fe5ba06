"""Pure jnp kernels: no I/O, no configs, no global state; jit/vmap/shard friendly (``fold_moments`` also runs
on numpy arrays, for the host BLAS).

Precision policy (:mod:`sentcomp.kernels.precision`, docs/precision.md): every matrix product in these kernels
(``jnp.dot``/``matmul``/``einsum``/``tensordot``, forward and in the custom backward passes) runs at
``jax.lax.Precision.HIGHEST`` by default, so TPUs (bfloat16 inputs at XLA's default) and recent GPUs (TF32)
compute in full float32, as CPU does. Each public kernel (and the fitted ``QuadraticFit``/``AffineFit``
when called) takes ``precision=`` (default ``DEFAULT_PRECISION = "highest"``; anything ``jnp.dot``'s
``precision=`` accepts, e.g. ``"high"``, ``"default"``, or ``None`` for JAX's global setting), passed down to
every product; it is a static argument of the jitted kernels. ``check_precision`` validates a value.

Every array kernel here is one jitted program per input shape (``precision``, sizes, modes static): called
outside ``jit`` it compiles once instead of once per operation (an operation run eagerly is a compilation of its
own, ~15–90 ms on CPU); inside a caller's ``jit`` it is inlined. Kernels that check their arguments (shapes,
``precision``) or reword the forward-mode error do so in Python and then call their jitted body; the others are
``jax.jit``-decorated. ``fold_moments`` (which also runs on numpy) and the Python-valued helpers are not jitted.
"""

from sentcomp.kernels.distill import (
    kl_from_features,
    quad_excess,
    remaining_mass,
    soft_quad_from_mean,
    soft_quad_loss,
    soft_quad_per_position,
    soft_xent_loss,
    soft_xent_per_position,
    sparse_target_entropy,
    sparse_target_mean,
    top_k_targets,
)
from sentcomp.kernels.linear import (
    MULTI_CLASS_MODES,
    LinearFits,
    linear_scores,
    predict_labels,
    weighted_standardisation,
)
from sentcomp.kernels.logistic import (
    logistic_losses,
    logistic_objective,
    logistic_regression_grid,
    logistic_targets,
    uses_sigmoid,
)
from sentcomp.kernels.losses import (
    IGNORE_INDEX,
    masked_mean,
    quad_loss,
    quad_per_position,
    xent_loss,
    xent_per_position,
)
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
from sentcomp.kernels.precision import DEFAULT_PRECISION, check_precision
from sentcomp.kernels.ridge import (
    CenteredRidge,
    RidgeMoments,
    centered_ridge,
    fold_moments,
    kfold_ridge_moments,
    kfold_split_moments,
    ridge_grid,
    ridge_grid_dual,
    ridge_moments,
)
from sentcomp.kernels.softmax_features import (
    conditional_mean_features,
    expected_values,
    log_partition,
    vocab_chunk_for,
    word_log_probs,
    word_logits,
    word_probs,
)

__all__ = [
    "DEFAULT_PRECISION",
    "check_precision",
    "conditional_mean_features",
    "IGNORE_INDEX",
    "expected_values",
    "log_partition",
    "vocab_chunk_for",
    "word_logits",
    "word_log_probs",
    "word_probs",
    "masked_mean",
    "xent_loss",
    "xent_per_position",
    "quad_loss",
    "quad_per_position",
    "kl_from_features",
    "quad_excess",
    "remaining_mass",
    "soft_quad_from_mean",
    "soft_quad_loss",
    "soft_quad_per_position",
    "soft_xent_loss",
    "soft_xent_per_position",
    "sparse_target_entropy",
    "sparse_target_mean",
    "top_k_targets",
    "AffineFit",
    "QuadraticFit",
    "embedding_covariance",
    "fit_affine",
    "fit_log_partition",
    "fit_log_partition_fixed_a",
    "gaussian_log_partition",
    "r_squared",
    "MULTI_CLASS_MODES",
    "CenteredRidge",
    "LinearFits",
    "RidgeMoments",
    "centered_ridge",
    "fold_moments",
    "kfold_ridge_moments",
    "kfold_split_moments",
    "linear_scores",
    "logistic_losses",
    "logistic_objective",
    "logistic_regression_grid",
    "logistic_targets",
    "predict_labels",
    "ridge_grid",
    "ridge_grid_dual",
    "ridge_moments",
    "uses_sigmoid",
    "weighted_standardisation",
]

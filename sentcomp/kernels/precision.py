"""The kernels' matmul precision policy, in one place.

On TPU a float32 matrix product at XLA's default precision rounds its inputs to bfloat16 (one pass), and on
recent NVIDIA GPUs to TF32; CPU computes in full float32 whatever the setting. Results that rest on float32
(log-partitions over 50k words, Gram matrices, probe solves) would then silently lose the accuracy the CPU
tests show. So every matmul-like op in :mod:`sentcomp.kernels` and :mod:`sentcomp.theory` (``jnp.dot``,
``jnp.matmul``, ``jnp.einsum``, ``jnp.tensordot``, and the products inside custom VJPs) runs at
``DEFAULT_PRECISION = "highest"`` (full float32: six bfloat16 passes on TPU, no TF32 on GPU) unless the caller
passes ``precision=`` to the public kernel, which forwards it to every op it runs (a static argument of the
jitted kernels). Accepted values are those of ``jnp.dot(..., precision=)``:

- ``"highest"`` / ``"float32"`` (default), ``"high"`` / ``"tensorfloat32"`` / ``"bfloat16_3x"`` (three bf16
  passes on TPU, TF32 on GPU), ``"default"`` / ``"bfloat16"`` / ``"fastest"`` (one bf16 pass on TPU);
- a :class:`jax.lax.Precision` member, or a tuple of two (one per operand; or of two of the names above);
- a :class:`jax.lax.DotAlgorithmPreset` (or its name) or a :class:`jax.lax.DotAlgorithm`;
- ``None``: JAX's own default, i.e. the ``jax_default_matmul_precision`` setting
  (``jax.default_matmul_precision(...)`` context manager) if set, else the backend's default.

Factorisations (``eigh``, ``svd``, ``solve``, ``cholesky``, triangular solves) are not matmuls in HLO and take
no precision; ``tests/test_precision.py`` checks that every ``dot_general`` the kernels lower to carries the
requested precision.
"""

from __future__ import annotations

from typing import Any

import jax

DEFAULT_PRECISION = "highest"

PRECISION_NAMES = ("highest", "float32", "high", "tensorfloat32", "bfloat16_3x", "default", "bfloat16", "fastest")

_ACCEPTED = (
    f"None, one of {PRECISION_NAMES}, a jax.lax.Precision, a tuple of two jax.lax.Precision values or two of "
    "those names, a jax.lax.DotAlgorithmPreset (or its name) or a jax.lax.DotAlgorithm"
)


def _is_precision_name(value: Any) -> bool:
    return isinstance(value, str) and value in PRECISION_NAMES


def check_precision(precision: Any) -> Any:
    """Returns ``precision`` unchanged if ``jnp.dot(..., precision=)`` accepts it (see the module docstring),
    else raises ``ValueError`` naming the accepted values. Tuples, not lists: jitted kernels hash it."""
    if precision is None or _is_precision_name(precision):
        return precision
    if isinstance(precision, (jax.lax.Precision, jax.lax.DotAlgorithmPreset, jax.lax.DotAlgorithm)):
        return precision
    if isinstance(precision, str) and precision in jax.lax.DotAlgorithmPreset.__members__:
        return precision
    if isinstance(precision, tuple) and len(precision) == 2 and (
        all(isinstance(p, jax.lax.Precision) for p in precision) or all(map(_is_precision_name, precision))
    ):
        return precision
    raise ValueError(f"precision must be {_ACCEPTED}; got {precision!r}.")

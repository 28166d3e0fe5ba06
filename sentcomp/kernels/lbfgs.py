"""L-BFGS minimiser as a pure jnp kernel (two-loop recursion, Armijo backtracking), ``vmap``-friendly.

Used by :func:`sentcomp.kernels.logistic.logistic_regression_grid` on its preconditioned mean-form objective.
Its inner products run at ``precision`` (default ``"highest"``, :mod:`sentcomp.kernels.precision`); the
objective's own products are the caller's to set.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sentcomp.kernels.precision import DEFAULT_PRECISION, check_precision


def _two_loop_direction(grad, steps, grad_changes, rho, precision):
    """L-BFGS search direction ``−H·grad`` from the stored pairs (oldest first; empty slots have ``ρ = 0``).

    Nocedal & Wright, Algorithm 7.4, with the initial inverse Hessian ``γI``, ``γ = sᵀy / yᵀy`` of the newest pair.
    """

    def dot(a, b):
        return jnp.dot(a, b, precision=precision)

    def backward(q, pair):
        s, y, r = pair
        a = r * dot(s, q)
        return q - a * y, a

    q, alphas = jax.lax.scan(backward, grad, (steps, grad_changes, rho), reverse=True)
    newest_yy = dot(grad_changes[-1], grad_changes[-1])
    gamma = jnp.where(rho[-1] > 0, dot(steps[-1], grad_changes[-1]) / jnp.where(newest_yy > 0, newest_yy, 1.0), 1.0)

    def forward(r, pair):
        s, y, rh, a = pair
        return r + s * (a - rh * dot(y, r)), None

    r, _ = jax.lax.scan(forward, gamma * q, (steps, grad_changes, rho, alphas))
    return -r


def lbfgs_minimise(fun, init: jax.Array, max_iter: int, tol: float, memory: int = 10, *,
                   precision=DEFAULT_PRECISION):
    """Minimises a smooth convex ``fun`` over a vector from ``init`` by L-BFGS with Armijo backtracking.

    Stops when ``‖∇fun‖₂ < tol``, after ``max_iter`` steps, or when no step decreases ``fun`` any more (the
    float32 resolution). Returns ``(params, value, grad_norm, iterations)``. ``precision``: of the solver's own
    inner products (:mod:`sentcomp.kernels.precision`).
    """
    precision = check_precision(precision)
    value_and_grad = jax.value_and_grad(fun)
    value, grad = value_and_grad(init)
    size = init.shape[0]
    history = (
        jnp.zeros((memory, size), init.dtype), jnp.zeros((memory, size), init.dtype), jnp.zeros((memory,), init.dtype)
    )

    def line_search(params, value, grad, direction, active):
        """Halves the step from 1 until Armijo's decrease holds (a NaN or infinite trial value counts as too
        long). ``active`` is False for problems already done: under ``vmap`` every problem runs this loop while
        any needs it, so finished ones must not search."""
        slope = jnp.dot(grad, direction, precision=precision)

        def too_long(carry):
            step, trial_value, _ = carry
            return active & ~(trial_value <= value + 1e-4 * step * slope) & (step > 2.0**-20)

        def halve(carry):
            step = 0.5 * carry[0]
            trial_value, trial_grad = value_and_grad(params + step * direction)
            return step, trial_value, trial_grad

        trial_value, trial_grad = value_and_grad(params + direction)
        return jax.lax.while_loop(too_long, halve, (jnp.ones((), init.dtype), trial_value, trial_grad))

    def not_done(carry):
        _, value, grad, _, iteration, stalled = carry
        return (iteration < max_iter) & (jnp.linalg.norm(grad) >= tol) & ~stalled

    def iterate(carry):
        params, value, grad, (steps, changes, rho), iteration, stalled = carry
        active = not_done(carry)
        direction = _two_loop_direction(grad, steps, changes, rho, precision)
        descends = jnp.dot(direction, grad, precision=precision) < 0
        direction = jnp.where(descends, direction, -grad)  # keep a descent direction
        step, new_value, new_grad = line_search(params, value, grad, direction, active)
        stalled = stalled | ~(new_value < value)
        accept_step = active & ~stalled
        s, y = step * direction, new_grad - grad
        curvature = jnp.dot(s, y, precision=precision)
        accept = (curvature > 0) & accept_step

        def push(buffer, item):
            return jnp.where(accept, jnp.concatenate([buffer[1:], item[None]]), buffer)

        new_rho = jnp.where(accept, 1.0 / jnp.where(accept, curvature, 1.0), 0.0)
        history = (push(steps, s), push(changes, y), push(rho, new_rho))
        params = jnp.where(accept_step, params + s, params)
        value, grad = jnp.where(accept_step, new_value, value), jnp.where(accept_step, new_grad, grad)
        return params, value, grad, history, iteration + active.astype(jnp.int32), stalled

    carry = (init, value, grad, history, jnp.zeros((), jnp.int32), jnp.zeros((), bool))
    params, value, grad, _, iterations, _ = jax.lax.while_loop(not_done, iterate, carry)
    return params, value, jnp.linalg.norm(grad), iterations

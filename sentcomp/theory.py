"""The paper's quantities, measured against the truth: ε, excess Quad loss, τ and B, coverage γ, the bounds.

Notation as in ../shared/PAPER.md, with sentcomp's layout: ``phi`` is ``[V, d]`` (row w is φ_w), so
``Φᵀθ = phi @ θ``, ``Φp = p @ phi`` and ``ΦΦᵀ = phiᵀ phi`` (the d×d Gram matrix). Labels are 0/1 for the
binary tasks the theorems cover; the logistic loss is ``ℓ(z, y) = log(1 + exp(−(2y−1) z))`` (1-Lipschitz).

How each quantity is computed
- ε (:func:`kl_epsilon`): ``KL(p*(.|s) ‖ p_f(s))`` exactly per context (a sum over the vocabulary), averaged
  over sampled contexts; :func:`mean_confidence_interval` gives a Student-t interval. For p_L = uniform
  position × document, average per document first (positions of one document are not independent).
- Excess Quad loss (:func:`excess_quad_loss`): ``ℓ_quad,s(θ) − ℓ_quad,s(θ*) = ½‖Φᵀ(θ−θ*)‖²`` with
  ``θ* = (ΦΦᵀ)⁻¹Φp*(.|s)``, exact per context; it is the ε of the Quad theorem.
- τ and B (:func:`naturalness_frontier`): a task is (τ,B)-natural when some ``‖v‖_∞ ≤ B`` has
  ``E_T ℓ(vᵀp*, y) ≤ τ``. The best τ for each B, ``τ(B) = min_{‖v‖_∞ ≤ B} E ℓ(vᵀp*, y)``, is a convex problem
  with box constraints, solved exactly (float64 L-BFGS-B) on a grid of B. No intercept is needed: p* sums to
  one, so adding c to every v_w adds c to vᵀp*. Every grid point is a valid (τ,B) pair, and the bound is
  evaluated at the best one (:func:`tightest_bound`).
- Natural w.r.t. Φ (:func:`phi_naturalness_frontier`): v must be ``Φᵀλ`` (a linear classifier λ on Φp*).
  The path ``min_λ E ℓ(λᵀΦp*, y) + ½ρ‖Φᵀλ‖²`` over a grid of ρ gives pairs (τ, v = Φᵀλ) with
  ``B = ‖v‖_∞`` and ``‖v‖₂`` (the Quad bound's norm; the path is exactly its τ-vs-‖v‖₂ frontier).
- γ (:func:`coverage`): ``inf_s p_L(s)/p_T(s)`` over task contexts, from their log-probabilities under both
  distributions (the synthetic language has the closed form 1/(L+1): ``synthetic.task_coverage``).
- Bounds: :func:`bound` ``τ + sqrt(2B²ε/γ)`` (any LM on p_f; softmax LM on Φp_f with Φ-naturalness; on f under
  the quadratic log-partition assumption) and :func:`quad_bound` ``τ + ‖v‖₂ sqrt(2ε/γ)`` (Quad model on f).
  The softmax-LM theorem asks ε relative to the best f for the model's fixed Φ; the absolute ε used here is
  larger, so the bound stays valid (looser).

:func:`evaluate_against_truth` puts it together for one model checkpoint on the synthetic language.

Precision: the jnp products here (and in the kernels they call) run at ``precision``, default ``"highest"``
(full float32 on TPU and GPU too; :mod:`sentcomp.kernels.precision`); the numpy/scipy parts are float64 on the
host.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import scipy.optimize
import scipy.special
import scipy.stats

from sentcomp import kernels, probe
from sentcomp.errors import SentcompError
from sentcomp.kernels.precision import DEFAULT_PRECISION, check_precision
from sentcomp.kernels.softmax_features import as_jax_array

# ---------------------------------------------------------------------------------------------------- ε, Quad


@jax.jit
def kl_epsilon(log_p_true: jax.Array, log_p_model: jax.Array) -> jax.Array:
    """Per-context ``KL(p* ‖ p_f) = Σ_w p*(w)(log p*(w) − log p_f(w))`` over the last axis (words with p* = 0
    contribute 0; ``+inf`` if the model gives 0 to a possible word)."""
    p_true = jnp.exp(log_p_true)
    terms = jnp.where(p_true > 0, p_true * (log_p_true - log_p_model), 0.0)
    return jnp.sum(terms, axis=-1)


class Estimate(NamedTuple):
    """A Monte-Carlo mean with a two-sided confidence interval ``[low, high]`` over ``n`` samples."""

    mean: float
    low: float
    high: float
    n: int

    def as_dict(self) -> dict:
        return self._asdict()


def mean_confidence_interval(values, confidence: float = 0.95) -> Estimate:
    """Mean of i.i.d. ``values`` with a Student-t interval (``mean ± t_{n−1} · std/√n``)."""
    values = np.asarray(values, np.float64).ravel()
    n = values.size
    if n == 0:
        raise SentcompError("mean_confidence_interval needs at least one value.")
    mean = float(values.mean())
    if n == 1:
        return Estimate(mean, -np.inf, np.inf, 1)
    half_width = float(scipy.stats.t.ppf(0.5 + confidence / 2, n - 1) * values.std(ddof=1) / np.sqrt(n))
    return Estimate(mean, mean - half_width, mean + half_width, n)


@functools.partial(jax.jit, static_argnames=("precision",))
def quad_optimum(p_star: jax.Array, phi: jax.Array, *, precision=DEFAULT_PRECISION) -> jax.Array:
    """``θ* = (ΦΦᵀ)⁻¹ Φ p*`` per context: the minimiser of ``ℓ_quad,s`` for fixed Φ.
    ``p_star [..., V]`` → ``[..., d]``."""
    precision = check_precision(precision)
    gram = jnp.matmul(phi.T, phi, precision=precision)
    mean = jnp.matmul(p_star, phi, precision=precision)
    return jnp.linalg.solve(gram, mean.reshape(-1, mean.shape[-1]).T).T.reshape(mean.shape)


@functools.partial(jax.jit, static_argnames=("precision",))
def excess_quad_loss(theta: jax.Array, phi: jax.Array, p_star: jax.Array, *, precision=DEFAULT_PRECISION
                     ) -> jax.Array:
    """Per-context ``ℓ_quad,s(θ) − ℓ_quad,s(θ*) = ½‖Φᵀ(θ − θ*)‖² = ½(θ−θ*)ᵀ(ΦΦᵀ)(θ−θ*)``."""
    precision = check_precision(precision)
    delta = theta - quad_optimum(p_star, phi, precision=precision)
    gram = jnp.matmul(phi.T, phi, precision=precision)
    return 0.5 * jnp.einsum("...d,de,...e->...", delta, gram, delta, precision=precision)


def coverage(log_p_pretrain, log_p_task) -> float:
    """``γ = inf_s p_L(s)/p_T(s)`` over the given task contexts, from ``log p_L(s)`` and ``log p_T(s)``.

    Exact when the contexts given are all the task's contexts (or when the ratio is constant, as in the
    synthetic language); on a sample of contexts it is the infimum over that sample.
    """
    return float(np.exp(np.min(np.asarray(log_p_pretrain, np.float64) - np.asarray(log_p_task, np.float64))))


def bound(tau, max_norm, epsilon, gamma):
    """The paper's guarantee ``τ + sqrt(2B²ε/γ)`` for a (τ,B)-natural task and an ε-optimal LM.

    ε is clipped at 0 (a float32 KL of a near-exact model can come out at −1e-8)."""
    return tau + np.sqrt(2.0 * np.square(max_norm) * np.maximum(epsilon, 0.0) / gamma)


def quad_bound(tau, l2_norm, epsilon, gamma):
    """The Quad guarantee ``τ + ‖v‖₂ sqrt(2ε/γ)`` (ε = excess Quad loss, v = Φᵀλ natural w.r.t. Φ)."""
    return tau + l2_norm * np.sqrt(2.0 * np.maximum(epsilon, 0.0) / gamma)


# ------------------------------------------------------------------------------------------------ naturalness


def logistic_loss(scores, labels) -> float:
    """Mean ``log(1 + exp(−(2y−1)·score))`` for 0/1 labels."""
    signs = 2.0 * np.asarray(labels, np.float64) - 1.0
    return float(np.mean(np.logaddexp(0.0, -signs * np.asarray(scores, np.float64))))


def _logistic_objective(weights, features, signs):
    margins = signs * (features @ weights)
    loss = np.mean(np.logaddexp(0.0, -margins))
    gradient = -features.T @ (signs * scipy.special.expit(-margins)) / len(signs)
    return loss, gradient


def _binary_signs(labels) -> np.ndarray:
    labels = np.asarray(labels)
    if not np.isin(labels, (0, 1)).all():
        raise SentcompError(
            "The theory's bounds are for binary tasks: labels must be 0/1 (use num_labels=2 for the synthetic "
            f"language); got label values {np.unique(labels)[:10]}."
        )
    return 2.0 * labels.astype(np.float64) - 1.0


class Frontier(NamedTuple):
    """Classifiers along a naturalness path, one row per grid point.

    Attributes:
      weights: ``[k, D]`` the classifier on the features it was fitted on (v on p*, or λ on Φp*).
      word_weights: ``[k, V]`` the same classifier as ``v`` on p* (``v = Φᵀλ`` for the Φ path).
      max_norm: ``[k]`` B = ‖v‖_∞.
      l2_norm: ``[k]`` ‖v‖₂.
      train_loss: ``[k]`` E ℓ(vᵀp*, y) on the fitting contexts (τ in-sample).
    """

    weights: np.ndarray
    word_weights: np.ndarray
    max_norm: np.ndarray
    l2_norm: np.ndarray
    train_loss: np.ndarray


DEFAULT_MAX_NORMS = (0.0, *np.geomspace(0.25, 256.0, 21))  # B = 0: the constant classifier, τ = log 2
DEFAULT_PENALTIES = tuple(np.geomspace(1e-6, 1e2, 17)[::-1])


def naturalness_frontier(p_star, labels, max_norms=DEFAULT_MAX_NORMS) -> Frontier:
    """``τ(B) = min_{‖v‖_∞ ≤ B} E ℓ(vᵀp*, y)`` for each B in ``max_norms`` (exact, box-constrained L-BFGS-B).

    ``p_star`` is ``[N, V]`` (probabilities, not logs). Warm-started along increasing B.
    """
    features = np.asarray(p_star, np.float64)
    signs = _binary_signs(labels)
    weights, rows, losses = np.zeros(features.shape[1]), [], []
    for max_norm in sorted(max_norms):
        result = scipy.optimize.minimize(
            _logistic_objective, np.clip(weights, -max_norm, max_norm), args=(features, signs), jac=True,
            method="L-BFGS-B", bounds=[(-max_norm, max_norm)] * features.shape[1],
            options={"maxiter": 2000, "ftol": 1e-14, "gtol": 1e-10},
        )
        weights = result.x
        rows.append(weights)
        losses.append(result.fun)
    path = np.stack(rows)
    return Frontier(path, path, np.abs(path).max(1), np.linalg.norm(path, axis=1), np.asarray(losses))


def phi_naturalness_frontier(p_star, labels, phi, penalties=DEFAULT_PENALTIES) -> Frontier:
    """Classifiers ``v = Φᵀλ`` natural w.r.t. Φ: ``min_λ E ℓ(λᵀΦp*, y) + ½ρ‖Φᵀλ‖²`` for each ρ in ``penalties``.

    Warm-started from large to small ρ. Each point's ``train_loss`` is the unpenalised loss (its τ).
    """
    phi = np.asarray(phi, np.float64)
    features = np.asarray(p_star, np.float64) @ phi
    gram = phi.T @ phi
    signs = _binary_signs(labels)

    def objective(lam, penalty):
        loss, gradient = _logistic_objective(lam, features, signs)
        return loss + 0.5 * penalty * lam @ gram @ lam, gradient + penalty * gram @ lam

    lam, rows, losses = np.zeros(phi.shape[1]), [], []
    for penalty in sorted(penalties, reverse=True):
        lam = scipy.optimize.minimize(
            objective, lam, args=(penalty,), jac=True, method="L-BFGS-B",
            options={"maxiter": 2000, "ftol": 1e-14, "gtol": 1e-10},
        ).x
        rows.append(lam)
        losses.append(_logistic_objective(lam, features, signs)[0])
    path = np.stack(rows)
    words = path @ phi.T
    return Frontier(path, words, np.abs(words).max(1), np.linalg.norm(words, axis=1), np.asarray(losses))


def tightest_bound(taus, norms, epsilon, gamma, quad: bool = False) -> tuple[float, int]:
    """The smallest bound over the frontier's (τ_k, norm_k) pairs, and the index k attaining it."""
    values = (quad_bound if quad else bound)(np.asarray(taus), np.asarray(norms), epsilon, gamma)
    k = int(np.argmin(values))
    return float(values[k]), k


# -------------------------------------------------------------------------------------- one model vs the truth


def _probe_scores(train_x, train_y, test_x, test_y, seed, cv_metric) -> dict[str, float]:
    """Held-out logistic loss and accuracy of the paper's probe (``sentcomp.probe.evaluate``, protocol
    ``"paper"``: L2 logistic regression with intercept, C by 5-fold stratified CV, no scaling), with C chosen
    by CV ``cv_metric`` (``"accuracy"``, the paper's, or ``"loss"``)."""
    fitted = probe.evaluate(train_x, train_y, test_x, test_y, protocol="paper", seed=seed, cv_metric=cv_metric)
    return {"loss": fitted.test_loss, "accuracy": fitted.test_accuracy, "C": fitted.regularisation}


def _train_test_split(num_documents: int, train_fraction: float, seed: int):
    order = np.random.default_rng(seed).permutation(num_documents)
    cut = int(round(train_fraction * num_documents))
    if cut < 2 or cut > num_documents - 2:
        raise SentcompError(f"Need at least 2 train and 2 test documents; got {num_documents} documents.")
    return order[:cut], order[cut:]


def evaluate_against_truth(
    features,
    phi,
    log_p_star,
    labels,
    gamma: float,
    *,
    objective: str = "xent",
    train_fraction: float = 0.5,
    seed: int = 0,
    max_norms=DEFAULT_MAX_NORMS,
    penalties=DEFAULT_PENALTIES,
    probe_cv_metric: str = "accuracy",
    precision=DEFAULT_PRECISION,
) -> dict:
    """ε, downstream probes and the theory's bounds for one model on documents with exact p*.

    Args:
      features: ``[N, T, d]`` the model's f(s) at each pretraining context of N documents; the task context
        is the last one (``[:, -1]``), as in ``synthetic.TaskData``.
      phi: ``[V, d]`` the model's output word embeddings.
      log_p_star: ``[N, T, V]`` exact log p*(.|s) at the same contexts.
      labels: ``[N]`` 0/1 task labels.
      gamma: coverage of the task contexts under p_L.
      objective: ``"xent"`` or ``"quad"`` (what the model was trained with; selects the f(s) bound).
      probe_cv_metric: how the probes choose C: ``"accuracy"`` (the paper's) or ``"loss"`` (held-out logistic
        loss, the quantity compared with the bounds: less noisy probe losses).
      precision: of the jnp products (log p_f, Φp_f, ε, the affine fit; :mod:`sentcomp.kernels.precision`).
        The probes (``sentcomp.probe.evaluate``) keep the kernels' default, ``"highest"``.

    Returns a JSON-ready dict: ``epsilon`` (E_{s~p_L} KL, with CI over documents), ``epsilon_task``
    (E_{s~p_T} KL), ``excess_quad`` (E_{s~p_L} ½‖Φᵀ(f−θ*)‖²), and per feature kind (``p_f``, ``phi_p_f``, ``f``,
    and the truth's ``p_star``, ``phi_p_star``) the held-out ``probe`` loss/accuracy; for model features also
    the ``bound``, the ``tau``/``norm`` attaining it, ``plug_in``: the held-out loss of that natural
    classifier applied to the model's features (the quantity the theorem bounds directly), and
    ``bound_task_epsilon``: the bound with ε measured on the task contexts themselves (γ = 1), the theorem's
    step before coverage enters (``E_T KL ≤ ε/γ``). All losses are on the test documents; τ is the natural
    classifier's test loss on p* (fitted on the train documents). For a cross-entropy model, ``f`` gets the
    Φp_f bound (valid under the quadratic log-partition assumption) with ``affine_r2``, the held-out R² of
    ``Φp_f ≈ A f + b``, saying how well that assumption holds.
    """
    if objective not in ("xent", "quad"):
        raise SentcompError(f"objective must be 'xent' or 'quad', got {objective!r}.")
    precision = check_precision(precision)
    features, phi, log_p_star = map(as_jax_array, (features, phi, log_p_star))
    labels = np.asarray(labels)
    logits = jnp.matmul(features, phi.T, precision=precision)
    log_p_model = logits - kernels.log_partition(features, phi, precision=precision)[..., None]
    p_star = jnp.exp(log_p_star)

    kl = np.asarray(kl_epsilon(log_p_star, log_p_model), np.float64)  # [N, T]
    excess = np.asarray(excess_quad_loss(features, phi, p_star, precision=precision), np.float64)
    epsilon = mean_confidence_interval(kl.mean(axis=1))
    excess_quad = mean_confidence_interval(excess.mean(axis=1))

    task_f = np.asarray(features[:, -1], np.float64)
    task = {
        "f": task_f,
        "phi_p_f": np.asarray(kernels.conditional_mean_features(features[:, -1], phi, precision=precision),
                              np.float64),
        "p_f": np.exp(np.asarray(log_p_model[:, -1], np.float64)),
        "p_star": np.asarray(p_star[:, -1], np.float64),
    }
    phi64 = np.asarray(phi, np.float64)
    task["phi_p_star"] = task["p_star"] @ phi64
    train, test = _train_test_split(len(labels), train_fraction, seed)

    results: dict = {
        "epsilon": epsilon.as_dict(),
        "epsilon_task": mean_confidence_interval(kl[:, -1]).as_dict(),
        "excess_quad": excess_quad.as_dict(),
        "gamma": gamma,
        "objective": objective,
        "features": {},
    }
    for kind, values in task.items():
        results["features"][kind] = {"probe": _probe_scores(values[train], labels[train], values[test],
                                                            labels[test], seed, probe_cv_metric)}

    box = naturalness_frontier(task["p_star"][train], labels[train], max_norms)
    along_phi = phi_naturalness_frontier(task["p_star"][train], labels[train], phi64, penalties)
    tau_box = np.array([logistic_loss(task["p_star"][test] @ v, labels[test]) for v in box.word_weights])
    tau_phi = np.array([logistic_loss(task["phi_p_star"][test] @ lam, labels[test]) for lam in along_phi.weights])

    def record(kind, taus, norms, eps, eps_task, quad, classifier_scores, assumption=None):
        value, k = tightest_bound(taus, norms, eps, gamma, quad=quad)
        entry = {"bound": value, "tau": float(taus[k]), "norm": float(norms[k]),
                 "norm_kind": "l2" if quad else "max", "epsilon_used": eps,
                 "bound_task_epsilon": tightest_bound(taus, norms, eps_task, 1.0, quad=quad)[0]}
        if classifier_scores is not None:
            entry["plug_in"] = logistic_loss(classifier_scores(k), labels[test])
        if assumption:
            entry["assumption"] = assumption
        results["features"][kind].update(entry)

    eps_task, excess_task = float(kl[test, -1].mean()), float(excess[test, -1].mean())
    record("p_f", tau_box, box.max_norm, epsilon.mean, eps_task, False,
           lambda k: task["p_f"][test] @ box.word_weights[k])
    record("phi_p_f", tau_phi, along_phi.max_norm, epsilon.mean, eps_task, False,
           lambda k: task["phi_p_f"][test] @ along_phi.weights[k])
    if objective == "quad":
        gram = phi64.T @ phi64
        record("f", tau_phi, along_phi.l2_norm, excess_quad.mean, excess_task, True,
               lambda k: task_f[test] @ (gram @ along_phi.weights[k]))
    else:
        # Under the quadratic log-partition assumption Φp_f = A f + b: fit (A, b) on the train documents and
        # apply the natural classifier λ to A f + b, a linear classifier on f.
        affine = kernels.fit_affine(task_f[train], task["phi_p_f"][train], precision=precision)
        affine_test = np.asarray(affine(task_f[test], precision=precision), np.float64)
        record("f", tau_phi, along_phi.max_norm, epsilon.mean, eps_task, False,
               lambda k: affine_test @ along_phi.weights[k],
               assumption="quadratic log-partition (Φp_f affine in f); plug_in applies λ to the fitted A f + b")
        results["features"]["f"]["affine_r2"] = float(kernels.r_squared(task["phi_p_f"][test], affine_test))
    results["tau"] = {"box": float(tau_box.min()), "phi": float(tau_phi.min())}
    return results


def evaluate_model_on_task(lm, task, gamma: float, *, objective: str = "xent", **options) -> dict:
    """:func:`evaluate_against_truth` for a model on a ``synthetic.TaskData``: f(s) at every context of every
    document from ``lm.hidden(tokens, mask)`` (any :class:`~sentcomp.models.LanguageModel`), Φ from ``lm.phi``.

    The documents have one fixed length, so one unpadded forward pass gives all contexts (causal attention:
    position t sees x_{1:t}). ``options`` go to :func:`evaluate_against_truth`.
    """
    contexts = jnp.asarray(task.contexts)
    features = lm.hidden(contexts, jnp.ones_like(contexts))
    return evaluate_against_truth(features, lm.phi, task.truth.log_next, task.labels, gamma, objective=objective,
                                  **options)

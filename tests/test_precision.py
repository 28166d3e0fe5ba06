"""The kernels' precision policy (sentcomp/kernels/precision.py): every matmul runs at HIGHEST by default.

CPU computes float32 products exactly at any precision setting, so no numerical test here could see a product
left at XLA's default (bfloat16 inputs on TPU, TF32 on GPU). These tests read the lowered StableHLO instead:
every ``dot_general`` of every public kernel (and of the losses' gradients) must carry ``[HIGHEST, HIGHEST]``,
and ``[DEFAULT, DEFAULT]`` with ``precision="default"`` (proving the argument reaches each op). Every name in
``sentcomp.kernels.__all__`` must be covered or listed as matmul-free or as no kernel, so a new kernel is
checked automatically or fails loudly.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sentcomp import kernels, theory

N, D, V, K, S = 6, 3, 10, 2, 2  # rows, feature dim, vocabulary, classes (targets), splits
_rng = np.random.default_rng(0)


def _normal(*shape):
    return jnp.asarray(_rng.normal(size=shape), jnp.float32)


H, PHI, THETA = _normal(N, D), _normal(V, D), _normal(N, D)
TARGETS, MASK = jnp.asarray(_rng.integers(0, V, N)), jnp.asarray([1, 1, 1, 0, 1, 1], jnp.float32)
WORD_IDS = jnp.asarray([1, 4, 7])
LABELS = jnp.asarray([0, 1, 0, 1, 1, 0])
ONE_HOT = jax.nn.one_hot(LABELS, K, dtype=jnp.float32)
SPLIT_WEIGHTS = jnp.asarray([[1, 1, 1, 0, 0, 1], [1, 1, 1, 1, 1, 1]], jnp.float32)
GRID = jnp.asarray([0.1, 1.0, 10.0], jnp.float32)
P_STAR = jax.nn.softmax(_normal(N, V), axis=-1)
FOLDS = (_normal(2, 3, D), jnp.reshape(ONE_HOT, (2, 3, K)), jnp.ones((2, 3), jnp.float32))  # x, targets, mask
MOMENTS = kernels.ridge_moments(H, ONE_HOT, SPLIT_WEIGHTS)
COEF, INTERCEPT = _normal(D, 1), _normal(1)

# A case maps a precision to ``(function, args)``: ``jax.jit(function).lower(*args)`` is what is checked.
KERNEL_CASES = {
    "conditional_mean_features": lambda p: (lambda h, phi: kernels.conditional_mean_features(
        h, phi, 4, precision=p), (H, PHI)),  # chunk 4 < V: several chunks, the last one shifted
    "expected_values": lambda p: (lambda h, phi: kernels.expected_values(h, phi, PHI[:, :3], 4, precision=p),
                                  (H, PHI)),
    "log_partition": lambda p: (lambda h, phi: kernels.log_partition(h, phi, 4, precision=p), (H, PHI)),
    "log_partition/grad": lambda p: (jax.grad(lambda h, phi: kernels.log_partition(
        h, phi, 4, precision=p).sum(), argnums=(0, 1)), (H, PHI)),
    "word_logits": lambda p: (lambda h, phi: kernels.word_logits(h, phi, WORD_IDS, precision=p), (H, PHI)),
    "word_log_probs": lambda p: (lambda h, phi: kernels.word_log_probs(h, phi, WORD_IDS, 4, precision=p), (H, PHI)),
    "word_probs": lambda p: (lambda h, phi: kernels.word_probs(h, phi, WORD_IDS, 4, precision=p), (H, PHI)),
    "xent_per_position": lambda p: (lambda h, phi: kernels.xent_per_position(h, phi, TARGETS, 4, precision=p),
                                    (H, PHI)),
    "xent_loss": lambda p: (lambda h, phi: kernels.xent_loss(h, phi, TARGETS, MASK, 4, precision=p), (H, PHI)),
    "xent_loss/grad": lambda p: (jax.grad(lambda h, phi: kernels.xent_loss(
        h, phi, TARGETS, MASK, 4, precision=p), argnums=(0, 1)), (H, PHI)),
    "quad_per_position": lambda p: (lambda h, phi: kernels.quad_per_position(h, phi, TARGETS, precision=p),
                                    (H, PHI)),
    "quad_loss": lambda p: (lambda h, phi: kernels.quad_loss(h, phi, TARGETS, MASK, 2, precision=p), (H, PHI)),
    "quad_loss/grad": lambda p: (jax.grad(lambda h, phi: kernels.quad_loss(
        h, phi, TARGETS, MASK, 2, precision=p), argnums=(0, 1)), (H, PHI)),  # 3 row blocks of 2
    "AffineFit": lambda p: (lambda a, b, x: kernels.AffineFit(a, b)(x, precision=p), (_normal(K, D), _normal(K), H)),
    "QuadraticFit": lambda p: (lambda a, b, x: kernels.QuadraticFit(a, b, jnp.float32(1.0))(x, precision=p),
                               (_normal(D, D), _normal(D), H)),
    "embedding_covariance": lambda p: (lambda phi: kernels.embedding_covariance(phi, precision=p), (PHI,)),
    "fit_affine": lambda p: (lambda x, y: kernels.fit_affine(x, y, 0.1, precision=p), (H, THETA)),
    "fit_log_partition": lambda p: (lambda x, y: kernels.fit_log_partition(x, y, precision=p), (H, H[:, 0])),
    "fit_log_partition/basis": lambda p: (lambda x, y, basis: kernels.fit_log_partition(
        x, y, 0.1, basis, precision=p), (H, H[:, 0], jnp.eye(D)[:2])),
    "fit_log_partition_fixed_a": lambda p: (lambda x, y, a: kernels.fit_log_partition_fixed_a(
        x, y, a, precision=p), (H, H[:, 0], jnp.eye(D))),
    "gaussian_log_partition": lambda p: (lambda phi: kernels.gaussian_log_partition(phi, precision=p), (PHI,)),
    "weighted_standardisation": lambda p: (lambda x, w: kernels.weighted_standardisation(x, w, precision=p),
                                           (H, SPLIT_WEIGHTS[0])),
    "linear_scores": lambda p: (lambda x, c, b: kernels.linear_scores(x, c, b, precision=p), (H, COEF, INTERCEPT)),
    "logistic_objective": lambda p: (lambda x, c, b: kernels.logistic_objective(
        x, LABELS, SPLIT_WEIGHTS[0], 1.0, c, b, 2, precision=p), (H, COEF, INTERCEPT)),
    "logistic_regression_grid": lambda p: (lambda x, w, c: kernels.logistic_regression_grid(
        x, LABELS, w, c, num_classes=2, standardize=True, precision=p), (H, SPLIT_WEIGHTS, GRID)),
    "logistic_regression_grid/cold": lambda p: (lambda x, w, c: kernels.logistic_regression_grid(
        x, LABELS % 3, w, c, num_classes=3, warm_start=False, precision=p), (H, SPLIT_WEIGHTS, GRID)),
    "ridge_moments": lambda p: (lambda x, y, w: kernels.ridge_moments(x, y, w, precision=p),
                                (H, ONE_HOT, SPLIT_WEIGHTS)),
    "fold_moments": lambda p: (lambda *folds: kernels.fold_moments(*folds, precision=p), FOLDS),
    "kfold_split_moments": lambda p: (lambda m: kernels.kfold_split_moments(m, precision=p),
                                      (kernels.fold_moments(*FOLDS),)),
    "kfold_ridge_moments": lambda p: (lambda *folds: kernels.kfold_ridge_moments(*folds, precision=p), FOLDS),
    "ridge_grid": lambda p: (lambda m, a: kernels.ridge_grid(m, a, precision=p), (MOMENTS, GRID)),
    "ridge_grid/eigh": lambda p: (lambda m, a: kernels.ridge_grid(m, a, True, "eigh", precision=p), (MOMENTS, GRID)),
    "ridge_grid_dual": lambda p: (lambda x, y, w, a: kernels.ridge_grid_dual(x, y, w, a, precision=p),
                                  (H, ONE_HOT, SPLIT_WEIGHTS, GRID)),
    "ridge_grid_dual/standardized": lambda p: (lambda x, y, w, a, rows: kernels.ridge_grid_dual(
        x, y, w[:1], a, True, (rows,), precision=p), (H, ONE_HOT, SPLIT_WEIGHTS, GRID, jnp.asarray([0, 1, 2, 5]))),
}

THEORY_CASES = {
    "quad_optimum": lambda p: (lambda p_star, phi: theory.quad_optimum(p_star, phi, precision=p), (P_STAR, PHI)),
    "excess_quad_loss": lambda p: (lambda theta, phi, p_star: theory.excess_quad_loss(
        theta, phi, p_star, precision=p), (THETA, PHI, P_STAR)),
}

# the distillation kernels (sentcomp/kernels/distill.py): sparse targets of K_TOP words, a teacher of width D + 1
K_TOP = 4
TOP_IDS = jnp.asarray(np.argsort(-np.asarray(P_STAR), axis=-1)[:, :K_TOP], jnp.int32)
TOP_PROBS = jnp.take_along_axis(P_STAR, TOP_IDS, axis=-1)
H_TEACHER, PHI_TEACHER = _normal(N, D + 1), _normal(V, D + 1)
KERNEL_CASES.update({
    "sparse_target_mean": lambda p: (lambda phi: kernels.sparse_target_mean(TOP_IDS, TOP_PROBS, phi, precision=p),
                                     (PHI,)),
    "soft_xent_per_position": lambda p: (lambda h, phi: kernels.soft_xent_per_position(
        h, phi, TOP_IDS, TOP_PROBS, 4, precision=p), (H, PHI)),
    "soft_xent_loss": lambda p: (lambda h, phi: kernels.soft_xent_loss(
        h, phi, TOP_IDS, TOP_PROBS, MASK, 4, precision=p), (H, PHI)),
    "soft_xent_loss/grad": lambda p: (jax.grad(lambda h, phi: kernels.soft_xent_loss(
        h, phi, TOP_IDS, TOP_PROBS, MASK, 4, precision=p), argnums=(0, 1)), (H, PHI)),
    "soft_quad_from_mean": lambda p: (lambda h, phi: kernels.soft_quad_from_mean(h, phi, THETA, precision=p),
                                      (H, PHI)),
    "soft_quad_per_position": lambda p: (lambda h, phi: kernels.soft_quad_per_position(
        h, phi, TOP_IDS, TOP_PROBS, precision=p), (H, PHI)),
    "soft_quad_loss": lambda p: (lambda h, phi: kernels.soft_quad_loss(
        h, phi, TOP_IDS, TOP_PROBS, MASK, precision=p), (H, PHI)),
    "soft_quad_loss/grad": lambda p: (jax.grad(lambda h, phi: kernels.soft_quad_loss(
        h, phi, TOP_IDS, TOP_PROBS, MASK, precision=p), argnums=(0, 1)), (H, PHI)),
    "quad_excess": lambda p: (lambda h, phi: kernels.quad_excess(h, phi, THETA, precision=p), (H, PHI)),
    "kl_from_features": lambda p: (lambda h, phi: kernels.kl_from_features(
        H_TEACHER, PHI_TEACHER, h, phi, 4, precision=p), (H, PHI)),
})

# Public names that compute on arrays without any matrix product: checked to lower to no dot_general at all.
MATMUL_FREE = {
    "masked_mean": lambda: (lambda v, m: kernels.masked_mean(v, m), (H[:, 0], MASK)),
    "r_squared": lambda: (lambda y, z: kernels.r_squared(y, z), (H, THETA)),
    "logistic_targets": lambda: (lambda y: kernels.logistic_targets(y, 3, "ovr"), (LABELS,)),
    "logistic_losses": lambda: (lambda z, y: kernels.logistic_losses(z, y, False), (H, jax.nn.softmax(THETA))),
    "predict_labels": lambda: (lambda z: kernels.predict_labels(z), (H,)),
    "centered_ridge": lambda: (lambda m: kernels.centered_ridge(m, True), (MOMENTS,)),
    "remaining_mass": lambda: (lambda p: kernels.remaining_mass(p), (TOP_PROBS,)),
    "sparse_target_entropy": lambda: (lambda p: kernels.sparse_target_entropy(p, V), (TOP_PROBS,)),
    "top_k_targets": lambda: (lambda logits: kernels.top_k_targets(logits, K_TOP), (THETA @ PHI.T,)),
}

# Public names that are no array computation: containers of results, constants, the policy itself.
NOT_KERNELS = {
    "LinearFits", "RidgeMoments", "CenteredRidge",  # NamedTuples of arrays (AffineFit/QuadraticFit are called)
    "MULTI_CLASS_MODES", "DEFAULT_PRECISION", "IGNORE_INDEX",  # constants
    "uses_sigmoid",  # Python ints in, bool out
    "check_precision",  # the policy's validator (tested below)
    "vocab_chunk_for",  # Python ints in, an int out (tests/test_kernels.py)
}

_DOT = re.compile(r"stablehlo\.dot_general\b(.*)")
_PRECISION = re.compile(r"precision = \[(\w+), (\w+)\]")


def _dot_precisions(case, precision=None) -> list[tuple[str, ...]]:
    """The ``(lhs, rhs)`` precision of every dot_general in the case's lowered StableHLO (``("NONE",)`` when a
    dot carries no precision config)."""
    function, args = case(precision) if precision is not None else case()
    text = jax.jit(function).lower(*args).as_text()
    found = []
    for match in _DOT.finditer(text):
        config = _PRECISION.search(match.group(1))
        found.append(config.groups() if config else ("NONE",))
    return found


def test_every_public_kernel_is_checked():
    public = set(kernels.__all__)
    covered = {name.split("/")[0] for name in KERNEL_CASES}
    classified = covered | set(MATMUL_FREE) | NOT_KERNELS
    assert public - classified == set(), (
        "new public kernels: add a case to KERNEL_CASES (or list them in MATMUL_FREE / NOT_KERNELS)"
    )
    assert classified - public == set(), "cases for names that are no longer public"
    assert not (covered & set(MATMUL_FREE)) and not (covered & NOT_KERNELS) and not (set(MATMUL_FREE) & NOT_KERNELS)


CASES = {**KERNEL_CASES, **{f"theory.{name}": case for name, case in THEORY_CASES.items()}}


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_matmul_runs_at_highest_by_default_and_follows_the_argument(name):
    highest = _dot_precisions(CASES[name], "highest")
    assert highest, f"{name}: no dot_general lowered (move it to MATMUL_FREE if it has no matrix product)"
    assert all(p == ("HIGHEST", "HIGHEST") for p in highest), f"{name}: {highest}"
    default = _dot_precisions(CASES[name], "default")
    assert len(default) == len(highest)
    assert all(p in (("DEFAULT", "DEFAULT"), ("NONE",)) for p in default), f"{name} with 'default': {default}"
    assert all(p == ("HIGH", "HIGH") for p in _dot_precisions(CASES[name], "high")), name


def test_the_default_is_highest():
    """The keyword's default is the policy: calling without ``precision=`` lowers the same as "highest"."""
    def lowered(function):
        return jax.jit(function).lower(H, PHI).as_text()

    assert kernels.DEFAULT_PRECISION == "highest"
    for default, explicit in [
        (lambda h, phi: kernels.xent_loss(h, phi, TARGETS, MASK),
         lambda h, phi: kernels.xent_loss(h, phi, TARGETS, MASK, precision="highest")),
        (jax.grad(lambda h, phi: kernels.quad_loss(h, phi, TARGETS, MASK)),
         jax.grad(lambda h, phi: kernels.quad_loss(h, phi, TARGETS, MASK, precision="highest"))),
        (lambda h, phi: theory.excess_quad_loss(h, phi, P_STAR),
         lambda h, phi: theory.excess_quad_loss(h, phi, P_STAR, precision="highest")),
    ]:
        assert lowered(default) == lowered(explicit)


@pytest.mark.parametrize("name", sorted(MATMUL_FREE))
def test_matmul_free_names_have_no_matmul(name):
    assert _dot_precisions(MATMUL_FREE[name]) == [], f"{name} now multiplies matrices: give it precision="


@pytest.mark.parametrize("value", [
    None, "highest", "high", "default", "float32", "tensorfloat32", "bfloat16", jax.lax.Precision.HIGH,
    (jax.lax.Precision.HIGHEST, jax.lax.Precision.DEFAULT), ("highest", "high"), jax.lax.DotAlgorithmPreset.F32_F32_F32,
    "F32_F32_F32",
])
def test_check_precision_accepts_what_jnp_accepts(value):
    assert kernels.check_precision(value) is value
    jax.jit(lambda a: jnp.dot(a, a.T, precision=value)).lower(H)  # and jnp does accept it


@pytest.mark.parametrize("value", ["HIGHEST", "fp32", 3, ["highest", "highest"], ("highest",)])
def test_check_precision_rejects_with_the_accepted_values(value):
    with pytest.raises(ValueError, match="precision must be None, one of .*'highest'"):
        kernels.check_precision(value)
    with pytest.raises(ValueError, match="precision must be"):
        kernels.log_partition(H, PHI, precision=value)


def test_jitted_kernels_run_at_another_precision():
    """Precision is a static argument of the jitted kernels: a call (not only a lowering) at "default" works and
    on CPU, where every setting is exact float32, gives the same fits."""
    fits = [kernels.ridge_grid(MOMENTS, GRID, precision=p).coef for p in ("highest", "default")]
    np.testing.assert_allclose(fits[0], fits[1], rtol=1e-6)
    fits = [kernels.logistic_regression_grid(H, LABELS, SPLIT_WEIGHTS, GRID, num_classes=2, precision=p).coef
            for p in ("highest", jax.lax.Precision.DEFAULT)]
    np.testing.assert_allclose(fits[0], fits[1], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------- training precision

_TOKENS = jnp.asarray(_rng.integers(0, V, (2, 5)))
_TRAIN_PARAMS = {"embedding": _normal(V, D), "phi": _normal(V, D)}


def _lookup(params, inputs, mask):  # a "model" without matrix products: every dot_general is the loss's
    return params["embedding"][inputs]


def _train_loss_case(loss_name, compute_dtype=jnp.float32):
    """The training gradient (steps.batch_loss) at a precision: ``(function, args)`` for ``_dot_precisions``."""
    from sentcomp.training import steps

    def case(precision):
        def loss(params):
            return steps.batch_loss(loss_name, _lookup, lambda p: p["phi"], params, _TOKENS,
                                       jnp.ones((2, 4), bool), compute_dtype, precision=precision)
        return jax.value_and_grad(loss), (_TRAIN_PARAMS,)
    return case


@pytest.mark.parametrize("loss_name", ["xent", "quad"])
def test_the_training_loss_follows_the_training_precision(loss_name):
    """steps.batch_loss passes its precision to every product of the loss and its gradient (default HIGHEST);
    with bf16 compute every product still accumulates in float32 and the loss is float32."""
    case = _train_loss_case(loss_name)
    assert all(p == ("HIGHEST", "HIGHEST") for p in _dot_precisions(case, "highest"))
    high = _dot_precisions(case, "high")
    assert high and all(p == ("HIGH", "HIGH") for p in high)
    function, args = _train_loss_case(loss_name, jnp.bfloat16)("high")
    text = jax.jit(function).lower(*args).as_text()
    dots = [line for line in text.splitlines() if "stablehlo.dot_general" in line]
    assert dots and all(re.search(r"-> tensor<[^>]*xf32>", line) for line in dots), dots
    value, _ = jax.jit(function)(*args)
    assert value.dtype == jnp.float32


def test_training_precision_per_backend():
    from sentcomp.errors import SentcompError
    from sentcomp.training import steps

    assert steps.training_precision("auto", "gpu") == "high"
    assert steps.training_precision("auto", "tpu") == "high"
    assert steps.training_precision("auto", "cpu") == "highest"
    assert steps.training_precision("default") == "default"
    with pytest.raises(SentcompError, match="config.matmul_precision: precision must be.*'auto'"):
        steps.training_precision("fp32")


@pytest.mark.parametrize("objective", ["soft_xent", "soft_quad"])
def test_the_distillation_step_follows_the_training_precision(objective):
    """sentcomp.programs.distill's soft train step (config.matmul_precision) passes its precision to the soft loss:
    the loss's products and their gradients lower at HIGH with "high" and at HIGHEST with "highest"."""
    import ml_collections
    import optax

    from sentcomp import parallel
    from sentcomp.models import tokenizers
    from sentcomp.programs import distill
    from sentcomp.training import steps

    config = ml_collections.ConfigDict(dict(objective=objective, seed=0, model=dict(
        family="llama", n_layer=1, n_embd=16, n_head=2, n_positions=16, intermediate_size=32,
        tie_word_embeddings=True)))
    lm = distill.build_student(config, tokenizers.byte_tokenizer())
    mesh = parallel.make_mesh({"data": 1, "fsdp": 1}, jax.devices()[:1])
    optimizer = optax.sgd(0.1)
    state = steps.initial_state(lm.params, optimizer, mesh)
    batch = (jnp.zeros((2, 1, 9), jnp.int32), jnp.zeros((2, 1, 8, 4), jnp.int32), jnp.full((2, 1, 8, 4), 0.2))

    def precisions(precision):
        step = distill.soft_train_step(objective, lm, optimizer, jnp.float32, mesh, precision)
        text = step.lower(state, batch).as_text()
        return {config.groups() if config else ("NONE",)
                for config in (_PRECISION.search(m.group(1)) for m in _DOT.finditer(text))}

    assert ("HIGH", "HIGH") in precisions("high") and ("HIGHEST", "HIGHEST") not in precisions("high")
    assert ("HIGHEST", "HIGHEST") in precisions("highest") and ("HIGH", "HIGH") not in precisions("highest")

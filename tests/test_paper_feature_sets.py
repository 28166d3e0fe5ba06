"""The paper's two other feature sets: the full next-word distribution p_f(s) (V-dimensional, probed exactly
through its N × N kernel matrix) and a seeded random orthonormal projection A p_f(s) (streamed over V), against
float64 numpy references and scikit-learn, and as Table-1 columns."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from sentcomp import features, kernels, probe
from sentcomp.evaluators import task_data
from sentcomp.launcher.config_files import EXPERIMENTS_DIR, load_config, override
from sentcomp.models import gpt2, tokenizers
from sentcomp.programs import table1


def _softmax64(logits):
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return np.exp(shifted) / np.exp(shifted).sum(axis=-1, keepdims=True)


def test_expected_values_match_float64_numpy():
    rng = np.random.default_rng(0)
    h, phi, values = rng.normal(size=(5, 3, 8)), rng.normal(size=(37, 8)) * 2, rng.normal(size=(37, 6))
    expected = _softmax64(h @ phi.T) @ values
    got = kernels.expected_values(jnp.asarray(h, jnp.float32), jnp.asarray(phi, jnp.float32),
                                  jnp.asarray(values, jnp.float32), chunk_size=10)  # 37 = 3 chunks + a shifted one
    np.testing.assert_allclose(np.asarray(got), expected, rtol=2e-5, atol=2e-6)
    with pytest.raises(ValueError, match="values has 36 rows but the vocabulary has 37"):
        kernels.expected_values(jnp.asarray(h, jnp.float32), jnp.asarray(phi, jnp.float32), jnp.zeros((36, 6)))


def test_random_projection_is_orthonormal_and_seeded():
    a_t = features.random_projection(300, 16, seed=3)
    np.testing.assert_allclose(a_t.T.astype(np.float64) @ a_t, np.eye(16), atol=1e-5)
    np.testing.assert_array_equal(a_t, features.random_projection(300, 16, seed=3))
    assert not np.allclose(a_t, features.random_projection(300, 16, seed=4))


def test_projected_distribution_of_a_model_matches_numpy(tmp_path):
    lm = gpt2.init(gpt2.gpt2_config(n_layer=1, n_embd=24, n_head=2, n_positions=64, vocab_size=257), 1,
                   tokenizer=tokenizers.byte_tokenizer())
    texts = ["a short text", "another, slightly longer text", "x"]
    out = features.extract_features(lm, texts, ("f", "projected_p_f", "p_f"), cache_dir=tmp_path, batch_size=8,
                                    projection_seed=5, progress=False)
    p_f = _softmax64(out["f"].astype(np.float64) @ np.asarray(lm.phi, np.float64).T)
    np.testing.assert_allclose(out["p_f"], p_f, rtol=1e-4, atol=1e-7)
    expected = p_f @ features.random_projection(257, 24, seed=5).astype(np.float64)
    np.testing.assert_allclose(out["projected_p_f"], expected, rtol=1e-4, atol=1e-6)
    assert out["projected_p_f"].shape == (3, 24)


@pytest.mark.slow
def test_row_space_features_give_the_probe_on_the_full_features():
    """More features than rows, like p_f: probing Z (N columns) equals probing X (D columns), and matches sklearn."""
    rng = np.random.default_rng(1)
    n_train, n_test, dim = 40, 20, 300
    logits = rng.normal(size=(n_train + n_test, dim))
    labels = rng.integers(2, size=n_train + n_test)
    logits[:, :5] += 1.5 * labels[:, None]
    x = _softmax64(logits)  # rows on the simplex, like p_f(s)
    z = probe.row_space_features(x, column_chunk=64)
    assert z.shape == (n_train + n_test, n_train + n_test)
    np.testing.assert_allclose(z.astype(np.float64) @ z.T, x @ x.T, atol=1e-7)
    splits = lambda a: (a[:n_train], labels[:n_train], a[n_train:], labels[n_train:])  # noqa: E731
    on_x, on_z = probe.evaluate(*splits(x * 100)), probe.evaluate(*splits(z * 100))
    assert on_z.regularisation == on_x.regularisation and on_z.test_accuracy == on_x.test_accuracy
    # the same up to one cross-validation prediction: the two float32 problems differ by rounding (~1e-7), and at
    # the weakest regularisation a point near the boundary can fall either side (as it does at XLA's LLVM -O0)
    np.testing.assert_allclose(on_z.cv_mean, on_x.cv_mean, atol=1 / n_train + 1e-6)
    c = on_x.regularisation
    sk_x = LogisticRegression(C=c, tol=1e-10, max_iter=10_000).fit(x[:n_train] * 100, labels[:n_train])
    sk_z = LogisticRegression(C=c, tol=1e-10, max_iter=10_000).fit(z[:n_train] * 100, labels[:n_train])
    np.testing.assert_allclose(sk_z.decision_function(z[n_train:] * 100), sk_x.decision_function(x[n_train:] * 100),
                               atol=1e-3)  # Z is float32: its coordinates carry ~1e-7 relative error


@pytest.mark.slow
def test_table1_columns_for_the_full_and_projected_distribution(tmp_path):
    config = override(load_config(f"{EXPERIMENTS_DIR / 'table1.py'}:smoke"), {
        "columns": ("p_f", "projected_p_f"), "zeroshot.enabled": False, "n_train": 24, "n_test": 12})
    table1.run(config, tmp_path)
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["table"]["rotten_tomatoes"]) == {"p_f", "projected_p_f"}
    cell = next(c for c in results["cells"] if c["key"] == "rotten_tomatoes/p_f/0")
    assert cell["n_features"] <= 36  # the kernel-matrix coordinates, not V = 50,257 columns
    (p_f_file,) = [path for path in (tmp_path / "features").glob("*/p_f.npy")
                   if json.loads((path.parent / "manifest.json").read_text())["prompt"] is None]
    data = task_data.prepare_task("rotten_tomatoes", config)
    (train_rows, test_rows), (train, test) = data.pair_rows[0], data.pairs[0]
    full = np.load(p_f_file).astype(np.float64)  # [N, 50257]: scikit-learn fits the V columns directly
    direct = LogisticRegression(C=cell["regularisation"], tol=1e-10, max_iter=10_000).fit(full[train_rows],
                                                                                           train.labels)
    assert cell["test_accuracy"] == pytest.approx(direct.score(full[test_rows], test.labels))
    projected = next(c for c in results["cells"] if c["key"] == "rotten_tomatoes/projected_p_f/0")
    assert projected["n_features"] == config.random_gpt2.n_embd

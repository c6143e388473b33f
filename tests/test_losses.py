"""The annealed DSM loss against a NumPy write-out and the closed form for Gaussian data."""
import numpy as np
import pytest
import tensorflow as tf

from ncsn_tf.training.losses import dsm_loss

SIGMAS = np.geomspace(10.0, 0.1, 6).astype(np.float32)


def gaussian_score(variance):
    """The exact score of N(0, (variance + σ²) I), the Gaussian data N(0, variance·I)
    perturbed at level σ, as a `score_fn`."""
    def score_fn(y, labels):
        sigma = tf.gather(SIGMAS, labels)[:, None, None, None]
        return -y / (variance + sigma ** 2)
    return score_fn


def numpy_dsm(score, x, labels, noise, anneal_power):
    sigma = SIGMAS[labels].astype(np.float64)
    target = -noise / sigma.reshape(-1, *[1] * (x.ndim - 1))
    per_example = 0.5 * ((score - target) ** 2).reshape(len(x), -1).sum(axis=1)
    return per_example * sigma ** anneal_power


@pytest.mark.parametrize("anneal_power", [2.0, 1.0, 0.0])
def test_matches_numpy(anneal_power):
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(5, 4, 4, 3)).astype(np.float32)
    noise = rng.normal(size=x.shape).astype(np.float32)
    labels = np.array([0, 5, 2, 2, 3], np.int32)
    weights = rng.normal(size=x.shape[1:]).astype(np.float32)

    def score_fn(y, i):  # any function of (x̃, i); here elementwise, easy to redo in NumPy
        return tf.tanh(y * weights) - tf.gather(SIGMAS, i)[:, None, None, None]

    loss = dsm_loss(score_fn, x, SIGMAS, labels, noise, anneal_power)
    perturbed = x + SIGMAS[labels][:, None, None, None] * noise
    score = np.tanh(perturbed * weights) - SIGMAS[labels][:, None, None, None]
    assert loss.shape == (5,) and loss.dtype == tf.float32
    np.testing.assert_allclose(loss, numpy_dsm(score, x, labels, noise, anneal_power),
                               rtol=1e-5)


def test_passes_the_perturbed_data_and_labels_to_the_score_function():
    x = np.zeros((2, 2, 2, 1), np.float32)
    noise = np.ones_like(x)
    labels = np.array([1, 4], np.int32)
    seen = {}

    def score_fn(y, i):
        seen["y"], seen["i"] = y.numpy(), i.numpy()
        return tf.zeros_like(y)

    loss = dsm_loss(score_fn, x, SIGMAS, labels, noise)
    np.testing.assert_allclose(seen["y"][:, 0, 0, 0], SIGMAS[labels])
    np.testing.assert_array_equal(seen["i"], labels)
    # Zero score: ½·D·(1/σ)²·σ² = D/2 for every example, whatever σ.
    np.testing.assert_allclose(loss, [2.0, 2.0], rtol=1e-6)


def test_exact_score_reaches_the_closed_form_minimum():
    """For data N(0, s²I) in D dims, the exact perturbed score has expected loss
    D·s²/(2(s² + σ²)) at every level (with σ² weighting); scaled scores do worse."""
    rng = np.random.default_rng(1)
    variance, n, shape = 0.25, 4000, (2, 2, 3)
    x = (np.sqrt(variance) * rng.normal(size=(n, *shape))).astype(np.float32)
    noise = rng.normal(size=x.shape).astype(np.float32)
    for level in (0, 3, 5):
        labels = np.full(n, level, np.int32)
        loss = dsm_loss(gaussian_score(variance), x, SIGMAS, labels, noise).numpy()
        expected = 12 * variance / (2 * (variance + SIGMAS[level] ** 2))
        np.testing.assert_allclose(loss.mean(), expected, rtol=0.05)
        for scale in (0.8, 1.25):
            worse = dsm_loss(lambda y, i: scale * gaussian_score(variance)(y, i), x, SIGMAS,
                             labels, noise).numpy()
            assert worse.mean() > loss.mean()


def test_works_for_any_rank_and_low_precision_scores():
    rng = np.random.default_rng(2)
    x = rng.uniform(size=(3, 7)).astype(np.float32)
    noise = rng.normal(size=x.shape).astype(np.float32)
    labels = np.array([0, 1, 2], np.int32)
    loss = dsm_loss(lambda y, i: tf.cast(-y, tf.bfloat16), x, SIGMAS, labels, noise)
    perturbed = x + SIGMAS[labels][:, None] * noise
    score = tf.cast(tf.cast(-perturbed, tf.bfloat16), tf.float32).numpy()
    assert loss.dtype == tf.float32
    np.testing.assert_allclose(loss, numpy_dsm(score, x, labels, noise, 2.0), rtol=1e-5)

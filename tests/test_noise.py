"""Noise tables and the paper's Techniques 1, 2 and 4 against closed forms, the paper's numbers
and scipy."""
import itertools
import logging
import math

import numpy as np
import pytest
import tensorflow as tf
from scipy import stats
from scipy.spatial.distance import pdist

from ncsn_tf import noise
from ncsn_tf.config import presets

# (σ1, L, T, ε as the paper solves Eq. 6 for the official configs; σL = 0.01 everywhere)
OFFICIAL = {
    "cifar10": (50.0, 232, 5, 6.18e-6),
    "celeb_a": (90.0, 500, 5, 3.34e-6),
    "lsun_bedroom": (190.0, 1086, 3, 1.77e-6),
    "ffhq": (348.0, 2311, 3, 8.93e-7),
}


def _eq6_as_printed(eps, T, gamma, sigma_end):
    """Eq. 6 of the paper, term by term."""
    s2 = sigma_end**2
    c = 2 * eps / (s2 - s2 * (1 - eps / s2) ** 2)
    return (1 - eps / s2) ** (2 * T) * (gamma**2 - c) + c


# --- noise tables ----------------------------------------------------------------------------

def test_geometric_sigmas_have_a_constant_ratio_from_sigma_begin_to_sigma_end():
    sigmas = noise.get_sigmas(50.0, 0.01, 232)
    assert sigmas.dtype == np.float32 and sigmas.shape == (232,)
    i = np.arange(232)
    np.testing.assert_allclose(sigmas, 50.0 * (0.01 / 50.0) ** (i / 231), rtol=1e-6)
    ratios = sigmas[:-1].astype(np.float64) / sigmas[1:]
    np.testing.assert_allclose(ratios, noise.geometric_ratio(50.0, 0.01, 232), rtol=1e-5)
    assert np.all(np.diff(sigmas) < 0)


def test_uniform_sigmas_are_evenly_spaced():
    sigmas = noise.get_sigmas(1.0, 0.01, 10, dist="uniform")
    np.testing.assert_allclose(sigmas, 1.0 - np.arange(10) * 0.99 / 9, rtol=1e-6)


@pytest.mark.parametrize("args, error, match", [
    ((1.0, 0.01, 10, "cosine"), ValueError, "Unknown sigma_dist"),
    ((1.0, 0.01, 1), ValueError, "at least 2"),
    ((0.01, 1.0, 10), ValueError, "sigma_begin > sigma_end > 0"),
    ((1.0, 0.0, 10), ValueError, "sigma_begin > sigma_end > 0"),
    ((1.0, 0.01, 10.5), TypeError, "num_scales must be an integer"),
])
def test_get_sigmas_rejects_bad_input(args, error, match):
    with pytest.raises(error, match=match):
        noise.get_sigmas(*args)


# --- Technique 2 -------------------------------------------------------------------------------

def test_gamma_solves_the_technique_2_condition_and_matches_the_paper_for_cifar10():
    gamma = noise.gamma_for_dimension(3072)
    shift = math.sqrt(2 * 3072) * (gamma - 1)
    assert (stats.norm.cdf(shift + 3 * gamma) - stats.norm.cdf(shift - 3 * gamma)
            == pytest.approx(0.5, abs=1e-10))
    assert gamma == pytest.approx(1.0398, abs=1e-4)  # paper.md
    # The paper's L ≈ 219 is 1 + log(50/0.01)/log γ = 219.25, which rounds up to 220 levels.
    assert 1 + math.log(5000) / math.log(gamma) == pytest.approx(219.25, abs=0.01)
    assert noise.num_scales_for(50.0, 0.01, gamma) == 220


def test_gamma_approaches_one_plus_3_over_sqrt_2d_in_high_dimension():
    # For large D the condition becomes Φ(a + 3) − Φ(a − 3) = 0.5 with a = √(2D)(γ − 1) → 3.
    dims = [256, 784, 3072, 12288, 10**8]
    gammas = [noise.gamma_for_dimension(d) for d in dims]
    assert all(g1 > g2 > 1 for g1, g2 in zip(gammas, gammas[1:]))
    assert gammas[-1] - 1 == pytest.approx(3 / math.sqrt(2e8), rel=1e-3)


def test_gamma_needs_at_least_five_dimensions():
    with pytest.raises(ValueError, match="D >= 5"):
        noise.gamma_for_dimension(4)
    assert noise.gamma_for_dimension(5) > 1


def test_num_scales_rounds_up_so_the_table_ratio_is_at_most_gamma():
    gamma = noise.geometric_ratio(50.0, 0.01, 232)
    assert noise.num_scales_for(50.0, 0.01, gamma) == 232  # no extra level from round-off
    assert noise.num_scales_for(50.0, 0.01, gamma * (1 + 1e-6)) == 232
    assert noise.num_scales_for(50.0, 0.01, gamma * (1 - 1e-6)) == 233
    with pytest.raises(ValueError, match="gamma must be > 1"):
        noise.num_scales_for(50.0, 0.01, 1.0)


# --- Technique 4 -------------------------------------------------------------------------------

@pytest.mark.parametrize("eps, T, gamma, sigma_end", [
    (6.2e-6, 5, 1.0376, 0.01), (1e-8, 3, 1.2, 0.01), (3e-3, 1, 1.5, 0.1), (0.015, 10, 1.01, 0.1),
])
def test_variance_ratio_is_eq6_and_the_variance_of_t_langevin_steps(eps, T, gamma, sigma_end):
    expected = _eq6_as_printed(eps, T, gamma, sigma_end)
    assert noise.variance_ratio(eps, T, gamma, sigma_end) == pytest.approx(expected, rel=1e-9)
    # Langevin on N(0, σL²): x ← (1 − ε/σL²)x + √(2ε)z, started at variance (γσL)².
    variance = (gamma * sigma_end) ** 2
    for _ in range(T):
        variance = (1 - eps / sigma_end**2) ** 2 * variance + 2 * eps
    assert noise.variance_ratio(eps, T, gamma, sigma_end) == pytest.approx(
        variance / sigma_end**2, rel=1e-9)


def test_variance_ratio_rejects_an_unstable_step():
    with pytest.raises(ValueError, match="step_lr must be in"):
        noise.variance_ratio(2e-4, 5, 1.04, 0.01)


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_best_step_lr_reproduces_the_papers_solutions_for_the_official_configs(name):
    sigma_begin, num_scales, T, paper_eps = OFFICIAL[name]
    preset = presets.get(name)
    assert (preset.model.sigma_begin, preset.model.num_scales,
            preset.sampling.n_steps_each) == (sigma_begin, num_scales, T)
    gamma = noise.geometric_ratio(sigma_begin, 0.01, num_scales)
    eps = noise.best_step_lr(T, gamma, 0.01)
    assert eps == pytest.approx(paper_eps, rel=3e-3)  # the paper prints 3 digits
    assert eps == pytest.approx(preset.sampling.step_lr, rel=0.05)  # configs round to 2


def test_best_step_lr_minimises_eq6_over_a_dense_grid():
    for T, gamma, sigma_end in [(5, 1.0376, 0.01), (1, 1.3, 0.05), (100, 1.005, 0.01)]:
        eps = noise.best_step_lr(T, gamma, sigma_end)
        grid = np.geomspace(1e-10, 1.0, 200_001) * sigma_end**2
        best_on_grid = np.min(np.abs(_eq6_as_printed(grid, T, gamma, sigma_end) - 1))
        achieved = abs(_eq6_as_printed(eps, T, gamma, sigma_end) - 1)
        assert achieved <= best_on_grid + 1e-12
        # Eq. 6 depends on ε only through ε/σL².
        assert noise.best_step_lr(T, gamma, 2 * sigma_end) == pytest.approx(4 * eps, rel=1e-6)


# --- Techniques 2 and 4 together; our presets ---------------------------------------------------

def test_recommend_chains_technique_2_and_4():
    rec = noise.recommend(3072, 50.0)
    assert rec.num_scales == 220 and rec.n_steps_each == 5 and rec.sigma_end == 0.01
    assert rec.gamma == pytest.approx(1.0398, abs=1e-4)
    assert rec.sigma_ratio <= rec.gamma
    assert rec.sigma_ratio == pytest.approx((50 / 0.01) ** (1 / 219), rel=1e-12)
    assert rec.variance_ratio == pytest.approx(
        _eq6_as_printed(rec.step_lr, 5, rec.sigma_ratio, 0.01), rel=1e-9)
    config = presets.override(presets.get("cifar10"), **rec.overrides())
    assert (config.model.num_scales, config.sampling.step_lr) == (220, rec.step_lr)


def _digits_max_distance():
    """Exact max pairwise distance of scikit-learn's digits as the `digits` preset sees them."""
    from sklearn.datasets import load_digits

    images = load_digits().images.astype(np.float32)[..., None] / 16.0
    images = tf.clip_by_value(tf.image.resize(images, [16, 16], method="bilinear"), 0.0, 1.0)
    return pdist(images.numpy().reshape(len(images), -1)).max()


@pytest.mark.parametrize("name, sigma_begin", [
    ("digits", math.ceil(_digits_max_distance() * 10) / 10),  # Technique 1, rounded up
    ("mnist", math.sqrt(28 * 28)),  # the largest distance possible in [0, 1]^784
])
def test_our_presets_follow_the_techniques(name, sigma_begin):
    config = presets.get(name)
    dim = config.data.image_size**2 * config.data.channels
    assert config.model.sigma_begin == pytest.approx(sigma_begin, abs=1e-12)
    rec = noise.recommend(dim, config.model.sigma_begin, config.model.sigma_end,
                          config.sampling.n_steps_each)
    assert config.model.num_scales == rec.num_scales
    assert config.sampling.step_lr == float(f"{rec.step_lr:.2g}")  # 2 digits, as official


# --- Technique 1 -------------------------------------------------------------------------------

def _dataset(points):
    return tf.data.Dataset.from_tensor_slices(np.asarray(points, np.float32))


@pytest.mark.parametrize("n, block_size", [(37, 8), (32, 8), (5, 64), (6, 1)])
@pytest.mark.parametrize("exact", [False, True])
def test_max_pairwise_distance_matches_scipy(n, block_size, exact):
    rng = np.random.default_rng(n)
    images = rng.uniform(size=(n, 4, 3, 2))
    # Plant the farthest pair in different blocks so that cross-block pairs must be compared.
    images[1] = 0.0
    images[-2] = 1.0
    result = noise.max_pairwise_distance(_dataset(images), exact=exact, block_size=block_size,
                                         progress=False)
    assert result.distance == pytest.approx(pdist(images.reshape(n, -1)).max(), rel=1e-6)
    assert (result.exact, result.num_examples, result.dataset_size, result.dim) == (
        True, n, n, 24)
    assert result.method == f"exact over all {n:,} examples"


def test_max_pairwise_distance_is_accurate_for_points_far_from_the_origin():
    # ‖a‖² + ‖b‖² − 2a·b cancels badly here in float32; the winning pair is measured directly.
    rng = np.random.default_rng(0)
    points = 100.0 + rng.uniform(-0.1, 0.1, size=(50, 64))
    points[7, :] = 100.0 + 0.5
    points[40, :] = 100.0 - 0.5
    expected = pdist(points.astype(np.float32).astype(np.float64)).max()
    for exact in (False, True):
        result = noise.max_pairwise_distance(_dataset(points), exact=exact, block_size=16,
                                             progress=False)
        assert result.distance == pytest.approx(expected, rel=1e-5)


def test_exact_pass_streams_blocks_against_blocks():
    n, block_size = 37, 8
    points = np.random.default_rng(1).normal(size=(n, 5)).astype(np.float32)
    iterations = []

    def generate():
        iterations.append(1)
        yield from points

    images = tf.data.Dataset.from_generator(
        generate, output_signature=tf.TensorSpec([5], tf.float32))
    result = noise.max_pairwise_distance(images, exact=True, block_size=block_size,
                                         progress=False)
    assert result.distance == pytest.approx(pdist(points).max(), rel=1e-6)
    assert result.exact and result.dataset_size == n
    assert len(iterations) == 1 + math.ceil(n / block_size)  # as documented


def test_subsample_is_used_above_max_examples():
    rng = np.random.default_rng(2)
    points = rng.normal(size=(40, 6))
    all_distances = pdist(points.astype(np.float32))
    result = noise.max_pairwise_distance(_dataset(points), max_examples=10, block_size=4,
                                         seed=3, progress=False)
    assert not result.exact
    assert (result.num_examples, result.dataset_size) == (10, 40)
    assert result.method == "uniform random subsample of 10 of 40 examples"
    # A distance between two of the examples, no larger than the exact maximum.
    assert np.min(np.abs(all_distances - result.distance)) < 1e-4
    assert result.distance <= all_distances.max() + 1e-5
    again = noise.max_pairwise_distance(_dataset(points), max_examples=10, block_size=4,
                                        seed=3, progress=False)
    assert again.distance == result.distance


def test_subsample_is_uniform():
    # 1-D points whose pairwise differences are all distinct: the distance of a sample reveals
    # its smallest and largest member. For a uniform 3-of-6 sample, P(min = i, max = j) =
    # (j − i − 1) / C(6, 3).
    positions = np.array([0, 1, 3, 7, 15, 31], np.float32)[:, None]
    pair_of = {positions[j, 0] - positions[i, 0]: (i, j)
               for i, j in itertools.combinations(range(6), 2)}
    runs = 200
    counts = {}
    for seed in range(runs):
        result = noise.max_pairwise_distance(_dataset(positions), max_examples=3, block_size=2,
                                             seed=seed, progress=False)
        pair = pair_of[round(result.distance)]
        counts[pair] = counts.get(pair, 0) + 1
    pairs = [(i, j) for i, j in itertools.combinations(range(6), 2) if j - i >= 2]
    assert set(counts) <= set(pairs)
    observed = [counts.get(p, 0) for p in pairs]
    expected = [runs * (j - i - 1) / 20 for i, j in pairs]
    assert stats.chisquare(observed, expected).pvalue > 1e-3


def test_default_subsample_size_caps_memory_for_large_images():
    assert noise.default_max_examples(32 * 32 * 3) == 20_000
    assert noise.default_max_examples(256 * 256 * 3) == 2 * 2**30 // (4 * 256 * 256 * 3)


def test_progress_is_logged(caplog):
    # The absl logger's own level may have been raised by an earlier CLI run in this process.
    with caplog.at_level(logging.INFO, logger="absl"):
        noise.max_pairwise_distance(_dataset(np.eye(3)), progress=True)
    assert any("3 examples read" in r.getMessage() and "examples/s" in r.getMessage()
               for r in caplog.records)


def test_max_pairwise_distance_rejects_bad_input():
    with pytest.raises(TypeError, match="map it to the image first"):
        noise.max_pairwise_distance(tf.data.Dataset.from_tensor_slices({"image": np.eye(3)}))
    with pytest.raises(ValueError, match="at least 2 examples"):
        noise.max_pairwise_distance(_dataset(np.ones((1, 4))), progress=False)
    with pytest.raises(ValueError, match="infinite"):
        noise.max_pairwise_distance(_dataset(np.eye(3)).repeat())
    with pytest.raises(ValueError, match="leave max_examples unset"):
        noise.max_pairwise_distance(_dataset(np.eye(3)), exact=True, max_examples=10)
    ragged = tf.data.Dataset.from_generator(
        lambda: iter([np.zeros(3, np.float32), np.zeros(4, np.float32)]),
        output_signature=tf.TensorSpec([None], tf.float32))
    for exact in (False, True):
        with pytest.raises(ValueError, match="same number of values"):
            noise.max_pairwise_distance(ragged, exact=exact, progress=False)

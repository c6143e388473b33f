"""FID / IS math and statistics files against closed forms and written-out NumPy formulas."""
import numpy as np
import pytest

from ncsn_tf.evaluation import metrics


def _random_spd(rng, d):
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def _fid_by_eigh(mu1, s1, mu2, s2):
    """Independent reference: tr(Σ1 + Σ2 − 2 (Σ1^½ Σ2 Σ1^½)^½) via symmetric eigendecompositions."""
    w, v = np.linalg.eigh(s1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = np.clip(np.linalg.eigvalsh(root1 @ s2 @ root1), 0, None)
    return np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(inner).sum()


def test_fid_of_equal_gaussians_is_zero():
    rng = np.random.default_rng(0)
    mu, sigma = rng.normal(size=8), _random_spd(rng, 8)
    assert metrics.frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-9)


def test_fid_with_equal_covariances_is_squared_mean_distance():
    rng = np.random.default_rng(1)
    mu1, mu2, sigma = rng.normal(size=6), rng.normal(size=6), _random_spd(rng, 6)
    assert metrics.frechet_distance(mu1, sigma, mu2, sigma) == pytest.approx(
        np.sum((mu1 - mu2) ** 2), rel=1e-9)


def test_fid_of_diagonal_covariances():
    rng = np.random.default_rng(2)
    var1, var2 = rng.uniform(0.1, 3.0, size=5), rng.uniform(0.1, 3.0, size=5)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(var1 + var2 - 2 * np.sqrt(var1 * var2))
    assert metrics.frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2)) == pytest.approx(
        expected, rel=1e-9)


def test_fid_of_commuting_covariances():
    rng = np.random.default_rng(3)
    q, _ = np.linalg.qr(rng.normal(size=(7, 7)))
    a, b = rng.uniform(0.0, 2.0, size=7), rng.uniform(0.0, 2.0, size=7)
    a[0] = 0.0  # one zero eigenvalue: singular, yet a square root exists
    expected = np.sum(a + b - 2 * np.sqrt(a * b))
    sigma1, sigma2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    got = metrics.frechet_distance(np.zeros(7), sigma1, np.zeros(7), sigma2)
    assert got == pytest.approx(expected, rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("n, d", [(20, 50), (10, 200)])
def test_fid_with_fewer_samples_than_dimensions_is_finite_and_correct(n, d):
    rng = np.random.default_rng(n)
    x1, x2 = rng.normal(size=(n, d)), rng.normal(0.2, 1.5, size=(n, d))
    mu1, s1 = metrics.statistics(x1)
    mu2, s2 = metrics.statistics(x2)
    assert np.linalg.matrix_rank(s1) < d
    got = metrics.frechet_distance(mu1, s1, mu2, s2)
    assert np.isfinite(got)
    assert got == pytest.approx(_fid_by_eigh(mu1, s1, mu2, s2), rel=1e-6)


def test_fid_of_a_singular_product_without_square_root_uses_the_offset():
    # scipy's sqrtm returns NaN for this product of two singular covariances.
    s1, s2 = np.array([[5.0, 2, 0], [2, 1, 0], [0, 0, 0]]), np.ones((3, 3))
    zero = np.zeros(3)
    got = metrics.frechet_distance(zero, s1, zero, s2)
    assert got == pytest.approx(_fid_by_eigh(zero, s1, zero, s2), abs=1e-2)
    with pytest.raises(ValueError, match="not finite"):
        metrics.frechet_distance(zero, np.full((3, 3), np.nan), zero, s2)


def test_fid_rejects_mismatched_or_invalid_statistics():
    with pytest.raises(ValueError, match="same feature network"):
        metrics.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="imaginary"):  # a "covariance" with a negative variance
        metrics.frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.diag([-1.0, 1.0]))


def test_inception_score_of_uniform_predictions_is_one():
    mean, std = metrics.inception_score(np.zeros((100, 7)))
    assert mean == pytest.approx(1.0) and std == pytest.approx(0.0, abs=1e-12)


def test_inception_score_of_confident_predictions_spread_over_k_classes_is_k():
    k = 5
    probs = np.eye(k)[np.arange(200) % k]  # every split holds each class equally often
    mean, std = metrics.inception_score(probs, from_logits=False)
    assert mean == pytest.approx(k) and std == pytest.approx(0.0, abs=1e-9)
    mean, _ = metrics.inception_score(60.0 * probs)  # as logits: softmax is one-hot to ~1e-26
    assert mean == pytest.approx(k, rel=1e-9)


def test_inception_score_of_a_mixture_with_uniform():
    k, a = 4, 0.3  # p(y|x) = (1 − a)·onehot + a/k; the marginal is uniform
    probs = (1 - a) * np.eye(k)[np.arange(80) % k] + a / k
    top = 1 - a + a / k
    kl = top * np.log(top * k) + (k - 1) * (a / k) * np.log(a)
    mean, _ = metrics.inception_score(probs, from_logits=False)
    assert mean == pytest.approx(np.exp(kl), rel=1e-9)
    mean_from_logits, _ = metrics.inception_score(np.log(probs) + 3.0)
    assert mean_from_logits == pytest.approx(np.exp(kl), rel=1e-9)


def test_inception_score_mean_and_std_over_splits():
    k = 6  # split 1: uniform (score 1); split 2: confident over k classes (score k)
    probs = np.concatenate([np.full((k * 3, k), 1.0 / k), np.eye(k)[np.arange(k * 3) % k]])
    mean, std = metrics.inception_score(probs, splits=2, from_logits=False)
    assert mean == pytest.approx((1 + k) / 2) and std == pytest.approx((k - 1) / 2)


def test_inception_score_rejects_bad_input():
    with pytest.raises(ValueError, match="sum to 1"):
        metrics.inception_score(np.full((10, 3), 0.5), from_logits=False)
    with pytest.raises(ValueError, match="splits"):
        metrics.inception_score(np.zeros((5, 3)), splits=10)


def test_statistics_match_written_out_formulas():
    x = np.random.default_rng(4).normal(size=(50, 3))
    mu, sigma = metrics.statistics(x)
    centred = x - x.sum(axis=0) / len(x)
    np.testing.assert_allclose(mu, x.sum(axis=0) / 50)
    np.testing.assert_allclose(sigma, centred.T @ centred / 49)


def test_streamed_statistics_equal_two_pass_statistics_despite_a_large_mean():
    x = 1e4 + np.random.default_rng(5).normal(size=(103, 4))
    accumulator = metrics.StatisticsAccumulator()
    for start in range(0, 103, 10):
        accumulator.update(x[start:start + 10])
    mu, sigma = accumulator.result()
    centred = x - x.mean(axis=0)
    assert accumulator.count == 103
    np.testing.assert_allclose(mu, x.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(sigma, centred.T @ centred / 102, rtol=1e-9, atol=1e-9)


def test_statistics_file_round_trip_and_network_check(tmp_path):
    rng = np.random.default_rng(6)
    mu, sigma = rng.normal(size=4), _random_spd(rng, 4)
    path = str(tmp_path / "sub" / "stats.npz")
    metrics.save_statistics(path, mu, sigma, network="net-a", num_images=123)
    loaded_mu, loaded_sigma = metrics.load_statistics(path, network="net-a")
    np.testing.assert_array_equal(loaded_mu, mu)
    np.testing.assert_array_equal(loaded_sigma, sigma)
    with np.load(path) as raw:
        assert int(raw["num_images"]) == 123 and str(raw["network"]) == "net-a"
    with pytest.raises(ValueError, match="net-a"):
        metrics.load_statistics(path, network="net-b")


def test_loads_ttur_and_raw_feature_layouts(tmp_path):
    rng = np.random.default_rng(7)
    ttur = tmp_path / "fid_stats_cifar10_train.npz"  # TTUR: float32 mu/sigma, nothing else
    mu, sigma = rng.normal(size=3).astype(np.float32), np.eye(3, dtype=np.float32)
    np.savez(ttur, mu=mu, sigma=sigma)
    loaded_mu, loaded_sigma = metrics.load_statistics(str(ttur), network="any network")
    np.testing.assert_array_equal(loaded_mu, mu)
    np.testing.assert_array_equal(loaded_sigma, sigma)

    features = rng.normal(size=(30, 3))
    raw = tmp_path / "statistics_0.npz"  # score_sde: the pool_3 features themselves
    np.savez(raw, pool_3=features)
    loaded_mu, loaded_sigma = metrics.load_statistics(str(raw))
    np.testing.assert_allclose(loaded_mu, features.mean(axis=0))
    np.testing.assert_allclose(loaded_sigma, np.cov(features, rowvar=False))

    np.savez(tmp_path / "other.npz", x=features)
    with pytest.raises(ValueError, match="'mu' and 'sigma'"):
        metrics.load_statistics(str(tmp_path / "other.npz"))
    with pytest.raises(FileNotFoundError):
        metrics.load_statistics(str(tmp_path / "missing.npz"))


# ------------------------------------------------------------- precision, recall, realism, KID

def test_pairwise_distances_and_knn_radii_match_brute_force():
    rng = np.random.default_rng(10)
    a, b = rng.normal(size=(30, 5)), rng.normal(size=(20, 5))
    brute = np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))
    np.testing.assert_allclose(metrics.pairwise_distances(a, b, block=7), brute, rtol=1e-5)
    within = np.sqrt(((a[:, None, :] - a[None, :, :]) ** 2).sum(-1))
    np.testing.assert_allclose(metrics.knn_radii(a, k=3), np.sort(within, axis=1)[:, 3],
                               rtol=1e-5)


def test_precision_recall_of_two_uniform_squares_with_known_overlap():
    """Real U([0,1]²), fake U([0.5,1.5]×[0,1]): half of each lies in the other's support."""
    rng = np.random.default_rng(11)
    real = rng.uniform(size=(3000, 2))
    fake = rng.uniform(size=(3000, 2)) + [0.5, 0.0]
    precision, recall = metrics.precision_recall(real, fake, k=3)
    assert precision == pytest.approx(0.5, abs=0.04)
    assert recall == pytest.approx(0.5, abs=0.04)


def test_precision_recall_of_disjoint_and_equal_sets():
    rng = np.random.default_rng(12)
    real = rng.normal(size=(500, 4))
    assert metrics.precision_recall(real, real + 100.0) == (0.0, 0.0)
    precision, recall = metrics.precision_recall(real, rng.normal(size=(500, 4)))
    assert precision > 0.8 and recall > 0.8


@pytest.mark.parametrize("fraction", [0.02, 0.05, 0.10])
def test_precision_drops_by_the_fraction_of_outliers_mixed_in(fraction):
    rng = np.random.default_rng(13)
    real, good = rng.normal(size=(1000, 8)), rng.normal(size=(2000, 8))
    n_bad = int(fraction * len(good))
    outliers = rng.normal(size=(n_bad, 8)) * 0.3 + 50.0  # broken samples: far from the data
    mixed = np.concatenate([good[:len(good) - n_bad], outliers])
    clean_precision, _ = metrics.precision_recall(real, good[:len(good) - n_bad])
    precision, _ = metrics.precision_recall(real, mixed)
    assert precision == pytest.approx(clean_precision * (1 - fraction), abs=1e-12)
    realism = metrics.realism_scores(real, mixed)
    worst = np.argsort(realism)[:n_bad]
    assert set(worst) == set(range(len(mixed) - n_bad, len(mixed)))  # the outliers, exactly
    assert realism[-n_bad:].max() < min(1.0, realism[:-n_bad].min())


def test_kid_matches_the_closed_form_mmd_of_two_gaussians():
    """In 1-D, k(x, y) = (xy + 1)³ = x³y³ + 3x²y² + 3xy + 1, so MMD² = Σ_j c_j (m_j(P) − m_j(Q))²
    with c = (3, 3, 1) for the moments j = 1, 2, 3; for N(μ, 1): μ, μ² + 1, μ³ + 3μ."""
    rng = np.random.default_rng(14)
    mu = 0.5
    expected = 3 * mu ** 2 + 3 * (mu ** 2) ** 2 + (mu ** 3 + 3 * mu) ** 2
    value, se = metrics.kid(rng.normal(size=(20000, 1)), rng.normal(mu, 1.0, size=(20000, 1)),
                            num_subsets=20)
    assert 0 < se < 0.1 * expected
    assert abs(value - expected) < 3 * se


def test_kid_is_unbiased_for_equal_distributions_at_small_sizes():
    rng = np.random.default_rng(15)
    values = [metrics.kid(rng.normal(size=(200, 16)), rng.normal(size=(200, 16)))
              for _ in range(30)]
    estimates, ses = np.array(values).T
    # Each estimate is within a few standard errors of 0, and so is their mean (no bias).
    assert np.all(np.abs(estimates) < 4 * ses)
    assert abs(estimates.mean()) < 3 * estimates.std(ddof=1) / np.sqrt(len(estimates))


def test_outlier_metrics_refuse_non_finite_features():
    with pytest.raises(ValueError, match="NaN"):
        metrics.precision_recall(np.full((10, 2), np.nan), np.zeros((10, 2)))

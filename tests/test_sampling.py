"""Annealed Langevin dynamics, inpainting and interpolation, checked with closed-form scores.

For Gaussian data N(μ, s²I) the perturbed density at noise level σ is N(μ, (s² + σ²)I), whose
score −(x − μ)/(s² + σ²) is exact and acts on every coordinate separately. Each Langevin step
x ← x + α·s(x) + √(2α)·z is then linear, so the mean and variance of every coordinate after any
number of steps follow a recursion written out here in NumPy: the sampler's output must match it
within sampling error (tolerances are stated as multiples of the standard error).
"""
import functools
import math

import numpy as np
import pytest
import tensorflow as tf

from ncsn_tf.config import presets
from ncsn_tf.sampling import (DIAGNOSTICS, AnnealedLangevin,
                              write_diagnostics)


def gaussian_score(mu, s2, sigmas):
    """Exact score of N(mu, s2·I) perturbed by N(0, σ²I), σ = sigmas[label]; per example."""
    sigmas = tf.constant(sigmas, tf.float32)

    def score(x, labels):
        var = s2 + tf.square(tf.gather(sigmas, labels))
        return -(x - mu) / tf.reshape(var, [-1] + [1] * (x.shape.rank - 1))
    return score


def gaussian_moments(mu, s2, sigmas, n_steps_each, step_lr, mean, var, denoise):
    """Mean and variance of one coordinate after annealed Langevin, by the exact recursion."""
    sigmas = np.asarray(sigmas, np.float64)
    for sigma in sigmas:
        alpha = step_lr * (sigma / sigmas[-1]) ** 2
        shrink = 1.0 - alpha / (s2 + sigma**2)
        for _ in range(n_steps_each):
            mean = shrink * mean + (1.0 - shrink) * mu
            var = shrink**2 * var + 2.0 * alpha
    if denoise:  # x + σL²·s(x, σL) = x − c·(x − μ)
        c = sigmas[-1] ** 2 / (s2 + sigmas[-1] ** 2)
        mean, var = mean + c * (mu - mean), (1.0 - c) ** 2 * var
    return mean, var


def assert_moments(x, mean, var, n_se=5.0):
    """Sample mean and variance of i.i.d. Gaussian values equal (mean, var) within n_se s.e."""
    x = np.asarray(x, np.float64).ravel()
    n = x.size
    assert abs(x.mean() - mean) < n_se * math.sqrt(var / n), (x.mean(), mean)
    assert abs(x.var() - var) < n_se * var * math.sqrt(2.0 / n), (x.var(), var)


SIGMAS = np.geomspace(3.0, 0.2, 8).astype(np.float32)
MU, S2 = 0.3, 0.25


@functools.cache
def small_sampler(shape=(4, 4, 1), **options):
    """A sampler with 8 levels × 3 steps; shared between tests (it holds no state but traces)."""
    settings = dict(n_steps_each=3, step_lr=0.004)
    return AnnealedLangevin(gaussian_score(MU, S2, SIGMAS), SIGMAS, shape, **{**settings,
                                                                               **options})


@pytest.mark.parametrize("denoise", [True, False])
def test_gaussian_data_mean_and_variance(denoise):
    """Many steps per level: samples follow the exact recursion and, nearly, N(μ, s⁴/(s²+σL²))."""
    n_steps_each, step_lr = 150, 0.004
    sampler = AnnealedLangevin(gaussian_score(MU, S2, SIGMAS), SIGMAS, (10_000,),
                               n_steps_each=n_steps_each, step_lr=step_lr, denoise=denoise,
                               clip=False)
    x = sampler.sample(np.arange(4))["samples"].numpy()  # 40,000 i.i.d. coordinates
    mean, var = gaussian_moments(MU, S2, SIGMAS, n_steps_each, step_lr, 0.5, 1 / 12, denoise)
    assert_moments(x, mean, var)
    # The chain has converged: what remains is the discretisation bias (< 1 % here) and, without
    # denoising, the noise σL² left on the data.
    sigma_end2 = float(SIGMAS[-1]) ** 2
    target = S2**2 / (S2 + sigma_end2) if denoise else S2 + sigma_end2
    assert abs(x.mean() - MU) < 0.01
    assert abs(x.var() / target - 1.0) < 0.03


def test_few_steps_follow_the_step_size_rule():
    """Far from converged after 2 steps per level, x still follows α_i = ε·σi²/σL² exactly."""
    sampler = AnnealedLangevin(gaussian_score(MU, S2, SIGMAS), SIGMAS, (5000,), n_steps_each=2,
                               step_lr=0.02, clip=False)
    x = sampler.sample(np.arange(4))["samples"].numpy()
    mean, var = gaussian_moments(MU, S2, SIGMAS, 2, 0.02, 0.5, 1 / 12, denoise=True)
    assert abs(var - S2) > 0.1  # not converged: the test distinguishes the schedule
    assert_moments(x, mean, var)


def test_initial_state():
    sampler = small_sampler(shape=(5000,))
    x = sampler.init([7, 8]).numpy()
    assert x.min() >= 0.0 and x.max() < 1.0
    assert abs(x.mean() - 0.5) < 0.01 and abs(x.var() - 1 / 12) < 0.003
    data = np.full((2, 5000), 0.25, np.float32)
    perturbed = sampler.init([7, 8], data).numpy()  # data_init: data + σ1·z
    assert_moments((perturbed - data) / SIGMAS[0], 0.0, 1.0)
    assert not np.array_equal(perturbed[0], perturbed[1])


def test_same_seed_same_image_whatever_the_batch():
    sampler = small_sampler()
    alone = sampler.sample([3])["samples"].numpy()[0]
    for seeds, where in [([1, 2, 3], 2), ([5, 3, 9], 1), ([3], 0)]:
        np.testing.assert_array_equal(sampler.sample(seeds)["samples"].numpy()[where], alone)
    batch = sampler.sample([1, 2, 3])["samples"].numpy()
    assert not np.array_equal(batch[0], batch[1])


def test_chunked_run_is_bit_identical_to_one_graph():
    sampler = small_sampler(trajectory_every=2, diagnostics=True)
    seeds = [4, 11, 2]
    whole = sampler.sample(seeds)
    x, frames, logs = sampler.init(seeds), [], []
    for start, end in [(0, 3), (3, 3), (3, 4), (4, 8)]:
        out = sampler.run_levels(x, seeds, start, end)
        x = out["samples"]
        frames.append(out["trajectory"].numpy())
        logs.append(out["diagnostics"])
    np.testing.assert_array_equal(sampler.finish(x).numpy(), whole["samples"].numpy())
    np.testing.assert_array_equal(np.concatenate(frames), whole["trajectory"].numpy())
    for name in DIAGNOSTICS:
        np.testing.assert_array_equal(np.concatenate([log[name] for log in logs]),
                                      whole["diagnostics"][name].numpy())


def test_trajectory_and_diagnostics_match_numpy():
    """Every step's state, step size, noise and the official verbose numbers, recomputed."""
    n_steps_each, step_lr = 3, 0.004
    sampler = small_sampler(trajectory_every=1, diagnostics=True, clip=False, denoise=False)
    seeds = [1, 2]
    out = sampler.sample(seeds)
    x0 = sampler.init(seeds).numpy().astype(np.float64)
    frames = out["trajectory"].numpy().astype(np.float64)
    steps = len(SIGMAS) * n_steps_each
    assert frames.shape == (steps, 2, 4, 4, 1)
    np.testing.assert_array_equal(frames[-1], out["samples"].numpy())
    before = np.concatenate([x0[None], frames[:-1]])
    level = np.arange(steps) // n_steps_each
    sigma = SIGMAS.astype(np.float64)[level]
    alpha = step_lr * (sigma / SIGMAS[-1]) ** 2
    b = (slice(None),) + (None,) * 4
    grad = -(before - MU) / (S2 + sigma**2)[b]
    z = (frames - before - alpha[b] * grad) / np.sqrt(2 * alpha)[b]
    assert_moments(z, 0.0, 1.0)  # the injected noise is standard normal
    norm = lambda t: np.sqrt((t.reshape(steps, 2, -1) ** 2).sum(-1))  # noqa: E731
    expected = dict(
        level=level, step_size=alpha, grad_norm=norm(grad).mean(1),
        image_norm=norm(frames).mean(1),
        snr=np.sqrt(alpha / 2) * norm(grad).mean(1) / norm(z).mean(1),
        grad_mean_norm=(grad.mean(1).reshape(steps, -1) ** 2).sum(-1) * sigma**2)
    for name in DIAGNOSTICS:
        np.testing.assert_allclose(out["diagnostics"][name].numpy(), expected[name], rtol=2e-3,
                                   err_msg=name)


def test_trajectory_every_k_steps():
    every = small_sampler(trajectory_every=1, clip=False).sample([5])["trajectory"].numpy()
    fifth = small_sampler(trajectory_every=5, clip=False).sample([5])["trajectory"].numpy()
    np.testing.assert_array_equal(fifth, every[4::5])  # after steps 5, 10, ..., 20


def test_finish_denoises_then_clips():
    seeds = [1, 2]
    x = np.random.default_rng(0).normal(0.5, 1.0, (2, 4, 4, 1)).astype(np.float32)
    s_last = -(x - MU) / (S2 + SIGMAS[-1] ** 2)
    denoised = x + SIGMAS[-1] ** 2 * s_last
    np.testing.assert_allclose(small_sampler(clip=False).finish(x), denoised, rtol=1e-6)
    np.testing.assert_array_equal(small_sampler(clip=False, denoise=False).finish(x), x)
    clipped = small_sampler().finish(x).numpy()
    np.testing.assert_allclose(clipped, np.clip(denoised, 0, 1), rtol=1e-6)
    assert clipped.min() == 0.0 and clipped.max() == 1.0
    assert small_sampler().sample(seeds)["samples"].numpy().min() >= 0.0


def test_per_call_settings_override():
    sampler = small_sampler(shape=(3000,), clip=False)
    x = sampler.sample(np.arange(4), n_steps_each=tf.constant(6), step_lr=0.01)["samples"]
    assert_moments(x.numpy(), *gaussian_moments(MU, S2, SIGMAS, 6, 0.01, 0.5, 1 / 12, True))


def test_jit_compile_draws_the_same_noise():
    """Under XLA a seed gives the same image as without (the noise is ordinary tensor ops),
    reproducibly and per seed."""
    sampler = small_sampler(jit_compile=True, clip=False, diagnostics=True)
    out = sampler.sample([3, 1])
    assert out["diagnostics"]["snr"].shape == (len(SIGMAS) * 3,)
    first = out["samples"].numpy()
    np.testing.assert_array_equal(sampler.sample([3, 1])["samples"].numpy(), first)
    np.testing.assert_array_equal(sampler.sample([3])["samples"].numpy()[0], first[0])
    plain = small_sampler(clip=False).sample([3, 1])["samples"].numpy()
    np.testing.assert_allclose(first, plain, rtol=1e-4, atol=1e-4)


# ---- inpainting ---------------------------------------------------------------------------------

@pytest.mark.parametrize("mask_shape", [(6, 5, 1), (3, 6, 5, 2), (1, 6, 5, 1)])
def test_inpainting_keeps_known_pixels_exactly(mask_shape):
    rng = np.random.default_rng(1)
    image = rng.uniform(size=(3, 6, 5, 2)).astype(np.float32)
    mask = (rng.uniform(size=mask_shape) < 0.5).astype(np.float32)
    sampler = small_sampler(shape=(6, 5, 2))
    out = sampler.inpaint(image, mask, [1, 2, 3])["samples"].numpy()
    known = np.broadcast_to(mask, image.shape) == 1
    np.testing.assert_array_equal(out[known], image[known])
    assert np.all(out[~known] != image[~known])


def test_inpainting_independent_pixels_follow_the_prior():
    """With independent pixels the known ones carry no information: unknown pixels ~ prior."""
    n_steps_each, step_lr = 20, 0.004
    sampler = AnnealedLangevin(gaussian_score(MU, S2, SIGMAS), SIGMAS, (50, 50, 1),
                               n_steps_each=n_steps_each, step_lr=step_lr, clip=False)
    image = np.full((4, 50, 50, 1), 0.9, np.float32)
    mask = np.zeros((50, 50, 1), np.float32)
    mask[:, :25] = 1.0
    x = sampler.inpaint(image, mask, np.arange(4))["samples"].numpy()
    assert np.all(x[:, :, :25] == 0.9)
    assert_moments(x[:, :, 25:], *gaussian_moments(MU, S2, SIGMAS, n_steps_each, step_lr, 0.5,
                                                   1 / 12, denoise=True))


def test_inpainting_correlated_pixels_follow_the_conditional():
    """Pairs of pixels with correlation ρ; the first of each pair known (= y).

    At step t of level i the known pixel is y + σi·z'; the unknown one u moves by
    α(−P21·(y + σi·z' − μ) − P22·(u − μ)) + √(2α)·z with P the precision of the perturbed pair.
    Its mean and variance follow a linear recursion; at small σL they approach the true
    conditional N(μ + ρ(y − μ), s²(1 − ρ²)).
    """
    mu, s2, rho, y = 0.5, 0.25, 0.8, 0.9
    sigmas = np.geomspace(2.0, 0.05, 8).astype(np.float32)
    n_steps_each, step_lr = 100, 0.001
    sig = tf.constant(sigmas)

    def pair_score(x, labels):  # x: [N, 1, 2K, 1], pairs (2j, 2j+1) along the width
        v = s2 + tf.square(tf.gather(sig, labels))[:, None, None, None]
        pairs = tf.reshape(x - mu, [-1, 1, x.shape[2] // 2, 2])
        a, b = pairs[..., :1], pairs[..., 1:]
        det = tf.square(v) - (rho * s2) ** 2
        out = tf.concat([(v * a - rho * s2 * b) / det, (v * b - rho * s2 * a) / det], -1)
        return -tf.reshape(out, tf.shape(x))

    k = 2500
    sampler = AnnealedLangevin(pair_score, sigmas, (1, 2 * k, 1), n_steps_each=n_steps_each,
                               step_lr=step_lr, denoise=False, clip=False)
    mask = np.tile(np.array([1.0, 0.0], np.float32), k).reshape(1, 2 * k, 1)
    image = np.full((4, 1, 2 * k, 1), y, np.float32)
    x = sampler.inpaint(image, mask, np.arange(4))["samples"].numpy()
    assert np.all(x[:, :, 0::2] == y)

    mean, var = 0.5, 1 / 12
    for sigma in sigmas.astype(np.float64):
        alpha = step_lr * (sigma / sigmas[-1]) ** 2
        v = s2 + sigma**2
        det = v**2 - (rho * s2) ** 2
        p21, p22 = -rho * s2 / det, v / det
        for _ in range(n_steps_each):
            mean = mean - alpha * (p21 * (y - mu) + p22 * (mean - mu))
            var = (1 - alpha * p22) ** 2 * var + (alpha * p21 * sigma) ** 2 + 2 * alpha
    assert_moments(x[:, :, 1::2], mean, var)
    # Near the true conditional; the variance keeps the noise σL·z' of the known pixel (≈ 4 %)
    # and the discretisation bias.
    assert abs(mean - (mu + rho * (y - mu))) < 0.01 and abs(var / (s2 * (1 - rho**2)) - 1) < 0.1


def test_inpainting_rejects_bad_masks():
    sampler = small_sampler(shape=(6, 5, 2))
    image = np.zeros((2, 6, 5, 2), np.float32)
    with pytest.raises(ValueError, match="height and width"):
        sampler.inpaint(image, np.ones((6, 4, 1), np.float32), [1, 2])
    with pytest.raises(ValueError, match="height and width"):
        sampler.inpaint(image, np.ones((2, 6, 5, 3), np.float32), [1, 2])

    @tf.function(input_signature=[tf.TensorSpec([None] * 4), tf.TensorSpec([None] * 4),
                                  tf.TensorSpec([None], tf.int64)])
    def serving_inpaint(image, mask, seeds):  # shapes known only at run time
        return sampler.inpaint(image, mask, seeds)["samples"]

    with pytest.raises(tf.errors.InvalidArgumentError, match="height and width"):
        serving_inpaint(image, np.ones((1, 6, 4, 1), np.float32), [1, 2])
    with pytest.raises(tf.errors.InvalidArgumentError, match="only 0"):
        sampler.inpaint(image, np.full((6, 5, 1), 0.5, np.float32), [1, 2])
    with pytest.raises(ValueError, match="mask must be"):
        sampler.inpaint(image, np.ones((6, 5), np.float32), [1, 2])
    with pytest.raises(tf.errors.InvalidArgumentError, match="one example per seed"):
        sampler.inpaint(image, np.ones((6, 5, 1), np.float32), [1, 2, 3])


# ---- interpolation ------------------------------------------------------------------------------

def test_interpolation_endpoint_and_marginals():
    sampler = AnnealedLangevin(gaussian_score(MU, S2, SIGMAS), SIGMAS, (2000,), n_steps_each=4,
                               step_lr=0.01, clip=False)
    out = sampler.interpolate([1, 2], [8, 9], 5)["samples"].numpy()
    assert out.shape == (2, 5, 2000)
    np.testing.assert_array_equal(out[:, 0], sampler.sample([1, 2])["samples"].numpy())
    # cos/sin weights keep the noise N(0, I): every chain has the same distribution (a linear
    # blend would halve the noise variance in the middle).
    mean, var = gaussian_moments(MU, S2, SIGMAS, 4, 0.01, 0.5, 1 / 12, denoise=True)
    for k in range(5):
        assert_moments(out[:, k], mean, var)
    # Neighbouring chains are closer to each other than the two ends are.
    gap = lambda i, j: np.abs(out[:, i] - out[:, j]).mean()  # noqa: E731
    assert gap(0, 1) < gap(0, 2) < gap(0, 4)


# ---- input validation, config, helpers ----------------------------------------------------------

def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="step_lr"):
        small_sampler(step_lr=0.0)
    with pytest.raises(ValueError, match="n_steps_each"):
        small_sampler(n_steps_each=0)
    with pytest.raises(ValueError, match="trajectory_every needs jit_compile=False"):
        small_sampler(trajectory_every=2, jit_compile=True)
    sampler = small_sampler()
    with pytest.raises(tf.errors.InvalidArgumentError, match="non-empty"):
        sampler.sample(np.zeros([0], np.int64))
    with pytest.raises(tf.errors.InvalidArgumentError, match="n_steps_each must be >= 1"):
        sampler.sample([1], n_steps_each=tf.constant(0))
    with pytest.raises(tf.errors.InvalidArgumentError, match="step_lr must be > 0"):
        sampler.sample([1], step_lr=tf.constant(-1.0))
    with pytest.raises(tf.errors.InvalidArgumentError, match="start_level <= end_level"):
        sampler.run_levels(sampler.init([1]), [1], 5, 2)
    with pytest.raises(ValueError, match="data must have shape"):
        sampler.sample([1], data=np.zeros((1, 4, 4, 3), np.float32))


def test_from_config():
    config = presets.override(presets.get("cifar10"), n_steps_each=2, step_lr=1e-5,
                              denoise=False)
    sampler = AnnealedLangevin.from_config(gaussian_score(MU, S2, SIGMAS), SIGMAS, config,
                                           clip=False)
    assert (sampler.shape, sampler.n_steps_each, sampler.step_lr, sampler.denoise,
            sampler.clip) == ((32, 32, 3), 2, 1e-5, False, False)


def test_write_diagnostics(tmp_path):
    out = small_sampler(diagnostics=True).run_levels(small_sampler().init([1]), [1], 2, 4)
    writer = tf.summary.create_file_writer(str(tmp_path))
    write_diagnostics(writer, out["diagnostics"], first_step=6)
    written = {}
    for path in tmp_path.iterdir():
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                written[(value.tag, event.step)] = tf.make_ndarray(value.tensor)
    snr = out["diagnostics"]["snr"].numpy()
    assert sorted(s for tag, s in written if tag == "langevin/snr") == list(range(6, 12))
    np.testing.assert_allclose([written[("langevin/snr", 6 + i)] for i in range(6)], snr)
    assert written[("langevin/level", 6)] == 2


def test_smoke_with_a_tiny_network():
    """A real (untrained) NCSNv2 as the score, also inside a serving-style tf.function."""
    from ncsn_tf import models

    config = presets.override(presets.get("cifar10"), ngf=8, num_scales=4, sigma_begin=3.0,
                              sigma_end=0.05, image_size=16, channels=3, n_steps_each=1)
    net = models.build(config)
    sampler = AnnealedLangevin.from_config(lambda x, y: net(x, y, training=False), net.sigmas,
                                           config)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.int64)])
    def serve(seeds):
        return sampler.sample(seeds)["samples"]

    batch = serve(tf.constant([1, 2, 3], tf.int64)).numpy()
    assert batch.shape == (3, 16, 16, 3) and batch.min() >= 0.0 and batch.max() <= 1.0
    # A network's kernels may pick other algorithms for other batch sizes: equal up to rounding.
    np.testing.assert_allclose(serve(tf.constant([3], tf.int64))[0], batch[2], atol=1e-4)

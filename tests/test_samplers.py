"""The cas, pc, heun and dpm samplers and the sampler registry, checked with closed-form
scores.

For Gaussian data N(μ, s²I) the score at noise σ is −(x − μ)/(s² + σ²) at any continuous σ,
and for a mixture of two such Gaussians it is the posterior-weighted mix of theirs. The
probability-flow ODE of a Gaussian has a closed-form solution: x(σ) = μ + (x(σ₀) − μ)·
√((s² + σ²)/(s² + σ₀²)), so Heun's method must map the perturbed data at σ_max onto the data.
"""
import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from ncsn_tf import models, sampling
from ncsn_tf.config import presets
from ncsn_tf.sampling import (SAMPLERS, ConsistentAnnealed, DPMSolver, HeunODE,
                              PredictorCorrector, karras_sigmas)

MU, S2 = 0.4, 0.01  # data concentrated as images are, relative to σ_max
SIGMA_MAX, SIGMA_MIN = 3.0, 0.01


def gaussian_score(mu=MU, s2=S2):
    def score(x, sigma):
        var = s2 + tf.square(tf.cast(sigma, tf.float32))
        return -(x - mu) / tf.reshape(var, [-1] + [1] * (x.shape.rank - 1))
    return score


def mixture_score(means=(0.2, 0.8), weights=(0.2, 0.8), s2=0.002):
    """Exact score of a two-Gaussian mixture perturbed by N(0, σ²), one coordinate."""
    means, log_w = tf.constant(means), tf.math.log(tf.constant(weights))

    def score(x, sigma):
        var = s2 + tf.square(tf.cast(sigma, tf.float32))[:, None, None]  # [N, 1, 1]
        diff = x - means  # [N, 1, K]
        logits = log_w - 0.5 * tf.square(diff) / var
        post = tf.nn.softmax(logits, axis=-1)
        return tf.reduce_sum(post * (-diff / var), axis=-1, keepdims=True)
    return score


def assert_gaussian(x, mean, var, rel=0.06):
    x = np.asarray(x, np.float64).ravel()
    assert abs(x.mean() - mean) < 5 * math.sqrt(var / x.size), (x.mean(), mean)
    assert abs(x.var() / var - 1) < rel, (x.var(), var)


SEEDS = np.arange(400)


def test_pc_gaussian_data_mean_and_variance():
    """From the prior U[0,1] + σ_max·z, PC ends at N(μ, s²) up to its known biases: the
    corrector's stationary variance v/(1 − r²) (+2.6% at r = 0.16) and the predictor's
    discretisation (+2% at 200 levels): +3% ± 2% in all. In image-like dimensions (here
    1,024), where the snr rule's ‖z‖/‖s‖ is sharp."""
    sampler = PredictorCorrector(gaussian_score(), SIGMA_MAX, SIGMA_MIN, (1024,),
                                 num_steps=200, corrector_steps=1, clip=False)
    out = sampler.sample(SEEDS[:100])["samples"].numpy()
    assert_gaussian(out, MU, S2 * 1.03, rel=0.02)


def test_cas_follows_its_exact_recursion():
    """CAS is linear per coordinate for Gaussian data: the mean and variance after the walk
    follow x ← (1 − c_i)·x + c_i·μ + β·σ_(i+1)·z, c_i = η·σ_i²/(s² + σ_i²), exactly; and
    for data concentrated at a point (s → 0) the noise of x stays σ_i at every level."""
    num_steps, step_lr = 200, 0.5 * SIGMA_MIN ** 2
    sampler = ConsistentAnnealed(gaussian_score(), SIGMA_MAX, SIGMA_MIN, (16,),
                                 num_steps=num_steps, step_lr=step_lr, clip=False)
    out = sampler.sample(SEEDS)["samples"].numpy()
    sigmas = np.geomspace(SIGMA_MAX, SIGMA_MIN, num_steps)
    eta, gamma = step_lr / SIGMA_MIN ** 2, sigmas[0] / sigmas[1]
    beta2 = 1 - ((1 - eta) * gamma) ** 2
    mean, var = 0.5, 1 / 12 + SIGMA_MAX ** 2  # the prior U[0,1] + σ_max·z
    for i, sigma in enumerate(sigmas):
        c = eta * sigma ** 2 / (S2 + sigma ** 2)
        following = sigmas[i + 1] if i + 1 < num_steps else 0.0
        mean, var = (1 - c) * mean + c * MU, (1 - c) ** 2 * var + beta2 * following ** 2
    c = SIGMA_MIN ** 2 / (S2 + SIGMA_MIN ** 2)  # the final denoising step
    mean, var = (1 - c) * mean + c * MU, (1 - c) ** 2 * var
    assert_gaussian(out, mean, var, rel=0.06)
    # Consistency: at s² = 0 the variance after level i is σ_(i+1)² exactly.
    v = SIGMA_MAX ** 2
    for i in range(num_steps - 1):
        v = (1 - eta) ** 2 * v + beta2 * sigmas[i + 1] ** 2
        assert v == pytest.approx(sigmas[i + 1] ** 2, rel=1e-9)


def test_heun_gaussian_data_from_the_prior():
    sampler = HeunODE(gaussian_score(), SIGMA_MAX, SIGMA_MIN, (16,), num_steps=30, clip=False)
    assert_gaussian(sampler.sample(SEEDS)["samples"].numpy(), MU, S2, rel=0.06)


def test_heun_ode_maps_perturbed_data_onto_the_data_exactly():
    """Start from the exact perturbed distribution at σ_max (data + σ_max·z): Heun's method
    reproduces the closed-form flow per sample, so the output is exactly N(μ, s²)."""
    rng = np.random.default_rng(0)
    data = (MU + math.sqrt(S2) * rng.normal(size=(400, 16))).astype(np.float32)
    sampler = HeunODE(gaussian_score(), SIGMA_MAX, SIGMA_MIN, (16,), num_steps=40, clip=False)
    start = sampler.init(SEEDS, data).numpy()
    out = sampler.sample(SEEDS, data)["samples"].numpy()
    exact = MU + (start - MU) * math.sqrt(S2 / (S2 + SIGMA_MAX ** 2))
    np.testing.assert_allclose(out, exact, atol=2e-3 * math.sqrt(S2) * 10)
    assert_gaussian(out, MU, S2, rel=0.05)
    assert sampler.nfe() == 79


def noise_after_each_level(sampler, mu):
    """Per level: the standard deviation of x − μ after the level's steps, from x = μ + σ_0·z
    (data at the point μ)."""
    seeds = np.arange(8)
    x, memory, stds = sampler.init(seeds, np.full((8, *sampler.shape), mu, np.float32)), None, []
    for level in range(sampler.num_levels - 1):
        out = sampler.run_levels(x, seeds, level, level + 1, memory=memory)
        x, memory = out["samples"], out.get("memory")
        stds.append(float(np.std(x.numpy() - mu)))
    return np.array(stds)


def test_pc_predictor_keeps_the_noise_at_the_next_level_however_far_apart():
    """Data at a point, the exact score, levels a ratio 2.15 apart, no corrector: after each
    predictor step x carries noise σ_(i+1) exactly. (The reverse-diffusion predictor left
    √(σ_(i+1)⁴/σ_i² + σ_i² − σ_(i+1)²) = 1.9·σ_(i+1) here, the cause of pc's noisy and
    pure-noise images at few levels.)"""
    sampler = PredictorCorrector(gaussian_score(s2=0.0), 3.0, 0.3, (4096,), num_steps=4,
                                 corrector_steps=0, clip=False)
    sigmas = sampler.sigmas.numpy()
    np.testing.assert_allclose(noise_after_each_level(sampler, MU), sigmas[1:], rtol=0.02)


@pytest.mark.parametrize("s_noise", [1.0, 0.8])
def test_heun_churn_noise_for_data_at_a_point(s_noise):
    """Data at a point, the exact score: churn adds s_noise·√(σ̂² − σ_i²)·z, σ̂ = σ_i·(1 + γ)
    (capped at σ_0), and the Heun step scales x − μ by σ_(i+1)/σ̂: noise v_i before level i
    leaves v_(i+1) = σ_(i+1)·√(v_i² + s_noise²·(σ̂² − σ_i²))/σ̂, exactly σ_(i+1) at
    s_noise = 1 (Karras' Algorithm 2), less below 1 (a lower temperature)."""
    sampler = HeunODE(gaussian_score(s2=0.0), 3.0, 0.3, (4096,), num_steps=5, churn=2.0,
                      s_noise=s_noise, clip=False)
    sigmas = sampler.sigmas.numpy().astype(np.float64)
    hat = np.minimum(sigmas[:-1] * 1.4, sigmas[0])  # γ = churn/N = 0.4
    expected, v = [], sigmas[0]
    for sigma, sigma_hat, following in zip(sigmas[:-1], hat, sigmas[1:]):
        v = following * np.sqrt(v ** 2 + s_noise ** 2 * (sigma_hat ** 2 - sigma ** 2)) / sigma_hat
        expected.append(v)
    np.testing.assert_allclose(noise_after_each_level(sampler, MU), expected, rtol=0.02)
    if s_noise == 1.0:
        np.testing.assert_allclose(expected, sigmas[1:], rtol=1e-12)
    else:
        assert np.all(np.array(expected[1:]) < 0.97 * sigmas[2:])


@pytest.mark.parametrize("eta", [0.5, 1.0, 3.0])
def test_dpm_keeps_the_noise_at_the_next_level_and_ends_on_the_point(eta):
    """For any η the SDE step keeps the noise of x at σ_(i+1) for data at a point and the
    exact score, and the denoising step lands on the point."""
    sampler = DPMSolver(gaussian_score(s2=0.0), 3.0, 0.01, (4096,), num_steps=6, eta=eta,
                        clip=False)
    sigmas = sampler.sigmas.numpy()
    np.testing.assert_allclose(noise_after_each_level(sampler, MU), sigmas[1:], rtol=0.02)
    np.testing.assert_allclose(sampler.sample([1, 2])["samples"].numpy(), MU, atol=1e-5)


def test_dpm_ode_is_second_order():
    """η = 0 solves the probability-flow ODE: from the exact perturbed data, the error against
    the closed-form flow (then the exact denoiser at σ_(N−1)) falls 4-fold when the steps
    double (second order; without the multistep term it halves, at 14 times the error)."""
    rng = np.random.default_rng(0)
    data = (MU + math.sqrt(S2) * rng.normal(size=(400, 16))).astype(np.float32)
    errors = []
    for num_steps in (20, 40):
        sampler = DPMSolver(gaussian_score(), SIGMA_MAX, SIGMA_MIN, (16,), num_steps=num_steps,
                            eta=0.0, clip=False)
        start = sampler.init(SEEDS, data).numpy()
        out = sampler.sample(SEEDS, data)["samples"].numpy()
        last = float(sampler.sigmas[-1])
        at_last = MU + (start - MU) * math.sqrt((S2 + last ** 2) / (S2 + SIGMA_MAX ** 2))
        exact = MU + (at_last - MU) * S2 / (S2 + last ** 2)
        errors.append(np.abs(out - exact).max())
    assert errors[1] < errors[0] / 3.3 and errors[1] < 2e-3, errors


def test_dpm_chunks_carry_the_memory():
    sampler = DPMSolver(gaussian_score(), SIGMA_MAX, SIGMA_MIN, (4,), num_steps=7)
    together = sampler.sample([5, 6, 7])["samples"].numpy()
    x, memory = sampler.init([5, 6, 7]), None
    for start in range(0, 7, 3):
        out = sampler.run_levels(x, [5, 6, 7], start, min(start + 3, 7), memory=memory)
        x, memory = out["samples"], out["memory"]
    np.testing.assert_array_equal(sampler.finish(x).numpy(), together)
    with pytest.raises(tf.errors.InvalidArgumentError, match="continue a run from level"):
        sampler.run_levels(x, [5, 6, 7], 3, 4)


def test_heun_churn_never_leaves_the_trained_sigma_range():
    """Churn raises σ to σ̂ = σ_i·(1 + γ) but never above σ_max, where the network was
    never trained (it used to start at 1.41·σ_max)."""
    highest = tf.Variable(0.0)

    def recording_score(x, sigma):
        highest.assign(tf.maximum(highest, tf.reduce_max(sigma)))
        return gaussian_score()(x, sigma)

    HeunODE(recording_score, SIGMA_MAX, SIGMA_MIN, (4,), num_steps=6, churn=10.0).sample([1])
    assert SIGMA_MAX * 0.99 < highest.numpy() <= SIGMA_MAX * (1 + 1e-6)


@pytest.mark.parametrize("name, tolerance", [("pc", 0.03), ("cas", 0.06), ("heun", 0.03),
                                             ("dpm", 0.03)])
def test_two_mode_mixture_weights_are_recovered(name, tolerance):
    """Modes at 0.2 and 0.8 with weights 0.2/0.8, 64 independent coordinates per example:
    nearly every value ends near a mode, and the share at 0.8 is 0.8 within `tolerance`
    (CAS's consistency holds for point-like data only, so it is looser)."""
    shape, options = (64, 1), dict(clip=False)
    if name == "pc":
        sampler = PredictorCorrector(mixture_score(), 2.0, 0.01, shape, num_steps=100,
                                     **options)
    elif name == "cas":
        sampler = ConsistentAnnealed(mixture_score(), 2.0, 0.01, shape, num_steps=300,
                                     step_lr=0.5 * 0.01 ** 2, **options)
    elif name == "heun":
        sampler = HeunODE(mixture_score(), 2.0, 0.01, shape, num_steps=60, **options)
    else:
        sampler = DPMSolver(mixture_score(), 2.0, 0.01, shape, num_steps=100, **options)
    out = sampler.sample(np.arange(300))["samples"].numpy().ravel()
    assert np.mean(np.abs(out - 0.2) < 0.1) + np.mean(np.abs(out - 0.8) < 0.1) > 0.97
    assert abs(np.mean(out > 0.5) - 0.8) < tolerance


def test_karras_schedule_and_nfe():
    sigmas = karras_sigmas(80.0, 0.002, 18)
    assert sigmas[0] == pytest.approx(80.0) and sigmas[-1] == pytest.approx(0.002, rel=1e-5)
    assert np.all(np.diff(sigmas) < 0)
    steps = np.diff(sigmas ** (1 / 7))
    np.testing.assert_allclose(steps, steps[0], rtol=1e-4)  # evenly spaced in σ^(1/ρ)
    score = gaussian_score()
    assert PredictorCorrector(score, 3.0, 0.01, (2,), num_steps=10, corrector_steps=2
                              ).nfe() == 30
    assert ConsistentAnnealed(score, 3.0, 0.01, (2,), num_steps=10, step_lr=0.9e-4).nfe() == 11
    assert HeunODE(score, 3.0, 0.01, (2,), num_steps=10).nfe() == 19
    assert DPMSolver(score, 3.0, 0.01, (2,), num_steps=10).nfe() == 10


def test_seeds_are_per_image_and_chunks_match_one_call():
    sampler = PredictorCorrector(gaussian_score(), SIGMA_MAX, SIGMA_MIN, (4,), num_steps=6)
    together = sampler.sample([5, 6, 7])["samples"].numpy()
    alone = sampler.sample([6])["samples"].numpy()
    np.testing.assert_array_equal(together[1:2], alone)
    x = sampler.init([5, 6, 7])
    for start in range(0, 6, 4):
        x = sampler.run_levels(x, [5, 6, 7], start, min(start + 4, 6))["samples"]
    np.testing.assert_array_equal(sampler.finish(x).numpy(), together)


def test_inpainting_and_interpolation_where_supported():
    """pc (and cas) inpaint and interpolate through the shared driver; heun, deterministic,
    refuses both with the reason."""
    shape = (2, 2, 1)
    image = np.full((2, *shape), 0.9, np.float32)
    mask = np.array([[1, 1], [0, 0]], np.float32)[..., None]  # keep the top row
    pc = PredictorCorrector(gaussian_score(), SIGMA_MAX, SIGMA_MIN, shape, num_steps=30)
    out = pc.inpaint(image, mask, [1, 2])["samples"].numpy()
    np.testing.assert_array_equal(out[:, 0], image[:, 0])
    assert not np.allclose(out[:, 1], 0.9)
    rows = pc.interpolate([1, 2], [3, 4], 3)["samples"].numpy()
    assert rows.shape == (2, 3, *shape)
    np.testing.assert_array_equal(rows[:, 0], pc.sample([1, 2])["samples"].numpy())
    heun = HeunODE(gaussian_score(), SIGMA_MAX, SIGMA_MIN, shape, num_steps=5)
    with pytest.raises(ValueError, match="heun sampler cannot interpolate"):
        heun.interpolate([1], [2], 3)
    with pytest.raises(ValueError, match="heun sampler cannot inpaint"):
        heun.inpaint(image, mask, [1, 2])
    dpm = DPMSolver(gaussian_score(), SIGMA_MAX, SIGMA_MIN, shape, num_steps=8)
    out = dpm.inpaint(image, mask, [1, 2])["samples"].numpy()
    np.testing.assert_array_equal(out[:, 0], image[:, 0])
    rows = dpm.interpolate([1, 2], [3, 4], 3)["samples"].numpy()
    np.testing.assert_array_equal(rows[:, 0], dpm.sample([1, 2])["samples"].numpy())
    ode = DPMSolver(gaussian_score(), SIGMA_MAX, SIGMA_MIN, shape, num_steps=8, eta=0.0)
    with pytest.raises(ValueError, match="dpm sampler cannot interpolate"):
        ode.interpolate([1], [2], 3)


def test_bad_settings_are_clear_errors():
    score = gaussian_score()
    with pytest.raises(ValueError, match=r"num_steps must be an integer in \[1, 100,000\]"):
        HeunODE(score, 3.0, 0.01, (2,), num_steps=0)
    with pytest.raises(ValueError, match=r"num_steps must be an integer in \[1, 100,000\]"):
        HeunODE(score, 3.0, 0.01, (2,), num_steps=10**8)  # before any array is allocated
    with pytest.raises(ValueError, match=r"cas needs step_lr/sigma_min\^2 in \[1 - 1/gamma"):
        ConsistentAnnealed(score, 3.0, 0.01, (2,), num_steps=10, step_lr=1e-9)
    with pytest.raises(ValueError, match="snr must be > 0"):
        PredictorCorrector(score, 3.0, 0.01, (2,), num_steps=10, snr=0.0)
    with pytest.raises(ValueError, match="dpm needs rho > 0, eta >= 0"):
        DPMSolver(score, 3.0, 0.01, (2,), num_steps=10, eta=-1.0)


def test_for_network_builds_the_configured_sampler():
    config = presets.override(presets.get("digits"), ngf=4, num_scales=6, n_steps_each=2,
                              step_lr=5e-5)  # η = 0.5, what cas needs on 12 levels
    keras.utils.set_random_seed(0)
    net = models.build(config)
    expected = {"ald": 6 * 2 + 1, "cas": 12 + 1, "pc": 6 * 2, "heun": 2 * 25 - 1, "dpm": 12}
    for name, cls in SAMPLERS.items():
        sampler = sampling.for_network(net, presets.override(config, sampler=name))
        assert isinstance(sampler, cls) and sampler.nfe() == expected[name], name
    heun = sampling.for_network(net, presets.override(config, sampler="heun", num_steps=4))
    out = heun.sample([1, 2])["samples"].numpy()
    assert out.shape == (2, 16, 16, 1) and out.min() >= 0 and out.max() <= 1
    with pytest.raises(ValueError, match="Unknown sampler 'ddim'"):
        sampling.for_network(net, presets.override(config, sampler="ddim"))


class _EulerODE(sampling.driver.Sampler):
    """A new rule in a few lines, as the driver's interface promises: the probability-flow
    ODE by Euler steps on a geometric schedule, x ← x + (σ_next − σ)·(−σ·s(x, σ))."""
    name = "euler"
    stochastic = False

    def __init__(self, score_fn, schedule, shape, **options):
        super().__init__(score_fn, tf.constant(schedule, tf.float32), shape, **options)

    def nfe(self) -> int:
        return self.num_levels

    def _update(self, x, level, substep, z):
        sigma = self._level_sigma(level)
        following = tf.where(level + 1 < self.num_levels,
                             self._sigmas()[tf.minimum(level + 1, self.num_levels - 1)], 0.0)
        grad = self.score_fn(x, tf.fill(tf.shape(x)[:1], sigma))
        return x + (following - sigma) * (-sigma * grad), grad, sigma - following


def test_a_new_rule_is_a_function_of_x_level_and_noise_and_gets_no_foreign_settings():
    """The driver passes a rule only the settings it declares: a five-line Euler rule runs
    under the driver (prior, levels, chunks) and reaches the closed-form ODE solution of a
    Gaussian; asking it, or heun, for ald's per-call settings is refused by name."""
    schedule = np.geomspace(SIGMA_MAX, SIGMA_MIN, 400).astype(np.float32)
    euler = _EulerODE(gaussian_score(), schedule, (4,), denoise=False, clip=False)
    x0 = euler.init(np.arange(64)).numpy()
    x = euler.sample(np.arange(64))["samples"].numpy()
    # x(0) = μ + (x(σ0) − μ)·√(s²/(s² + σ0²)), the Gaussian's ODE solution.
    expected = MU + (x0 - MU) * math.sqrt(S2 / (S2 + SIGMA_MAX ** 2))
    np.testing.assert_allclose(x, expected, atol=0.01)
    assert euler.steps_per_level == 1 and euler.call_settings == {}
    for sampler in (euler, HeunODE(gaussian_score(), SIGMA_MAX, SIGMA_MIN, (4,), num_steps=3)):
        with pytest.raises(TypeError, match="takes no per-call setting n_steps_each"):
            sampler.sample([0], n_steps_each=2)

"""Correctness of annealed Langevin dynamics against closed-form facts from the NCSN papers.

1. A mixture of two far-apart Gaussians in 2-D with weights 0.2/0.8. Its perturbed score is
   known exactly. Annealed Langevin with that score recovers the weights; plain Langevin at the
   smallest σ with the same number of steps keeps the split of its initial points instead (the
   failure that motivates annealing, NCSN 2019 Fig. 3).
2. Technique 4: for a single data point at 0 the perturbed density at level i is N(0, σi²I).
   Langevin at σi started from N(0, σ(i−1)²I) for T steps ends with variance ratio
   Var(x_T)/σi² given by Eq. 6; the measured ratio must match it within sampling error.
"""
import math

import numpy as np
import pytest
import tensorflow as tf

from ncsn_tf import noise
from ncsn_tf.config import presets
from ncsn_tf.sampling import AnnealedLangevin

MEANS = np.array([[-5.0, -5.0], [5.0, 5.0]], np.float32)
WEIGHTS = np.array([0.2, 0.8], np.float32)
STD = 1.0  # of each component


def mixture_score(sigmas):
    """Exact score of the mixture perturbed by N(0, σ²I); x: [N, points, 2], σ = sigmas[label]."""
    sigmas = tf.constant(sigmas, tf.float32)
    means, log_w = tf.constant(MEANS), tf.math.log(tf.constant(WEIGHTS))

    def score(x, labels):
        var = STD**2 + tf.square(tf.gather(sigmas, labels))[:, None, None, None]  # [N,1,1,1]
        diff = x[:, :, None, :] - means  # [N, points, 2 modes, 2]
        logits = log_w - tf.reduce_sum(tf.square(diff), -1) / (2.0 * var[..., 0])
        resp = tf.nn.softmax(logits, axis=-1)[..., None]
        return -tf.reduce_sum(resp * diff, axis=2) / var[:, :, 0]
    return score


def fraction_in_first_mode(x):
    return float(np.mean(x.reshape(-1, 2).sum(-1) < 0.0))


def test_annealing_recovers_mixture_weights_plain_langevin_does_not():
    seeds, points = np.arange(4), 1000  # 4,000 chains: the weight's standard error is 0.0063
    rng = np.random.default_rng(0)
    x0 = rng.uniform(-8.0, 8.0, (len(seeds), points, 2)).astype(np.float32)  # as in NCSN 2019

    sigmas = np.geomspace(20.0, 0.1, 10).astype(np.float32)
    # Enough steps per level for chains to move between the modes while they still can
    # (with T = 100 the weight stays ≈ 0.22: annealing recovers it only with enough mixing).
    n_steps_each, step_lr = 300, 0.002
    annealed = AnnealedLangevin(mixture_score(sigmas), sigmas, (points, 2),
                                n_steps_each=n_steps_each, step_lr=step_lr, clip=False)
    x = annealed.run_levels(x0, seeds, 0, len(sigmas))["samples"]
    x = annealed.finish(x).numpy()
    assert abs(fraction_in_first_mode(x) - WEIGHTS[0]) < 0.03
    for mode in range(2):  # and each component has the right mean and spread
        members = x.reshape(-1, 2)[(x.reshape(-1, 2).sum(-1) > 0) == bool(mode)]
        np.testing.assert_allclose(members.mean(0), MEANS[mode], atol=0.15)
        np.testing.assert_allclose(members.std(0), STD, rtol=0.1)

    # Plain Langevin: the smallest σ only, the same 3,000 steps, with a step size that mixes
    # well within a mode (α = 0.05 of the component variance). It cannot cross between modes.
    plain_sigma = sigmas[-1:]
    plain = AnnealedLangevin(mixture_score(plain_sigma), plain_sigma, (points, 2),
                             n_steps_each=len(sigmas) * n_steps_each,
                             step_lr=0.05 * (STD**2 + float(plain_sigma[0]) ** 2),
                             clip=False, denoise=False)
    x_plain = plain.run_levels(x0, seeds, 0, 1)["samples"].numpy()
    initial_split = fraction_in_first_mode(x0)  # ≈ 0.5
    assert abs(fraction_in_first_mode(x_plain) - WEIGHTS[0]) > 0.2
    assert abs(fraction_in_first_mode(x_plain) - initial_split) < 0.03


def paper_eq6(step_lr, n_steps_each, gamma, sigma_end):
    """Eq. 6 of the paper, written out as printed."""
    x = step_lr / sigma_end**2
    stationary = 2 * step_lr / (sigma_end**2 - sigma_end**2 * (1 - x) ** 2)
    return (1 - x) ** (2 * n_steps_each) * (gamma**2 - stationary) + stationary


SMALL = (1.0, 0.01, 6)  # σ1, σL, L: γ ≈ 2.5, far from converged after T steps
CIFAR10 = (50.0, 0.01, 232)  # the official CIFAR-10 table: γ ≈ 1.0376


@pytest.mark.parametrize("table, step_lr, n_steps_each, level", [
    (SMALL, 0.002, 5, 5),  # tiny steps (ε/σL² = 0.002): the start's γ² survives
    (SMALL, 0.05, 5, 5),
    (SMALL, 0.05, 5, 2),  # a middle level: α_i = ε·σi²/σL² gives the same ratio
    (SMALL, 0.6, 3, 5),  # large steps: the chain's own stationary variance 2/(2 − ε/σL²)
    (CIFAR10, "best", 5, 231),  # Technique 4's ε for T = 5 (≈ 6.18e-6)
    (CIFAR10, "preset", 5, 100),  # the official ε = 6.2e-6 at a middle level
])
def test_variance_ratio_matches_eq6(table, step_lr, n_steps_each, level):
    sigmas = noise.get_sigmas(*table)
    gamma = noise.geometric_ratio(*table)
    sigma_end = float(sigmas[-1])
    if step_lr == "best":
        step_lr = noise.best_step_lr(n_steps_each, gamma, sigma_end)
    elif step_lr == "preset":
        step_lr = presets.get("cifar10").sampling.step_lr
    else:
        step_lr *= sigma_end**2
    expected = noise.variance_ratio(step_lr, n_steps_each, gamma, sigma_end)
    assert expected == pytest.approx(paper_eq6(step_lr, n_steps_each, gamma, sigma_end))

    seeds, dim = np.arange(4), 50_000
    sigmas_t = tf.constant(sigmas)
    point_score = lambda x, labels: -x / tf.square(tf.gather(sigmas_t, labels))[:, None]  # noqa
    sampler = AnnealedLangevin(point_score, sigmas, (dim,), n_steps_each=n_steps_each,
                               step_lr=step_lr, clip=False, denoise=False)
    rng = np.random.default_rng(level)
    x0 = (sigmas[level - 1] * rng.standard_normal((len(seeds), dim))).astype(np.float32)
    x = sampler.run_levels(x0, seeds, level, level + 1)["samples"].numpy().astype(np.float64)
    measured = np.mean(x**2) / float(sigmas[level]) ** 2  # the mean is 0 exactly
    # Var of a mean of n squared Gaussians: 2·ratio²/n; allow 5 standard errors (≈ 1.6 %).
    assert abs(measured - expected) < 5 * expected * math.sqrt(2 / x.size), (measured, expected)

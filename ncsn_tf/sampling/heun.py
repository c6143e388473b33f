"""`heun`: Heun's second-order method on the probability-flow ODE (Karras et al., NeurIPS
2022), on a ρ-spaced σ schedule, with their stochastic churn (Algorithm 2)."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import tensorflow as tf

from ncsn_tf.sampling.continuous import ContinuousSampler, check_num_steps


def karras_sigmas(sigma_max: float, sigma_min: float, num_steps: int, rho: float = 7.0
                  ) -> np.ndarray:
    """σ_i = (σ_max^(1/ρ) + i/(N−1)·(σ_min^(1/ρ) − σ_max^(1/ρ)))^ρ, i = 0 … N−1: dense near
    σ_min, where the ODE's curvature is."""
    if num_steps == 1:
        return np.array([sigma_max], np.float32)
    ramp = np.linspace(0.0, 1.0, num_steps)
    inv = sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))
    return (inv ** rho).astype(np.float32)


class HeunODE(ContinuousSampler):
    """dx/dσ = −σ·s(x, σ) (the probability-flow ODE of the VE SDE) from σ_max to 0, with the
    denoiser D(x, σ) = x + σ²·s(x, σ) and Heun steps between consecutive σ of `karras_sigmas`
    (σ_N = 0):

        x_0 = u + σ_0·z,  u ~ U[0, 1]^D
        for i = 0..N−1:
            churn (optional): σ̂ = min(σ_i·(1 + γ), σ_0), γ = min(churn/N, √2 − 1);
                              x ← x + s_noise·√(σ̂² − σ_i²)·z
            d = (x − D(x, σ̂))/σ̂;  x' = x + (σ_(i+1) − σ̂)·d
            if σ_(i+1) > 0:  d' = (x' − D(x', σ_(i+1)))/σ_(i+1);  x' = x + (σ_(i+1) − σ̂)·(d + d')/2
            x ← x'

    σ̂ never exceeds σ_0 = σ_1 of the table: the network was never trained above it.
    `s_noise` scales the churn's noise (Karras' S_noise). Without churn this is the
    probability-flow ODE, deterministic, and it follows the network's errors without
    correcting them: on the digits quickstart models 39% of its images are noise at any N
    (12 to 100 steps give the same images). With churn at full noise (s_noise = 1) 1.4% still
    are; at the config's 0.8 none are, no more malformed digits than ALD's
    (bench/results/samplers_digits.md).
    heun never inpaints or interpolates: its noise is not the driver's per-level noise.
    NFE = 2N − 1.
    """

    name = "heun"
    stochastic = False

    @classmethod
    def stochastic_with(cls, settings) -> bool:
        return False

    def __init__(self, score_fn, sigma_max: float, sigma_min: float, shape: Sequence[int], *,
                 num_steps: int, rho: float = 7.0, churn: float = 0.0, s_noise: float = 1.0,
                 **options):
        num_steps = check_num_steps(num_steps)
        if not rho > 0 or churn < 0 or not s_noise >= 0:
            raise ValueError(f"heun needs rho > 0, churn >= 0 and s_noise >= 0, got rho={rho}, "
                             f"churn={churn}, s_noise={s_noise}")
        self.rho, self.churn, self.s_noise = float(rho), float(churn), float(s_noise)
        super().__init__(score_fn, karras_sigmas(sigma_max, sigma_min, num_steps, rho), shape,
                         **options)

    def nfe(self) -> int:
        return 2 * self.num_levels - 1

    def _update(self, x, level, substep, z):
        sigma = self._level_sigma(level)
        gamma = min(self.churn / self.num_levels, np.sqrt(2.0) - 1.0)
        sigma_hat = tf.minimum(sigma * (1.0 + gamma), self._level_sigma(0))
        if gamma > 0:
            x = x + self.s_noise * tf.sqrt(tf.square(sigma_hat) - tf.square(sigma)) * z
        next_sigma = self._next_sigma(level)
        grad = self._score(x, sigma_hat)
        slope = -sigma_hat * grad  # (x − D(x, σ̂))/σ̂
        euler = x + (next_sigma - sigma_hat) * slope

        def corrected():
            slope_next = -next_sigma * self._score(euler, next_sigma)
            return x + (next_sigma - sigma_hat) * 0.5 * (slope + slope_next)

        x = tf.cond(next_sigma > 0, corrected, lambda: euler)
        return x, grad, tf.abs(next_sigma - sigma_hat)

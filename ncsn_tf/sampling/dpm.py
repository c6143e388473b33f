"""`dpm`: a second-order multistep solver on the denoiser, in the spirit of DPM-Solver++(2M)
(Lu et al., 2022), with the noise of its SDE variant."""
from __future__ import annotations

from collections.abc import Sequence

import tensorflow as tf

from ncsn_tf.sampling.continuous import ContinuousSampler, check_num_steps
from ncsn_tf.sampling.heun import karras_sigmas


class DPMSolver(ContinuousSampler):
    """Steps in λ = −log σ between the ρ-spaced levels σ_0 > … > σ_(N−1) of `karras_sigmas`,
    on the denoiser D(x, σ) = x + σ²·s(x, σ), with h = log(σ_i/σ_(i+1)) and a = e^(−(1+η)h):

        x_0 = u + σ_0·z,  u ~ U[0, 1]^D
        for i = 0..N−2:
            D_i = D(x_i, σ_i);  D' = D_i + (D_i − D_(i−1))·h/(2·h_(i−1))   (D' = D_0 at i = 0)
            x_(i+1) = a·x_i + (1 − a)·D' + s_noise·σ_(i+1)·√(1 − e^(−2ηh))·z
        x = D(x_(N−1), σ_(N−1))   (the denoising step; without `denoise`, + σ_(N−1)·z)

    η = 0 is the probability-flow ODE (DPM-Solver++(2M) itself); η > 0 solves the reverse SDE
    family that keeps, for data at a point and the exact score, the noise of x at exactly
    σ_(i+1) for any step size (a^2·σ_i^2 + σ_(i+1)^2·(1 − e^(−2ηh)) = σ_(i+1)^2), so the
    injected noise corrects the score's errors instead of piling up. D' extrapolates D
    linearly in λ from the previous step (second order). `s_noise` < 1 injects less noise:
    lower temperature, higher precision and lower recall. NFE = N.
    """

    name = "dpm"
    uses_memory = True

    def __init__(self, score_fn, sigma_max: float, sigma_min: float, shape: Sequence[int], *,
                 num_steps: int, rho: float = 7.0, eta: float = 1.0, s_noise: float = 1.0,
                 **options):
        num_steps = check_num_steps(num_steps)
        if num_steps < 2:
            raise ValueError("dpm needs num_steps >= 2 (one step, then the denoising step)")
        if not rho > 0 or not eta >= 0 or not s_noise >= 0:
            raise ValueError(f"dpm needs rho > 0, eta >= 0 and s_noise >= 0, got rho={rho}, "
                             f"eta={eta}, s_noise={s_noise}")
        self.rho, self.eta, self.s_noise = float(rho), float(eta), float(s_noise)
        super().__init__(score_fn, karras_sigmas(sigma_max, sigma_min, num_steps, rho), shape,
                         **options)

    @classmethod
    def stochastic_with(cls, settings) -> bool:
        return settings.eta > 0  # the ODE draws no noise after the first step

    @property
    def stochastic(self) -> bool:
        return self.eta > 0

    def nfe(self) -> int:
        return self.num_levels

    def _step(self, x, level, substep, z, previous):
        sigmas = self._sigmas()
        sigma, next_sigma = sigmas[level], self._next_sigma(level)
        grad = self._score(x, sigma)
        denoised = x + tf.square(sigma) * grad

        def solver_step():
            h = tf.math.log(sigma / next_sigma)
            last_h = tf.math.log(sigmas[tf.maximum(level - 1, 0)] / sigma)
            slope = tf.where(level > 0, h / (2.0 * tf.maximum(last_h, 1e-12)), 0.0)
            extrapolated = denoised + slope * (denoised - previous)
            keep = tf.exp(-(1.0 + self.eta) * h)
            noise_scale = self.s_noise * next_sigma * tf.sqrt(-tf.math.expm1(-2.0 * self.eta * h))
            return keep * x + (1.0 - keep) * extrapolated + noise_scale * z

        def last_step():
            return denoised if self.denoise else denoised + sigma * z

        x = tf.cond(next_sigma > 0, solver_step, last_step)
        return x, grad, sigma - next_sigma, denoised

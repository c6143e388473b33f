"""`pc`: the predictor–corrector sampler of the variance-exploding SDE (Song et al., ICLR 2021)."""
from __future__ import annotations

from collections.abc import Sequence

import tensorflow as tf

from ncsn_tf import noise
from ncsn_tf.sampling.continuous import ContinuousSampler, check_num_steps
from ncsn_tf.sampling.driver import norms


class PredictorCorrector(ContinuousSampler):
    """On a geometric schedule of `num_steps` levels σ_1 > … > σ_N, at each level first
    `corrector_steps` Langevin steps with the signal-to-noise step rule, then one ancestral
    predictor step down to the next level (σ_(N+1) = 0):

        x_0 = u + σ_1·z,  u ~ U[0, 1]^D
        for i = 1..N:
            M times:  g = s(x, σ_i);  z ~ N(0, I);  ε = 2·(r·‖z‖/‖g‖)²;  x ← x + ε·g + √(2ε)·z
            x ← x + (σ_i² − σ_(i+1)²)·s(x, σ_i) + (σ_(i+1)/σ_i)·√(σ_i² − σ_(i+1)²)·z

    r = `snr` (0.16, the VE setting of score_sde), norms per image (an image never depends
    on its batch). The predictor is score_sde's ancestral one: for data at a point and the
    exact score it leaves x with noise of exactly σ_(i+1), however far apart the levels. The
    reverse-diffusion (Euler–Maruyama) predictor adds √(σ_i² − σ_(i+1)²)·z instead, which
    is right only for close levels: at a ratio σ_i/σ_(i+1) = 1.85 (12 levels) it leaves 1.65
    σ_(i+1), and the next levels cannot remove it (noisy or pure-noise images). The last
    predictor step goes to σ = 0: it is the denoising step; with `denoise=False` it adds
    σ_N·z back, as score_sde does. NFE = N·(M + 1).
    """

    name = "pc"

    def __init__(self, score_fn, sigma_max: float, sigma_min: float, shape: Sequence[int], *,
                 num_steps: int, corrector_steps: int = 1, snr: float = 0.16, **options):
        num_steps = check_num_steps(num_steps)
        if corrector_steps < 0:
            raise ValueError(f"corrector_steps must be >= 0, got {corrector_steps}")
        if not snr > 0:
            raise ValueError(f"snr must be > 0, got {snr}")
        self.corrector_steps, self.snr = int(corrector_steps), float(snr)
        schedule = (noise.get_sigmas(sigma_max, sigma_min, num_steps) if num_steps > 1
                    else [sigma_max])
        super().__init__(score_fn, schedule, shape, **options)

    def nfe(self) -> int:
        return self.num_levels * (self.corrector_steps + 1)

    def _steps_per_level(self):
        return self.corrector_steps + 1

    def _update(self, x, level, substep, z):
        sigma = self._level_sigma(level)
        grad = self._score(x, sigma)

        def corrector():
            eps = 2.0 * tf.square(self.snr * norms(z) / tf.maximum(norms(grad), 1e-12))
            eps = tf.reshape(eps, [-1] + [1] * len(self.shape))
            return x + eps * grad + tf.sqrt(2.0 * eps) * z, tf.reduce_mean(eps)

        def predictor():
            next_sigma = self._next_sigma(level)
            drop = tf.square(sigma) - tf.square(next_sigma)
            noise_scale = next_sigma / sigma * tf.sqrt(drop)
            if not self.denoise:
                noise_scale = tf.where(next_sigma > 0, noise_scale, sigma)
            return x + drop * grad + noise_scale * z, drop

        x, step_size = tf.cond(substep < self.corrector_steps, corrector, predictor)
        return x, grad, step_size

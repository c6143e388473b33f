"""`cas`: Consistent Annealed Sampling (Jolicoeur-Martineau et al., ICLR 2021)."""
from __future__ import annotations

from collections.abc import Sequence

import tensorflow as tf

from ncsn_tf import noise
from ncsn_tf.sampling.continuous import ContinuousSampler, check_num_steps


class ConsistentAnnealed(ContinuousSampler):
    """One step per level on a geometric schedule of `num_steps` levels σ_1 > … > σ_N
    (ratio γ), keeping the noise of x at exactly σ_i (for data concentrated at points):

        x_0 = u + σ_1·z,  u ~ U[0, 1]^D
        for i = 1..N:  z ~ N(0, I);  x ← x + η·σ_i²·s(x, σ_i) + β·σ_(i+1)·z,  σ_(N+1) = 0

    with η = ε/σ_N² (ε = step_lr, as ALD's step size at the last level) and
    β = √(1 − ((1 − η)·γ)²), which needs η ≥ 1 − 1/γ. ALD instead adds √(2α)·z, so the noise
    of x drifts away from σ_i when T is small. Same NFE as ALD with num_steps = L·T
    (+1 with the final denoising step x + σ_N²·s(x, σ_N)).
    """

    name = "cas"

    def __init__(self, score_fn, sigma_max: float, sigma_min: float, shape: Sequence[int], *,
                 num_steps: int, step_lr: float, **options):
        num_steps = check_num_steps(num_steps)
        if num_steps < 2:
            raise ValueError("cas needs num_steps >= 2 (a geometric schedule)")
        schedule = noise.get_sigmas(sigma_max, sigma_min, num_steps)
        self.gamma = float(noise.geometric_ratio(sigma_max, sigma_min, num_steps))
        self.eta = eta = step_lr / float(schedule[-1]) ** 2
        if not 1.0 - 1.0 / self.gamma <= eta < 1.0:
            raise ValueError(
                f"cas needs step_lr/sigma_min^2 in [1 - 1/gamma, 1) = [{1 - 1 / self.gamma:.4g}, "
                f"1) for gamma = {self.gamma:.5g} ({num_steps} levels); got "
                f"{eta:.4g}: raise --step_lr or --num_steps")
        super().__init__(score_fn, schedule, shape, **options)

    def nfe(self) -> int:
        return self.num_levels + int(self.denoise)

    def _update(self, x, level, substep, z):
        sigma = self._level_sigma(level)
        beta = max(1.0 - ((1.0 - self.eta) * self.gamma) ** 2, 0.0) ** 0.5
        step_size = self.eta * tf.square(sigma)
        grad = self._score(x, sigma)
        return x + step_size * grad + beta * self._next_sigma(level) * z, grad, step_size

    def _final(self, x):
        sigma = self._sigmas()[-1]
        return x + tf.square(sigma) * self._score(x, sigma)



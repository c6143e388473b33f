"""`ald`: annealed Langevin dynamics, Algorithm 1 of NCSNv2 (the official sampler)."""
from __future__ import annotations

import tensorflow as tf

from ncsn_tf.sampling import philox
from ncsn_tf.sampling.driver import INIT, Sampler, checked, per_seed


class AnnealedLangevin(Sampler):
    """T = n_steps_each Langevin steps at each of the L levels of the σ table, step size
    α_i = ε·σ_i²/σ_L² (ε = step_lr):

        x_0 ~ U[0, 1]^D;  for i = 1..L, T times:  z ~ N(0, I);  x ← x + α_i·s(x, σ_i) + √(2α_i)·z

    then, with `denoise`, x ← x + σ_L²·s(x, σ_L). `score_fn(x, labels)` takes int32 level
    indices into `sigmas` (for a network: `lambda x, labels: net(x, labels, training=False)`).
    NFE = L·T (+1 with denoise).
    """

    name = "ald"
    call_settings = {"n_steps_each": tf.int32, "step_lr": tf.float32}

    def __init__(self, score_fn, sigmas, shape, *, n_steps_each: int, step_lr: float,
                 **options):
        if n_steps_each < 1:
            raise ValueError(f"n_steps_each must be >= 1, got {n_steps_each}")
        if not step_lr > 0:
            raise ValueError(f"step_lr must be > 0, got {step_lr}")
        self.n_steps_each, self.step_lr = n_steps_each, step_lr
        super().__init__(score_fn, sigmas, shape, **options)

    @classmethod
    def from_config(cls, score_fn, sigmas, config, **options) -> "AnnealedLangevin":
        """A sampler with the settings of `config.sampling` and the shape of `config.data`.

        `config.sampling.data_init` is the caller's to apply: pass the data to `sample`.
        """
        shape = (config.data.image_size, config.data.image_size, config.data.channels)
        settings = dict(n_steps_each=config.sampling.n_steps_each,
                        step_lr=config.sampling.step_lr, denoise=config.sampling.denoise)
        return cls(score_fn, sigmas, shape, **{**settings, **options})

    def nfe(self) -> int:
        return self.num_levels * self.n_steps_each + int(self.denoise)

    def _prior(self, seeds):
        return per_seed(philox.uniform, seeds, INIT, self.shape)

    def _steps_per_level(self, n_steps_each, step_lr):
        return n_steps_each

    def _check_settings(self, n_steps_each, step_lr) -> dict:
        return dict(
            n_steps_each=checked(n_steps_each, tf.debugging.assert_greater_equal(
                n_steps_each, 1, message="n_steps_each must be >= 1")),
            step_lr=checked(step_lr, tf.debugging.assert_greater(
                step_lr, 0.0, message="step_lr must be > 0")))

    def _update(self, x, level, substep, z, n_steps_each, step_lr):
        sigmas = self._sigmas()
        step_size = step_lr * tf.square(sigmas[level] / sigmas[-1])
        grad = tf.cast(self.score_fn(x, tf.fill(tf.shape(x)[:1], level)), x.dtype)
        return x + step_size * grad + tf.sqrt(2.0 * step_size) * z, grad, step_size

    def _final(self, x):
        last = tf.fill(tf.shape(x)[:1], self.num_levels - 1)
        return x + tf.square(self._sigmas()[-1]) * tf.cast(self.score_fn(x, last), x.dtype)
